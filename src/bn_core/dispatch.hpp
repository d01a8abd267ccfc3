// Runtime choice of the kernel table (one per ISA).
#ifndef BN_CORE_DISPATCH_HPP
#define BN_CORE_DISPATCH_HPP

#include "plan.hpp"

namespace bn_core {

bool isa_supported(bn_isa isa);
bn_isa best_isa();
const kernel_table &kernels_for(bn_isa isa);

}  // namespace bn_core

#endif
