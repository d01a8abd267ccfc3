// bn_core C++17 API: the C API (bn_core.h) with value types and exceptions.
//
// Header only, over the C functions: the library's ABI stays the C one, so one
// build of it serves applications built with any C++ standard library or flags.
// Every failure throws bn_core::error, carrying the bn_status and the
// library's message.
//
// Tensors are described, not owned, by a tensor_view (writable: outputs) or a
// const_tensor_view (read only: inputs): data, dtype, shape and byte strides
// (any sign, 0 allowed). Per-channel values are std::vector<double> of C
// entries (C = product of the sizes of the channel axes; see bn_core.h).
#ifndef BN_CORE_HPP
#define BN_CORE_HPP

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_core/bn_core.h"

namespace bn_core {

// The C enums under C++ names.
using status = bn_status;
using dtype = bn_dtype;
using isa = bn_isa;

using axis_list = std::vector<int32_t>;

class error : public std::runtime_error {
 public:
  error(status code, const std::string &message) : std::runtime_error(message), code_(code) {}
  status code() const noexcept { return code_; }

 private:
  status code_;
};

// Storage of the 16-bit formats (the library converts; arithmetic is not its job here).
struct float16 {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

template <class T>
struct dtype_traits {
  static_assert(!std::is_same_v<T, T>,
                "unsupported element type: use float, double, bn_core::float16, bn_core::bfloat16, "
                "uint8_t or bool (masks), or a tensor view's untyped constructor");
};
template <> struct dtype_traits<float> : std::integral_constant<dtype, BN_FLOAT32> {};
template <> struct dtype_traits<double> : std::integral_constant<dtype, BN_FLOAT64> {};
template <> struct dtype_traits<float16> : std::integral_constant<dtype, BN_FLOAT16> {};
template <> struct dtype_traits<bfloat16> : std::integral_constant<dtype, BN_BFLOAT16> {};
template <> struct dtype_traits<uint8_t> : std::integral_constant<dtype, BN_UINT8> {};
template <> struct dtype_traits<bool> : std::integral_constant<dtype, BN_UINT8> {};

// The dtype of elements of type T (const or not).
template <class T>
inline constexpr dtype dtype_of = dtype_traits<std::remove_cv_t<T>>::value;

inline int64_t element_size(dtype type) {
  switch (type) {
    case BN_FLOAT64: return 8;
    case BN_FLOAT32: return 4;
    case BN_FLOAT16:
    case BN_BFLOAT16: return 2;
    case BN_UINT8: return 1;
  }
  throw error(BN_ERR_DTYPE, "unknown dtype " + std::to_string(static_cast<int>(type)));
}

template <class Void>
class basic_tensor_view {
  static_assert(std::is_void_v<Void>, "a tensor view's data is void * or const void *");

 public:
  // Any dtype; strides in bytes, one per dimension.
  basic_tensor_view(Void *data, dtype type, std::vector<int64_t> shape, std::vector<int64_t> strides)
      : data_(data), type_(type), shape_(std::move(shape)), strides_(std::move(strides)) {
    if (shape_.size() != strides_.size())
      throw error(BN_ERR_SHAPE, "shape has " + std::to_string(shape_.size()) + " sizes but strides has " +
                                    std::to_string(strides_.size()));
  }

  // Any dtype, contiguous in row-major (C) order.
  basic_tensor_view(Void *data, dtype type, std::vector<int64_t> shape)
      : data_(data), type_(type), shape_(std::move(shape)), strides_(contiguous_strides(shape_, type)) {}

  // The dtype of T.
  template <class T, class = std::enable_if_t<std::is_convertible_v<T *, Void *>>>
  basic_tensor_view(T *data, std::vector<int64_t> shape)
      : basic_tensor_view(data, dtype_of<T>, std::move(shape)) {}

  template <class T, class = std::enable_if_t<std::is_convertible_v<T *, Void *>>>
  basic_tensor_view(T *data, std::vector<int64_t> shape, std::vector<int64_t> strides)
      : basic_tensor_view(data, dtype_of<T>, std::move(shape), std::move(strides)) {}

