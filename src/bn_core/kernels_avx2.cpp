// The kernels compiled for the "avx2" target (flags set per file in CMakeLists.txt).
#define BN_ISA_NS avx2
#define BN_ISA_NAME "avx2"
#define BN_VEC_BYTES 32  // the target's native vector width
#include "kernels_impl.hpp"
