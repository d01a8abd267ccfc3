// The backward_apply kernels for the "scalar" target (flags from the file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_BACKWARD_APPLY
#include "kernels/entry.hpp"
