// The normalize kernels for the "scalar" target (flags from the file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_NORMALIZE
#include "kernels/entry.hpp"