  // A writable view is also a read-only one.
  template <class Other, class = std::enable_if_t<std::is_const_v<Void> && !std::is_const_v<Other>>>
  basic_tensor_view(const basic_tensor_view<Other> &other)
      : data_(other.data()), type_(other.type()), shape_(other.shape()), strides_(other.strides()) {}

  Void *data() const noexcept { return data_; }
  dtype type() const noexcept { return type_; }
  int64_t rank() const noexcept { return static_cast<int64_t>(shape_.size()); }
  const std::vector<int64_t> &shape() const noexcept { return shape_; }
  const std::vector<int64_t> &strides() const noexcept { return strides_; }

  // The C description; it points into this view, so it lives as long as the view.
  bn_tensor c_tensor() const noexcept {
    // bn_tensor has void * for inputs too: the library never writes x or a mask.
    return bn_tensor{const_cast<void *>(static_cast<const void *>(data_)), type_,
                     static_cast<int32_t>(std::min<size_t>(shape_.size(), BN_MAX_RANK + 1)), shape_.data(),
                     strides_.data()};
  }

 private:
  static std::vector<int64_t> contiguous_strides(const std::vector<int64_t> &shape, dtype type) {
    std::vector<int64_t> strides(shape.size());
    int64_t stride = element_size(type);
    for (size_t i = shape.size(); i-- > 0;) {
      strides[i] = stride;
      const int64_t n = shape[i];
      if (n < 0)
        throw error(BN_ERR_SHAPE, "shape has negative size " + std::to_string(n) + " at axis " + std::to_string(i));
      if (n > 0 && stride > std::numeric_limits<int64_t>::max() / n)
        throw error(BN_ERR_OVERFLOW, "a contiguous tensor of this shape spans more than 2^63 bytes");
      stride *= n;
    }
    return strides;
  }

