// C++17 tests of bn_core.hpp: views and their strides (hand-derived), results
// against double-precision loops written here (forward, backward, the
// distributed phases on ranks of the batch), BatchNorm's moving statistics and
// backward (hand-derived), and every error as a bn_core::error with its status.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "bn_core/bn_core.hpp"
#include "check.h"

namespace {

// call() must throw bn_core::error with `expected` and a message containing `text`.
void check_throws(const char *what, bn_core::status expected, const std::string &text,
                  const std::function<void()> &call) {
  ++checks;
  try {
    call();
  } catch (const bn_core::error &e) {
    if (e.code() == expected && std::string(e.what()).find(text) != std::string::npos) return;
    ++failures;
    std::fprintf(stderr, "FAIL %s: status %d '%s'; expected %d with '%s'\n", what, static_cast<int>(e.code()),
                 e.what(), static_cast<int>(expected), text.c_str());
    return;
  }
  ++failures;
  std::fprintf(stderr, "FAIL %s: no exception\n", what);
}

using bn_core::const_tensor_view;
using bn_core::tensor_view;
using shape_t = std::vector<int64_t>;

static_assert(std::is_convertible_v<tensor_view, const_tensor_view>, "a writable view is a read-only one");
static_assert(!std::is_convertible_v<const_tensor_view, tensor_view>, "but not the other way");
static_assert(std::is_constructible_v<const_tensor_view, const float *, shape_t>, "const data: read only");
static_assert(!std::is_constructible_v<tensor_view, const float *, shape_t>, "const data is not writable");
static_assert(std::is_same_v<bn_core::view_of<const double>, const_tensor_view>, "view_of const");
static_assert(bn_core::dtype_of<const bn_core::bfloat16> == BN_BFLOAT16 && bn_core::dtype_of<bool> == BN_UINT8,
              "dtype_of");

void test_views() {
  float f[24] = {};
  const tensor_view a(f, {2, 3, 4});
  CHECK(a.type() == BN_FLOAT32 && a.rank() == 3 && a.strides() == shape_t({48, 16, 4}), "float (2, 3, 4)");
  double d[6] = {};
  const const_tensor_view b(static_cast<const double *>(d), {3, 2});
  CHECK(b.type() == BN_FLOAT64 && b.strides() == shape_t({16, 8}), "double (3, 2)");
  bn_core::float16 h[5] = {};
  CHECK(tensor_view(h, {5}).strides() == shape_t({2}), "float16 (5,)");
  bool m[6] = {};
  CHECK(const_tensor_view(m, {2, 3}).strides() == shape_t({3, 1}), "bool mask (2, 3)");
  CHECK(tensor_view(f, {0, 3}).strides() == shape_t({12, 4}), "empty (0, 3)");

  // NHWC (2, 3, 4, 5) float: strides 3*4*5*4, 4*5*4, 5*4, 4.
  float images[120] = {};
  const tensor_view nhwc = bn_core::nhwc(images, 2, 3, 4, 5);
  CHECK(nhwc.shape() == shape_t({2, 3, 4, 5}) && nhwc.strides() == shape_t({240, 80, 20, 4}), "nhwc");
  const const_tensor_view nchw = bn_core::nchw(static_cast<const float *>(images), 2, 5, 3, 4);
  CHECK(nchw.shape() == shape_t({2, 5, 3, 4}) && nchw.strides() == shape_t({240, 48, 16, 4}), "nchw");

  const const_tensor_view converted = a;
  const bn_tensor c = converted.c_tensor();
  CHECK(c.data == f && c.dtype == BN_FLOAT32 && c.rank == 3 && c.shape[1] == 3 && c.strides[0] == 48, "c_tensor");
  const tensor_view reversed(f + 3, BN_FLOAT32, {4}, {-4});
  CHECK(reversed.c_tensor().strides[0] == -4 && reversed.data() == f + 3, "untyped, negative stride");
}

// An NCHW float batch (N=3, C=2, H=2, W=5) around 50, a (N, 1, H, W) mask and
// their float64 loops, shared by the tests against loops.
constexpr int N = 3, C = 2, H = 2, W = 5, HW = H * W, kElements = N * C * HW;

struct loop_batch {
  float x[kElements];
  uint8_t mask[N * HW];
};

float next_uniform(unsigned &seed) {  // in [0, 1)
  seed = seed * 1664525u + 1013904223u;
  return static_cast<float>((seed >> 8) / double(1u << 24));
}

loop_batch make_batch() {
  loop_batch b;
  unsigned seed = 7;
  for (float &v : b.x) v = 50.0f + next_uniform(seed);
  for (int i = 0; i < N * HW; ++i) b.mask[i] = i % 4 != 0;
  return b;
}

std::optional<const_tensor_view> mask_view(const loop_batch &b, bool masked) {
  if (!masked) return std::nullopt;
  return const_tensor_view(b.mask, {N, 1, H, W});
}

// Element k = (n C + c) HW + i of the batch is used (mask 1, or no mask).
bool used(const loop_batch &b, bool masked, int k) { return !masked || b.mask[k / (C * HW) * HW + k % HW]; }
int channel_at(int k) { return k / HW % C; }

// Two-pass float64 moments over the used positions.
bn_core::statistics loop_moments(const loop_batch &b, bool masked) {
  bn_core::statistics s{std::vector<double>(C), std::vector<double>(C), std::vector<double>(C)};
  for (int k = 0; k < kElements; ++k)
    if (used(b, masked, k)) {
      s.mean[channel_at(k)] += b.x[k];
      s.count[channel_at(k)] += 1;
    }
  for (int c = 0; c < C; ++c) s.mean[c] /= s.count[c];
  for (int k = 0; k < kElements; ++k)
    if (used(b, masked, k)) {
      const double d = b.x[k] - s.mean[channel_at(k)];
      s.variance[channel_at(k)] += d * d / s.count[channel_at(k)];
    }
  return s;
}

// The backward by bn_core.h's formulas in float64: dx, and Σdy, Σdy·x̂ over every position.
struct loop_gradient {
  std::vector<double> dx, sum_dy, sum_dy_xhat;
};

loop_gradient loop_backward(const loop_batch &b, const float *dy, bool masked, bool training,
                            const bn_core::statistics &s, const std::vector<double> &gamma, double epsilon) {
  loop_gradient g{std::vector<double>(kElements), std::vector<double>(C), std::vector<double>(C)};
  auto inv_std = [&](int c) { return 1 / std::sqrt(s.variance[c] + epsilon); };
  auto xhat = [&](int k) { return (b.x[k] - s.mean[channel_at(k)]) * inv_std(channel_at(k)); };
  for (int k = 0; k < kElements; ++k) {
    g.sum_dy[channel_at(k)] += dy[k];
    g.sum_dy_xhat[channel_at(k)] += dy[k] * xhat(k);
  }
  for (int k = 0; k < kElements; ++k) {
    const int c = channel_at(k);
    const double through_stats =
        training && used(b, masked, k) ? (g.sum_dy[c] + xhat(k) * g.sum_dy_xhat[c]) / s.count[c] : 0.0;
    g.dx[k] = gamma[c] * inv_std(c) * (dy[k] - through_stats);
  }
  return g;
}

// The C++ calls against the loops.
void test_against_loop() {
  const loop_batch b = make_batch();
  const float *x = b.x;
  float y[kElements];
  const std::vector<double> gamma = {2.0, 0.5}, beta = {0.25, -1.0};

  for (const bool masked : {false, true}) {
    const bn_core::statistics loop = loop_moments(b, masked);
    const std::vector<double> &mean = loop.mean, &var = loop.variance, &count = loop.count;
    const std::optional<const_tensor_view> m = mask_view(b, masked);
    const bn_core::statistics s = bn_core::moments(bn_core::nchw(x, N, C, H, W), {1}, m);
    const bn_core::statistics t =
        bn_core::train_forward(bn_core::nchw(x, N, C, H, W), bn_core::nchw(y, N, C, H, W), {1}, gamma, beta, 1e-3, m);
    CHECK(s.mean.size() == C && s.count.size() == C && t.mean.size() == C && t.count.empty(), "sizes");
    for (int c = 0; c < C; ++c) {
      // float32 data: the bounds of reference.h (2e-6 of the spread and of the variance).
      const double mean_tol = 2e-6 * std::sqrt(var[c]), var_tol = 2e-6 * var[c];
      CHECK(std::fabs(s.mean[c] - mean[c]) < mean_tol && std::fabs(s.variance[c] - var[c]) < var_tol &&
                s.count[c] == count[c],
            "moments channel %d (masked %d): %.12g %.12g %g vs %.12g %.12g %g", c, masked, s.mean[c],
            s.variance[c], s.count[c], mean[c], var[c], count[c]);
      CHECK(std::fabs(t.mean[c] - mean[c]) < mean_tol && std::fabs(t.variance[c] - var[c]) < var_tol,
            "train_forward statistics channel %d", c);
    }
    double worst = 0;  // every position is normalized, masked ones too
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c)
        for (int i = 0; i < HW; ++i) {
          const int k = (n * C + c) * HW + i;
          const double expected = (x[k] - mean[c]) * gamma[c] / std::sqrt(var[c] + 1e-3) + beta[c];
          worst = std::max(worst, std::fabs(y[k] - expected) / (1 + std::fabs(expected)));
        }
    CHECK(worst < 1e-6, "train_forward y (masked %d): relative error %g", masked, worst);
  }

