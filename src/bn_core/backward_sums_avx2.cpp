// The backward_sums kernels for the "avx2" target (flags from the file suffix).
#include "kernels/target_avx2.hpp"
#define BN_KERNEL_BACKWARD_SUMS
#include "kernels/entry.hpp"
