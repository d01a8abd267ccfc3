// The kernels compiled for the "avx512" target (flags set per file in CMakeLists.txt).
#define BN_ISA_NS avx512
#define BN_ISA_NAME "avx512"
#define BN_VEC_BYTES 64  // the target's native vector width
#include "kernels_impl.hpp"
