// The normalize kernels with an epilogue for the "scalar" target (flags from the file suffix).
#include "kernels/target_scalar.hpp"
#define BN_KERNEL_NORMALIZE_EPILOGUE
#include "kernels/entry.hpp"