  Void *data_;
  dtype type_;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
};

using tensor_view = basic_tensor_view<void>;
using const_tensor_view = basic_tensor_view<const void>;

// The view type for T *: read only when T is const.
template <class T>
using view_of = std::conditional_t<std::is_const_v<T>, const_tensor_view, tensor_view>;

// Contiguous image batches: channel axis 3 (NHWC, channels last) or 1 (NCHW).
template <class T>
view_of<T> nhwc(T *data, int64_t n, int64_t h, int64_t w, int64_t c) {
  return view_of<T>(data, {n, h, w, c});
}
template <class T>
view_of<T> nchw(T *data, int64_t n, int64_t c, int64_t h, int64_t w) {
  return view_of<T>(data, {n, c, h, w});
}

// Per-channel statistics: float64, C values each.
struct statistics {
  std::vector<double> mean;
  std::vector<double> variance;  // biased (population)
  std::vector<double> count;     // used positions per channel (moments() and moments_finalize() only)
};

// Per-channel sums of a backward pass over every position: Σdy (= dbeta) and
// Σdy·x̂ (= dgamma); count (used positions) from backward_sums() only.
struct gradient_sums {
  std::vector<double> sum_dy;
  std::vector<double> sum_dy_xhat;
  std::vector<double> count;
};

// A fused epilogue (bn_epilogue in bn_core.h): y = act(z + residual), z the
// normalized value. The default is none (identity, no residual).
struct epilogue {
  bn_activation activation = BN_ACT_IDENTITY;
  double alpha = 0.01;    // BN_ACT_LEAKY_RELU's negative slope
  double lo = 0, hi = 0;  // BN_ACT_CLIP's bounds
  std::optional<const_tensor_view> residual;
};

namespace detail {

inline void check(status s) {
  if (s != BN_OK) throw error(s, bn_last_error());
}

// C, or -1 when x or the axes are invalid. In that case the wrappers pass NULL
// for every per-channel array: the library rejects x and the axes before it
// reads any, so the error it reports is the real one.
inline int64_t channel_count(const bn_tensor &x, const axis_list &axes) {
  if (x.rank < 1 || x.rank > BN_MAX_RANK || !x.shape || axes.empty() || axes.size() > size_t(x.rank))
    return -1;
  bool seen[BN_MAX_RANK] = {};
  int64_t channels = 1;
  for (const int32_t a : axes) {
    if (a < -x.rank || a >= x.rank) return -1;
    const int32_t axis = a < 0 ? a + x.rank : a;
    const int64_t n = x.shape[axis];
    if (seen[axis] || n < 0 || (n > 0 && channels > std::numeric_limits<int64_t>::max() / n)) return -1;
    seen[axis] = true;
    channels *= n;
  }
  return channels;
}

inline void check_channels(const std::vector<double> &values, int64_t channels, const char *name) {
  if (static_cast<int64_t>(values.size()) != channels)
    throw error(BN_ERR_SHAPE, std::string(name) + " has " + std::to_string(values.size()) +
                                  " values; expected one per channel (" + std::to_string(channels) + ")");
}

// A per-channel input. An optional one (gamma, beta) may be empty: NULL (1 and 0).
inline const double *channel_input(const std::vector<double> &values, int64_t channels, const char *name,
                                   bool optional) {
  static const double no_channel = 0.0;  // data() of an empty vector may be NULL, which the library refuses
  if (channels < 0 || (optional && values.empty())) return nullptr;
  check_channels(values, channels, name);
  return channels == 0 ? &no_channel : values.data();
}

// A per-channel output of C values. data() of an empty vector may be NULL,
// which the library refuses, so with 0 channels it gets `spare` (never written).
inline double *channel_output(std::vector<double> &values, int64_t channels, double &spare) {
  if (channels < 0) return nullptr;
  values.assign(static_cast<size_t>(channels), 0.0);
  return channels == 0 ? &spare : values.data();
}

// The C description of an optional mask (pass `m ? &*m : nullptr`).
inline std::optional<bn_tensor> mask_tensor(const std::optional<const_tensor_view> &mask) {
  return mask ? std::optional<bn_tensor>(mask->c_tensor()) : std::nullopt;
}

// The axis list for the C call: never NULL, so an empty list is reported as such.
inline const int32_t *axes_data(const axis_list &axes) {
  static const int32_t no_axis = 0;
  return axes.empty() ? &no_axis : axes.data();
}

inline int32_t axes_size(const axis_list &axes) {
  return static_cast<int32_t>(std::min<size_t>(axes.size(), std::numeric_limits<int32_t>::max()));
}

// e as the C descriptor; residual holds its tensor.
inline bn_epilogue c_epilogue(const epilogue &e, bn_tensor &residual) {
  if (e.residual) residual = e.residual->c_tensor();
  return bn_epilogue{e.activation, e.alpha, e.lo, e.hi, e.residual ? &residual : nullptr};
}

}  // namespace detail

// Per-channel mean, biased variance and count over all other axes; masked
// positions (mask zero) are left out. A channel with no used position gets 0, 0, 0.
inline statistics moments(const const_tensor_view &x, const axis_list &axes,
                          const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor xt = x.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  statistics s;
  double spare;
  double *mean = detail::channel_output(s.mean, channels, spare);
  double *variance = detail::channel_output(s.variance, channels, spare);
  double *count = detail::channel_output(s.count, channels, spare);
  detail::check(bn_moments(&xt, detail::axes_data(axes), detail::axes_size(axes), mt ? &*mt : nullptr, mean,
                           variance, count));
  return s;
}

// Inference: y = (x - mean) * gamma / sqrt(variance + epsilon) + beta, then
// the epilogue. Empty gamma or beta: 1 and 0. y may be x itself (in place).
inline void normalize(const const_tensor_view &x, const tensor_view &y, const axis_list &axes,
                      const std::vector<double> &mean, const std::vector<double> &variance,
                      const std::vector<double> &gamma = {}, const std::vector<double> &beta = {},
                      double epsilon = 1e-3, const epilogue &epi = {}) {
  const bn_tensor xt = x.c_tensor(), yt = y.c_tensor();
  const int64_t channels = detail::channel_count(xt, axes);
  bn_tensor residual;
  const bn_epilogue e = detail::c_epilogue(epi, residual);
  detail::check(bn_normalize_epilogue(&xt, &yt, detail::axes_data(axes), detail::axes_size(axes),
                                      detail::channel_input(mean, channels, "mean", false),
                                      detail::channel_input(variance, channels, "variance", false),
                                      detail::channel_input(gamma, channels, "gamma", true),
                                      detail::channel_input(beta, channels, "beta", true), epsilon, &e));
}

// Folding (bn_fold): weight_out (may be weight itself) receives the linear
// layer's weights scaled per output channel; returns its new bias. Empty bias,
// gamma or beta: 0, 1 and 0.
inline std::vector<double> fold(const const_tensor_view &weight, const tensor_view &weight_out,
                                int32_t out_axis, const std::vector<double> &bias,
                                const std::vector<double> &mean, const std::vector<double> &variance,
                                const std::vector<double> &gamma = {},
                                const std::vector<double> &beta = {}, double epsilon = 1e-3) {
  const bn_tensor wt = weight.c_tensor(), ot = weight_out.c_tensor();
  const int64_t channels = detail::channel_count(wt, axis_list{out_axis});
  std::vector<double> new_bias;
  double spare;
  double *out = detail::channel_output(new_bias, channels, spare);
  detail::check(bn_fold(&wt, &ot, out_axis, detail::channel_input(bias, channels, "bias", true),
                        detail::channel_input(mean, channels, "mean", false),
                        detail::channel_input(variance, channels, "variance", false),
                        detail::channel_input(gamma, channels, "gamma", true),
                        detail::channel_input(beta, channels, "beta", true), epsilon, out));
  return new_bias;
}

// Training: the batch statistics (masked as in moments(); count is left empty)
// and y normalized with them (then the epilogue), in one pass.
inline statistics train_forward(const const_tensor_view &x, const tensor_view &y, const axis_list &axes,
                                const std::vector<double> &gamma = {}, const std::vector<double> &beta = {},
                                double epsilon = 1e-3,
                                const std::optional<const_tensor_view> &mask = std::nullopt,
                                const epilogue &epi = {}) {
  const bn_tensor xt = x.c_tensor(), yt = y.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  const double *g = detail::channel_input(gamma, channels, "gamma", true);
  const double *b = detail::channel_input(beta, channels, "beta", true);
  statistics s;
  double spare;
  double *mean = detail::channel_output(s.mean, channels, spare);
  double *variance = detail::channel_output(s.variance, channels, spare);
  bn_tensor residual;
  const bn_epilogue e = detail::c_epilogue(epi, residual);
  detail::check(bn_train_forward_epilogue(&xt, &yt, detail::axes_data(axes), detail::axes_size(axes),
                                          mt ? &*mt : nullptr, g, b, epsilon, mean, variance, &e));
  return s;
}

// Backward of y = x̂·gamma + beta, x̂ = (x - mean) / sqrt(variance + epsilon), into
// dx (which may be dy's memory). training: through the batch statistics, which
// must be the (masked) moments of x the forward used; else with them fixed.
// Empty gamma: 1. Returns Σdy and Σdy·x̂ (count is left empty).
inline gradient_sums backward(const const_tensor_view &dy, const const_tensor_view &x, const tensor_view &dx,
                              const axis_list &axes, const std::vector<double> &mean,
                              const std::vector<double> &variance, const std::vector<double> &gamma = {},
                              double epsilon = 1e-3, bool training = true,
                              const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor dyt = dy.c_tensor(), xt = x.c_tensor(), dxt = dx.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  const double *m = detail::channel_input(mean, channels, "mean", false);
  const double *v = detail::channel_input(variance, channels, "variance", false);
  const double *g = detail::channel_input(gamma, channels, "gamma", true);
  gradient_sums sums;
  double spare;
  double *sum_dy = detail::channel_output(sums.sum_dy, channels, spare);
  double *sum_dy_xhat = detail::channel_output(sums.sum_dy_xhat, channels, spare);
  detail::check(bn_backward(&dyt, &xt, &dxt, detail::axes_data(axes), detail::axes_size(axes), mt ? &*mt : nullptr,
                            m, v, g, epsilon, training ? 1 : 0, sum_dy, sum_dy_xhat));
  return sums;
}

// Backward through the epilogue (bn_backward_epilogue): dx, and g = dy·act'(z)
// into dresidual when given; returns Σg and Σg·x̂. output: the forward's y
// (optional; saves a pass for the piecewise-linear activations). Empty gamma
// or beta: 1 and 0.
inline gradient_sums backward_epilogue(const const_tensor_view &dy, const const_tensor_view &x,
                                       const tensor_view &dx, const axis_list &axes,
                                       const std::vector<double> &mean, const std::vector<double> &variance,
                                       const std::vector<double> &gamma, const std::vector<double> &beta,
                                       double epsilon, bool training, const epilogue &epi,
                                       const std::optional<const_tensor_view> &output = std::nullopt,
                                       const std::optional<tensor_view> &dresidual = std::nullopt,
                                       const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor dyt = dy.c_tensor(), xt = x.c_tensor(), dxt = dx.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const std::optional<bn_tensor> ot = output ? std::optional<bn_tensor>(output->c_tensor()) : std::nullopt;
  const std::optional<bn_tensor> rt = dresidual ? std::optional<bn_tensor>(dresidual->c_tensor()) : std::nullopt;
  const int64_t channels = detail::channel_count(xt, axes);
  bn_tensor residual;
  const bn_epilogue e = detail::c_epilogue(epi, residual);
  gradient_sums sums;
  double spare;
  double *sum_dy = detail::channel_output(sums.sum_dy, channels, spare);
  double *sum_dy_xhat = detail::channel_output(sums.sum_dy_xhat, channels, spare);
  detail::check(bn_backward_epilogue(
      &dyt, &xt, &dxt, detail::axes_data(axes), detail::axes_size(axes), mt ? &*mt : nullptr,
      detail::channel_input(mean, channels, "mean", false), detail::channel_input(variance, channels, "variance", false),
      detail::channel_input(gamma, channels, "gamma", true), detail::channel_input(beta, channels, "beta", true),
      epsilon, training ? 1 : 0, sum_dy, sum_dy_xhat, &e, ot ? &*ot : nullptr, rt ? &*rt : nullptr));
  return sums;
}

// Distributed training (see bn_core.h): the caller sums what phase 1 returns
// over the ranks (e.g. an MPI allreduce) and hands the totals to phase 2.
//
// Forward, phase 1: 3·C values (counts, n·(mean - K), M2 + n·(mean - K)²) for
// a shift K every rank shares (e.g. the moving mean; empty: 0).
inline std::vector<double> moments_partial(const const_tensor_view &x, const axis_list &axes,
                                           const std::vector<double> &shift = {},
                                           const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor xt = x.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  if (channels > std::numeric_limits<int64_t>::max() / 3)
    throw error(BN_ERR_OVERFLOW, std::to_string(channels) + " channels: 3 values each overflow int64");
  std::vector<double> partial;
  double spare;
  // Never NULL: bn_moments_partial checks it before x, whose error is the real one.
  double *out = detail::channel_output(partial, channels < 0 ? 0 : 3 * channels, spare);
  detail::check(bn_moments_partial(&xt, detail::axes_data(axes), detail::axes_size(axes), mt ? &*mt : nullptr,
                                   detail::channel_input(shift, channels, "shift", true), out));
  return partial;
}

// Forward, phase 2: mean, variance and count from the partials summed over ranks.
inline statistics moments_finalize(const std::vector<double> &partial, const std::vector<double> &shift = {}) {
  if (partial.size() % 3 != 0)
    throw error(BN_ERR_SHAPE, "partial has " + std::to_string(partial.size()) + " values; expected 3 per channel");
  const int64_t channels = static_cast<int64_t>(partial.size() / 3);
  statistics s;
  double spare = 0.0;
  double *mean = detail::channel_output(s.mean, channels, spare);
  double *variance = detail::channel_output(s.variance, channels, spare);
  detail::check(bn_moments_finalize(channels, partial.empty() ? &spare : partial.data(),
                                    detail::channel_input(shift, channels, "shift", true), mean, variance));
  s.count.assign(partial.begin(), partial.begin() + channels);
  return s;
}

// Backward, phase 1: this rank's count, Σdy and Σdy·x̂ for the global statistics.
inline gradient_sums backward_sums(const const_tensor_view &dy, const const_tensor_view &x, const axis_list &axes,
                                   const std::vector<double> &mean, const std::vector<double> &variance,
                                   double epsilon = 1e-3,
                                   const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor dyt = dy.c_tensor(), xt = x.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  const double *m = detail::channel_input(mean, channels, "mean", false);
  const double *v = detail::channel_input(variance, channels, "variance", false);
  gradient_sums sums;
  double spare;
  double *count = detail::channel_output(sums.count, channels, spare);
  double *sum_dy = detail::channel_output(sums.sum_dy, channels, spare);
  double *sum_dy_xhat = detail::channel_output(sums.sum_dy_xhat, channels, spare);
  detail::check(bn_backward_sums(&dyt, &xt, detail::axes_data(axes), detail::axes_size(axes), mt ? &*mt : nullptr,
                                 m, v, epsilon, count, sum_dy, sum_dy_xhat));
  return sums;
}

// Backward, phase 2: dx as backward() in training, from phase 1's sums added
// over ranks (all three vectors).
inline void backward_apply(const const_tensor_view &dy, const const_tensor_view &x, const tensor_view &dx,
                           const axis_list &axes, const std::vector<double> &mean,
                           const std::vector<double> &variance, const gradient_sums &totals,
                           const std::vector<double> &gamma = {}, double epsilon = 1e-3,
                           const std::optional<const_tensor_view> &mask = std::nullopt) {
  const bn_tensor dyt = dy.c_tensor(), xt = x.c_tensor(), dxt = dx.c_tensor();
  const std::optional<bn_tensor> mt = detail::mask_tensor(mask);
  const int64_t channels = detail::channel_count(xt, axes);
  detail::check(bn_backward_apply(&dyt, &xt, &dxt, detail::axes_data(axes), detail::axes_size(axes),
                                  mt ? &*mt : nullptr, detail::channel_input(mean, channels, "mean", false),
                                  detail::channel_input(variance, channels, "variance", false),
                                  detail::channel_input(gamma, channels, "gamma", true), epsilon,
                                  detail::channel_input(totals.count, channels, "count", false),
                                  detail::channel_input(totals.sum_dy, channels, "sum_dy", false),
                                  detail::channel_input(totals.sum_dy_xhat, channels, "sum_dy_xhat", false)));
}

// Keras-style layer state for applications that do not manage buffers:
// gamma = 1, beta = 0, moving mean 0 and moving variance 1 to start with.
// forward() in training normalizes with the batch statistics and updates
//   moving = moving * momentum + batch * (1 - momentum);
// in inference it normalizes with the moving statistics (and ignores a mask,
// which only selects the positions counted in batch statistics).
// backward() differentiates the last forward(): dx, and dgamma and dbeta.
class BatchNorm {
 public:
  explicit BatchNorm(int64_t channels, axis_list axes = {-1}, double momentum = 0.99, double epsilon = 1e-3)
      : axes(std::move(axes)), momentum(momentum), epsilon(epsilon) {
    if (channels < 0) throw error(BN_ERR_VALUE, "channels is " + std::to_string(channels) + "; expected >= 0");
    const size_t c = static_cast<size_t>(channels);
    gamma.assign(c, 1.0);
    beta.assign(c, 0.0);
    moving_mean.assign(c, 0.0);
    moving_variance.assign(c, 1.0);
  }

