// The normalize kernels with a piecewise-linear epilogue for the "avx2" target (flags from the file suffix).
#include "kernels/target_avx2.hpp"
#define BN_KERNEL_NORMALIZE_PIECEWISE
#include "kernels/entry.hpp"
