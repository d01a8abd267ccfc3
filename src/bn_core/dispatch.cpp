// CPU feature detection (cpuid + xgetbv: the OS must also save the wide
// registers) and the ISA -> kernel table mapping.
#include "dispatch.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#define BN_CORE_X86 1
#include <cpuid.h>
#endif

namespace bn_core {

#if BN_CORE_X86
namespace {

struct x86_features {
  bool avx2 = false;
  bool avx512 = false;
};

uint64_t read_xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

x86_features detect() {
  x86_features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM0-15 upper, ZMM16-31
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}

const x86_features &features() {
  static const x86_features f = detect();
  return f;
}

}  // namespace
#endif

bool isa_supported(bn_isa isa) {
  switch (isa) {
    case BN_ISA_SCALAR: return true;
#if BN_CORE_X86
    case BN_ISA_AVX2: return features().avx2;
    case BN_ISA_AVX512: return features().avx512;
#endif
    default: return false;
  }
}

bn_isa best_isa() {
  if (isa_supported(BN_ISA_AVX512)) return BN_ISA_AVX512;
  if (isa_supported(BN_ISA_AVX2)) return BN_ISA_AVX2;
  return BN_ISA_SCALAR;
}

const kernel_table &kernels_for(bn_isa isa) {
  switch (isa) {
#if BN_CORE_X86
    case BN_ISA_AVX2: return avx2::table;
    case BN_ISA_AVX512: return avx512::table;
#endif
    default: return scalar::table;
  }
}

}  // namespace bn_core
