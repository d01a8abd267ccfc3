// Scratch state of one call, allocated before its team starts: per-slot
// moments partials, the per-channel normalize parameters, and the backward
// parameters and per-slot sums. The kernels fill and read it; allocation
// failures are reported (false), never thrown.
#ifndef BN_CORE_SCRATCH_HPP
#define BN_CORE_SCRATCH_HPP

#include <memory>
#include <vector>

#include "plan.hpp"

namespace bn_core {

// count doubles (zeroed if asked), or null when they cannot be allocated: a
// saturated count (see saturating_mul) or too little memory. Never throws: a
// throwing allocation of an impossible size aborts under ASan.
std::unique_ptr<double[]> new_doubles(int64_t count, bool zeroed = false);

// Per-slot moments partials laid out for the kernels.
class moments_state {
 public:
  // Room for `slots` partials of plans up to p's size; laid out for p.
  bool allocate(const plan &p, int32_t slots);

  // Partials laid out for p (no larger than the allocated plan), with what the
  // kernels accumulate into zeroed: the statistics, the shifts and shift_ok,
  // and for planes x L the run arrays too. The kernels set the other arrays
  // before use, so those are left as they are: a short rows x C call's reset
  // would otherwise write more than its data, once per slot (bench/DESIGN.md,
  // 'Moments scratch').
  void reset(const plan &p);

  moments_scratch slot(int32_t s) {
    double *base = buffer_.get() + per_slot_ * s;
    const int64_t C = channels_, n = block_;  // n: the length of each block array
    double *block = base + kChannelArrays * C;
    return moments_scratch{base, base + C, base + 2 * C, base + 3 * C, base + 4 * C, base + 5 * C, base + 6 * C,
                           reinterpret_cast<uint8_t *>(block + 6 * n),
                           &shifts_missing_[static_cast<size_t>(s)], block, block + n,
                           block + 2 * n, block + 3 * n, block + 4 * n, block + 5 * n};
  }

  // Merges the team's partials of p in slot order (deterministic for a given
  // team); count may be null. Channels left non-finite by float32 blocks that
  // overflowed are recomputed in float64 (float64_moments.hpp).
  void finish(int32_t team, const plan &p, double *mean, double *variance, double *count);

 private:
  static constexpr int64_t kChannelArrays = 7;  // count, mean, m2, shift, run_s1, run_s2, run_n
  static constexpr int64_t kStatisticsArrays = 4;  // the first four of them
  static constexpr int64_t kBlockArrays = 6;

  int64_t layout(const plan &p);
  void redo_non_finite(const plan &p, double *mean, double *variance, double *count);
  static int64_t spaced_block_length(int64_t n);

  int32_t slots_ = 0;
  int64_t channels_ = 0, block_ = 0, per_slot_ = 0;
  std::unique_ptr<double[]> buffer_;
  std::vector<int64_t> shifts_missing_;
};

// Per-channel parameter arrays in the compute type (float for <=32-bit data,
// double for float64): array 0 is the mean rounded to that type (hi), the
// others are formed in float64 from the remainder lo = mean − hi (which keeps
// x − mean exact at mean/std = 1e5) and rounded once. A folded plan reads them
// replicated over one super row. The storage is not zeroed: fill writes every
// value a kernel reads.
template <int32_t Arrays>
class channel_params {
 public:
  bool allocate(const plan &p);
  void fit(const plan &p);  // lays the arrays out for p (no larger than the allocated plan)

  // values(c, lo, out) writes arrays 1.. of channel c as float64.
  template <class Values>
  void fill(const double *mean, Values &&values);

  const void *array(int32_t i) const {
    const size_t unit = wide_ ? sizeof(double) : sizeof(float);
    return reinterpret_cast<const char *>(buffer_.get()) + unit * static_cast<size_t>(i * stride_);
  }

  int64_t length() const { return length_; }
  int64_t channels() const { return channels_; }

 private:
  template <class acc, class Values>
  void fill_as(const double *mean, Values &&values);

  bool wide_ = false;
  int64_t channels_ = 0, length_ = 0, stride_ = 0;  // stride_: the allocated length
  std::unique_ptr<double[]> buffer_;
};

// y = (x − mean_hi)·scale + bias; scale = gamma / sqrt(var + eps) and
// bias = beta − (mean − mean_hi)·scale (see affine_params). gamma and beta may
// be null (1 and 0).
class affine_state {
 public:
  bool allocate(const plan &p) { return params_.allocate(p); }
  void fit(const plan &p) { params_.fit(p); }
  void fill(const double *mean, const double *variance, const double *gamma, const double *beta,
            double eps);
  void fill_identity();  // y = x: mean 0, scale 1, bias 0
  affine_params params() const {
    return affine_params{params_.array(0), params_.array(1), params_.array(2)};
  }

 private:
  channel_params<3> params_;
};

// Backward through y = x̂·gamma + beta, x̂ = (x − mean)·s, s = 1/sqrt(var + eps),
// with used positions w (the mask) and N = Σw per channel. Through the batch
// statistics (training):
//   dx = gamma·s·(dy − (w/N)·(Σdy + x̂·Σdy·x̂))     (sums over every position)
// and dx = gamma·s·dy with fixed statistics (inference).
class backward_state {
 public:
  bool allocate(const plan &p, int32_t slots);  // slots: of the sums pass (0: none)
  // Lays the arrays out for p (no larger than the allocated plan), with one
  // slot of sums, zeroed.
  void fit(const plan &p);
  void fill_xhat(const double *mean, const double *variance, double eps);
  // count/sum_dy/sum_dy_xhat are the statistics' totals (null: fixed statistics).
  void fill_dx(const double *mean, const double *variance, const double *gamma, double eps,
               const double *count, const double *sum_dy, const double *sum_dy_xhat);

  backward_params params() const {
    return backward_params{params_.array(0), params_.array(1), params_.array(2),
                           params_.array(3), params_.array(4), params_.array(5)};
  }

  backward_scratch slot(int32_t s) {
    double *base = sums_.get() + 3 * length_ * s;
    return backward_scratch{base, base + length_, base + 2 * length_};
  }

  // Totals over the team in slot order; entries k and k + C of a folded plan
  // are the same channel. An unmasked call counts elements / C per channel.
  void finish(int32_t team, const plan &p, double *count, double *sum_dy, double *sum_dy_xhat);

 private:
  int64_t channels_ = 0, length_ = 0;
  channel_params<6> params_;
  std::unique_ptr<double[]> sums_;
};

}  // namespace bn_core

#endif