  // Inference in place, without gamma/beta, on a channels-last double tensor.
  double z[12] = {1, 10, 2, 20, 3, 30, 4, 40, 5, 50, 6, 60};
  const std::vector<double> mean = {3.5, 35}, var = {2.0, 200.0};
  bn_core::normalize(tensor_view(z, {6, 2}), tensor_view(z, {6, 2}), {-1}, mean, var, {}, {}, 0.0);
  for (int i = 0; i < 12; ++i) {
    const double expected = ((i % 2 ? 10.0 : 1.0) * (i / 2 + 1) - mean[i % 2]) / std::sqrt(var[i % 2]);
    CHECK(std::fabs(z[i] - expected) < 1e-14, "in place z[%d] = %.17g vs %.17g", i, z[i], expected);
  }

  // Zero channels: nothing to do, and empty results.
  float empty[1] = {};
  const bn_core::statistics none = bn_core::moments(tensor_view(empty, {4, 0}), {1});
  CHECK(none.mean.empty() && none.variance.empty() && none.count.empty(), "0 channels");
  bn_core::normalize(tensor_view(empty, {4, 0}), tensor_view(empty, {4, 0}), {1}, {}, {});
  const std::vector<double> no_partial = bn_core::moments_partial(tensor_view(empty, {4, 0}), {1});
  CHECK(no_partial.empty() && bn_core::moments_finalize(no_partial).mean.empty(), "0 channels, distributed");
}

