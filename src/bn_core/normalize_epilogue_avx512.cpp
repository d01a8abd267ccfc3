// The normalize kernels with an epilogue for the "avx512" target (flags from the file suffix).
#include "kernels/target_avx512.hpp"
#define BN_KERNEL_NORMALIZE_EPILOGUE
#include "kernels/entry.hpp"
