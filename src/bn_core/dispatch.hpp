// Runtime choice of the kernel table (one per ISA): detection, the process-wide
// choice (bn_set_isa, else the best this CPU runs) and the ISA entry points.
#ifndef BN_CORE_DISPATCH_HPP
#define BN_CORE_DISPATCH_HPP

#include "plan.hpp"

namespace bn_core {

bool isa_supported(bn_isa isa);
bn_isa best_isa();
const kernel_table &kernels_for(bn_isa isa);
const kernel_table &active_kernels();  // the chosen ISA's table

}  // namespace bn_core

#endif