// Largest |got - expected| over the batch, in units of gamma / sqrt(variance + epsilon)
// of the element's channel: the size of dx's terms for |dy| <= 1.
template <class T>
double worst_dx_error(const T *got, const std::vector<double> &expected, const bn_core::statistics &s,
                      const std::vector<double> &gamma, double epsilon) {
  double worst = 0;
  for (int k = 0; k < kElements; ++k) {
    const int c = channel_at(k);
    const double scale = gamma[c] / std::sqrt(s.variance[c] + epsilon);
    worst = std::max(worst, std::fabs(got[k] - expected[k]) / scale);
  }
  return worst;
}

// Largest difference between sums, relative to kElements / C terms of size <= 2.
double worst_sum_error(const std::vector<double> &got, const std::vector<double> &expected) {
  double worst = got.size() == expected.size() ? 0 : 1e300;
  for (size_t c = 0; c < got.size() && c < expected.size(); ++c)
    worst = std::max(worst, std::fabs(got[c] - expected[c]) / (2.0 * kElements / C));
  return worst;
}

void add_to(std::vector<double> &total, const std::vector<double> &part) {
  total.resize(part.size());
  for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
}

// backward(), the distributed phases on three shards of the batch (one empty)
// and BatchNorm::backward() against loop_backward().
void test_backward_against_loop() {
  const loop_batch b = make_batch();
  float dy[kElements], dx[kElements], y[kElements];
  unsigned seed = 11;
  for (float &v : dy) v = 2 * next_uniform(seed) - 0.8f;  // Σdy is not 0
  const std::vector<double> gamma = {2.0, 0.5};
  const double epsilon = 1e-3;
  // float32 data: sums and dx within a few float32 roundings of their terms.
  const double tol = 1e-5;
  const const_tensor_view x_all = bn_core::nchw(b.x, N, C, H, W), dy_all = bn_core::nchw(dy, N, C, H, W);
  const tensor_view dx_all = bn_core::nchw(dx, N, C, H, W);

  for (const bool masked : {false, true}) {
    const std::optional<const_tensor_view> m = mask_view(b, masked);
    const bn_core::statistics stats = loop_moments(b, masked);
    for (const bool training : {true, false}) {
      const loop_gradient loop = loop_backward(b, dy, masked, training, stats, gamma, epsilon);
      const bn_core::gradient_sums sums =
          bn_core::backward(dy_all, x_all, dx_all, {1}, stats.mean, stats.variance, gamma, epsilon, training, m);
      CHECK(worst_dx_error(dx, loop.dx, stats, gamma, epsilon) < tol, "backward dx (masked %d, training %d)", masked,
            training);
      CHECK(worst_sum_error(sums.sum_dy, loop.sum_dy) < tol &&
                worst_sum_error(sums.sum_dy_xhat, loop.sum_dy_xhat) < tol && sums.count.empty(),
            "backward sums (masked %d, training %d)", masked, training);
    }
    const loop_gradient loop = loop_backward(b, dy, masked, true, stats, gamma, epsilon);

    // Samples [0, 1), [1, 1) and [1, 3) as three ranks: phase 1 summed, phase 2 per rank.
    const int first[3] = {0, 1, 1}, count[3] = {1, 0, 2};
    auto rank_view = [&](auto *data, int r) { return bn_core::nchw(data + first[r] * C * HW, count[r], C, H, W); };
    auto rank_mask = [&](int r) {
      return masked ? std::optional<const_tensor_view>(const_tensor_view(b.mask + first[r] * HW, {count[r], 1, H, W}))
                    : std::nullopt;
    };
    const std::vector<double> shift = {50.5, 50.25};  // a moving mean near the data
    std::vector<double> partial;
    bn_core::gradient_sums totals;
    for (int r = 0; r < 3; ++r) {
      add_to(partial, bn_core::moments_partial(rank_view(b.x, r), {1}, shift, rank_mask(r)));
      const bn_core::gradient_sums rank_sums =
          bn_core::backward_sums(rank_view(dy, r), rank_view(b.x, r), {1}, stats.mean, stats.variance, epsilon,
                                 rank_mask(r));
      add_to(totals.count, rank_sums.count);
      add_to(totals.sum_dy, rank_sums.sum_dy);
      add_to(totals.sum_dy_xhat, rank_sums.sum_dy_xhat);
    }
    const bn_core::statistics global = bn_core::moments_finalize(partial, shift);
    for (int c = 0; c < C; ++c)
      CHECK(std::fabs(global.mean[c] - stats.mean[c]) < 2e-6 * std::sqrt(stats.variance[c]) &&
                std::fabs(global.variance[c] - stats.variance[c]) < 2e-6 * stats.variance[c] &&
                global.count[c] == stats.count[c],
            "moments_partial/finalize channel %d (masked %d): %.12g %.12g %g", c, masked, global.mean[c],
            global.variance[c], global.count[c]);
    CHECK(totals.count == stats.count && worst_sum_error(totals.sum_dy, loop.sum_dy) < tol &&
              worst_sum_error(totals.sum_dy_xhat, loop.sum_dy_xhat) < tol,
          "backward_sums added over ranks (masked %d)", masked);
    std::fill(dx, dx + kElements, 0.0f);
    for (int r = 0; r < 3; ++r)
      bn_core::backward_apply(rank_view(dy, r), rank_view(b.x, r), rank_view(dx, r), {1}, stats.mean, stats.variance,
                              totals, gamma, epsilon, rank_mask(r));
    CHECK(worst_dx_error(dx, loop.dx, stats, gamma, epsilon) < tol, "backward_apply dx (masked %d)", masked);

    // The layer: a training step, then its backward in place into a copy of dy.
    bn_core::BatchNorm layer(C, {1}, 0.9, epsilon);
    layer.gamma = gamma;
    layer.forward(x_all, bn_core::nchw(y, N, C, H, W), true, m);
    std::copy(dy, dy + kElements, dx);
    layer.backward(dx_all, dx_all);
    CHECK(worst_dx_error(dx, loop.dx, stats, gamma, epsilon) < tol, "BatchNorm::backward dx (masked %d)", masked);
    CHECK(worst_sum_error(layer.dbeta, loop.sum_dy) < tol && worst_sum_error(layer.dgamma, loop.sum_dy_xhat) < tol,
          "BatchNorm::backward dgamma, dbeta (masked %d)", masked);
  }
}

