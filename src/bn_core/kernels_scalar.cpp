// The kernels compiled for the "scalar" target (flags set per file in CMakeLists.txt).
#define BN_ISA_NS scalar
#define BN_ISA_NAME "scalar"
#include "kernels_impl.hpp"
