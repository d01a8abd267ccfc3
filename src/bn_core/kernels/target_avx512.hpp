// Names the "avx512" target for the kernel source; the including file ends in _avx512.cpp,
// which selects its compiler flags (CMakeLists.txt, the R package's Makevars).
#define BN_ISA_NS avx512
#define BN_ISA_NAME "avx512"
#define BN_VEC_BYTES 64  // the target's native vector width