// Channel 0 holds {1, 2, 3, 4} (mean 2.5, variance 1.25), channel 1 {-1, -1, 1, 1}
// (mean 0, variance 1); momentum 0.9, epsilon 0.
void test_batch_norm() {
  const float batch[8] = {1, -1, 2, -1, 3, 1, 4, 1};
  float y[8];
  bn_core::BatchNorm bn(2, {-1}, 0.9, 0.0);
  CHECK(bn.gamma == std::vector<double>({1, 1}) && bn.beta == std::vector<double>({0, 0}) &&
            bn.moving_mean == std::vector<double>({0, 0}) && bn.moving_variance == std::vector<double>({1, 1}),
        "initial state");
  bn.gamma = {2.0, 1.0};
  bn.beta = {0.0, 3.0};

  bn.forward(const_tensor_view(batch, {4, 2}), tensor_view(y, {4, 2}), true);
  // moving_mean = 0 * 0.9 + 2.5 * 0.1 and 0; moving_variance = 0.9 + 1.25 * 0.1 and 0.9 + 0.1.
  CHECK(std::fabs(bn.moving_mean[0] - 0.25) < 1e-15 && bn.moving_mean[1] == 0.0, "moving mean %.17g %.17g",
        bn.moving_mean[0], bn.moving_mean[1]);
  CHECK(std::fabs(bn.moving_variance[0] - 1.025) < 1e-15 && std::fabs(bn.moving_variance[1] - 1.0) < 1e-15,
        "moving variance %.17g %.17g", bn.moving_variance[0], bn.moving_variance[1]);
  // Batch statistics: y = 2 (x - 2.5) / sqrt(1.25) and x + 3.
  CHECK(std::fabs(y[0] - 2 * -1.5 / std::sqrt(1.25)) < 1e-6 && std::fabs(y[6] - 2 * 1.5 / std::sqrt(1.25)) < 1e-6,
        "training y channel 0: %g %g", y[0], y[6]);
  CHECK(y[1] == 2.0f && y[7] == 4.0f, "training y channel 1: %g %g", y[1], y[7]);

  bn.forward(const_tensor_view(batch, {4, 2}), tensor_view(y, {4, 2}), true);
  // Second step: 0.25 * 0.9 + 0.25 = 0.475; 1.025 * 0.9 + 0.125 = 1.0475.
  CHECK(std::fabs(bn.moving_mean[0] - 0.475) < 1e-15 && std::fabs(bn.moving_variance[0] - 1.0475) < 1e-15,
        "second step %.17g %.17g", bn.moving_mean[0], bn.moving_variance[0]);

  bn.forward(const_tensor_view(batch, {4, 2}), tensor_view(y, {4, 2}), false);
  CHECK(std::fabs(y[2] - 2 * (2 - 0.475) / std::sqrt(1.0475)) < 1e-6, "inference y[2] %g", y[2]);
  CHECK(std::fabs(y[3] - (-1 / std::sqrt(1.0) + 3)) < 1e-6, "inference y[3] %g", y[3]);

  // A mask: the last row (4 and 1) is left out of channel 0's {1, 2, 3} (mean 2, variance 2/3).
  bn_core::BatchNorm masked(2, {1}, 0.0, 0.0);
  const uint8_t rows[4] = {1, 1, 1, 0};
  masked.forward(const_tensor_view(batch, {4, 2}), tensor_view(y, {4, 2}), true, const_tensor_view(rows, {4, 1}));
  CHECK(std::fabs(masked.moving_mean[0] - 2.0) < 1e-15 && std::fabs(masked.moving_variance[0] - 2.0 / 3) < 1e-15,
        "masked step %.17g %.17g", masked.moving_mean[0], masked.moving_variance[0]);
  CHECK(std::fabs(y[6] - 2 / std::sqrt(2.0 / 3)) < 1e-6, "masked position normalized too: %g", y[6]);
}

