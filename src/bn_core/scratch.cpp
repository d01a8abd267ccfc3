#include "scratch.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <type_traits>

#include "dispatch.hpp"
#include "float64_moments.hpp"
#include "validate.hpp"

namespace bn_core {
std::unique_ptr<double[]> new_doubles(int64_t count, bool zeroed) {
  if (count < 0 || count > std::numeric_limits<int64_t>::max() / 16) return nullptr;
  std::unique_ptr<double[]> doubles(new (std::nothrow) double[static_cast<size_t>(count)]);
  if (doubles && zeroed) std::fill(doubles.get(), doubles.get() + count, 0.0);
  return doubles;
}

// ---- moments_state ---------------------------------------------------------------


bool moments_state::allocate(const plan &p, int32_t slots) {
  slots_ = slots;
  buffer_ = new_doubles(saturating_mul(layout(p), slots));
  if (!buffer_) return false;
  try {
    shifts_missing_.resize(static_cast<size_t>(slots));
  } catch (const std::bad_alloc &) {
    return false;
  }
  reset(p);
  return true;
}

void moments_state::reset(const plan &p) {
  per_slot_ = layout(p);
  for (int32_t s = 0; s < slots_; ++s) {
    const moments_scratch m = slot(s);
    // The run arrays follow the statistics; only planes x L walks add into them
    // (rows x C walks set them before each super block).
    const int64_t arrays = p.inner_is_channel ? kStatisticsArrays : kChannelArrays;
    std::fill(m.count, m.count + arrays * channels_, 0.0);
    std::fill(m.shift_ok, m.shift_ok + channels_, uint8_t{0});
  }
  std::fill(shifts_missing_.begin(), shifts_missing_.end(), channels_);
}

void moments_state::finish(int32_t team, const plan &p, double *mean, double *variance,
                           double *count) {
  const bool non_finite =
      active_kernels().finish_moments(slot(0), per_slot_, team, channels_, mean, variance, count);
  if (non_finite && float32_blocks_can_overflow(p.dtype)) redo_non_finite(p, mean, variance, count);
}

// The partials are merged: slot 0's arrays are free to serve as the flags and
// sums of float64_moments.
void moments_state::redo_non_finite(const plan &p, double *mean, double *variance, double *count) {
  const moments_scratch s = slot(0);
  for (int64_t c = 0; c < channels_; ++c)
    s.shift_ok[c] = !(std::isfinite(mean[c]) && std::isfinite(variance[c]));
  float64_moments(p, s.shift_ok, mean, variance, count, s.run_s1, s.run_n);
}

int64_t moments_state::layout(const plan &p) {
  channels_ = p.channels;
  block_ = p.inner_is_channel ? spaced_block_length(std::min(p.inner.n, kRowsChannelChunk)) : 0;
  return saturating_add(saturating_add(saturating_mul(kChannelArrays, channels_), kBlockArrays * block_),
                        channels_ / 8 + (channels_ % 8 != 0));  // the shift_ok bytes
}

// A block array length of at least n doubles at which no two block arrays
// start within 256 bytes of a nonzero multiple of 4 KB apart. The channels-last
// walk from memory stores two of them and loads a third per vector, and a load
// whose low 12 address bits match a pending store's waits for it (4K
// aliasing): at 256 channels unspaced arrays are exactly 4 KB apart
// (bench/DESIGN.md, 'scratch.cpp').
int64_t moments_state::spaced_block_length(int64_t n) {
  constexpr int64_t page = 4096 / sizeof(double), near = 256 / sizeof(double);
  for (int64_t len = n;; len += 8) {
    bool apart = true;
    for (int64_t i = 1; i < kBlockArrays; ++i) {
      const int64_t o = i * len;
      apart &= o < page - near || (o + near) % page >= 2 * near;
    }
    if (apart) return len;
  }
}

// ---- channel_params ----------------------------------------------------------------

template <int32_t Arrays>
bool channel_params<Arrays>::allocate(const plan &p) {
  wide_ = p.dtype == BN_FLOAT64;
  fit(p);
  stride_ = length_;
  buffer_ = new_doubles(saturating_mul(Arrays, stride_));
  return buffer_ != nullptr;
}

template <int32_t Arrays>
void channel_params<Arrays>::fit(const plan &p) {
  channels_ = p.channels;
  length_ = p.period ? std::max(p.fold_len, channels_) : channels_;
}

template <int32_t Arrays>
template <class Values>
void channel_params<Arrays>::fill(const double *mean, Values &&values) {
  if (wide_) fill_as<double>(mean, values);
  else fill_as<float>(mean, values);
}

// Arrays is a constant so that this loop vectorizes (with -fno-math-errno and
// -fno-trapping-math on this file: see CMakeLists.txt).
template <int32_t Arrays>
template <class acc, class Values>
void channel_params<Arrays>::fill_as(const double *mean, Values &&values) {
  acc *a = reinterpret_cast<acc *>(buffer_.get());
  const int64_t stride = stride_;
  for (int64_t c = 0; c < channels_; ++c) {
    double v[Arrays];
    const acc hi = static_cast<acc>(mean[c]);
    v[0] = hi;
    values(c, mean[c] - static_cast<double>(hi), v);
    for (int32_t i = 0; i < Arrays; ++i) a[i * stride + c] = static_cast<acc>(v[i]);
  }
  for (int32_t i = 0; i < Arrays; ++i)
    for (int64_t k = channels_; k < length_; ++k) a[i * stride + k] = a[i * stride + k - channels_];
}

template class channel_params<3>;
template class channel_params<6>;

// ---- affine_state ------------------------------------------------------------------

void affine_state::fill(const double *mean, const double *variance, const double *gamma,
                        const double *beta, double eps) {
  // One loop per presence of gamma and beta, so that none branches inside (and vectorizes).
  auto fill_with = [&](auto has_gamma, auto has_beta) {
    params_.fill(mean, [&](int64_t c, double lo, double *v) {
      const double scale = (has_gamma ? gamma[c] : 1.0) / std::sqrt(variance[c] + eps);
      const double b = has_beta ? beta[c] : 0.0;
      const double corrected = b - lo * scale;  // unconditional: a select vectorizes, a branch does not
      v[1] = scale;
      v[2] = lo == 0 ? b : corrected;  // lo = 0 (float64 data) keeps beta exact even at scale = inf
    });
  };
  if (gamma && beta) fill_with(std::true_type{}, std::true_type{});
  else if (gamma) fill_with(std::true_type{}, std::false_type{});
  else if (beta) fill_with(std::false_type{}, std::true_type{});
  else fill_with(std::false_type{}, std::false_type{});
}

void affine_state::fill_identity() {
  const std::vector<double> zeros(static_cast<size_t>(params_.channels()), 0.0);
  params_.fill(zeros.data(), [](int64_t, double, double *v) {
    v[1] = 1.0;
    v[2] = 0.0;
  });
}

// ---- backward_state ----------------------------------------------------------------

bool backward_state::allocate(const plan &p, int32_t slots) {
  channels_ = p.channels;
  if (!params_.allocate(p)) return false;
  length_ = params_.length();
  sums_ = new_doubles(saturating_mul(saturating_mul(3, length_), slots), true);
  return sums_ != nullptr;
}

void backward_state::fit(const plan &p) {
  channels_ = p.channels;
  params_.fit(p);
  length_ = params_.length();
  std::fill(sums_.get(), sums_.get() + 3 * length_, 0.0);
}

void backward_state::fill_xhat(const double *mean, const double *variance, double eps) {
  params_.fill(mean, [&](int64_t c, double lo, double *v) {
    v[1] = lo;
    v[2] = 1.0 / std::sqrt(variance[c] + eps);
    v[3] = v[4] = v[5] = 0.0;
  });
}

void backward_state::fill_dx(const double *mean, const double *variance, const double *gamma,
                             double eps, const double *count, const double *sum_dy,
                             const double *sum_dy_xhat) {
  params_.fill(mean, [&](int64_t c, double lo, double *v) {
    const double s = 1.0 / std::sqrt(variance[c] + eps), gs = (gamma ? gamma[c] : 1.0) * s;
    v[1] = lo;
    const bool through_stats = count && count[c] > 0;
    v[2] = s;
    v[3] = gs;
    // gs·s alone overflows when variance + eps < ~1e-308 (s > 1e154); Σdy·x̂ is 0 then
    // for a constant channel, whose exact coefficient is 0, not inf·0 = NaN.
    v[4] = through_stats ? -gs * (s * (sum_dy_xhat[c] / count[c])) : 0.0;
    v[5] = through_stats ? -gs * sum_dy[c] / count[c] : 0.0;
  });
}

void backward_state::finish(int32_t team, const plan &p, double *count, double *sum_dy,
                            double *sum_dy_xhat) {
  std::fill(sum_dy, sum_dy + channels_, 0.0);
  std::fill(sum_dy_xhat, sum_dy_xhat + channels_, 0.0);
  std::fill(count, count + channels_, 0.0);
  for (int32_t s = 0; s < team; ++s) {
    const backward_scratch b = slot(s);
    for (int64_t k = 0; k < length_; ++k) {
      sum_dy[k % channels_] += b.sum_dy[k];
      sum_dy_xhat[k % channels_] += b.sum_dy_xhat[k];
      count[k % channels_] += b.count[k];
    }
  }
  if (!p.mask && !p.empty) {
    const double per_channel = static_cast<double>(p.lines * p.inner.n / channels_);
    std::fill(count, count + channels_, per_channel);
  }
}

}  // namespace bn_core
