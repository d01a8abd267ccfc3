// The backward through a fused epilogue: g = dy·act'(z) by the normalize walk
// in its gradient mode, then the plain backward with g as its incoming
// gradient. z = bn(x) + residual is recomputed in registers from x (no
// residual: one pass over x and dy), read from the forward's output (the
// piecewise-linear activations: one pass over it and dy), or else written by
// a first pass over x and the residual and read back by a second with dy.
#include <algorithm>
#include <memory>
#include <numeric>

#include "backward.hpp"
#include "bn_core/bn_core.h"
#include "dispatch.hpp"
#include "planning.hpp"
#include "schedule.hpp"
#include "scratch.hpp"
#include "team.hpp"
#include "validate.hpp"

namespace bn_core {
namespace {

// A tensor of x's shape and dtype with its dims laid out in x's memory order
// (so that the two walk together as x alone would), in memory of its own.
class tensor_like {
 public:
  bool allocate(const bn_tensor &x) {
    const int64_t es = element_bytes(x.dtype);
    int32_t order[BN_MAX_RANK];
    std::iota(order, order + x.rank, 0);
    stable_sort_dims(order, order + x.rank, [&](int32_t a, int32_t b) {
      return std::abs(x.strides[a]) < std::abs(x.strides[b]);
    });
    int64_t step = es;
    for (int32_t k = 0; k < x.rank; ++k) {
      strides_[order[k]] = step;
      step = saturating_mul(step, x.shape[order[k]]);
    }
    buffer_ = new_doubles((step + 7) / 8);
    t = bn_tensor{buffer_.get(), x.dtype, x.rank, x.shape, strides_};
    return buffer_ != nullptr;
  }
  bn_tensor t{};

 private:
  int64_t strides_[BN_MAX_RANK];
  std::unique_ptr<double[]> buffer_;
};

// The forward's parameters z is formed with.
struct forward_params {
  const double *mean, *variance, *gamma, *beta;
  double epsilon;
};

// One normalize walk over `in` into `out`, the second stream `second`, with
// the forward's affine (params) or the identity (null), and the epilogue e.
bn_status walk_pass(const bn_tensor &in, const bn_tensor &out, const bn_tensor *second,
                    const bool is_channel[], const forward_params *params, const epilogue_params &e) {
  plan p;
  make_plan(in, &out, nullptr, second, is_channel, p);
  if (p.empty) return BN_OK;
  p.epilogue = e;
  const int32_t threads = schedule(p);
  affine_state affine;
  if (!affine.allocate(p)) return out_of_memory();
  if (params) affine.fill(params->mean, params->variance, params->gamma, params->beta, params->epsilon);
  else affine.fill_identity();
  const affine_params a = affine.params();
  const auto normalize = active_kernels().normalize_walk(p);
  const auto walk = slot_items(p, threads, [&](int64_t begin, int64_t end, int32_t) {
    normalize(p, begin, end, a);
  });
  return run_slots(threads, walk) ? BN_OK : out_of_memory();
}

// Whether act' can be read from the activation's output.
bool slope_from_output(const bn_epilogue &e) {
  switch (enum_value(e.activation)) {
    case BN_ACT_IDENTITY: case BN_ACT_RELU: case BN_ACT_RELU6: case BN_ACT_CLIP: return true;
    case BN_ACT_LEAKY_RELU: return e.alpha >= 0;
    default: return false;
  }
}

// g = dy·act'(z) for a checked call.
bn_status gradient_passes(const bn_tensor &dy, const bn_tensor &x, const bn_tensor &g, const bool is_channel[],
                          const forward_params &params, const bn_epilogue &e, const bn_tensor *output) {
  epilogue_params gradient{true, enum_value(e.activation), e.alpha, e.lo, e.hi, true};
  if (!e.residual) return walk_pass(x, g, &dy, is_channel, &params, gradient);
  if (output && slope_from_output(e)) return walk_pass(*output, g, &dy, is_channel, nullptr, gradient);
  // z = bn(x) + residual first, into g unless g is dy (still to be read).
  tensor_like scratch;
  const bool into_g = g.data != dy.data;
  if (!into_g && !scratch.allocate(x)) return out_of_memory();
  const bn_tensor &z = into_g ? g : scratch.t;
  const epilogue_params add_residual{true, BN_ACT_IDENTITY, 0, 0, 0, false};
  if (bn_status st = walk_pass(x, z, e.residual, is_channel, &params, add_residual)) return st;
  return walk_pass(z, g, &dy, is_channel, nullptr, gradient);
}

}  // namespace
}  // namespace bn_core

using namespace bn_core;

extern "C" {

bn_status bn_epilogue_gradient(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *g, const int32_t *axes,
                               int32_t n_axes, const double *mean, const double *variance, const double *gamma,
                               const double *beta, double epsilon, const bn_epilogue *epilogue,
                               const bn_tensor *output) {
  const call_args call{x, {{g, "g"}, {dy, "dy"}}, nullptr, axes, n_axes, {{mean, "mean"}, {variance, "variance"}},
                       &epsilon, epilogue};
  return guarded([&] {
    bool is_channel[BN_MAX_RANK];
    if (bn_status st = check_call(call, is_channel)) return st;
    if (bn_status st = check_gradient_tensors(*x, {epilogue, output, dy, nullptr, g, "g"})) return st;
    return gradient_passes(*dy, *x, *g, is_channel, {mean, variance, gamma, beta, epsilon}, *epilogue, output);
  });
}

bn_status bn_backward_epilogue(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx, const int32_t *axes,
                               int32_t n_axes, const bn_tensor *mask, const double *mean, const double *variance,
                               const double *gamma, const double *beta, double epsilon, int32_t training,
                               double *sum_dy, double *sum_dy_xhat, const bn_epilogue *epilogue,
                               const bn_tensor *output, const bn_tensor *dresidual) {
  const call_args call{x, {{dy, "dy"}, {dx, "dx"}}, mask, axes, n_axes, {{mean, "mean"}, {variance, "variance"}},
                       &epsilon, epilogue};
  return guarded([&] {
    bool is_channel[BN_MAX_RANK];
    if (bn_status st = check_call(call, is_channel)) return st;
    if (bn_status st = check_gradient_tensors(*x, {epilogue, output, dy, dx, dresidual, "dresidual"})) return st;
    // g goes to dresidual, else to dx unless dx is x (read again by the backward).
    tensor_like scratch;
    const bn_tensor *g = dresidual ? dresidual : dx->data != x->data ? dx : nullptr;
    if (!g) {
      if (!scratch.allocate(*x)) return out_of_memory();
      g = &scratch.t;
    }
    const forward_params params{mean, variance, gamma, beta, epsilon};
    if (bn_status st = gradient_passes(*dy, *x, *g, is_channel, params, *epilogue, output)) return st;
    return backward_checked({g, x, dx, axes, n_axes, mask, mean, variance, gamma, epsilon, training != 0,
                             sum_dy, sum_dy_xhat}, is_channel);
  });
}

}  // extern "C"