// fold: a (2 in, 3 out) dense weight in Keras' layout, folded in place; the
// folded layer applied to x equals bn(dense(x)) computed here.
void test_fold() {
  double w[6] = {1, -2, 0.5, 3, 0.25, -1};
  const double x[2] = {0.5, -1.5};
  const std::vector<double> bias{0.1, 0.2, 0.3}, mean{1, -1, 0}, var{4, 1, 0.25}, gamma{2, 1, -1};
  const double eps = 0.0;
  double expected[3];
  for (int o = 0; o < 3; ++o) {
    const double z = x[0] * w[o] + x[1] * w[3 + o] + bias[o];
    expected[o] = (z - mean[o]) / std::sqrt(var[o] + eps) * gamma[o];
  }
  const std::vector<double> new_bias =
      bn_core::fold(const_tensor_view(w, {2, 3}), tensor_view(w, {2, 3}), -1, bias, mean, var, gamma, {}, eps);
  for (int o = 0; o < 3; ++o) {
    const double folded = x[0] * w[o] + x[1] * w[3 + o] + new_bias[o];
    CHECK(std::fabs(folded - expected[o]) < 1e-14, "fold channel %d: %.17g vs %.17g", o, folded, expected[o]);
  }
  check_throws("fold mean length", BN_ERR_SHAPE, "mean", [&] {
    bn_core::fold(const_tensor_view(w, {2, 3}), tensor_view(w, {2, 3}), -1, {}, {0.0}, var);
  });
}

