// Statistics of channels-first lines (planes x L: the inner run is one channel),
// contiguous or strided, masked or not (template parameters).
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

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
  double sum1 = 0, sum2 = 0, used = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum1 += s1[l];
    sum2 += s2[l];
    used += cnt[l];
  }
  s1_out = sum1;
  s2_out = sum2;
  n_out = Masked ? used : static_cast<double>(len);
}

// Σ over the lanes in float64, pairwise: lane by lane in order it would be a
// chain of dependent adds per fold, on a short plane a large part of its cost
// (bench/DESIGN.md, 'kernels/moments_channels_first.hpp'). Callers add their two
// chains' vectors first: one rounding in the compute type next to the chains'
// own, for half the conversions.
template <class V>
double lane_sum(V v) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  double d[n];
  for (int l = 0; l < n; ++l) d[l] = static_cast<double>(v[l]);
  // Unrolled into register operations: as loops, d stays on the stack and each
  // halving step loads, as vectors, lanes just stored one by one; a load that
  // spans several pending stores cannot take its data from them (no store
  // forwarding) and waits until they reach the cache (bench/DESIGN.md).
#pragma GCC unroll 8
  for (int w = n / 2; w > 0; w /= 2)
#pragma GCC unroll 16
    for (int l = 0; l < w; ++l) d[l] += d[l + w];
  return d[0];
}

// v with only its last `rest` lanes kept: the vector that ends at a run's end,
// whose first lanes the vectors before it summed already. A scalar tail would
// cost each short plane (14x14 = 12 vectors + 4) a chain of dependent float64
// adds.
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
      // Contiguous unmasked blocks sum in vectors relative to their first value:
      // on short planes every plane of the first image is a first block, and a
      // scalar float64 pass, one dependent add per element, would take longer
      // than the vector shifted sums that follow (bench/DESIGN.md). Values whose
      // differences overflow overflow the sums that follow anyway.
      double mean;
      if (!Masked && xs == E::size) {
        const acc first = E::load(xb);
        double s1, s2;
        plane_block_sums_contiguous<E>(xb, len, first, s1, s2);
        mean = static_cast<double>(first) + s1 / static_cast<double>(len);
      } else {
        double part[8] = {}, cnt = 0;  // 8 chains: one would wait an add's latency per element
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

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
