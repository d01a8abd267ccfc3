// The kernel source. Compiled once per ISA: kernels_<isa>.cpp defines
// BN_ISA_NS and is built with that ISA's target flags. Everything here lives
// in bn_core::BN_ISA_NS::(anonymous), so no symbol compiled with AVX flags can
// be shared with (and picked by the linker for) another ISA's code.
//
// Moments: per channel, short blocks of shifted sums Σ(x−K), Σ(x−K)² in the
// accumulator type, with K the channel's running mean (two-pass mean of its
// first block), folded into float64 (count, mean, M2) with Chan's merge. Plain
// sum speed, two-pass accuracy (spec R4.2).
#if !defined(BN_ISA_NS) || !defined(BN_VEC_BYTES)
#error "define BN_ISA_NS and BN_VEC_BYTES before including kernels_impl.hpp"
#endif

#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "plan.hpp"

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

struct f32_elem {
  using acc = float;
  using vec = f32_vec;
  static constexpr int64_t size = 4, lanes = kVecBytes / 4;
  static acc load(const char *p) { float v; std::memcpy(&v, p, 4); return v; }
  static vec load_vec(const char *p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(char *p, acc v) { std::memcpy(p, &v, 4); }
  template <bool Stream = false> static void store_vec(char *p, vec v) { put<Stream>(p, v); }
};

struct f64_elem {
  using acc = double;
  using vec = f64_vec;
  static constexpr int64_t size = 8, lanes = kVecBytes / 8;
  static acc load(const char *p) { double v; std::memcpy(&v, p, 8); return v; }
  static vec load_vec(const char *p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(char *p, acc v) { std::memcpy(p, &v, 8); }
  template <bool Stream = false> static void store_vec(char *p, vec v) { put<Stream>(p, v); }
};

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
template <int Write>
inline void prefetch_rows(const char *first, int64_t step, int64_t rows, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(first + r * step + at, Write, 2);
}

// ---- tiles of channels ------------------------------------------------------------

// Rows x C kernels walk channels in tiles of K whole vectors whose per-channel
// values (parameters or partial sums) stay in registers while the tile walks
// down rows. K is a compile-time width, handed to the tile as a tag.
template <int K> struct vectors { static constexpr int count = K; };

template <int K, int64_t W, class F>
void part_tile(int64_t n_vectors, int64_t j, F &tile) {
  if constexpr (K > 0) {
    if (n_vectors == K) tile(vectors<K>{}, j);
    else part_tile<K - 1, W>(n_vectors, j, tile);
  }
}

// Calls tile(vectors<K>{}, j) over channels [0, len) in tiles of Max vectors of
// W lanes, the last one shorter; returns where the whole vectors end (the
// caller's scalar tail starts there).
template <int Max, int64_t W, class F>
int64_t for_each_tile(int64_t len, F &&tile) {
  int64_t j = 0;
  for (; j + Max * W <= len; j += Max * W) tile(vectors<Max>{}, j);
  part_tile<Max - 1, W>((len - j) / W, j, tile);
  return len / W * W;
}

// The normalization of one value or vector: (x − mean_hi)·scale + bias (see
// affine_params), for scalars and vectors alike.
template <class V, class P>
inline V normalized(V x, P mean_hi, P scale, P bias) {
  return (x - mean_hi) * scale + bias;
}

// ---- walking the lines of a plan -----------------------------------------------

// Byte offsets of a line's first element in x, y, the mask and dy, and its
// channel index.
struct line_offsets {
  int64_t x_off, y_off, m_off, p_off, d_off;

  void advance(const loop_dim &dim, int64_t k) {
    x_off += k * dim.x_stride; y_off += k * dim.y_stride; m_off += k * dim.m_stride;
    p_off += k * dim.p_stride; d_off += k * dim.d_stride;
  }
};

// Odometer over the outer dims.
struct line_cursor : line_offsets {
  int64_t idx[BN_MAX_RANK];

  line_cursor(const plan &p, int64_t line) : line_offsets{0, 0, 0, p.p_base, 0} {
    for (int32_t d = p.n_outer - 1; d >= 0; --d) {
      const loop_dim &dim = p.outer[d];
      idx[d] = line % dim.n;
      line /= dim.n;
      advance(dim, idx[d]);
    }
  }

  // Moves count >= 1 lines ahead; count must not pass the end of the innermost
  // outer dim (only the last step may carry).
  void skip(const plan &p, int64_t count) {
    const int32_t d = p.n_outer - 1;
    idx[d] += count - 1;
    advance(p.outer[d], count - 1);
    next(p);
  }

  void next(const plan &p) {
    for (int32_t d = p.n_outer - 1; d >= 0; --d) {
      const loop_dim &dim = p.outer[d];
      advance(dim, 1);
      if (++idx[d] < dim.n) return;
      idx[d] = 0;
      advance(dim, -dim.n);
    }
  }
};

// A work item is one segment of one line: [begin, begin + len) of the inner run.
struct segment { int64_t begin, len; };

// Calls f(first, segment, n_lines) for the items [item_begin, item_end) in
// memory order: n_lines whole lines (segment = all of each), the first at
// `first`, each one step of the innermost outer dim (run_step(p)) after the
// last — or one segment of one line (n_lines = 1) when lines are cut.
// Stepping the odometer per line cost more than a short line's work (a
// 64-channel row), and handing kernels whole runs lets them keep per-channel
// values in registers across rows.
template <class F>
void for_each_run(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  if (item_begin >= item_end) return;
  const int64_t n = p.inner.n, segments = p.segments;
  if (segments == 1) {
    line_cursor cur(p, item_begin);
    if (p.n_outer == 0) {
      f(static_cast<const line_offsets &>(cur), segment{0, n}, int64_t{1});
      return;
    }
    const loop_dim &rows = p.outer[p.n_outer - 1];
    for (int64_t line = item_begin; line < item_end;) {
      const int64_t run = min_of(rows.n - cur.idx[p.n_outer - 1], item_end - line);
      f(static_cast<const line_offsets &>(cur), segment{0, n}, run);
      cur.skip(p, run);
      line += run;
    }
    return;
  }
  // Folded runs are cut at super-row boundaries so element i stays channel i % period.
  const int64_t align = p.period ? p.fold_len : 1;
  const int64_t seg_len = ((n + segments - 1) / segments + align - 1) / align * align;
  line_cursor cur(p, item_begin / segments);
  int64_t seg = item_begin % segments;
  for (int64_t k = item_begin; k < item_end; ++k) {
    const int64_t begin = min_of(seg * seg_len, n);
    const int64_t len = min_of(seg_len, n - begin);
    if (len) f(static_cast<const line_offsets &>(cur), segment{begin, len}, int64_t{1});
    if (++seg == segments) {
      seg = 0;
      cur.next(p);
    }
  }
}

// The step between the lines of a run.
inline const loop_dim &run_step(const plan &p) { return p.outer[p.n_outer - 1]; }

// Calls f(first, segment, n_rows, step) for the runs of rows x C lines of
// [item_begin, item_end) whose rows share their channels; step is the row step
// (all zero for a lone row). Rows of a ghost-batch view have their own channels
// (the row step moves the parameters) and are handed over one per run.
template <class F>
void for_each_rows_run(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  for_each_run(p, item_begin, item_end, [&](const line_offsets &first, segment seg, int64_t n_lines) {
    const loop_dim step = n_lines > 1 ? run_step(p) : loop_dim{};  // a lone line never steps
    if (step.p_stride == 0) {
      f(first, seg, n_lines, step);
      return;
    }
    line_offsets at = first;
    for (int64_t r = 0; r < n_lines; ++r, at.advance(step, 1))
      f(static_cast<const line_offsets &>(at), seg, int64_t{1}, loop_dim{});
  });
}

// for_each_rows_run, or for a folded plan each line segment as a run of super
// rows of `row` elements (a divisor of fold_len, so that position j of every
// super row has parameter j: the offsets keep p_off) and its rest, shorter than
// a row, as a lone row.
template <class F>
void for_each_rows_or_super_rows_run(const plan &p, int64_t item_begin, int64_t item_end, int64_t row, F &&f) {
  if (!p.period) {
    for_each_rows_run(p, item_begin, item_end, f);
    return;
  }
  const loop_dim &in = p.inner;
  const loop_dim along{0, in.x_stride, in.y_stride, in.m_stride, 0, in.d_stride};
  const loop_dim step{0, row * in.x_stride, row * in.y_stride, row * in.m_stride, 0, row * in.d_stride};
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    line_offsets at = cur;
    at.advance(along, seg.begin);
    const int64_t whole = seg.len / row, done = whole * row;
    if (whole) f(static_cast<const line_offsets &>(at), segment{0, row}, whole, step);
    at.advance(along, done);
    if (done < seg.len) f(static_cast<const line_offsets &>(at), segment{0, seg.len - done}, int64_t{1}, loop_dim{});
  });
}