// The epilogue through the C++ API: train_forward with relu and a residual,
// then backward_epilogue, against loops over a (4, 2) batch (channels last).
void test_epilogue() {
  const float x[8] = {1, -2, 3, 0.5f, -1, 2, 5, -0.5f}, r[8] = {0.5f, 0.25f, -3, 1, 0.75f, -0.5f, -1, 2};
  const float dy[8] = {1, 2, -1, 0.5f, 3, -2, 0.25f, 1};
  float y[8], dx[8], dres[8];
  bn_core::epilogue relu;
  relu.activation = BN_ACT_RELU;
  relu.residual = const_tensor_view(r, {4, 2});
  const double eps = 1e-3;
  const bn_core::statistics s = bn_core::train_forward(const_tensor_view(x, {4, 2}), tensor_view(y, {4, 2}), {1}, {},
                                                       {}, eps, std::nullopt, relu);
  const bn_core::gradient_sums g = bn_core::backward_epilogue(
      const_tensor_view(dy, {4, 2}), const_tensor_view(x, {4, 2}), tensor_view(dx, {4, 2}), {1}, s.mean, s.variance,
      {}, {}, eps, true, relu, const_tensor_view(y, {4, 2}), tensor_view(dres, {4, 2}));
  for (int c = 0; c < 2; ++c) {
    double mean = 0, var = 0, sg = 0, sgx = 0, xhat[4], grad[4];
    for (int n = 0; n < 4; ++n) mean += x[2 * n + c] / 4.0;
    for (int n = 0; n < 4; ++n) var += (x[2 * n + c] - mean) * (x[2 * n + c] - mean) / 4.0;
    const double inv = 1 / std::sqrt(var + eps);
    for (int n = 0; n < 4; ++n) {
      xhat[n] = (x[2 * n + c] - mean) * inv;
      const double z = xhat[n] + r[2 * n + c];
      CHECK(std::fabs(y[2 * n + c] - std::max(z, 0.0)) < 1e-5, "epilogue y[%d][%d]", n, c);
      grad[n] = z > 0 ? dy[2 * n + c] : 0.0;
      CHECK(dres[2 * n + c] == grad[n], "dresidual[%d][%d]", n, c);
      sg += grad[n];
      sgx += grad[n] * xhat[n];
    }
    CHECK(std::fabs(g.sum_dy[c] - sg) < 1e-5 && std::fabs(g.sum_dy_xhat[c] - sgx) < 1e-5, "epilogue sums %d", c);
    for (int n = 0; n < 4; ++n) {
      const double want = inv * (grad[n] - (sg + xhat[n] * sgx) / 4);
      CHECK(std::fabs(dx[2 * n + c] - want) < 1e-5, "epilogue dx[%d][%d]: %g vs %g", n, c, dx[2 * n + c], want);
    }
  }
  check_throws("backward_epilogue dresidual is x", BN_ERR_VALUE, "dresidual", [&] {
    float copy[8];
    std::copy(x, x + 8, copy);
    bn_core::backward_epilogue(const_tensor_view(dy, {4, 2}), const_tensor_view(copy, {4, 2}), tensor_view(dx, {4, 2}),
                               {1}, s.mean, s.variance, {}, {}, eps, true, relu, std::nullopt,
                               tensor_view(copy, {4, 2}));
  });
}

