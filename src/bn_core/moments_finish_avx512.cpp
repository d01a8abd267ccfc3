// The merge of the team's moments partials for the "avx512" target (flags from the
// file suffix).
#include "kernels/target_avx512.hpp"
#define BN_KERNEL_MOMENTS_FINISH
#include "kernels/entry.hpp"
