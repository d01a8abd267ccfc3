#include "call.hpp"

#include <cfloat>
#include <cmath>
#include <cstdio>

namespace fuzz {
namespace {

bool takes_mask(entry op) { return op != entry::normalize && op != entry::moments_finalize; }
bool takes_out(entry op) {
  return op == entry::normalize || op == entry::train_forward || op == entry::backward ||
         op == entry::backward_sums || op == entry::backward_apply;
}
bool takes_dy(entry op) { return op == entry::backward || op == entry::backward_sums || op == entry::backward_apply; }

std::vector<double> read_values(const tensor_buffer &t, const std::vector<int64_t> &offsets) {
  std::vector<double> values(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) values[i] = t.get(offsets[i]);
  return values;
}

double random_epsilon(generator &g, bn_dtype dtype) {
  // float32 computes gamma/sqrt(variance + epsilon) in float32: no epsilon that overflows it.
  if (dtype == BN_FLOAT64 && g.chance(3)) return g.pick<double>({5e-324, 1e-300, 1e300, DBL_MAX});
  return g.pick<double>({0.0, -0.0, 1e-5, 1e-3, 0.1, 1.0, 1e-20, 100.0});
}

double_array random_params(generator &g, int64_t channels, double scale) {
  if (g.chance(3)) return double_array();  // NULL: 1 for gamma, 0 for beta
  double_array values(channels);
  for (int64_t c = 0; c < channels; ++c) values[c] = scale * g.uniform();
  return values;
}

// Statistics given to a normalization or backward: x's own (what a training
// backward must get), near them, or fixed values.
void given_statistics(generator &g, call &c, bool exact) {
  const moments_ref r = reference_moments(c.e);
  const int mode = exact ? 0 : g.in().ConsumeIntegralInRange<int>(0, 2);
  const double factor = g.pick<double>({0.0, 0.25, 1.0, 4.0});
  c.mean = double_array(c.e.channels);
  c.variance = double_array(c.e.channels);
  for (int64_t ch = 0; ch < c.e.channels; ++ch) {
    c.mean[ch] = mode == 2 ? 0.0 : r.mean[ch] + (mode == 1 ? r.spread[ch] * g.uniform() : 0.0);
    c.variance[ch] = mode == 2 ? factor : r.variance[ch] * (mode == 1 ? factor : 1.0);
  }
}

void lay_out_x(generator &g, call &c, const std::vector<int64_t> &shape) {
  lay_out(g, c.x, c.dtype, shape, c.out_is != out_kind::x);
  c.x_offsets = element_offsets(c.x, shape);
  fill(g, c.x, c.x_offsets, random_scale(g, c.dtype));
  c.e.x = read_values(c.x, c.x_offsets);
  c.e.channel = element_channels(shape, channel_axes(c.axes, static_cast<int32_t>(shape.size())), c.e.channels);
  c.e.used.assign(c.e.x.size(), 1);
  if (!c.has_mask) return;
  random_mask(g, c.mask, shape);
  const std::vector<int64_t> mask_offsets = element_offsets(c.mask, shape);
  for (size_t i = 0; i < mask_offsets.size(); ++i) c.e.used[i] = c.mask.get(mask_offsets[i]) != 0;
}

void lay_out_dy_and_out(generator &g, call &c, const std::vector<int64_t> &shape) {
  if (c.has_dy) {
    lay_out(g, c.dy, c.dtype, shape, c.out_is != out_kind::dy);
    c.dy_offsets = element_offsets(c.dy, shape);
    // Gradients at moderate scales: gamma·s·dy must not overflow where the exact dx is finite.
    value_scale s{0.0, std::ldexp(1.0, g.in().ConsumeIntegralInRange<int>(-12, 8)), g.chance(4), 0};
    if (g.chance(3)) s.offset = s.spread * 16 * g.uniform();
    fill(g, c.dy, c.dy_offsets, s);
    c.dy_values = read_values(c.dy, c.dy_offsets);
  }
  if (c.has_out && c.out_is == out_kind::own) {
    lay_out(g, c.out, c.dtype, shape, false);
    c.out_offsets = element_offsets(c.out, shape);
    for (int64_t offset : c.out_offsets) c.out.set(offset, std::nan(""));
  }
}

void per_channel_arrays(generator &g, call &c) {
  const int64_t C = c.e.channels;
  const bool training_backward = c.op == entry::backward_sums || (c.op == entry::backward && c.training != 0);
  if (c.op == entry::normalize || c.op == entry::backward || c.op == entry::backward_sums)
    given_statistics(g, c, training_backward);
  else {
    c.mean = double_array(C);
    c.variance = double_array(C);
  }
  if (c.op == entry::normalize || c.op == entry::train_forward || takes_dy(c.op)) c.gamma = random_params(g, C, 4.0);
  if (c.op == entry::normalize || c.op == entry::train_forward) c.beta = random_params(g, C, 4.0);
  if (c.op == entry::moments && g.chance(2)) c.count = double_array(C);
  if (c.op == entry::backward_sums) c.count = double_array(C);
  if (takes_dy(c.op) && (c.op == entry::backward_sums || g.chance(2))) {
    c.sum_dy = double_array(C);
    c.sum_dy_xhat = double_array(C);
  }
  if (c.op == entry::moments_partial) {
    c.partial = double_array(3 * C);
    if (g.chance(2)) {
      const moments_ref r = reference_moments(c.e);
      c.shift = double_array(C);
      for (int64_t ch = 0; ch < C; ++ch) c.shift[ch] = r.mean[ch] + r.spread[ch] * g.uniform();
    }
  }
}

}  // namespace

const char *entry_name(entry e) {
  static const char *const names[] = {"bn_moments", "bn_normalize", "bn_train_forward", "bn_backward",
                                      "bn_moments_partial", "bn_moments_finalize", "bn_backward_sums",
                                      "bn_backward_apply"};
  return names[static_cast<int>(e)];
}

const tensor_buffer &call::out_tensor() const { return out_is == out_kind::x ? x : out_is == out_kind::dy ? dy : out; }

const std::vector<int64_t> &call::out_element_offsets() const {
  return out_is == out_kind::x ? x_offsets : out_is == out_kind::dy ? dy_offsets : out_offsets;
}

void build_call(generator &g, entry op, call &c) {
  c.op = op;
  c.dtype = g.pick({BN_FLOAT32, BN_FLOAT64, BN_FLOAT16, BN_BFLOAT16});
  const std::vector<int64_t> shape = random_shape(g, g.chance(16) ? int64_t(1) << 17 : 4096);
  c.axes = random_axes(g, static_cast<int32_t>(shape.size()));
  c.has_out = takes_out(op);
  c.has_dy = takes_dy(op);
  c.has_mask = takes_mask(op) && g.chance(2);
  if (c.has_out && g.chance(3)) c.out_is = c.has_dy && g.chance(2) ? out_kind::dy : out_kind::x;
  c.training = op == entry::backward ? g.pick<int32_t>({1, 1, 0, 0, -1, 2, INT32_MIN}) : 1;
  c.epsilon = random_epsilon(g, c.dtype);
  lay_out_x(g, c, shape);
  lay_out_dy_and_out(g, c, shape);
  per_channel_arrays(g, c);
}

namespace {

std::string list(const std::vector<int64_t> &values) {
  std::string s = "(";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + ")";
}

std::string layout(const char *name, const tensor_buffer &t) {
  return std::string(" ") + name + " shape " + list(t.shape) + " strides " + list(t.strides) +
         (t.data ? "" : " NULL data");
}

}  // namespace

std::string describe(const call &c) {
  static const char *const dtypes[] = {"float32", "float64", "float16", "bfloat16"};
  char scalars[96];
  std::snprintf(scalars, sizeof scalars, " epsilon %.17g training %d", c.epsilon, static_cast<int>(c.training));
  std::string s = std::string(entry_name(c.op)) + " " + dtypes[c.dtype] + layout("x", c.x);
  if (c.has_out) s += c.out_is == out_kind::own ? layout("out", c.out) : c.out_is == out_kind::x ? " out=x" : " out=dy";
  if (c.has_dy) s += layout("dy", c.dy);
  if (c.has_mask) s += layout("mask", c.mask);
  return s + " axes " + list(std::vector<int64_t>(c.axes.begin(), c.axes.end())) + scalars;
}

void pass_arguments(const call &c, args &a) {
  a.x = c.x.descriptor();
  a.x_ptr = &a.x;
  a.out = c.out_tensor().descriptor();
  a.out_ptr = c.has_out ? &a.out : nullptr;
  a.dy = c.dy.descriptor();
  a.dy_ptr = c.has_dy ? &a.dy : nullptr;
  a.mask = c.mask.descriptor();
  a.mask_ptr = c.has_mask ? &a.mask : nullptr;
  a.axes = c.axes.data();
  a.n_axes = static_cast<int32_t>(c.axes.size());
  a.mean = c.mean.get();
  a.variance = c.variance.get();
  a.gamma = c.gamma.get();
  a.beta = c.beta.get();
  a.count = c.count.get();
  a.sum_dy = c.sum_dy.get();
  a.sum_dy_xhat = c.sum_dy_xhat.get();
  a.shift = c.shift.get();
  a.partial = c.partial.get();
  a.channels = c.e.channels;
  a.epsilon = c.epsilon;
  a.training = c.training;
}

bn_status invoke(entry op, const args &a) {
  switch (op) {
    case entry::moments:
      return bn_moments(a.x_ptr, a.axes, a.n_axes, a.mask_ptr, a.mean, a.variance, a.count);
    case entry::normalize:
      return bn_normalize(a.x_ptr, a.out_ptr, a.axes, a.n_axes, a.mean, a.variance, a.gamma, a.beta, a.epsilon);
    case entry::train_forward:
      return bn_train_forward(a.x_ptr, a.out_ptr, a.axes, a.n_axes, a.mask_ptr, a.gamma, a.beta, a.epsilon, a.mean,
                              a.variance);
    case entry::backward:
      return bn_backward(a.dy_ptr, a.x_ptr, a.out_ptr, a.axes, a.n_axes, a.mask_ptr, a.mean, a.variance, a.gamma,
                         a.epsilon, a.training, a.sum_dy, a.sum_dy_xhat);
    case entry::moments_partial:
      return bn_moments_partial(a.x_ptr, a.axes, a.n_axes, a.mask_ptr, a.shift, a.partial);
    case entry::moments_finalize:
      return bn_moments_finalize(a.channels, a.partial, a.shift, a.mean, a.variance);
    case entry::backward_sums:
      return bn_backward_sums(a.dy_ptr, a.x_ptr, a.axes, a.n_axes, a.mask_ptr, a.mean, a.variance, a.epsilon,
                              a.count, a.sum_dy, a.sum_dy_xhat);
    case entry::backward_apply:
      return bn_backward_apply(a.dy_ptr, a.x_ptr, a.out_ptr, a.axes, a.n_axes, a.mask_ptr, a.mean, a.variance,
                               a.gamma, a.epsilon, a.count, a.sum_dy, a.sum_dy_xhat);
  }
  return BN_ERR_VALUE;
}

}  // namespace fuzz
