// The float64 reference every result is checked against, computed here from
// the values as stored (x-shaped data in row-major order, one channel index
// and one used flag per element).
#ifndef BN_FUZZ_REFERENCE_HPP
#define BN_FUZZ_REFERENCE_HPP

#include <cstdint>
#include <vector>

namespace fuzz {

// What a dtype's results are held to (checks.cpp: tolerance_of).
struct tolerance {
  double unit;        // the compute precision's unit roundoff (float32 for 16-bit data)
  double out_rtol;    // of an output element, relative to its error scale
  double out_atol;    // absolute, for outputs near the dtype's subnormals
  double stats_rtol;  // of statistics and sums, relative to their scales
  double max_finite;  // the output dtype's largest finite value
};

struct elements {
  std::vector<double> x;
  std::vector<int64_t> channel;
  std::vector<char> used;  // the mask (all 1 without one)
  int64_t channels = 0;
};

// Per channel over the used elements: two-pass moments on the values scaled
// by a power of two (exact), so no intermediate overflows or underflows.
struct moments_ref {
  std::vector<double> mean, variance, count;
  std::vector<double> spread;     // max |x - mean|: the scale of the mean's error
  std::vector<double> magnitude;  // max |x|
  std::vector<char> non_finite;   // a used value is NaN or inf
};
moments_ref reference_moments(const elements &e);

// Per-channel parameters of a normalization or backward (gamma/beta may be empty: 1 and 0).
struct channel_params {
  const double *mean, *variance, *gamma, *beta;
  double epsilon;
};

// y = (x - mean) * gamma / sqrt(variance + epsilon) + beta, and each value's
// allowed error: out_rtol·(|gamma·s|·(|x - mean| + 16u(|x| + |mean|)) + |beta|) plus
// |gamma·s| times a few subnormal units;
// NaN where variance + epsilon is not > 0 (no check: documented NaN).
void reference_normalize(const elements &e, const channel_params &p, const tolerance &tol,
                         std::vector<double> &y, std::vector<double> &bound);

// Σdy, Σdy·x̂ per channel over every position, the used counts, the sums of
// magnitudes |dy| and |dy|·|x̂| (with x̂'s own error) that bound their relative
// error, and Σdy·x̂'s absolute error from x - mean's near the subnormal range.
struct backward_sums_ref {
  std::vector<double> count, sum_dy, sum_dy_xhat, abs_dy, abs_dy_xhat, xhat_floor_error;
};
backward_sums_ref reference_backward_sums(const elements &e, const std::vector<double> &dy,
                                          const channel_params &p, const tolerance &tol);

// dx from the totals (count, Σdy, Σdy·x̂; sums_ref bounds their error), as
// bn_backward documents it (training false: gamma·s·dy), and each value's
// allowed error.
struct backward_totals {
  const double *count, *sum_dy, *sum_dy_xhat;
  const backward_sums_ref &sums_ref;
};
void reference_dx(const elements &e, const std::vector<double> &dy, const channel_params &p, bool training,
                  const backward_totals &t, const tolerance &tol, std::vector<double> &dx,
                  std::vector<double> &bound);

}  // namespace fuzz

#endif
