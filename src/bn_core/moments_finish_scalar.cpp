// The merge of the team's moments partials for the "scalar" target (flags from the
// file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_MOMENTS_FINISH
#include "kernels/entry.hpp"