// Calls f(offsets, segment) per line segment, in memory order.
template <class F>
void for_each_item(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  for_each_run(p, item_begin, item_end, [&](const line_offsets &first, segment seg, int64_t n_lines) {
    line_offsets at = first;
    for (int64_t r = 0;;) {
      f(static_cast<const line_offsets &>(at), seg);
      if (++r == n_lines) return;
      at.advance(run_step(p), 1);
    }
  });
}

// ---- moments: planes x L (the inner run is one channel) -------------------------

constexpr int64_t kLanes = 16;        // independent partial sums: short chains, SIMD-friendly
// Elements per shifted-sum block of a plane: two chains of 32 per vector lane,
// so the float32 accuracy is the same on every ISA.
template <class E> constexpr int64_t plane_block() { return 64 * E::lanes; }
constexpr int64_t kRowBlock = 32;     // rows per shifted-sum block for rows x C: the fp32 chain length
constexpr int64_t kChannelChunk = kRowsChannelChunk;  // channels per block (bounds scratch)

template <class E, bool Contig, bool Masked>
void plane_block_sums(const char *x, int64_t xs, const uint8_t *m, int64_t ms, int64_t len,
                      typename E::acc shift, double &s1_out, double &s2_out, double &n_out) {
  using acc = typename E::acc;
  acc s1[kLanes] = {}, s2[kLanes] = {}, cnt[kLanes] = {};
  // A compile-time step lets the compiler vectorize the contiguous case.
  const int64_t step = Contig ? E::size : xs;
  int64_t i = 0;
  auto at = [&](int64_t k) { return x + k * step; };
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc d = E::load(at(i + l)) - shift;
      if (Masked) {
        const bool used = m[(i + l) * ms] != 0;
        d = used ? d : acc(0);
        cnt[l] += used ? acc(1) : acc(0);
      }
      s1[l] += d;
      s2[l] += d * d;
    }
  }
  for (int64_t l = 0; i < len; ++i, ++l) {
    acc d = E::load(at(i)) - shift;
    if (Masked) {
      const bool used = m[i * ms] != 0;
      d = used ? d : acc(0);
      cnt[l] += used ? acc(1) : acc(0);
    }
    s1[l] += d;
    s2[l] += d * d;
  }
  double a = 0, b = 0, c = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    a += s1[l];
    b += s2[l];
    c += cnt[l];
  }
  s1_out = a;
  s2_out = b;
  n_out = Masked ? c : static_cast<double>(len);
}

// Σ over the lanes in float64, pairwise: per lane in order it was a chain of
// dependent adds per fold, a short plane's largest cost. Callers add their two
// chains' vectors first: one rounding in the compute type next to the chains'
// own, for half the conversions.
template <class V>
double lane_sum(V v) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  double d[n];
  for (int l = 0; l < n; ++l) d[l] = static_cast<double>(v[l]);
  // Unrolled into register operations: as loops, d stayed on the stack and the
  // halves' loads missed store forwarding (a 4 MB plane tensor's statistics from
  // the L3 took 1.3x as long).
#pragma GCC unroll 8
  for (int w = n / 2; w > 0; w /= 2)
#pragma GCC unroll 16
    for (int l = 0; l < w; ++l) d[l] += d[l + w];
  return d[0];
}

// v with only its last `rest` lanes kept: the vector that ends at a run's end,
// whose first lanes the vectors before it summed already. A scalar tail cost
// short planes (14x14 = 12 vectors + 4) a chain of dependent float64 adds each.
template <class V>
V last_lanes(V v, int64_t rest) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  V lane;
  for (int l = 0; l < n; ++l) lane[l] = l;
  return lane >= static_cast<decltype(v[0] + 0)>(n - rest) ? v : V{};
}

// The common case, contiguous and unmasked, in explicit vectors: two
// independent chains of E::lanes partial sums (the autovectorizer turned the
// generic loop above into scalar code with spills on AVX2).
template <class E>
void plane_block_sums_contiguous(const char *x, int64_t len, typename E::acc shift,
                                 double &s1_out, double &s2_out) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec s1a = {}, s1b = {}, s2a = {}, s2b = {};
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const vec da = E::load_vec(x + i * E::size) - shift;
    const vec db = E::load_vec(x + (i + W) * E::size) - shift;
    s1a += da;
    s2a += da * da;
    s1b += db;
    s2b += db * db;
  }
  if (i + W <= len) {
    const vec d = E::load_vec(x + i * E::size) - shift;
    s1a += d;
    s2a += d * d;
    i += W;
  }
  if (i < len && len >= W) {
    const vec d = last_lanes(E::load_vec(x + (len - W) * E::size) - shift, len - i);
    s1b += d;
    s2b += d * d;
    i = len;
  }
  double a = lane_sum(s1a + s1b), b = lane_sum(s2a + s2b);
  for (; i < len; ++i) {
    const double d = E::load(x + i * E::size) - shift;
    a += d;
    b += d * d;
  }
  s1_out = a;
  s2_out = b;
}

// Sums of a folded super row's positions added up per channel: out[c] for
// c < period gets the positions j = c (mod period) of in[0, len). out may be in.
template <class T, class U>
void fold_positions(const T *in, int64_t len, int64_t period, U *out) {
  for (int64_t c = 0; c < period; ++c) out[c] = in[c];
  for (int64_t j = period, c = 0; j < len; ++j) {  // c = j % period, counted (no division per position)
    out[c] += in[j];
    if (++c == period) c = 0;
  }
}

// Chan's merge of the shifted sums Σ(x−K), Σ(x−K)² of n_b positions per channel
// (rows of a block, blocks of a plane) into contiguous channels. Branch-free so the compiler
// vectorizes it; n == 0 needs no case because a channel's mean is 0 until its
// first merge. The shift follows the mean so later blocks stay well centred.
template <class T, class K>
void merge_shifted_sums(const T *s1, const T *s2, const K *k, double n_b, int64_t len,
                        double *__restrict count, double *__restrict mean, double *__restrict m2,
                        double *__restrict shift) {
  const double inv_n_b = 1.0 / n_b;
  for (int64_t j = 0; j < len; ++j) {
    const double a = s1[j], b = s2[j];
    const double mean_b = static_cast<double>(k[j]) + a * inv_n_b;
    const double m2_b = b - a * a * inv_n_b;
    const double total = count[j] + n_b;
    const double delta = mean_b - mean[j];
    mean[j] += delta * (n_b / total);
    m2[j] += (m2_b > 0 ? m2_b : 0.0) + delta * delta * (count[j] * n_b / total);
    count[j] = total;
    shift[j] = mean[j];
  }
}

// A channel's consecutive blocks share one shift: their shifted sums add up, so
// they merge once per this many blocks' positions, within a plane and across a
// channel's planes (run_s1, run_s2, run_n). Merging after every block made the
// next block's sums wait for the merge's divisions: statistics of cached 56x56
// planes took 1.2x as long, and with a merge per plane (8,256,14,14) took
// 1.2-1.3x and (32,512,7,7) 1.5x. The shift still follows the mean after each group.
constexpr int64_t kBlocksPerShift = 8;

// Merges channel c's pending shifted sums (taken relative to its shift).
template <class E>
void plane_merge_pending(int64_t c, const moments_scratch &s) {
  if (s.run_n[c] == 0) return;
  const typename E::acc shift = static_cast<typename E::acc>(s.shift[c]);
  merge_shifted_sums(s.run_s1 + c, s.run_s2 + c, &shift, s.run_n[c], 1, s.count + c, s.mean + c, s.m2 + c,
                     s.shift + c);
  s.run_s1[c] = s.run_s2[c] = s.run_n[c] = 0;
}

template <class E, bool Masked>
void plane_moments(const char *x, int64_t xs, const uint8_t *m, int64_t ms, int64_t n, int64_t c,
                   const moments_scratch &s) {
  using acc = typename E::acc;
  constexpr int64_t block = plane_block<E>();
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t len = min_of(block, n - b0);
    const char *xb = x + b0 * xs;
    const uint8_t *mb = Masked ? m + b0 * ms : m;
    if (!s.shift_ok[c]) {
      // Two-pass start: the shift is the mean of the channel's first used block.
      // Contiguous unmasked blocks sum in vectors relative to their first value
      // (a scalar float64 pass cost 14x14 planes, where every plane of the
      // first image is a first block, most of the statistics' time; values
      // whose differences overflow overflow the sums that follow anyway).
      double mean;
      if (!Masked && xs == E::size) {
        const acc first = E::load(xb);
        double s1, s2;
        plane_block_sums_contiguous<E>(xb, len, first, s1, s2);
        mean = static_cast<double>(first) + s1 / static_cast<double>(len);
      } else {
        double part[8] = {}, cnt = 0;  // 8 chains: one cost more than a small tensor's sums
        for (int64_t i = 0; i < len; ++i) {
          const bool used = !Masked || mb[i * ms] != 0;
          part[i & 7] += used ? static_cast<double>(E::load(xb + i * xs)) : 0.0;
          cnt += used ? 1.0 : 0.0;
        }
        if (cnt == 0) continue;
        mean = (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))) / cnt;
      }
      s.shift[c] = mean;
      s.shift_ok[c] = 1;
      --*s.shifts_missing;
    }
    const acc shift = static_cast<acc>(s.shift[c]);  // changes only when the group merges
    double s1, s2, cnt = static_cast<double>(len);
    if (xs == E::size && !Masked)
      plane_block_sums_contiguous<E>(xb, len, shift, s1, s2);
    else if (xs == E::size)
      plane_block_sums<E, true, Masked>(xb, xs, mb, ms, len, shift, s1, s2, cnt);
    else
      plane_block_sums<E, false, Masked>(xb, xs, mb, ms, len, shift, s1, s2, cnt);
    s.run_s1[c] += s1;
    s.run_s2[c] += s2;
    s.run_n[c] += cnt;
    if (s.run_n[c] >= kBlocksPerShift * block) plane_merge_pending<E>(c, s);
  }
}

