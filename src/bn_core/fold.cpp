// bn_fold: an inference batch normalization merged into the linear layer before
// it. The weight update is a normalization of the weight tensor along its
// output-channel axis with mean 0, variance 1 and gamma = s, so it reuses
// bn_normalize (any dtype, strides, in place, threads) after the per-channel
// factors are formed here in float64.
#include <algorithm>
#include <cmath>
#include <memory>

#include "bn_core/bn_core.h"
#include "planning.hpp"
#include "scratch.hpp"
#include "validate.hpp"

using namespace bn_core;

extern "C" bn_status bn_fold(const bn_tensor *weight, const bn_tensor *weight_out,
                             int32_t out_axis, const double *bias, const double *mean,
                             const double *variance, const double *gamma, const double *beta,
                             double epsilon, double *bias_out) {
  const call_args call{weight, {{weight_out, "weight_out"}}, nullptr, &out_axis, 1,
                       {{mean, "mean"}, {variance, "variance"}, {bias_out, "bias_out"}}, &epsilon};
  return planned_call(call, weight_out, nullptr, [&](plan &p) {
    const int64_t channels = p.channels;
    // scale, then the normalization's mean 0 and variance 1, then the new bias
    // (written to bias_out only once the weights are done: it may alias an input).
    std::unique_ptr<double[]> arrays = new_doubles(saturating_mul(4, channels), true);
    if (!arrays) return out_of_memory();
    double *scale = arrays.get(), *zeros = scale + channels, *ones = zeros + channels,
           *new_bias = ones + channels;
    for (int64_t o = 0; o < channels; ++o) {
      scale[o] = (gamma ? gamma[o] : 1.0) / std::sqrt(variance[o] + epsilon);
      new_bias[o] = ((bias ? bias[o] : 0.0) - mean[o]) * scale[o] + (beta ? beta[o] : 0.0);
      ones[o] = 1.0;
    }
    if (bn_status st = bn_normalize(weight, weight_out, &out_axis, 1, zeros, ones, scale, nullptr, 0.0))
      return st;
    std::copy(new_bias, new_bias + channels, bias_out);
    return BN_OK;
  });
}
