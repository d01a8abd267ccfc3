#include "reference.hpp"

#include <cfloat>
#include <cmath>
#include <cstdlib>

namespace fuzz {
namespace {

size_t at(int64_t i) { return static_cast<size_t>(i); }

double param_or(const double *values, int64_t c, double otherwise) { return values ? values[c] : otherwise; }

// |x - mean| plus its rounding error in the compute precision, relative to the operands.
double deviation_magnitude(double x, double mean, const tolerance &tol) {
  return std::fabs(x - mean) + 16 * tol.unit * (std::fabs(x) + std::fabs(mean));
}

// The absolute error of x - mean near the subnormal range: a few subnormal units.
double deviation_floor(const tolerance &tol) {
  return 4 * (tol.unit == 0x1p-53 ? 4.9406564584124654e-324 : 1.4012984643248171e-45);
}

// The power of two that brings each channel's largest used finite |x| into [0.5, 1).
std::vector<int> channel_exponents(const elements &e) {
  std::vector<double> largest(at(e.channels), 0.0);
  for (size_t i = 0; i < e.x.size(); ++i)
    if (e.used[i] && std::isfinite(e.x[i])) largest[at(e.channel[i])] = std::fmax(largest[at(e.channel[i])], std::fabs(e.x[i]));
  std::vector<int> exponent(at(e.channels), 0);
  for (size_t c = 0; c < largest.size(); ++c)
    if (largest[c] > 0) std::frexp(largest[c], &exponent[c]);
  return exponent;
}

}  // namespace

moments_ref reference_moments(const elements &e) {
  const size_t C = at(e.channels);
  moments_ref r{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0),
                std::vector<double>(C, 0.0), std::vector<double>(C, 0.0), std::vector<char>(C, 0)};
  const std::vector<int> exponent = channel_exponents(e);
  std::vector<double> scaled_sum(C, 0.0), scaled_m2(C, 0.0), scaled_spread(C, 0.0);
  for (size_t i = 0; i < e.x.size(); ++i) {
    if (!e.used[i]) continue;
    const size_t c = at(e.channel[i]);
    r.count[c] += 1;
    r.non_finite[c] |= !std::isfinite(e.x[i]);
    r.magnitude[c] = std::fmax(r.magnitude[c], std::fabs(e.x[i]));
    scaled_sum[c] += std::ldexp(e.x[i], -exponent[c]);
  }
  for (size_t c = 0; c < C; ++c) scaled_sum[c] = r.count[c] > 0 ? scaled_sum[c] / r.count[c] : 0.0;  // the mean
  // A second pass corrects the mean by the mean deviation from it: a plain sum
  // is off by ulps (16 equal values need not sum to 16 times one), which would
  // give a constant channel a variance.
  std::vector<double> correction(C, 0.0);
  for (size_t i = 0; i < e.x.size(); ++i)
    if (e.used[i]) correction[at(e.channel[i])] += std::ldexp(e.x[i], -exponent[at(e.channel[i])]) - scaled_sum[at(e.channel[i])];
  for (size_t c = 0; c < C; ++c) scaled_sum[c] += r.count[c] > 0 ? correction[c] / r.count[c] : 0.0;
  for (size_t i = 0; i < e.x.size(); ++i) {
    if (!e.used[i]) continue;
    const size_t c = at(e.channel[i]);
    const double d = std::ldexp(e.x[i], -exponent[c]) - scaled_sum[c];
    scaled_m2[c] += d * d;
    scaled_spread[c] = std::fmax(scaled_spread[c], std::fabs(d));
  }
  for (size_t c = 0; c < C; ++c) {
    if (r.count[c] == 0) continue;
    r.mean[c] = std::ldexp(scaled_sum[c], exponent[c]);
    r.variance[c] = std::ldexp(scaled_m2[c] / r.count[c], 2 * exponent[c]);
    r.spread[c] = std::ldexp(scaled_spread[c], exponent[c]);
  }
  return r;
}

