// The moments kernels for the "avx512" target (flags from the file suffix).
#include "kernels/target_avx512.hpp"
#define BN_KERNEL_MOMENTS
#include "kernels/entry.hpp"
