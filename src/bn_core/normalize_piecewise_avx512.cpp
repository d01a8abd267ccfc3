// The normalize kernels with a piecewise-linear epilogue for the "avx512" target (flags from the file suffix).
#include "kernels/target_avx512.hpp"
#define BN_KERNEL_NORMALIZE_PIECEWISE
#include "kernels/entry.hpp"
