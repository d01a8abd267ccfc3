// Shifted sums and Chan's merge: block sizes of the shifted sums Σ(x−K), Σ(x−K)²,
// their merge into float64 (count, mean, M2) per channel, and the merge of the
// team's per-slot partials into the statistics.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- moments: planes x L (the inner run is one channel) -------------------------

constexpr int64_t kLanes = 16;        // independent partial sums: short chains, SIMD-friendly
// Elements per shifted-sum block of a plane: two chains of 32 per vector lane,
// so the float32 accuracy is the same on every ISA.
template <class E> constexpr int64_t plane_block() { return 64 * E::lanes; }
constexpr int64_t kRowBlock = 32;     // rows per shifted-sum block for rows x C: the fp32 chain length
constexpr int64_t kChannelChunk = kRowsChannelChunk;  // channels per block (bounds scratch)

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
// first merge, and delta·(delta·0) is 0 even where delta² would overflow (a
// first block of float64 data near 1e154 and beyond). The shift follows the
// mean so later blocks stay well centred.
template <class T, class K>
void merge_shifted_sums(const T *s1, const T *s2, const K *k, double n_b, int64_t len,
                        double *__restrict count, double *__restrict mean, double *__restrict m2,
                        double *__restrict shift) {
  const double inv_n_b = 1.0 / n_b;
  for (int64_t j = 0; j < len; ++j) {
    const double a = s1[j], b = s2[j];
    const double mean_b = static_cast<double>(k[j]) + a * inv_n_b;
    // Rounding can take b − a²/n below 0 (clamped); inf − inf (a spread whose squares
    // overflow) is NaN and takes b itself: the true M2 is then beyond the range too.
    const double centered = b - a * a * inv_n_b;
    const double m2_b = centered >= 0 ? centered : centered < 0 ? 0.0 : b;
    const double total = count[j] + n_b;
    const double delta = mean_b - mean[j];
    mean[j] += delta * (n_b / total);
    m2[j] += m2_b + delta * (delta * (count[j] * n_b / total));
    count[j] = total;
    shift[j] = mean[j];
  }
}

// A channel's consecutive blocks share one shift: their shifted sums add up, so
// they merge once per this many blocks' positions, within a plane and across a
// channel's planes (run_s1, run_s2, run_n). A merge's result is the next
// block's shift, so merging after every block (or every short plane) makes the
// next block's sums wait for the merge's float64 divisions instead of
// overlapping with them. The shift still follows the mean after each group
// (bench/DESIGN.md, 'kernels/shifted_sums.hpp').
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

// ---- the team's partials ------------------------------------------------------

// Chan's merge of every channel's partial (n_b, mean_b, m2_b) into (n, mean, m2),
// exact to rounding whatever the two parts' sizes and means. A merge with an
// empty part, on either side, gives the other part exactly (selects, so the
// loop has no branch and vectorizes: a channel's merges chain their divisions,
// but channels are independent).
inline void chan_merge_channels(const double *__restrict n_b, const double *__restrict mean_b,
                                const double *__restrict m2_b, int64_t channels, double *__restrict n,
                                double *__restrict mean, double *__restrict m2) {
  for (int64_t c = 0; c < channels; ++c) {
    const double n_a = n[c], mean_a = mean[c], m2_a = m2[c], nb = n_b[c], mb = mean_b[c], m2b = m2_b[c];
    const double total = n_a + nb;
    const double delta = mb - mean_a;
    const double merged_mean = mean_a + delta * (nb / total);
    // delta² alone may overflow where the product does not
    const double merged_m2 = m2_a + (m2b + delta * (delta * (n_a * nb / total)));
    const double mean_with_b = n_a == 0.0 ? mb : merged_mean, m2_with_b = n_a == 0.0 ? m2b : merged_m2;
    mean[c] = nb == 0.0 ? mean_a : mean_with_b;
    m2[c] = nb == 0.0 ? m2_a : m2_with_b;
    n[c] = nb == 0.0 ? n_a : total;
  }
}

// The statistics of merged partials (any: some slot ran; none did, every count
// is 0): mean, biased variance (rounding can take M2 below 0: clamped; NaN,
// from NaN or infinite data, stays NaN) and
// count (if asked), 0 for a channel no element reached. True if some channel's
// mean + M2 is not finite (for float32 data no finite mean and M2 overflow
// their sum). The flag is a select rather than an or of booleans, which the
// compiler does not vectorize.
inline bool statistics_of_merged(const double *__restrict n, const double *__restrict mean,
                                 const double *__restrict m2, bool any, int64_t channels,
                                 double *__restrict mean_out, double *__restrict variance_out,
                                 double *__restrict count_out) {
  const double ran = any ? 1.0 : 0.0;
  double non_finite = 0.0;
  for (int64_t c = 0; c < channels; ++c) {
    const double n_c = n[c] * ran, mean_c = mean[c], m2_c = m2[c];
    const double mu = n_c > 0 ? mean_c : 0.0, m2_kept = n_c > 0 ? m2_c : 0.0, v = m2_kept / n_c;
    mean_out[c] = mu;
    variance_out[c] = n_c > 0 ? (v < 0.0 ? 0.0 : v) : 0.0;  // std::max(v, 0.0): NaN stays
    const double t = mu + m2_kept, zero_if_finite = t - t;  // NaN for an infinite or NaN t
    non_finite = zero_if_finite == 0.0 ? non_finite : 1.0;
  }
  if (count_out)
    for (int64_t c = 0; c < channels; ++c) count_out[c] = n[c] * ran;
  return non_finite != 0.0;
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