  void forward(const const_tensor_view &x, const tensor_view &y, bool training,
               const std::optional<const_tensor_view> &mask = std::nullopt) {
    if (!training) {
      normalize(x, y, axes, moving_mean, moving_variance, gamma, beta, epsilon);
      last_forward_ = forward_record{x, std::nullopt, moving_mean, moving_variance, false};
      return;
    }
    // Checked before y is written, so a failed step changes nothing.
    const int64_t channels = detail::channel_count(x.c_tensor(), axes);
    if (channels >= 0) {
      detail::check_channels(moving_mean, channels, "moving_mean");
      detail::check_channels(moving_variance, channels, "moving_variance");
    }
    statistics batch = train_forward(x, y, axes, gamma, beta, epsilon, mask);
    for (size_t c = 0; c < batch.mean.size(); ++c) {
      moving_mean[c] = moving_mean[c] * momentum + batch.mean[c] * (1.0 - momentum);
      moving_variance[c] = moving_variance[c] * momentum + batch.variance[c] * (1.0 - momentum);
    }
    last_forward_ = forward_record{x, mask, std::move(batch.mean), std::move(batch.variance), true};
  }

  // dx from dy for the last forward(): through the batch statistics it used
  // after a training one, with the moving statistics it used fixed after an
  // inference one; gamma, axes and epsilon as they are now. dgamma = Σdy·x̂ and
  // dbeta = Σdy over every position. The layer keeps views, not copies: that
  // forward's x (and mask) must still hold its data. dx may be dy's memory.
  void backward(const const_tensor_view &dy, const tensor_view &dx) {
    if (!last_forward_) throw error(BN_ERR_VALUE, "backward() needs a forward() first");
    const forward_record &f = *last_forward_;
    gradient_sums sums =
        bn_core::backward(dy, f.x, dx, axes, f.mean, f.variance, gamma, epsilon, f.training, f.mask);
    dgamma = std::move(sums.sum_dy_xhat);
    dbeta = std::move(sums.sum_dy);
  }

