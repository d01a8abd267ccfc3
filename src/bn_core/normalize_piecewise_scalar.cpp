// The normalize kernels with a piecewise-linear epilogue for the "scalar" target (flags from the file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_NORMALIZE_PIECEWISE
#include "kernels/entry.hpp"