// ---- moments: rows x C (the inner run walks channels) ----------------------------

template <class E, bool Contig, bool Masked>
void row_accumulate(const char *x, int64_t xs, const uint8_t *m, int64_t ms, int64_t len,
                    const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2,
                    typename E::acc *cnt) {
  using acc = typename E::acc;
  const int64_t step = Contig ? E::size : xs;
  for (int64_t j = 0; j < len; ++j) {
    acc d = E::load(x + j * step) - shift[j];
    if (Masked) {
      const bool used = m[j * ms] != 0;
      d = used ? d : acc(0);
      cnt[j] += used ? acc(1) : acc(0);
    }
    s1[j] += d;
    s2[j] += d * d;
  }
}

// One unmasked contiguous row added to block sums held in memory (L1), in
// memory order: the walk for rows too wide for one tile that come from memory.
template <class E>
void row_sums_in_order(const char *x, int64_t len, const typename E::acc *shift,
                       typename E::acc *s1, typename E::acc *s2) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    const vec d = E::load_vec(x + j * E::size) - load_acc<E>(shift + j);
    const vec sum1 = load_acc<E>(s1 + j) + d, sum2 = load_acc<E>(s2 + j) + d * d;
    std::memcpy(s1 + j, &sum1, sizeof(vec));
    std::memcpy(s2 + j, &sum2, sizeof(vec));
  }
  row_accumulate<E, true, false>(x + j * E::size, E::size, nullptr, 0, len - j, shift + j, s1 + j,
                                 s2 + j, nullptr);
}

// Unmasked contiguous rows: tiles of K vectors of channels whose sums stay in
// registers over all rows of the block (instead of loading and storing the
// block sums per row). 3 registers per vector: 4 vectors fit the 16 registers of
// AVX2, 8 the 32 of AVX-512, whose longer runs per row took (2048,2048)
// statistics from the L3 0.30 -> 0.26 ms and (32,56,56,128) from memory
// 1.77 -> 1.42 ms at 2 threads.
constexpr int kMomentsTileVectors = kVecBytes >= 64 ? 8 : 4;

// Rows whose lines a tile prefetches at its own channels while it walks the
// current block: the next block's (0 rows: none).
struct rows_ahead {
  const char *first;
  int64_t step;
  int64_t rows;
};

// rest_of_row(r) runs after the tile's vectors of row r (a walk in memory order
// that handles the rest of each row; a no-op for tiles walking down rows).
template <class E, int K, class Rest>
void rows_tile_sums(const char *const *rows, int64_t n_rows, int64_t j, const rows_ahead &next,
                    const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2,
                    Rest &&rest_of_row) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec k[K], a[K], b[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    k[q] = load_acc<E>(shift + j + q * W);
    a[q] = vec{};
    b[q] = vec{};
  }
  prefetch_rows<0>(next.first + j * E::size, next.step, next.rows, K * W * E::size);
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const vec d = E::load_vec(rows[r] + (j + q * W) * E::size) - k[q];
      a[q] += d;
      b[q] += d * d;
    }
    rest_of_row(r);
  }
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    const vec sum1 = load_acc<E>(s1 + j + q * W) + a[q], sum2 = load_acc<E>(s2 + j + q * W) + b[q];
    std::memcpy(s1 + j + q * W, &sum1, sizeof(vec));
    std::memcpy(s2 + j + q * W, &sum2, sizeof(vec));
  }
}

template <class E>
void rows_tile_accumulate(const char *const *rows, int64_t n_rows, int64_t len, const rows_ahead &next,
                          const typename E::acc *shift, typename E::acc *s1,
                          typename E::acc *s2) {
  const int64_t j = for_each_tile<kMomentsTileVectors, E::lanes>(len, [&](auto width, int64_t j0) {
    rows_tile_sums<E, decltype(width)::count>(rows, n_rows, j0, next, shift, s1, s2, [](int64_t) {});
  });
  for (int64_t r = 0; j < len && r < n_rows; ++r)
    row_accumulate<E, true, false>(rows[r] + j * E::size, E::size, nullptr, 0, len - j, shift + j,
                                   s1 + j, s2 + j, nullptr);
}

// Rows from memory, wider than one tile, in memory order: the sums of each
// row's first vectors stay in registers across the block's rows and the rest of
// each row goes through the block sums in L1. With AVX-512 that took
// (64,56,56,256) statistics at 2 threads from 9.8-10.3 to 8.9-9.9 ms
// (interleaved, run in either order); with AVX2 it was slower (8.0-9.0 ->
// 8.7-10.3 ms), so there whole rows go through L1.
constexpr bool kInOrderTileInRegisters = kVecBytes >= 64;

// The register tile of that walk is twice a walking tile wide where the row
// allows: 32 sums in the 32 registers (the shifts become memory operands, one
// sum spills). Each row's stores to the block sums wait for its loads from
// memory and filled the store queue: (64,56,56,256) statistics went 10.0-10.6 ->
// 6.2-7.7 ms at 2 threads and 18.2-18.8 -> 9.2-9.8 ms at 1 (a read: 4.2-6.9).
template <class E, int K>
void rows_sums_in_order_from(const char *const *rows, int64_t n_rows, int64_t len,
                             const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2) {
  constexpr int64_t tile = K * E::lanes;
  rows_tile_sums<E, K>(rows, n_rows, 0, rows_ahead{}, shift, s1, s2, [&](int64_t r) {
    if (len > tile)
      row_sums_in_order<E>(rows[r] + tile * E::size, len - tile, shift + tile, s1 + tile, s2 + tile);
  });
}

// Rows wider than one tile (the walk is only taken for those).
template <class E>
void rows_sums_in_order(const char *const *rows, int64_t n_rows, int64_t len, const typename E::acc *shift,
                        typename E::acc *s1, typename E::acc *s2) {
  constexpr int wide = 2 * kMomentsTileVectors;
  if (!kInOrderTileInRegisters) {
    for (int64_t r = 0; r < n_rows; ++r) row_sums_in_order<E>(rows[r], len, shift, s1, s2);
  } else if (len >= wide * E::lanes) {
    rows_sums_in_order_from<E, wide>(rows, n_rows, len, shift, s1, s2);
  } else {
    rows_sums_in_order_from<E, kMomentsTileVectors>(rows, n_rows, len, shift, s1, s2);
  }
}