  axis_list axes;
  double momentum;
  double epsilon;
  std::vector<double> gamma, beta, moving_mean, moving_variance;
  std::vector<double> dgamma, dbeta;  // from the last backward()

 private:
  // What backward() needs of the last forward().
  struct forward_record {
    const_tensor_view x;
    std::optional<const_tensor_view> mask;
    std::vector<double> mean, variance;
    bool training;
  };
  std::optional<forward_record> last_forward_;
};

// Cache sizes in bytes the training forward blocks for (per-core L2, shared
// L3); a value <= 0 restores the detected size.
struct cache_sizes {
  int64_t l2;
  int64_t l3;
};
inline void set_cache_bytes(int64_t l2, int64_t l3) { detail::check(bn_set_cache_bytes(l2, l3)); }
inline std::string cache_origin() { return bn_cache_origin(); }
inline cache_sizes get_cache_bytes() {
  cache_sizes sizes{};
  bn_get_cache_bytes(&sizes.l2, &sizes.l3);
  return sizes;
}

// Threads of later calls; n <= 0 restores the default (OpenMP's).
inline void set_num_threads(int32_t n) { detail::check(bn_set_num_threads(n)); }
inline int32_t get_num_threads() { return bn_get_num_threads(); }

// SIMD level in use, the best this CPU has, and a choice by value or name
// ("scalar", "avx2", "avx512"; "" for the best).
inline isa get_isa() { return bn_get_isa(); }
inline isa cpu_best_isa() { return bn_best_isa(); }
inline void set_isa(isa level) { detail::check(bn_set_isa(level)); }
inline void set_isa(const std::string &name) { detail::check(bn_set_isa_by_name(name.c_str())); }
inline std::string isa_name(isa level) { return bn_isa_name(level); }

inline std::string version() { return bn_version(); }
inline std::string build_info() { return bn_build_info(); }

}  // namespace bn_core

#endif  // BN_CORE_HPP
