// bn_core from C++: inference on an NHWC batch with given statistics, then a
// training step of a BatchNorm layer, forward and backward; all checked against
// a plain loop.
#include <cmath>
#include <cstdio>
#include <vector>

#include "bn_core/bn_core.hpp"

namespace {

constexpr int N = 2, H = 4, W = 4, C = 3, size = N * H * W * C;

// Largest |y - reference| over the batch; reference(i, c) for element i of channel c.
template <class F>
double worst_error(const std::vector<float> &y, F reference) {
  double worst = 0;
  for (int i = 0; i < size; ++i) worst = std::fmax(worst, std::fabs(y[i] - reference(i, i % C)));
  return worst;
}

}  // namespace

int main() {
  std::printf("bn_core %s (%s), SIMD %s, %d threads\n", bn_core::version().c_str(),
              bn_core::build_info().c_str(), bn_core::isa_name(bn_core::get_isa()).c_str(),
              bn_core::get_num_threads());
  std::vector<float> x(size), y(size);
  for (int i = 0; i < size; ++i) x[i] = static_cast<float>((i % C + 1) * 10 + (i * 7 % 11) * 0.5);
  const int32_t channel_axis = 3;  // NHWC

  // Inference with given statistics and weights.
  const std::vector<double> mean = {12, 22, 32}, variance = {4, 9, 1}, gamma = {1, 2, 0.5}, beta = {0, 1, -1};
  const double epsilon = 1e-3;
  bn_core::normalize(bn_core::nhwc(x.data(), N, H, W, C), bn_core::nhwc(y.data(), N, H, W, C), {channel_axis},
                     mean, variance, gamma, beta, epsilon);
  std::printf("inference: y[0..2] = %.4f %.4f %.4f\n", y[0], y[1], y[2]);
  const double inference_error = worst_error(y, [&](int i, int c) {
    return (x[i] - mean[c]) / std::sqrt(variance[c] + epsilon) * gamma[c] + beta[c];
  });

  // One training step: batch statistics, moving statistics updated (momentum 0.9).
  bn_core::BatchNorm layer(C, {channel_axis}, 0.9, epsilon);
  layer.forward(bn_core::nhwc(x.data(), N, H, W, C), bn_core::nhwc(y.data(), N, H, W, C), true);
  const double per_channel = size / C;
  std::vector<double> batch_mean(C, 0.0), batch_variance(C, 0.0);
  for (int i = 0; i < size; ++i) batch_mean[i % C] += x[i] / per_channel;
  for (int i = 0; i < size; ++i)
    batch_variance[i % C] += (x[i] - batch_mean[i % C]) * (x[i] - batch_mean[i % C]) / per_channel;
  double moving_error = 0;
  for (int c = 0; c < C; ++c) {
    std::printf("channel %d: batch mean %.4f variance %.4f -> moving mean %.4f variance %.4f\n", c,
                batch_mean[c], batch_variance[c], layer.moving_mean[c], layer.moving_variance[c]);
    moving_error = std::fmax(moving_error, std::fabs(layer.moving_mean[c] - 0.1 * batch_mean[c]));
    moving_error = std::fmax(moving_error, std::fabs(layer.moving_variance[c] - (0.9 + 0.1 * batch_variance[c])));
  }
  auto xhat = [&](int i) { return (x[i] - batch_mean[i % C]) / std::sqrt(batch_variance[i % C] + epsilon); };
  const double training_error = worst_error(y, [&](int i, int) { return xhat(i); });

  // Its backward for a gradient dy of y (gamma = 1): dbeta = Σdy, dgamma = Σdy·x̂ and
  // dx = (dy - (dbeta + x̂·dgamma) / n) / sqrt(variance + epsilon), n per channel.
  std::vector<float> dy(size), dx(size);
  for (int i = 0; i < size; ++i) dy[i] = static_cast<float>((i * 5 % 7 - 3) * 0.25);
  layer.backward(bn_core::nhwc(dy.data(), N, H, W, C), bn_core::nhwc(dx.data(), N, H, W, C));
  std::vector<double> dbeta(C, 0.0), dgamma(C, 0.0);
  for (int i = 0; i < size; ++i) {
    dbeta[i % C] += dy[i];
    dgamma[i % C] += dy[i] * xhat(i);
  }
  double gradient_error = worst_error(dx, [&](int i, int c) {
    return (dy[i] - (dbeta[c] + xhat(i) * dgamma[c]) / per_channel) / std::sqrt(batch_variance[c] + epsilon);
  });
  for (int c = 0; c < C; ++c) {
    gradient_error = std::fmax(gradient_error, std::fabs(layer.dbeta[c] - dbeta[c]));
    gradient_error = std::fmax(gradient_error, std::fabs(layer.dgamma[c] - dgamma[c]));
  }
  std::printf("backward: dx[0..2] = %.4f %.4f %.4f, dgamma[0] %.4f, dbeta[0] %.4f\n", dx[0], dx[1], dx[2],
              layer.dgamma[0], layer.dbeta[0]);

  std::printf("largest errors against the plain loop: inference %.2g, training %.2g, moving statistics %.2g, "
              "backward %.2g\n",
              inference_error, training_error, moving_error, gradient_error);
  const bool ok = inference_error < 1e-5 && training_error < 1e-5 && moving_error < 1e-9 && gradient_error < 1e-5;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
