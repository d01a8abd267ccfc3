// The entries of one ISA's kernel_table, each operation's defined in its own
// translation unit (<operation>_<isa>.cpp) so that the build compiles them in
// parallel.
// Include after kernels/target_<isa>.hpp.
#include "../plan.hpp"

namespace bn_core {
namespace BN_ISA_NS {

void moments_entry(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s);
bool finish_moments_entry(const moments_scratch &slot0, int64_t slot_stride, int32_t team, int64_t channels,
                          double *mean, double *variance, double *count);
void normalize_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);
void normalize_epilogue_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);
void normalize_piecewise_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);
void backward_sums_entry(const plan &p, int64_t item_begin, int64_t item_end,
                         const backward_params &b, const backward_scratch &s);
void backward_apply_entry(const plan &p, int64_t item_begin, int64_t item_end,
                          const backward_params &b);

}  // namespace BN_ISA_NS
}  // namespace bn_core