// One block of rows over channels [j0, j0 + len) of their segment.
template <class E>
void rows_block_moments(const plan &p, const char *const *rows_begin,
                        const uint8_t *const *rows_m_begin, int64_t n_rows, int64_t p_begin,
                        int64_t j0, int64_t len, const moments_scratch &s) {
  using acc = typename E::acc;
  const int64_t xs = p.inner.x_stride, ms = p.inner.m_stride, ps = p.inner.p_stride;
  const char *rows_x[kRowBlock];
  const uint8_t *rows_m[kRowBlock];
  for (int64_t r = 0; r < n_rows; ++r) {
    rows_x[r] = rows_begin[r] + j0 * xs;
    rows_m[r] = rows_m_begin[r] ? rows_m_begin[r] + j0 * ms : nullptr;
  }
  // Channel of position j. Folded super rows repeat their channels every period
  // (and fit one chunk, so j0 = 0 there): their first period positions are all
  // the distinct channels.
  const int64_t c_first = p_begin + j0 * ps;
  auto channel = [&](int64_t j) { return c_first + (p.period ? j % p.period : j) * ps; };
  const int64_t distinct = p.period ? min_of(len, p.period) : len;
  const bool masked = p.mask != nullptr;
  const bool per_element_mask = masked && ms != 0;
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *cnt = static_cast<acc *>(s.block_n);
  acc *k = static_cast<acc *>(s.block_shift);
  auto used_row = [&](int64_t r) { return !masked || per_element_mask || rows_m[r][0] != 0; };

  const bool contig = xs == E::size;
  const char *used[kRowBlock];
  int64_t n_used = 0;
  if (!per_element_mask)
    for (int64_t r = 0; r < n_rows; ++r)
      if (used_row(r)) used[n_used++] = rows_x[r];

  bool need_shift = false;
  if (*s.shifts_missing)
    for (int64_t j = 0; j < distinct; ++j) need_shift |= !s.shift_ok[c_first + j * ps];
  if (need_shift) {
    // The block's mean gives each channel a shift. It need not be exact, so
    // contiguous rows sum in float tiles (the scalar float64 loop cost more
    // than the block's shifted sums), relative to the first row so that values
    // near the float range do not overflow the sum.
    if (contig && !per_element_mask && n_used > 0) {
      for (int64_t j = 0; j < len; ++j) { k[j] = E::load(used[0] + j * E::size); s1[j] = 0; s2[j] = 0; }
      rows_tile_accumulate<E>(used, n_used, len, rows_ahead{}, k, s1, s2);
      for (int64_t j = 0; j < len; ++j) {
        s.block_sum[j] = static_cast<double>(k[j]) * static_cast<double>(n_used) + s1[j];
        s.block_cnt[j] = static_cast<double>(n_used);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) { s.block_sum[j] = 0; s.block_cnt[j] = 0; }
      for (int64_t r = 0; r < n_rows; ++r) {
        if (!used_row(r)) continue;
        for (int64_t j = 0; j < len; ++j) {
          if (per_element_mask && rows_m[r][j * ms] == 0) continue;
          s.block_sum[j] += E::load(rows_x[r] + j * xs);
          s.block_cnt[j] += 1;
        }
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = channel(j);
      if (!s.shift_ok[c] && s.block_cnt[j] > 0) {
        s.shift[c] = s.block_sum[j] / s.block_cnt[j];
        s.shift_ok[c] = 1;
        --*s.shifts_missing;
      }
    }
  }
  for (int64_t j = 0; j < distinct; ++j) k[j] = static_cast<acc>(s.shift[c_first + j * ps]);
  for (int64_t j = distinct; j < len; ++j) k[j] = k[j - distinct];
  for (int64_t j = 0; j < len; ++j) {
    s1[j] = 0; s2[j] = 0; cnt[j] = 0;
  }
  const double rows_used = static_cast<double>(n_used);
  if (per_element_mask) {
    for (int64_t r = 0; r < n_rows; ++r) {
      if (contig) row_accumulate<E, true, true>(rows_x[r], xs, rows_m[r], ms, len, k, s1, s2, cnt);
      else row_accumulate<E, false, true>(rows_x[r], xs, rows_m[r], ms, len, k, s1, s2, cnt);
    }
  } else {
    if (contig) {
      rows_tile_accumulate<E>(used, n_used, len, rows_ahead{}, k, s1, s2);
    } else {
      for (int64_t r = 0; r < n_used; ++r)
        row_accumulate<E, false, false>(used[r], xs, nullptr, 0, len, k, s1, s2, cnt);
    }
  }
  if (!per_element_mask && !p.period && ps == 1) {
    if (rows_used > 0)
      merge_shifted_sums(s1, s2, k, rows_used, len, s.count + c_first, s.mean + c_first,
                         s.m2 + c_first, s.shift + c_first);
    return;
  }
  // Per distinct channel: a folded super row's columns of one channel share its
  // shift, so their sums add up and the channel merges once per block (a merge
  // per column chained 64 merges per channel and block at 3 channels, and the
  // statistics of (32,224,224,3) took 1.2-1.4x as long).
  double *sum1 = s.block_sum, *sum2 = s.block_cnt;
  fold_positions(s1, len, distinct, sum1);  // only folded rows have more columns than channels
  fold_positions(s2, len, distinct, sum2);
  fold_positions(cnt, len, distinct, cnt);  // counts of at most 2^16 positions: exact in float
  const double columns = p.period ? static_cast<double>(len / p.period) : 1.0;  // super rows hold whole periods
  for (int64_t j = 0; j < distinct; ++j) {
    const double n_b = per_element_mask ? static_cast<double>(cnt[j]) : rows_used * columns;
    if (n_b == 0) continue;
    const int64_t c = channel(j);
    merge_shifted_sums(sum1 + j, sum2 + j, k + j, n_b, 1, s.count + c, s.mean + c, s.m2 + c, s.shift + c);
  }
}

// Unmasked contiguous rows x C over a run of rows, in super blocks: float tile
// blocks of kRowBlock rows are folded into float64 per-channel sums, and Chan's
// merge runs once per super block (per 32-row block it cost more than the
// sums). A super block is bounded in bytes so that its channel chunks are
// re-read from L2. The run's first block goes through rows_block_moments while
// shifts are missing (their two-pass start). The rows of a folded plan are its
// super rows (len a multiple of the period, within one channel chunk): each
// position sums on its own, and the positions of a channel add up before the merge.
constexpr int64_t kSuperBlockBytes = 256 * 1024;
constexpr int64_t kSuperBlockMaxRows = 1024;

template <class E>
void rows_moments_run(const plan &p, const char *x, int64_t x_row, int64_t n_rows, int64_t c_first,
                      int64_t len, const moments_scratch &s) {
  using acc = typename E::acc;
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *k = static_cast<acc *>(s.block_shift);
  const char *rows[kRowBlock];
  const uint8_t *no_mask[kRowBlock] = {};
  auto block_rows = [&](int64_t r0, int64_t nb, int64_t j0) {
    for (int64_t r = 0; r < nb; ++r) rows[r] = x + (r0 + r) * x_row + j0 * E::size;
  };
  int64_t r0 = 0;
  if (*s.shifts_missing) {
    const int64_t nb = min_of(kRowBlock, n_rows);
    block_rows(0, nb, 0);
    for (int64_t j0 = 0; j0 < len; j0 += kChannelChunk)
      rows_block_moments<E>(p, rows, no_mask, nb, c_first, j0, min_of(kChannelChunk, len - j0), s);
    r0 = nb;
  }
  const bool walks_in_order = len <= kMomentsTileVectors * E::lanes;
  // Wider rows from memory go one at a time in memory order
  // (rows_sums_in_order): (64,56,56,256) at 2 threads took 1.6x a plain read in
  // tiles down the block's rows (prefetched), 1.5x this way with 8 vectors' sums
  // in registers, 1.1-1.2x with 16.
  const bool by_row = !walks_in_order && p.x_from == x_source::memory;
  // One channel chunk reads each row once: its super block need not fit L2, and
  // the merge (divisions per channel) then runs once per kSuperBlockMaxRows rows
  // instead of per 32 at 2048 channels ((2048,2048) statistics from the L3:
  // 0.35 -> 0.30 ms at 2 threads).
  const int64_t by_bytes = len <= kChannelChunk ? kSuperBlockMaxRows
                                                : kSuperBlockBytes / (len * E::size) / kRowBlock * kRowBlock;
  const int64_t super_rows = min_of(kSuperBlockMaxRows, by_bytes > kRowBlock ? by_bytes : kRowBlock);
  for (; r0 < n_rows; r0 += super_rows) {
    const int64_t r1 = min_of(n_rows, r0 + super_rows);
    for (int64_t j0 = 0; j0 < len; j0 += kChannelChunk) {
      const int64_t cl = min_of(kChannelChunk, len - j0), c0 = c_first + j0;
      const int64_t distinct = p.period ? p.period : cl;
      double *__restrict sum1 = p.period ? s.block_sum : s.run_s1 + c0;
      double *__restrict sum2 = p.period ? s.block_cnt : s.run_s2 + c0;
      for (int64_t j = 0; j < distinct; ++j) k[j] = static_cast<acc>(s.shift[c0 + j]);
      for (int64_t j = distinct; j < cl; ++j) k[j] = k[j - distinct];
      for (int64_t j = 0; j < cl; ++j) {
        sum1[j] = 0;
        sum2[j] = 0;
      }
      for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
        const int64_t nb = min_of(kRowBlock, r1 - b0);
        block_rows(b0, nb, j0);
        // Tiles prefetch the next block (from the L3 too: without it,
        // (32,56,56,64) took twice as long). One tile across the row walks
        // memory in order.
        const rows_ahead next{rows[0] + nb * x_row, x_row,
                              walks_in_order || p.x_from == x_source::l2 ? 0 : min_of(kRowBlock, n_rows - b0 - nb)};
        for (int64_t j = 0; j < cl; ++j) { s1[j] = 0; s2[j] = 0; }
        if (by_row)
          rows_sums_in_order<E>(rows, nb, cl, k, s1, s2);
        else
          rows_tile_accumulate<E>(rows, nb, cl, next, k, s1, s2);
        for (int64_t j = 0; j < cl; ++j) {
          sum1[j] += static_cast<double>(s1[j]);
          sum2[j] += static_cast<double>(s2[j]);
        }
      }
      if (p.period) {
        fold_positions(sum1, cl, distinct, s.run_s1 + c0);
        fold_positions(sum2, cl, distinct, s.run_s2 + c0);
      }
      merge_shifted_sums(s.run_s1 + c0, s.run_s2 + c0, k, static_cast<double>((r1 - r0) * (cl / distinct)),
                         distinct, s.count + c0, s.mean + c0, s.m2 + c0, s.shift + c0);
    }
  }
}

