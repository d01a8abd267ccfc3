// Names the "scalar" target for the kernel source; the including file ends in _scalar.cpp,
// which selects its compiler flags (CMakeLists.txt, the R package's Makevars).
#define BN_ISA_NS scalar
#define BN_ISA_NAME "scalar"
#define BN_VEC_BYTES 16  // the target's native vector width
// GCC before 13 has no _Float16 in C++ on aarch64; its __fp16 is the same IEEE
// binary16 storage type there (converted to and from float with rounding to nearest).
#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#define _Float16 __fp16
#endif
