// The "scalar" kernel table (flags from the file suffix; the entries are in
// <operation>_scalar.cpp).
#include "kernels/target_scalar.hpp"
#include "kernels/entries.hpp"

namespace bn_core {
namespace BN_ISA_NS {

extern const kernel_table table;
const kernel_table table = {BN_ISA_NAME, moments_entry, normalize_entry, backward_sums_entry,
                            backward_apply_entry};

}  // namespace BN_ISA_NS
}  // namespace bn_core