// The longest super row of a folded plan up to max_len elements: parameters are
// replicated over fold_len, and rows of any divisor that is a multiple of the
// period and of the vector width see the same channels at the same positions.
template <class E>
int64_t folded_row(const plan &p, int64_t max_len) {
  int64_t row = p.fold_len;
  while (row > max_len && row % 2 == 0 && (row / 2) % p.period == 0 && (row / 2) % E::lanes == 0) row /= 2;
  return row;
}

template <class E>
void moments_items(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s) {
  const uint8_t *mask = p.mask;
  if (!p.inner_is_channel) {
    for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
      const char *x = p.x + cur.x_off + seg.begin * p.inner.x_stride;
      if (!mask) {
        plane_moments<E, false>(x, p.inner.x_stride, nullptr, 0, seg.len, cur.p_off, s);
        return;
      }
      const uint8_t *m = mask + cur.m_off + seg.begin * p.inner.m_stride;
      if (p.inner.m_stride == 0) {  // one mask value for the whole segment
        if (*m) plane_moments<E, false>(x, p.inner.x_stride, nullptr, 0, seg.len, cur.p_off, s);
      } else {
        plane_moments<E, true>(x, p.inner.x_stride, m, p.inner.m_stride, seg.len, cur.p_off, s);
      }
    });
    for (int64_t c = 0; c < p.channels; ++c) plane_merge_pending<E>(c, s);
    return;
  }
  const int64_t xs = p.inner.x_stride, ms = p.inner.m_stride;
  // A folded plan walks super rows that one tile spans, so that it walks them in
  // memory order: in two tiles, super rows of fold_len = 192 at 3 channels took
  // 1.3x as long at 1 thread.
  const int64_t row = p.period ? folded_row<E>(p, kMomentsTileVectors * E::lanes) : 0;
  if (!mask && xs == E::size && p.inner.p_stride == 1) {
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      rows_moments_run<E>(p, p.x + cur.x_off + seg.begin * xs, step.x_stride, n_rows,
                          cur.p_off + seg.begin, seg.len, s);
    });
    return;
  }
  // Other rows x C: gather up to kRowBlock consecutive rows sharing channels and length.
  const char *rows_x[kRowBlock];
  const uint8_t *rows_m[kRowBlock];
  int64_t n_rows = 0, block_p = 0, block_len = 0;
  auto flush = [&] {
    for (int64_t j0 = 0; n_rows && j0 < block_len; j0 += kChannelChunk)
      rows_block_moments<E>(p, rows_x, rows_m, n_rows, block_p, j0,
                            min_of(kChannelChunk, block_len - j0), s);
    n_rows = 0;
  };
  auto push = [&](const char *x, const uint8_t *m, int64_t p_first, int64_t len) {
    if (n_rows == kRowBlock || (n_rows && (p_first != block_p || len != block_len))) flush();
    block_p = p_first;
    block_len = len;
    rows_x[n_rows] = x;
    rows_m[n_rows] = m;
    ++n_rows;
  };
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    const char *x = p.x + cur.x_off + seg.begin * xs;
    const uint8_t *m = mask ? mask + cur.m_off + seg.begin * ms : nullptr;
    if (!p.period) {
      push(x, m, cur.p_off + seg.begin * p.inner.p_stride, seg.len);
      return;
    }
    for (int64_t k = 0; k < seg.len; k += row)
      push(x + k * xs, m ? m + k * ms : nullptr, cur.p_off, min_of(row, seg.len - k));
  });
  flush();
}

// ---- normalize -------------------------------------------------------------------

// One channel's contiguous run: plain stores up to a vector-aligned y, then
// vectors (streaming with Stream). Vector stores that straddle two lines (NumPy's
// large arrays start 16 bytes into a page) ran 10-20% slower at 1 thread
// (64x1x256x256 out of place). ahead > 0: also prefetch x's lines that many bytes
// on (a training forward's next chunk, fetched while this one runs from the caches).
template <class E, bool Stream>
void normalize_plane(const char *x, char *y, int64_t len, typename E::acc mh, typename E::acc sc,
                     typename E::acc b, int64_t ahead) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes, align = W * E::size;
  auto vector_at = [&](int64_t at) { return normalized<vec>(E::load_vec(x + at * E::size), mh, sc, b); };
  const uintptr_t y_at = reinterpret_cast<uintptr_t>(y);
  // Out of place (y never partly overlaps x), the elements before y's first
  // aligned vector and after its last go in one unaligned vector each, which
  // store some values twice: in scalar loops, (8,256,14,14) out of place took
  // 1.15x as long at 1 thread and (32,512,7,7) 1.35x. In place that would
  // normalize them twice; streamed, the vectors' plain stores into lines that
  // are then streamed made (64,256,56,56) take 1.4x as long.
  const bool overlap_stores = !Stream && x != y && len >= W && y_at % E::size == 0;
  // A y off the element size never aligns: streamed, it is all plain stores.
  const int64_t peel_end = Stream || y_at % E::size == 0 ? len : 0;
  int64_t i = 0;
  if (overlap_stores && y_at % align) {
    E::template store_vec<false>(y, vector_at(0));
    i = static_cast<int64_t>(align - y_at % align) / E::size;
  }
  for (; i < peel_end && (y_at + i * E::size) % align; ++i)
    E::store(y + i * E::size, normalized(E::load(x + i * E::size), mh, sc, b));
  for (; i + W <= len; i += W) {
    if (ahead) __builtin_prefetch(x + i * E::size + ahead, 0, 2);
    E::template store_vec<Stream>(y + i * E::size, vector_at(i));
  }
  if (overlap_stores && i < len) {
    E::template store_vec<false>(y + (len - W) * E::size, vector_at(len - W));
    i = len;
  }
  for (; i < len; ++i) E::store(y + i * E::size, normalized(E::load(x + i * E::size), mh, sc, b));
}

// One line segment. Contig: x and y unit-stride (and, for rows x C, unit
// channel stride), so the compiler sees plain arrays.
template <class E, bool Contig>
void normalize_segment(const plan &p, const char *x, char *y, int64_t c0, int64_t len,
                       const affine_params &a) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(a.mean_hi);
  const acc *__restrict scale = static_cast<const acc *>(a.scale);
  const acc *__restrict bias = static_cast<const acc *>(a.bias);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ys = Contig ? E::size : p.inner.y_stride;
  if (!p.inner_is_channel) {
    const acc mh = mean_hi[c0], sc = scale[c0], b = bias[c0];
    if (Contig && p.stream_y) normalize_plane<E, true>(x, y, len, mh, sc, b, p.prefetch_ahead);
    else if (Contig) normalize_plane<E, false>(x, y, len, mh, sc, b, p.prefetch_ahead);
    else
      for (int64_t i = 0; i < len; ++i) E::store(y + i * ys, normalized(E::load(x + i * xs), mh, sc, b));
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = c0 + j * ps;
    E::store(y + j * ys, normalized(E::load(x + j * xs), mean_hi[c], scale[c], bias[c]));
  }
}

// Normalize tiles: K vectors of channels whose parameters stay in registers
// while the tile walks down rows (loaded per row, the parameters were most of
// the loads, and kept NHWC in place at half the memory-bound speed). 3
// parameter vectors per data vector fit the 16 registers of AVX2.
constexpr int kNormalizeTileVectors = 4;

// Wide rows (more channels than a tile) in blocks of kNormalizeBlockRows rows,
// kNormalizeBlockVectors vectors of channels at a time: the 3 parameter loads
// serve 8 vectors. Row by row they were 3 loads per vector on top of the data
// load, which bound the walk at cache speeds ((16384,256) and (2048,2048) in
// place took twice the sweep's time; the loads, not the stores, were the limit).
constexpr int kNormalizeBlockVectors = 2;
constexpr int64_t kNormalizeBlockRows = 4;
// Parameter bytes (3 arrays) that stay in L1 next to the data: from memory, rows
// of up to that many channels go one at a time (the blocks gained nothing there,
// and streaming stores ran 1.4x faster in row order at (131072,256)).
constexpr int64_t kNormalizeL1ParamBytes = 8 << 10;

// K vectors of channels over n_rows rows, B rows at a time with all B·K loads
// before the stores (a walk down rows would otherwise load right behind stores
// to the lines it reads next). ahead: rows after these whose lines it
// prefetches (x, and y out of place unless streamed).
template <class E, bool Stream, int K, int B>
void normalize_rows_tile(const char *x, int64_t x_row, char *y, int64_t y_row, int64_t n_rows,
                         int64_t ahead, const typename E::acc *mean_hi, const typename E::acc *scale,
                         const typename E::acc *bias) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec mh[K], sc[K], b[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    mh[k] = load_acc<E>(mean_hi + k * W);
    sc[k] = load_acc<E>(scale + k * W);
    b[k] = load_acc<E>(bias + k * W);
  }
  prefetch_rows<0>(x + n_rows * x_row, x_row, ahead, K * W * E::size);
  if (!Stream && y != x) prefetch_rows<1>(y + n_rows * y_row, y_row, ahead, K * W * E::size);
  auto group = [&](int64_t r, auto rows) {
    constexpr int G = decltype(rows)::count;
    vec v[G][K];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) v[g][k] = E::load_vec(x + (r + g) * x_row + k * W * E::size);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        E::template store_vec<Stream>(y + (r + g) * y_row + k * W * E::size,
                                      normalized(v[g][k], mh[k], sc[k], b[k]));
  };
  int64_t r = 0;
  for (; r + B <= n_rows; r += B) group(r, vectors<B>{});
  for (; r < n_rows; ++r) group(r, vectors<1>{});
}