// Epsilon 0.3125 and gamma {2, 1}. Channel 0 {1, 2, 3, 4}: mean 2.5, variance 1.25,
// s = 1/sqrt(1.5625) = 0.8, x̂ {-1.2, -0.4, 0.4, 1.2}; dy {0, 0, 0, 1}: Σdy 1, Σdy·x̂ 1.2,
// dx = 1.6 (dy - (1 + 1.2 x̂)/4) = {0.176, -0.208, -0.592, 0.624}. Channel 1
// {-0.5, 0.5, -0.5, 0.5}: mean 0, variance 0.25, s = 4/3, x̂ = ±2/3; dy {1, 0, 0, 0}:
// Σdy 1, Σdy·x̂ -2/3, dx = 4/3 (dy - (1 - 2/3 x̂)/4) = {23/27, -5/27, -13/27, -5/27}.
void test_batch_norm_backward() {
  const float x[8] = {1, -0.5f, 2, 0.5f, 3, -0.5f, 4, 0.5f};
  const float dy[8] = {0, 1, 0, 0, 0, 0, 1, 0};
  float y[8], dx[8];
  bn_core::BatchNorm bn(2, {-1}, 0.9, 0.3125);
  bn.gamma = {2.0, 1.0};
  check_throws("backward before forward", BN_ERR_VALUE, "needs a forward()",
               [&] { bn.backward(const_tensor_view(dy, {4, 2}), tensor_view(dx, {4, 2})); });

  bn.forward(const_tensor_view(x, {4, 2}), tensor_view(y, {4, 2}), true);
  bn.backward(const_tensor_view(dy, {4, 2}), tensor_view(dx, {4, 2}));
  const double training_dx[8] = {0.176, 23.0 / 27, -0.208, -5.0 / 27, -0.592, -13.0 / 27, 0.624, -5.0 / 27};
  for (int i = 0; i < 8; ++i) CHECK(std::fabs(dx[i] - training_dx[i]) < 1e-6, "training dx[%d] %g", i, dx[i]);
  CHECK(std::fabs(bn.dgamma[0] - 1.2) < 1e-6 && std::fabs(bn.dgamma[1] + 2.0 / 3) < 1e-6 && bn.dbeta[0] == 1 &&
            bn.dbeta[1] == 1,
        "training dgamma %g %g, dbeta %g %g", bn.dgamma[0], bn.dgamma[1], bn.dbeta[0], bn.dbeta[1]);

  // After an inference forward, the moving statistics (mean {0.25, 0}, variance
  // {0.9 + 0.125, 0.9 + 0.025}) are fixed: dx = gamma dy / sqrt(variance + epsilon).
  bn.forward(const_tensor_view(x, {4, 2}), tensor_view(y, {4, 2}), false);
  bn.backward(const_tensor_view(dy, {4, 2}), tensor_view(dx, {4, 2}));
  const double s0 = 1 / std::sqrt(1.025 + 0.3125), s1 = 1 / std::sqrt(0.925 + 0.3125);
  CHECK(std::fabs(dx[6] - 2 * s0) < 1e-6 && std::fabs(dx[1] - s1) < 1e-6 && dx[0] == 0 && dx[7] == 0,
        "inference dx %g %g", dx[6], dx[1]);
  CHECK(std::fabs(bn.dgamma[0] - (4 - 0.25) * s0) < 1e-6 && std::fabs(bn.dgamma[1] - -0.5 * s1) < 1e-6 &&
            bn.dbeta[0] == 1 && bn.dbeta[1] == 1,
        "inference dgamma %g %g", bn.dgamma[0], bn.dgamma[1]);
}

