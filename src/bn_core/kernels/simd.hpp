// SIMD primitives and element types: vectors as wide as the target's registers,
// (streaming) stores, and per storage type (float32/64, float16, bfloat16) its loads
// and conversions to the compute (accumulator) type.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- element types: storage <-> compute (accumulator) type -------------------

// Vectors of the accumulator type as wide as the target's registers (wider
// generic vectors are lowered through the stack).
constexpr int64_t kVecBytes = BN_VEC_BYTES;
using f32_vec = float __attribute__((vector_size(kVecBytes)));
using f64_vec = double __attribute__((vector_size(kVecBytes)));
using u16_half_vec = uint16_t __attribute__((vector_size(kVecBytes / 2)));
using u32_vec = uint32_t __attribute__((vector_size(kVecBytes)));

// Stores the vector v at p; with Stream, non-temporal (p must be aligned to
// sizeof v), where the target has such a store for that width.
template <bool Stream, class V>
inline void put(char *p, V v) {
#if defined(__AVX512F__)
  if constexpr (Stream && sizeof(V) == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i *>(p), reinterpret_cast<__m512i &>(v));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (Stream && sizeof(V) == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i *>(p), reinterpret_cast<__m256i &>(v));
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (Stream && sizeof(V) == 16) {
    _mm_stream_si128(reinterpret_cast<__m128i *>(p), reinterpret_cast<__m128i &>(v));
    return;
  }
#endif
  std::memcpy(p, &v, sizeof v);
}

// Orders this thread's non-temporal stores before whatever follows.
inline void end_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// float and double: loaded, accumulated and stored as themselves.
template <class T, class Vec>
struct native_elem {
  using acc = T;
  using vec = Vec;
  static constexpr int64_t size = sizeof(T), lanes = kVecBytes / sizeof(T);
  static acc load(const char *p) { T v; std::memcpy(&v, p, sizeof v); return v; }
  static vec load_vec(const char *p) {
#if defined(__AVX512F__)
    // In two 256-bit halves: on a Zen 5 EPYC, the walks' 512-bit loads among
    // stores to nearby lines made channels-last sweeps up to 1.8x as long as the
    // halves do (bench/DESIGN.md); the halves cost one shuffle per vector.
    if constexpr (sizeof(vec) == 64) {
      // The masked insert with every lane taken: the plain one passes GCC 12's
      // self-initialized undefined vector as the unused source, which warns
      // wherever it is inlined. The same instruction either way.
      const __m512d low = _mm512_castpd256_pd512(_mm256_loadu_pd(reinterpret_cast<const double *>(p)));
      const __m512d w = _mm512_mask_insertf64x4(low, static_cast<__mmask8>(0xFF), low,
                                                _mm256_loadu_pd(reinterpret_cast<const double *>(p + 32)), 1);
      vec v; std::memcpy(&v, &w, sizeof v); return v;
    }
#endif
    return load_whole_vec(p);
  }
  // One load of the whole vector (see the free load_whole_vec below).
  static vec load_whole_vec(const char *p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(char *p, acc v) { std::memcpy(p, &v, sizeof v); }
  template <bool Stream = false> static void store_vec(char *p, vec v) { put<Stream>(p, v); }
};
using f32_elem = native_elem<float, f32_vec>;
using f64_elem = native_elem<double, f64_vec>;

// A vector of float or double in one load, for a walk that loads and stores one
// vector at a time along one run (a channels-first plane): there the halves'
// shuffle cost in-cache planes up to 10% and gained nothing from memory
// (bench/DESIGN.md). Other element types convert and load as load_vec does.
template <class E>
typename E::vec load_whole_vec(const char *p) {
  if constexpr (std::is_same_v<E, f32_elem> || std::is_same_v<E, f64_elem>) return E::load_whole_vec(p);
  else return E::load_vec(p);
}

struct f16_elem {
  using acc = float;
  using vec = f32_vec;
  using half_vec = _Float16 __attribute__((vector_size(kVecBytes / 2)));
  static constexpr int64_t size = 2, lanes = kVecBytes / 4;
  static acc load(const char *p) { _Float16 h; std::memcpy(&h, p, 2); return static_cast<float>(h); }
  static vec load_vec(const char *p) {
    half_vec h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vec);
  }
  // The conversion rounds to nearest even.
  static void store(char *p, acc v) { _Float16 h = static_cast<_Float16>(v); std::memcpy(p, &h, 2); }
  template <bool Stream = false> static void store_vec(char *p, vec v) {
    put<Stream>(p, __builtin_convertvector(v, half_vec));
  }
};

struct bf16_elem {
  using acc = float;
  using vec = f32_vec;
  static constexpr int64_t size = 2, lanes = kVecBytes / 4;
  static acc load(const char *p) {
    uint16_t b; std::memcpy(&b, p, 2);
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float v; std::memcpy(&v, &u, 4); return v;
  }
  static vec load_vec(const char *p) {
    u16_half_vec b; std::memcpy(&b, p, sizeof b);
    const u32_vec u = __builtin_convertvector(b, u32_vec) << 16;
    vec v; std::memcpy(&v, &u, sizeof v); return v;
  }
  static void store(char *p, acc v) {
    uint32_t u; std::memcpy(&u, &v, 4);
    // Round to nearest even; NaN stays a (quiet) NaN instead of rounding to Inf.
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint16_t b = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
    std::memcpy(p, &b, 2);
  }
  template <bool Stream = false> static void store_vec(char *p, vec v) {  // store(), lane by lane
    u32_vec u;
    std::memcpy(&u, &v, sizeof u);
    const u32_vec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32_vec bits = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;
    put<Stream>(p, __builtin_convertvector(bits, u16_half_vec));
  }
};

template <class I> inline I min_of(I a, I b) { return a < b ? a : b; }

// A vector of compute-type values (parameters, partial sums, shifts) from their
// array (the element types' load_vec reads and converts stored elements).
template <class E>
inline typename E::vec load_acc(const typename E::acc *p) {
  typename E::vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Prefetches `bytes` from each of `rows` rows, `step` apart from `first`, one
// line at a time (Write: for a store). Tiles that walk down rows fetch the next
// block this way: the hardware prefetchers do not follow such walks.
// Unrolled (-O2 would leave a loop of a few known trips, the epilogue walks'
// optimization level) for the tiles' compile-time row counts and widths.
template <int Write>
inline void prefetch_rows(const char *first, int64_t step, int64_t rows, int64_t bytes) {
#pragma GCC unroll 4
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(first + r * step + at, Write, 2);
}

// Rows longer than this many bytes, read from the L3, are left to the hardware
// prefetchers even by tiles that walk down rows: the tiles cross each row in
// order, and a run this long within a page is a stream they lock on to; the
// software prefetches on top only took load slots and L1 room (on a Zen 3,
// rows of 1000 to 4096 floats ran up to 1.7x faster without them, rows of 512
// and fewer up to 1.5x slower; bench/DESIGN.md). From memory the software lead
// is kept.
constexpr int64_t kHardwarePrefetchRowBytes = 2048;

// Whether a tile walking down rows of row_bytes from x_from prefetches the next
// block of rows itself (rows in L2 need no prefetch).
inline bool prefetch_next_rows(x_source x_from, int64_t row_bytes) {
  return x_from == x_source::memory || (x_from == x_source::l3 && row_bytes <= kHardwarePrefetchRowBytes);
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