// Contiguous rows x C over a run of n_rows rows of channels [c0, c0 + len), in
// tiles of explicit vectors across channels (the autovectorized segment loop
// spent ~50 instructions of set-up per row, more than a 64-channel row's work).
// A run one tile spans goes in memory order; wider rows in blocks (above), or
// one at a time from memory while their parameters fit in L1.
template <class E, bool Stream>
void normalize_rows_run(const char *x, int64_t x_row, char *y, int64_t y_row, int64_t n_rows,
                        int64_t len, const affine_params &a, int64_t c0, x_source x_from) {
  using acc = typename E::acc;
  constexpr int64_t W = E::lanes;
  const acc *mean_hi = static_cast<const acc *>(a.mean_hi) + c0;
  const acc *scale = static_cast<const acc *>(a.scale) + c0;
  const acc *bias = static_cast<const acc *>(a.bias) + c0;
  const bool one_tile = len <= kNormalizeTileVectors * W;
  const bool by_row = !one_tile && x_from == x_source::memory &&
                      3 * len * int64_t(sizeof(acc)) <= kNormalizeL1ParamBytes;
  const int64_t block = one_tile ? n_rows : by_row ? 1 : kNormalizeBlockRows;
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t nb = min_of(block, n_rows - r0);
    const int64_t ahead =
        block != kNormalizeBlockRows || x_from == x_source::l2 ? 0 : min_of(block, n_rows - r0 - nb);
    const char *xb = x + r0 * x_row;
    char *yb = y + r0 * y_row;
    // rows and ahead as compile-time constants for whole blocks: with them at
    // run time, each tile's set-up (row loops, prefetch branches, spilled
    // pointers) was as long as its 8 vectors of work, and (256,1024) in place
    // from the L2 took 1.5-2x the sweep's time.
    auto walk = [&](auto rows, auto n_rows, auto n_ahead) {
      constexpr int B = decltype(rows)::count;
      auto tile = [&](auto width, int64_t j) {
        normalize_rows_tile<E, Stream, decltype(width)::count, B>(xb + j * E::size, x_row, yb + j * E::size, y_row,
                                                                  n_rows, n_ahead, mean_hi + j, scale + j, bias + j);
      };
      return B == 1 ? for_each_tile<kNormalizeTileVectors, W>(len, tile)
                    : for_each_tile<kNormalizeBlockVectors, W>(len, tile);
    };
    constexpr int64_t B = kNormalizeBlockRows;
    using one = std::integral_constant<int64_t, 1>;
    using none = std::integral_constant<int64_t, 0>;
    using whole = std::integral_constant<int64_t, B>;
    const int64_t vector_end = one_tile                ? walk(vectors<1>{}, nb, none{})
                               : by_row                ? walk(vectors<1>{}, one{}, none{})
                               : nb == B && ahead == 0 ? walk(vectors<B>{}, whole{}, none{})
                               : nb == B && ahead == B ? walk(vectors<B>{}, whole{}, whole{})
                                                       : walk(vectors<B>{}, nb, ahead);
    for (int64_t r = 0; vector_end < len && r < nb; ++r)
      for (int64_t k = vector_end; k < len; ++k)
        E::store(yb + r * y_row + k * E::size,
                 normalized(E::load(xb + r * x_row + k * E::size), mean_hi[k], scale[k], bias[k]));
  }
}

// Whether every vector store of a run of rows lands on a vector-aligned address
// (streaming stores need it): the first row, the row step and the storage
// vector all aligned.
template <class E>
bool vector_aligned(const char *y, int64_t y_row) {
  const int64_t align = E::lanes * E::size;
  return reinterpret_cast<uintptr_t>(y) % align == 0 && y_row % align == 0;
}

// Channels of back-to-back rows whose parameters normalize_rows_rotated keeps on
// the stack (3 arrays of them).
constexpr int64_t kRotatedMaxChannels = 4096;

// Streams back-to-back rows (x_row = y_row = len elements, a whole number of
// vectors) into a y that is not vector-aligned (NumPy's large arrays start 16
// bytes into a page): seen from its first aligned element, head elements on, y
// is rows of the same length whose channels are rotated by head, all aligned.
// The first row's head gets plain stores (it shares a line with what precedes
// y), the last row's rest streamed ones. Its own function, so that only this
// walk's frame holds the rotated parameters.
template <class E>
__attribute__((noinline)) void normalize_rows_rotated(const plan &p, const char *x, char *y, int64_t row,
                                                      int64_t n_rows, int64_t len, int64_t head,
                                                      const affine_params &a, int64_t c0) {
  using acc = typename E::acc;
  acc rotated[3][kRotatedMaxChannels];
  const acc *params[3] = {static_cast<const acc *>(a.mean_hi), static_cast<const acc *>(a.scale),
                          static_cast<const acc *>(a.bias)};
  for (int i = 0; i < 3; ++i)
    for (int64_t k = 0; k < len; ++k) rotated[i][k] = params[i][c0 + (head + k) % len];
  const affine_params rotated_a{rotated[0], rotated[1], rotated[2]};
  normalize_rows_run<E, false>(x, row, y, row, 1, head, a, c0, p.x_from);
  normalize_rows_run<E, true>(x + head * E::size, row, y + head * E::size, row, n_rows - 1, len,
                              rotated_a, 0, p.x_from);
  const int64_t last = (n_rows - 1) * row + head * E::size;
  normalize_rows_run<E, true>(x + last, row, y + last, row, 1, len - head, a, c0 + head, p.x_from);
}

template <class E>
void normalize_rows(const plan &p, const char *x, int64_t x_row, char *y, int64_t y_row,
                    int64_t n_rows, int64_t len, const affine_params &a, int64_t c0) {
  constexpr int64_t align = E::lanes * E::size;
  const int64_t head = (align - reinterpret_cast<uintptr_t>(y) % align) % align / E::size;
  const int64_t row_bytes = len * E::size;
  if (p.stream_y && head != 0 && x_row == row_bytes && y_row == row_bytes && row_bytes % align == 0 &&
      reinterpret_cast<uintptr_t>(y) % E::size == 0 && n_rows >= 2 && len <= kRotatedMaxChannels)
    normalize_rows_rotated<E>(p, x, y, row_bytes, n_rows, len, head, a, c0);
  else if (p.stream_y && vector_aligned<E>(y, y_row))
    normalize_rows_run<E, true>(x, x_row, y, y_row, n_rows, len, a, c0, p.x_from);
  else
    normalize_rows_run<E, false>(x, x_row, y, y_row, n_rows, len, a, c0, p.x_from);
}

template <class E>
void normalize_items(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a) {
  const int64_t xs = p.inner.x_stride, ys = p.inner.y_stride, ps = p.inner.p_stride;
  const bool contig = xs == E::size && ys == E::size && (!p.inner_is_channel || ps == 1);
  if (contig && p.inner_is_channel) {  // folded plans are contiguous
    // A folded plan's longest super row that one tile spans walks in order.
    const int64_t row = folded_row<E>(p, kNormalizeTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      normalize_rows<E>(p, p.x + cur.x_off + seg.begin * xs, step.x_stride, p.y + cur.y_off + seg.begin * ys,
                        step.y_stride, n_rows, seg.len, a, cur.p_off + seg.begin);
    });
    if (p.stream_y) end_streaming();
    return;
  }
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    const char *x = p.x + cur.x_off + seg.begin * xs;
    char *y = p.y + cur.y_off + seg.begin * ys;
    const int64_t c0 = cur.p_off + (p.inner_is_channel ? seg.begin * ps : 0);
    if (contig) normalize_segment<E, true>(p, x, y, c0, seg.len, a);
    else normalize_segment<E, false>(p, x, y, c0, seg.len, a);
  });
  if (p.stream_y) end_streaming();
}

// ---- backward --------------------------------------------------------------------

// The operands of one line segment.
struct grad_segment {
  const char *x;
  const char *dy;
  char *dx;            // null for the sums pass
  const uint8_t *m;    // null when unmasked
  int64_t c0;          // first channel (parameter index)
  int64_t len;
};

inline grad_segment grad_segment_at(const plan &p, const line_offsets &cur, segment seg) {
  const loop_dim &in = p.inner;
  return grad_segment{p.x + cur.x_off + seg.begin * in.x_stride,
                      p.dy + cur.d_off + seg.begin * in.d_stride,
                      p.y ? p.y + cur.y_off + seg.begin * in.y_stride : nullptr,
                      p.mask ? p.mask + cur.m_off + seg.begin * in.m_stride : nullptr,
                      cur.p_off + (p.inner_is_channel ? seg.begin * in.p_stride : 0), seg.len};
}