void test_errors() {
  float f[6] = {};
  const tensor_view x(f, {2, 3});
  check_throws("shape and strides differ", BN_ERR_SHAPE, "strides has 1",
               [&] { tensor_view(f, {2, 3}, {4}); });
  check_throws("negative size", BN_ERR_SHAPE, "negative size -2 at axis 1", [&] { tensor_view(f, {2, -2}); });
  check_throws("contiguous overflow", BN_ERR_OVERFLOW, "2^63", [&] { tensor_view(f, {int64_t(1) << 62, 2}); });
  check_throws("unknown dtype", BN_ERR_DTYPE, "dtype 7", [&] { tensor_view(f, static_cast<bn_core::dtype>(7), {2}); });
  check_throws("rank 0", BN_ERR_RANK, "rank 0", [&] { bn_core::moments(tensor_view(f, {}), {0}); });
  check_throws("axis out of range", BN_ERR_AXIS, "axis 2", [&] { bn_core::moments(x, {2}); });
  check_throws("axis twice", BN_ERR_AXIS, "twice", [&] { bn_core::moments(x, {1, -1}); });
  check_throws("no axis", BN_ERR_AXIS, "n_axes is 0", [&] { bn_core::moments(x, {}); });
  check_throws("mask shape", BN_ERR_SHAPE, "mask", [&] {
    uint8_t m[4] = {};
    bn_core::moments(x, {1}, const_tensor_view(m, {2, 2}));
  });
  check_throws("float mask", BN_ERR_DTYPE, "mask", [&] { bn_core::moments(x, {1}, x); });
  check_throws("y dtype", BN_ERR_DTYPE, "y", [&] {
    double d[6];
    bn_core::normalize(x, tensor_view(d, {2, 3}), {1}, {0, 0, 0}, {1, 1, 1});
  });
  check_throws("mean size", BN_ERR_SHAPE, "mean has 2 values", [&] {
    bn_core::normalize(x, x, {1}, {0, 0}, {1, 1, 1});
  });
  check_throws("gamma size", BN_ERR_SHAPE, "gamma has 4 values", [&] {
    bn_core::train_forward(x, x, {1}, {1, 1, 1, 1});
  });
  check_throws("bad axis wins over sizes", BN_ERR_AXIS, "axis 5", [&] {
    bn_core::normalize(x, x, {5}, {0}, {1});
  });
  check_throws("epsilon", BN_ERR_VALUE, "epsilon", [&] { bn_core::normalize(x, x, {1}, {0, 0, 0}, {1, 1, 1}, {}, {}, -1); });
  check_throws("null data", BN_ERR_NULL, "NULL data", [&] {
    bn_core::moments(tensor_view(static_cast<float *>(nullptr), {2, 3}), {1});
  });
  check_throws("byte span", BN_ERR_OVERFLOW, "overflow", [&] {
    bn_core::moments(tensor_view(f, {2, 3}, {std::numeric_limits<int64_t>::max(), 4}), {1});
  });
  const std::vector<double> zeros = {0, 0, 0}, ones = {1, 1, 1};
  check_throws("backward dy dtype", BN_ERR_DTYPE, "dy", [&] {
    double d[6];
    bn_core::backward(tensor_view(d, {2, 3}), x, x, {1}, zeros, ones);
  });
  check_throws("backward bad axis", BN_ERR_AXIS, "axis 5", [&] { bn_core::backward(x, x, x, {5}, {0}, {1}); });
  check_throws("backward variance size", BN_ERR_SHAPE, "variance has 1 values",
               [&] { bn_core::backward(x, x, x, {1}, zeros, {1}); });
  check_throws("moments_partial bad axis", BN_ERR_AXIS, "axis 5", [&] { bn_core::moments_partial(x, {5}); });
  check_throws("moments_partial shift size", BN_ERR_SHAPE, "shift has 2 values",
               [&] { bn_core::moments_partial(x, {1}, {0, 0}); });
  check_throws("moments_finalize partial size", BN_ERR_SHAPE, "partial has 4 values",
               [&] { bn_core::moments_finalize({1, 2, 3, 4}); });
  check_throws("backward_sums epsilon", BN_ERR_VALUE, "epsilon",
               [&] { bn_core::backward_sums(x, x, {1}, zeros, ones, -1); });
  check_throws("backward_apply count size", BN_ERR_SHAPE, "count has 2 values", [&] {
    bn_core::backward_apply(x, x, x, {1}, zeros, ones, bn_core::gradient_sums{zeros, zeros, {1, 1}});
  });
  check_throws("SIMD name", BN_ERR_VALUE, "sse9", [] { bn_core::set_isa("sse9"); });
  check_throws("negative channels", BN_ERR_VALUE, "channels is -1", [] { bn_core::BatchNorm(-1); });

  bn_core::BatchNorm bn(3, {1});
  bn.moving_variance.pop_back();
  f[0] = 42;
  check_throws("moving_variance size", BN_ERR_SHAPE, "moving_variance has 2 values",
               [&] { bn.forward(x, tensor_view(f, {2, 3}), true); });
  CHECK(f[0] == 42 && bn.moving_mean == std::vector<double>({0, 0, 0}), "a failed step changes nothing");
}

void test_settings() {
  const int32_t default_threads = bn_core::get_num_threads();
  bn_core::set_num_threads(2);
  CHECK(bn_core::get_num_threads() == 2, "2 threads");
  bn_core::set_num_threads(0);
  CHECK(bn_core::get_num_threads() == default_threads, "default threads");
  bn_core::set_isa("scalar");
  CHECK(bn_core::get_isa() == BN_ISA_SCALAR && bn_core::isa_name(bn_core::get_isa()) == "scalar", "scalar");
  bn_core::set_isa("");
  CHECK(bn_core::get_isa() == bn_core::cpu_best_isa(), "best");
  CHECK(!bn_core::version().empty() && !bn_core::build_info().empty(), "version, build info");
  const bn_core::cache_sizes detected = bn_core::get_cache_bytes();
  bn_core::set_cache_bytes(4096, 65536);
  const bn_core::cache_sizes small = bn_core::get_cache_bytes();
  CHECK(small.l2 == 4096 && small.l3 == 65536, "cache sizes set");
  CHECK(bn_core::cache_origin() == "set by bn_set_cache_bytes", "cache origin: %s", bn_core::cache_origin().c_str());
  bn_core::set_cache_bytes(0, -1);
  const bn_core::cache_sizes restored = bn_core::get_cache_bytes();
  CHECK(detected.l2 > 0 && restored.l2 == detected.l2 && restored.l3 == detected.l3, "cache sizes restored");
}

}  // namespace

int main() {
  test_views();
  test_against_loop();
  test_backward_against_loop();
  test_batch_norm();
  test_batch_norm_backward();
  test_fold();
  test_epilogue();
  test_errors();
  test_settings();
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
