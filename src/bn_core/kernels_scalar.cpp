// The kernels compiled for the "scalar" target (flags set per file in CMakeLists.txt).
#define BN_ISA_NS scalar
#define BN_ISA_NAME "scalar"
#define BN_VEC_BYTES 16  // the target's native vector width
#include "kernels_impl.hpp"