// Calls f(segment) over [item_begin, item_end); a folded line is handed over
// one super row at a time with c0 = 0, so parameter index j is its position.
template <class F>
void for_each_grad_segment(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  const loop_dim &in = p.inner;
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    grad_segment g = grad_segment_at(p, cur, seg);
    if (!p.period) {
      f(g);
      return;
    }
    for (int64_t k = 0; k < seg.len; k += p.fold_len) {
      f(grad_segment{g.x + k * in.x_stride, g.dy + k * in.d_stride,
                     g.dx ? g.dx + k * in.y_stride : nullptr, g.m ? g.m + k * in.m_stride : nullptr,
                     0, min_of(p.fold_len, seg.len - k)});
    }
  });
}

// Σdy and Σdy·x̂ of one channel's contiguous unmasked run, in blocks of
// compute-type vector partial sums folded into float64 (as plane moments).
template <class E>
void plane_grad_sums_contiguous(const char *x, const char *dy, int64_t len, typename E::acc mh,
                                typename E::acc ml, typename E::acc invstd, double &sum_dy,
                                double &sum_dy_xhat) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes, block = plane_block<E>();
  auto xhat = [&](int64_t at) { return ((E::load_vec(x + at * E::size) - mh) - ml) * invstd; };
  int64_t i = 0;
  while (len >= W && i < len) {
    const int64_t end = min_of(len, i + block);
    vec a0 = {}, a1 = {}, b0 = {}, b1 = {};
    for (; i + 2 * W <= end; i += 2 * W) {
      const vec d0 = E::load_vec(dy + i * E::size), d1 = E::load_vec(dy + (i + W) * E::size);
      a0 += d0; b0 += d0 * xhat(i);
      a1 += d1; b1 += d1 * xhat(i + W);
    }
    // One more vector, then the one ending at the run's end (its lanes already
    // summed dropped): short planes (14x14) spent much of their time in a scalar tail.
    if (i + W <= end) {
      const vec d = E::load_vec(dy + i * E::size);
      a0 += d; b0 += d * xhat(i);
      i += W;
    }
    if (i < end && end == len) {
      const vec d = E::load_vec(dy + (len - W) * E::size);
      a1 += last_lanes(d, len - i);
      b1 += last_lanes(d * xhat(len - W), len - i);
      i = len;
    }
    sum_dy += lane_sum(a0 + a1);
    sum_dy_xhat += lane_sum(b0 + b1);
  }
  for (; i < len; ++i) {
    const double d = E::load(dy + i * E::size);
    sum_dy += d;
    sum_dy_xhat += d * static_cast<double>(((E::load(x + i * E::size) - mh) - ml) * invstd);
  }
}

template <class E, bool Contig, bool Masked>
void grad_sums_segment(const plan &p, const grad_segment &g, const backward_params &b,
                       const backward_scratch &s) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(b.mean_hi);
  const acc *__restrict mean_lo = static_cast<const acc *>(b.mean_lo);
  const acc *__restrict invstd = static_cast<const acc *>(b.invstd);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ds = Contig ? E::size : p.inner.d_stride;
  const int64_t ms = p.inner.m_stride;
  const char *x = g.x, *dy = g.dy;
  const uint8_t *m = g.m;
  const int64_t len = g.len;
  auto used = [&](int64_t i) { return Masked ? double(m[i * ms] != 0) : 1.0; };
  if (!p.inner_is_channel) {
    const int64_t c = g.c0;
    if (Contig && !Masked) {
      plane_grad_sums_contiguous<E>(x, dy, len, mean_hi[c], mean_lo[c], invstd[c],
                                    s.sum_dy[c], s.sum_dy_xhat[c]);
      return;
    }
    double a = 0, h = 0, n = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double d = E::load(dy + i * ds);
      a += d;
      h += d * static_cast<double>(((E::load(x + i * xs) - mean_hi[c]) - mean_lo[c]) * invstd[c]);
      if (Masked) n += used(i);
    }
    s.sum_dy[c] += a;
    s.sum_dy_xhat[c] += h;
    if (Masked) s.count[c] += n;
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  double *__restrict sum_dy = s.sum_dy, *__restrict sum_dy_xhat = s.sum_dy_xhat;
  double *__restrict count = s.count;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = g.c0 + j * ps;
    const acc d = E::load(dy + j * ds);
    const acc h = ((E::load(x + j * xs) - mean_hi[c]) - mean_lo[c]) * invstd[c];
    sum_dy[c] += static_cast<double>(d);
    sum_dy_xhat[c] += static_cast<double>(d) * static_cast<double>(h);
    if (Masked) count[c] += used(j);
  }
}

template <class E, bool Contig, bool Masked>
void grad_apply_segment(const plan &p, const grad_segment &g, const backward_params &b) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(b.mean_hi);
  const acc *__restrict mean_lo = static_cast<const acc *>(b.mean_lo);
  const acc *__restrict dy_scale = static_cast<const acc *>(b.dy_scale);
  const acc *__restrict xc_scale = static_cast<const acc *>(b.xc_scale);
  const acc *__restrict shift = static_cast<const acc *>(b.shift);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ds = Contig ? E::size : p.inner.d_stride;
  const int64_t ys = Contig ? E::size : p.inner.y_stride;
  const int64_t ms = p.inner.m_stride;
  // Locals, not g's fields: a store through dx could otherwise alias g.
  const char *x = g.x, *dy = g.dy;
  char *dx = g.dx;
  const uint8_t *m = g.m;
  const int64_t len = g.len, c0 = g.c0;
  auto used = [&](int64_t i) { return Masked ? acc(m[i * ms] != 0) : acc(1); };
  if (!p.inner_is_channel) {
    const acc mh = mean_hi[c0], ml = mean_lo[c0], a = dy_scale[c0], xc = xc_scale[c0], sh = shift[c0];
    int64_t i = 0;
    // Explicit vectors: the autovectorized loop's set-up cost short planes
    // (14x14) about as much as their work.
    if constexpr (Contig && !Masked) {
      using vec = typename E::vec;
      for (; i + E::lanes <= len; i += E::lanes) {
        const vec centred = (E::load_vec(x + i * E::size) - mh) - ml;
        E::store_vec(dx + i * E::size, a * E::load_vec(dy + i * E::size) + (xc * centred + sh));
      }
    }
    for (; i < len; ++i) {
      const acc centred = (E::load(x + i * xs) - mh) - ml;
      E::store(dx + i * ys, a * E::load(dy + i * ds) + used(i) * (xc * centred + sh));
    }
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = c0 + j * ps;
    const acc centred = (E::load(x + j * xs) - mean_hi[c]) - mean_lo[c];
    E::store(dx + j * ys, dy_scale[c] * E::load(dy + j * ds) + used(j) * (xc_scale[c] * centred + shift[c]));
  }
}

// Contig: x, dy (and dx) unit-stride, and unit channel stride for rows x C.
template <class E>
bool grad_contiguous(const plan &p) {
  const loop_dim &in = p.inner;
  return in.x_stride == E::size && in.d_stride == E::size &&
         (!p.y || in.y_stride == E::size) && (!p.inner_is_channel || in.p_stride == 1);
}

// Σdy and Σdy·x̂ of unmasked contiguous rows x C: tiles of channels keep float
// partial sums in registers over blocks of kRowBlock rows, folded into the
// float64 sums per block (summed per element in float64 through memory, they
// took 10 instructions per element). A tile has 5 values per vector: with
// AVX2, 2 vectors fit the 16 registers. With AVX-512, 16 vectors (256 float32
// channels) put the sums in the 32 registers and the parameters become memory
// operands; each tile walks as many channels as possible in memory order. With
// 4 vectors, backward of (8,56,56,256) and (64,56,56,256) at 2 threads took
// 1.3-1.55x as long (interleaved in either order), (2048,2048) and (256,1024)
// the same.
constexpr int kGradTileVectors = kVecBytes >= 64 ? 16 : 2;
// Rows a backward tile walks before the next tile: a few streams, which the
// prefetchers follow (tiles down 32-row blocks of 512-channel rows ran 3x
// slower in the normalize).
constexpr int64_t kGradRowBlock = 8;

// Rows a tile of `tile` channels walks before the next tile. One tile covering
// the row walks the run in memory order: no blocks needed. From memory, wider
// rows go one at a time: the bandwidth hides the parameter loads, and the tile
// walk defeated the hardware prefetchers.
inline int64_t rows_per_block(int64_t n_rows, int64_t len, int64_t tile, bool from_memory) {
  return len <= tile ? n_rows : from_memory ? 1 : kGradRowBlock;
}

