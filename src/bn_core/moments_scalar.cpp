// The moments kernels for the "scalar" target (flags from the file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_MOMENTS
#include "kernels/entry.hpp"
