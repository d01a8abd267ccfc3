// One ISA's kernel_table: the dispatcher's handle on that ISA's entries.
// Included once per ISA (kernels_<isa>.cpp), after kernels/target_<isa>.hpp.
#include "entries.hpp"

namespace bn_core {
namespace BN_ISA_NS {

extern const kernel_table table;
const kernel_table table = {BN_ISA_NAME,           moments_entry,           finish_moments_entry,
                            normalize_entry,       backward_sums_entry,     backward_apply_entry,
                            normalize_epilogue_entry, normalize_piecewise_entry};

}  // namespace BN_ISA_NS
}  // namespace bn_core
