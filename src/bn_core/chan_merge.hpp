// Chan et al.'s pairwise merge of (count, mean, M2) summaries: exact to
// rounding whatever the two parts' sizes and means: the team's per-thread
// partials (scratch.cpp; the kernels merge shifted sums with merge_shifted_sums).
// `static` on purpose: no symbol shared between translation units.
#ifndef BN_CORE_CHAN_MERGE_HPP
#define BN_CORE_CHAN_MERGE_HPP

namespace bn_core {

static inline void chan_merge(double &n, double &mean, double &m2, double n_b, double mean_b,
                              double m2_b) {
  if (n_b == 0.0) return;
  if (n == 0.0) {
    n = n_b;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const double total = n + n_b;
  const double delta = mean_b - mean;
  mean += delta * (n_b / total);
  m2 += m2_b + delta * (delta * (n * n_b / total));  // delta² alone may overflow where the product does not
  n = total;
}

}  // namespace bn_core

#endif
