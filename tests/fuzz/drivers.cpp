#include "drivers.hpp"

#include <cmath>
#include <string>

#include "checks.hpp"

namespace fuzz {
namespace {

const double *optional(const double_array &a) { return a.absent() ? nullptr : a.get(); }

std::vector<double> output_values(const call &c) {
  const tensor_buffer &t = c.out_tensor();
  const std::vector<int64_t> &offsets = c.out_element_offsets();
  std::vector<double> values(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) values[i] = t.get(offsets[i]);
  return values;
}

void expect_outputs(const char *what, const call &c, const std::vector<double> &want,
                    const std::vector<double> &bound, const std::vector<char> &skip_channel) {
  const tolerance tol = tolerance_of(c.dtype);
  const std::vector<double> got = output_values(c);
  for (size_t i = 0; i < got.size(); ++i)
    if (skip_channel.empty() || !skip_channel[static_cast<size_t>(c.e.channel[i])])
      expect_close(what, static_cast<int64_t>(i), got[i], want[i], bound[i], tol);
}

// Channels with a NaN or inf anywhere in x: the backward sums run over every
// position, so no exact value is expected there.
std::vector<char> non_finite_channels(const elements &e) {
  std::vector<char> flagged(static_cast<size_t>(e.channels), 0);
  for (size_t i = 0; i < e.x.size(); ++i) flagged[static_cast<size_t>(e.channel[i])] |= !std::isfinite(e.x[i]);
  return flagged;
}

void expect_status_ok(entry op, bn_status st) { expect_status(entry_name(op), st, BN_OK); }

void check_moments(const call &c, const args &a) {
  expect_status_ok(entry::moments, invoke(entry::moments, a));
  const moments_ref ref = reference_moments(c.e);
  const tolerance tol = tolerance_of(c.dtype);
  for (int64_t ch = 0; ch < c.e.channels; ++ch) {
    expect_moments("bn_moments", ch, c.mean[ch], c.variance[ch], ref, tol);
    if (!c.count.absent() && c.count[ch] != ref.count[ch]) finding("bn_moments: count of channel " + std::to_string(ch));
  }
}

void check_normalize(const call &c, const args &a) {
  expect_status_ok(entry::normalize, invoke(entry::normalize, a));
  std::vector<double> want, bound;
  reference_normalize(c.e, {c.mean.get(), c.variance.get(), optional(c.gamma), optional(c.beta), c.epsilon},
                      tolerance_of(c.dtype), want, bound);
  expect_outputs("bn_normalize y", c, want, bound, {});
}

void check_train_forward(const call &c, const args &a) {
  expect_status_ok(entry::train_forward, invoke(entry::train_forward, a));
  const moments_ref ref = reference_moments(c.e);
  const tolerance tol = tolerance_of(c.dtype);
  for (int64_t ch = 0; ch < c.e.channels; ++ch)
    expect_moments("bn_train_forward", ch, c.mean[ch], c.variance[ch], ref, tol);
  // y normalizes every position with the statistics the call returned.
  std::vector<double> want, bound;
  reference_normalize(c.e, {c.mean.get(), c.variance.get(), optional(c.gamma), optional(c.beta), c.epsilon}, tol,
                      want, bound);
  expect_outputs("bn_train_forward y", c, want, bound, ref.non_finite);
}

// Σdy and Σdy·x̂ of a backward against the reference, where given.
void expect_sums(const char *what, const call &c, const backward_sums_ref &ref, const std::vector<char> &skip) {
  const tolerance tol = tolerance_of(c.dtype);
  const tolerance sums{tol.unit, 0, 4.9406564584124654e-324, 0, 1.7976931348623157e308};
  for (int64_t ch = 0; ch < c.e.channels; ++ch) {
    if (skip[static_cast<size_t>(ch)] || !(c.variance[ch] + c.epsilon > 0)) continue;
    expect_close((std::string(what) + " sum_dy").c_str(), ch, c.sum_dy[ch], ref.sum_dy[ch],
                 tol.stats_rtol * ref.abs_dy[ch], sums);
    expect_close((std::string(what) + " sum_dy_xhat").c_str(), ch, c.sum_dy_xhat[ch], ref.sum_dy_xhat[ch],
                 tol.stats_rtol * ref.abs_dy_xhat[ch] + ref.xhat_floor_error[ch], sums);
  }
}

// The channels whose dx has no exact value: x not finite, or variance + epsilon not > 0.
std::vector<char> unchecked_dx_channels(const call &c) {
  std::vector<char> skip = non_finite_channels(c.e);
  for (int64_t ch = 0; ch < c.e.channels; ++ch) skip[static_cast<size_t>(ch)] |= !(c.variance[ch] + c.epsilon > 0);
  return skip;
}

void check_backward(const call &c, const args &a) {
  const std::vector<double> dy = c.dy_values;  // dx may overwrite dy or x
  expect_status_ok(entry::backward, invoke(entry::backward, a));
  const tolerance tol = tolerance_of(c.dtype);
  const channel_params p{c.mean.get(), c.variance.get(), optional(c.gamma), nullptr, c.epsilon};
  const backward_sums_ref ref = reference_backward_sums(c.e, dy, p, tol);
  const std::vector<char> skip = unchecked_dx_channels(c);
  if (!c.sum_dy.absent()) expect_sums("bn_backward", c, ref, skip);
  std::vector<double> want, bound;
  reference_dx(c.e, dy, p, c.training != 0, {ref.count.data(), ref.sum_dy.data(), ref.sum_dy_xhat.data(), ref}, tol,
               want, bound);
  expect_outputs("bn_backward dx", c, want, bound, skip);
}

void check_partial(const call &c, const moments_ref &ref, const tolerance &tol) {
  const int64_t C = c.e.channels;
  const tolerance exact{tol.unit, 0, 4 * 2.2250738585072014e-308, 0, 1.7976931348623157e308};
  for (int64_t ch = 0; ch < C; ++ch) {
    if (ref.non_finite[ch]) continue;
    const double n = ref.count[ch], k = c.shift.absent() ? 0.0 : c.shift[ch], d = ref.mean[ch] - k;
    const double m_error = mean_error(ref, ch, tol);
    if (c.partial[ch] != n) finding("bn_moments_partial: count of channel " + std::to_string(ch));
    expect_close("bn_moments_partial n(mean - K)", ch, c.partial[C + ch], n * d,
                 n * (m_error + 0x1p-50 * (std::fabs(ref.mean[ch]) + std::fabs(k))), exact);
    const double m2 = n * ref.variance[ch];
    expect_close("bn_moments_partial M2 + n(mean - K)^2", ch, c.partial[2 * C + ch], m2 + n * d * d,
                 n * variance_error(ref, ch, tol) + 2 * n * std::fabs(d) * m_error + 0x1p-50 * (m2 + n * d * d),
                 exact);
  }
}

void check_distributed_moments(const call &c, const args &a) {
  expect_status_ok(entry::moments_partial, invoke(entry::moments_partial, a));
  const moments_ref ref = reference_moments(c.e);
  const tolerance tol = tolerance_of(c.dtype);
  check_partial(c, ref, tol);
  expect_status_ok(entry::moments_finalize, invoke(entry::moments_finalize, a));
  const int64_t C = c.e.channels;
  const tolerance exact{tol.unit, 0, 4 * 2.2250738585072014e-308, 0, 1.7976931348623157e308};
  for (int64_t ch = 0; ch < C; ++ch) {
    // n·(mean - K)² past DBL_MAX (K far from a huge mean; bn_core.h: K near the
    // mean) has no float64 partial to merge from.
    if (ref.non_finite[ch] || ref.count[ch] == 0 || !std::isfinite(c.partial[2 * C + ch])) continue;
    const double n = ref.count[ch], k = c.shift.absent() ? 0.0 : c.shift[ch];
    // The merge subtracts s1²/n from s2: off by float64 rounding of s2.
    expect_close("bn_moments_finalize mean", ch, c.mean[ch], ref.mean[ch],
                 mean_error(ref, ch, tol) + 0x1p-50 * (std::fabs(k) + std::fabs(ref.mean[ch])), exact);
    expect_close("bn_moments_finalize variance", ch, c.variance[ch], ref.variance[ch],
                 variance_error(ref, ch, tol) + 0x1p-48 * std::fabs(c.partial[2 * C + ch]) / n, exact);
  }
}

void check_distributed_backward(const call &c, const args &a) {
  const std::vector<double> dy = c.dy_values;
  expect_status_ok(entry::backward_sums, invoke(entry::backward_sums, a));
  const tolerance tol = tolerance_of(c.dtype);
  const channel_params p{c.mean.get(), c.variance.get(), optional(c.gamma), nullptr, c.epsilon};
  const backward_sums_ref ref = reference_backward_sums(c.e, dy, p, tol);
  const std::vector<char> skip = unchecked_dx_channels(c);
  for (int64_t ch = 0; ch < c.e.channels; ++ch)
    if (c.count[ch] != ref.count[ch]) finding("bn_backward_sums: count of channel " + std::to_string(ch));
  expect_sums("bn_backward_sums", c, ref, skip);
  expect_status_ok(entry::backward_apply, invoke(entry::backward_apply, a));
  std::vector<double> want, bound;
  reference_dx(c.e, dy, p, true, {c.count.get(), c.sum_dy.get(), c.sum_dy_xhat.get(), ref}, tol, want, bound);
  expect_outputs("bn_backward_apply dx", c, want, bound, skip);
}

}  // namespace

void run_and_check(const call &c, const args &a) {
  switch (c.op) {
    case entry::moments: return check_moments(c, a);
    case entry::normalize: return check_normalize(c, a);
    case entry::train_forward: return check_train_forward(c, a);
    case entry::backward: return check_backward(c, a);
    case entry::moments_partial: return check_distributed_moments(c, a);
    case entry::backward_sums: return check_distributed_backward(c, a);
    default: return;
  }
}

}  // namespace fuzz
