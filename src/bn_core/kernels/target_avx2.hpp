// Names the "avx2" target for the kernel source; the including file ends in _avx2.cpp,
// which selects its compiler flags (CMakeLists.txt, the R package's Makevars).
#define BN_ISA_NS avx2
#define BN_ISA_NAME "avx2"
#define BN_VEC_BYTES 32  // the target's native vector width