void reference_normalize(const elements &e, const channel_params &p, const tolerance &tol,
                         std::vector<double> &y, std::vector<double> &bound) {
  y.assign(e.x.size(), 0.0);
  bound.assign(e.x.size(), 0.0);
  for (size_t i = 0; i < e.x.size(); ++i) {
    const int64_t c = e.channel[i];
    const double x = e.x[i], mean = p.mean[c], denominator = p.variance[c] + p.epsilon;
    const double s = param_or(p.gamma, c, 1.0) / std::sqrt(denominator), beta = param_or(p.beta, c, 0.0);
    y[i] = (x - mean) * s + beta;
    bound[i] = denominator > 0 ? tol.out_rtol * (std::fabs(s) * deviation_magnitude(x, mean, tol) + std::fabs(beta)) +
                                     std::fabs(s) * deviation_floor(tol)
                               : std::nan("");
  }
}

backward_sums_ref reference_backward_sums(const elements &e, const std::vector<double> &dy,
                                          const channel_params &p, const tolerance &tol) {
  const size_t C = at(e.channels);
  backward_sums_ref r{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0),
                      std::vector<double>(C, 0.0), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  for (size_t i = 0; i < e.x.size(); ++i) {
    const size_t c = at(e.channel[i]);
    const double s = 1.0 / std::sqrt(p.variance[c] + p.epsilon), d = e.x[i] - p.mean[c];
    const double xhat_magnitude = deviation_magnitude(e.x[i], p.mean[c], tol) * s;
    r.count[c] += e.used[i] ? 1 : 0;
    r.sum_dy[c] += dy[i];
    r.sum_dy_xhat[c] += dy[i] * (d * s);  // x̂ first: dy·d may underflow where dy·x̂ does not
    r.abs_dy[c] += std::fabs(dy[i]);
    r.abs_dy_xhat[c] += std::fabs(dy[i]) * xhat_magnitude;
    r.xhat_floor_error[c] += std::fabs(dy[i]) * (deviation_floor(tol) * s);
  }
  return r;
}

void reference_dx(const elements &e, const std::vector<double> &dy, const channel_params &p, bool training,
                  const backward_totals &t, const tolerance &tol, std::vector<double> &dx,
                  std::vector<double> &bound) {
  dx.assign(e.x.size(), 0.0);
  bound.assign(e.x.size(), 0.0);
  for (size_t i = 0; i < e.x.size(); ++i) {
    const int64_t c = e.channel[i];
    const double s = 1.0 / std::sqrt(p.variance[c] + p.epsilon), gs = param_or(p.gamma, c, 1.0) * s;
    const double d = e.x[i] - p.mean[c];
    const double xhat_magnitude = deviation_magnitude(e.x[i], p.mean[c], tol) * s;
    double through = 0, through_magnitude = 0, sums_error = 0, floor_error = 0;
    if (training && e.used[i] && t.count[c] > 0) {
      const double n = t.count[c];
      through = (t.sum_dy[c] + d * s * t.sum_dy_xhat[c]) / n;
      through_magnitude = (std::fabs(t.sum_dy[c]) + xhat_magnitude * std::fabs(t.sum_dy_xhat[c])) / n;
      sums_error = (t.sums_ref.abs_dy[c] + xhat_magnitude * t.sums_ref.abs_dy_xhat[c]) / n;
      floor_error = (deviation_floor(tol) * s * std::fabs(t.sum_dy_xhat[c]) +
                     xhat_magnitude * t.sums_ref.xhat_floor_error[c]) / n;
    }
    dx[i] = gs * (dy[i] - through);
    bound[i] = std::fabs(gs) * (tol.out_rtol * (std::fabs(dy[i]) + through_magnitude) + tol.stats_rtol * sums_error +
                                floor_error);
    // Open finding (README.md): the core's coefficient of x − mean, γ·s²·Σdy·x̂/N,
    // overflows its compute type (float32 for 16- and 32-bit data): no exact value
    // is expected in that channel.
    const double compute_max = tol.unit > 0x1p-30 ? FLT_MAX : DBL_MAX;
    const double coefficient = t.count[c] > 0 ? gs * (s * (t.sum_dy_xhat[c] / t.count[c])) : 0.0;
    if (training && !(std::fabs(coefficient) <= compute_max))
      bound[i] = std::nan("");
  }
}

}  // namespace fuzz
