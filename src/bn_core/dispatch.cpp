// CPU feature detection (cpuid + xgetbv: the OS must also save the wide
// registers), the ISA -> kernel table mapping, and the process-wide choice.
#include "dispatch.hpp"

#include <atomic>
#include <cstring>
#include <string>

#include "validate.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#define BN_CORE_X86 1
#include <cpuid.h>
#endif

namespace bn_core {
namespace {

std::atomic<int32_t> isa_choice{-1};  // -1: not chosen yet

}  // namespace

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

const kernel_table &active_kernels() {
  int32_t isa = isa_choice.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    isa_choice.store(isa, std::memory_order_relaxed);
  }
  return kernels_for(static_cast<bn_isa>(isa));
}

}  // namespace bn_core

using namespace bn_core;

extern "C" {

bn_isa bn_get_isa(void) {
  (void)active_kernels();
  return static_cast<bn_isa>(isa_choice.load(std::memory_order_relaxed));
}

bn_isa bn_best_isa(void) { return best_isa(); }

const char *bn_isa_name(bn_isa isa) {
  switch (enum_value(isa)) {
    case BN_ISA_SCALAR: return "scalar";
    case BN_ISA_AVX2: return "avx2";
    case BN_ISA_AVX512: return "avx512";
  }
  return "unknown";
}

bn_status bn_set_isa(bn_isa isa) {
  const int32_t value = enum_value(isa);
  if (value != BN_ISA_SCALAR && value != BN_ISA_AVX2 && value != BN_ISA_AVX512)
    return fail(BN_ERR_VALUE, "unknown SIMD level " + std::to_string(value));
  if (!isa_supported(isa)) {
    std::string have;
    for (bn_isa i : {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512})
      if (isa_supported(i)) have += std::string(have.empty() ? "" : ", ") + bn_isa_name(i);
    return fail(BN_ERR_UNSUPPORTED, std::string("this CPU lacks SIMD level ") + bn_isa_name(isa) +
                                        " (available: " + have + ")");
  }
  isa_choice.store(isa, std::memory_order_relaxed);
  return BN_OK;
}

bn_status bn_set_isa_by_name(const char *name) {
  if (!name || !*name) return bn_set_isa(best_isa());
  for (bn_isa i : {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512})
    if (std::strcmp(name, bn_isa_name(i)) == 0) return bn_set_isa(i);
  return fail(BN_ERR_VALUE, std::string("unknown SIMD level '") + name + "'; expected scalar, avx2 or avx512");
}

}  // extern "C"