template <class E, int K>
void grad_rows_tile_sums(const char *x, const char *dy, int64_t x_row, int64_t d_row, int64_t n_rows,
                         const typename E::acc *mean_hi, const typename E::acc *mean_lo,
                         const typename E::acc *invstd, double *sum_dy, double *sum_dy_xhat) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec mh[K], ml[K], is[K], a[K], h[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    mh[q] = load_acc<E>(mean_hi + q * W);
    ml[q] = load_acc<E>(mean_lo + q * W);
    is[q] = load_acc<E>(invstd + q * W);
    a[q] = vec{};
    h[q] = vec{};
  }
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const vec d = E::load_vec(dy + r * d_row + q * W * E::size);
      a[q] += d;
      h[q] += d * (((E::load_vec(x + r * x_row + q * W * E::size) - mh[q]) - ml[q]) * is[q]);
    }
  }
  for (int q = 0; q < K; ++q)
    for (int64_t l = 0; l < W; ++l) {
      sum_dy[q * W + l] += static_cast<double>(a[q][l]);
      sum_dy_xhat[q * W + l] += static_cast<double>(h[q][l]);
    }
}

// g: the run's first row; the others follow at the row step (both copies:
// stores through dx could otherwise alias them and force reloads).
template <class E>
void grad_rows_sums(const plan &p, const grad_segment g, const loop_dim step, int64_t n_rows,
                    const backward_params &b, const backward_scratch &s) {
  using acc = typename E::acc;
  const acc *mean_hi = static_cast<const acc *>(b.mean_hi) + g.c0;
  const acc *mean_lo = static_cast<const acc *>(b.mean_lo) + g.c0;
  const acc *invstd = static_cast<const acc *>(b.invstd) + g.c0;
  double *sum_dy = s.sum_dy + g.c0, *sum_dy_xhat = s.sum_dy_xhat + g.c0;
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRowBlock) {
    const int64_t nb = min_of(kRowBlock, n_rows - r0);
    const char *xb = g.x + r0 * step.x_stride, *db = g.dy + r0 * step.d_stride;
    const int64_t j = for_each_tile<kGradTileVectors, E::lanes>(g.len, [&](auto width, int64_t j0) {
      grad_rows_tile_sums<E, decltype(width)::count>(xb + j0 * E::size, db + j0 * E::size, step.x_stride,
                                                     step.d_stride, nb, mean_hi + j0, mean_lo + j0,
                                                     invstd + j0, sum_dy + j0, sum_dy_xhat + j0);
    });
    for (int64_t r = 0; j < g.len && r < nb; ++r)
      grad_sums_segment<E, true, false>(
          p, grad_segment{xb + r * step.x_stride + j * E::size, db + r * step.d_stride + j * E::size,
                          nullptr, nullptr, g.c0 + j, g.len - j}, b, s);
  }
}

template <class E>
void backward_sums_items(const plan &p, int64_t item_begin, int64_t item_end,
                         const backward_params &b, const backward_scratch &s) {
  const bool contig = grad_contiguous<E>(p), masked = p.mask != nullptr;
  if (contig && !masked && p.inner_is_channel) {
    const int64_t row = folded_row<E>(p, kGradTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      grad_rows_sums<E>(p, grad_segment_at(p, cur, seg), step, n_rows, b, s);
    });
    return;
  }
  for_each_grad_segment(p, item_begin, item_end, [&](const grad_segment &g) {
    if (masked) {
      if (contig) grad_sums_segment<E, true, true>(p, g, b, s);
      else grad_sums_segment<E, false, true>(p, g, b, s);
    } else {
      if (contig) grad_sums_segment<E, true, false>(p, g, b, s);
      else grad_sums_segment<E, false, false>(p, g, b, s);
    }
  });
}

// dx of unmasked contiguous rows x C, in tiles whose five parameters stay in
// registers (as normalize_rows_run).
template <class E, int K>
void grad_rows_tile_apply(const char *x, const char *dy, char *dx, int64_t x_row, int64_t d_row,
                          int64_t y_row, int64_t n_rows, const backward_params &b, int64_t c) {
  using acc = typename E::acc;
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  auto param = [c](const void *p, int q) { return load_acc<E>(static_cast<const acc *>(p) + c + q * W); };
  vec mh[K], ml[K], ds[K], xc[K], sh[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    mh[q] = param(b.mean_hi, q);
    ml[q] = param(b.mean_lo, q);
    ds[q] = param(b.dy_scale, q);
    xc[q] = param(b.xc_scale, q);
    sh[q] = param(b.shift, q);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const int64_t at = q * W * E::size;
      const vec centred = (E::load_vec(x + r * x_row + at) - mh[q]) - ml[q];
      E::store_vec(dx + r * y_row + at, ds[q] * E::load_vec(dy + r * d_row + at) + (xc[q] * centred + sh[q]));
    }
  }
}

// g: the run's first row; the others follow at the row step (both copies:
// stores through dx could otherwise alias them and force reloads).
template <class E>
void grad_rows_apply(const plan &p, const grad_segment g, const loop_dim step, int64_t n_rows,
                     const backward_params &b) {
  const int64_t block = rows_per_block(n_rows, g.len, kGradTileVectors * E::lanes,
                                       p.x_from == x_source::memory);
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t nb = min_of(block, n_rows - r0);
    const char *xb = g.x + r0 * step.x_stride, *db = g.dy + r0 * step.d_stride;
    char *yb = g.dx + r0 * step.y_stride;
    const int64_t j = for_each_tile<kGradTileVectors, E::lanes>(g.len, [&](auto width, int64_t j0) {
      grad_rows_tile_apply<E, decltype(width)::count>(xb + j0 * E::size, db + j0 * E::size,
                                                      yb + j0 * E::size, step.x_stride, step.d_stride,
                                                      step.y_stride, nb, b, g.c0 + j0);
    });
    for (int64_t r = 0; j < g.len && r < nb; ++r)
      grad_apply_segment<E, true, false>(
          p, grad_segment{xb + r * step.x_stride + j * E::size, db + r * step.d_stride + j * E::size,
                          yb + r * step.y_stride + j * E::size, nullptr, g.c0 + j, g.len - j}, b);
  }
}

template <class E>
void backward_apply_items(const plan &p, int64_t item_begin, int64_t item_end,
                          const backward_params &b) {
  const bool contig = grad_contiguous<E>(p), masked = p.mask != nullptr;
  if (contig && !masked && p.inner_is_channel) {
    const int64_t row = folded_row<E>(p, kGradTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      grad_rows_apply<E>(p, grad_segment_at(p, cur, seg), step, n_rows, b);
    });
    return;
  }
  for_each_grad_segment(p, item_begin, item_end, [&](const grad_segment &g) {
    if (masked) {
      if (contig) grad_apply_segment<E, true, true>(p, g, b);
      else grad_apply_segment<E, false, true>(p, g, b);
    } else {
      if (contig) grad_apply_segment<E, true, false>(p, g, b);
      else grad_apply_segment<E, false, false>(p, g, b);
    }
  });
}

// ---- dtype dispatch -----------------------------------------------------------

template <template <class> class K, class... Args>
void by_dtype(bn_dtype dt, Args &&...args) {
  switch (dt) {
    case BN_FLOAT32: K<f32_elem>::run(args...); break;
    case BN_FLOAT64: K<f64_elem>::run(args...); break;
    case BN_FLOAT16: K<f16_elem>::run(args...); break;
    case BN_BFLOAT16: K<bf16_elem>::run(args...); break;
    default: break;  // validated by the caller
  }
}

template <class E> struct moments_kernel {
  static void run(const plan &p, int64_t b, int64_t e, const moments_scratch &s) {
    moments_items<E>(p, b, e, s);
  }
};
template <class E> struct normalize_kernel {
  static void run(const plan &p, int64_t b, int64_t e, const affine_params &a) {
    normalize_items<E>(p, b, e, a);
  }
};

template <class E> struct backward_sums_kernel {
  static void run(const plan &p, int64_t b, int64_t e, const backward_params &bp,
                  const backward_scratch &s) {
    backward_sums_items<E>(p, b, e, bp, s);
  }
};
template <class E> struct backward_apply_kernel {
  static void run(const plan &p, int64_t b, int64_t e, const backward_params &bp) {
    backward_apply_items<E>(p, b, e, bp);
  }
};

void moments_entry(const plan &p, int64_t b, int64_t e, const moments_scratch &s) {
  by_dtype<moments_kernel>(p.dtype, p, b, e, s);
}
void normalize_entry(const plan &p, int64_t b, int64_t e, const affine_params &a) {
  by_dtype<normalize_kernel>(p.dtype, p, b, e, a);
}

void backward_sums_entry(const plan &p, int64_t b, int64_t e, const backward_params &bp,
                         const backward_scratch &s) {
  by_dtype<backward_sums_kernel>(p.dtype, p, b, e, bp, s);
}
void backward_apply_entry(const plan &p, int64_t b, int64_t e, const backward_params &bp) {
  by_dtype<backward_apply_kernel>(p.dtype, p, b, e, bp);
}

}  // namespace

extern const kernel_table table;
const kernel_table table = {BN_ISA_NAME, moments_entry, normalize_entry, backward_sums_entry,
                            backward_apply_entry};

}  // namespace BN_ISA_NS
}  // namespace bn_core
