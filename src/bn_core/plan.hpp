// Canonical loop plan: every call (any rank, strides, channel-axis set, mask
// broadcast) is reduced to "lines" — an outer odometer over merged dims and one
// inner run — so kernels only ever see that shape.
//
// Types only, no functions: this header is included by the per-ISA kernel
// translation units, and an inline function here could be emitted with AVX
// instructions and then picked by the linker for the portable path.
#ifndef BN_CORE_PLAN_HPP
#define BN_CORE_PLAN_HPP

#include <cstdint>

#include "bn_core/bn_core.h"

namespace bn_core {

// One loop dimension. x/y/mask/dy strides are in bytes (d_stride: dy's in a
// backward call, the residual's in a forward call); the parameter stride is in
// channel-index units (0 for a reduced dimension).
struct loop_dim {
  int64_t n;
  int64_t x_stride;
  int64_t y_stride;
  int64_t m_stride;
  int64_t p_stride;
  int64_t d_stride;
};

// Where x's lines come from (set by the caller from x's size and the cache
// sizes): the team's L2 caches, the shared L3, or memory. Kernels whose tile
// walks the hardware prefetchers do not follow prefetch by it.
enum class x_source : int8_t { l2, l3, memory };

// A forward call's epilogue, y = act(z + residual) with z the normalized value
// (bn_epilogue; the residual is the plan's second input). Inactive for calls
// without one, and for identity without a residual: those take the plain walk.
// A gradient pass (gradient: true) of the backward through an epilogue walks
// the incoming gradient dy as the second input and writes dy·act'(z).
struct epilogue_params {
  bool active;
  int32_t activation;  // a bn_activation
  double alpha, lo, hi;
  bool gradient;

  // A forward of identity, relu, relu6, clip or leaky relu of a slope <= 1:
  // one clamp formula (kernels/epilogue.hpp, clamp_activation), walked by a
  // kernel of its own.
  bool piecewise_linear() const {
    switch (activation) {
      case BN_ACT_IDENTITY: case BN_ACT_RELU: case BN_ACT_RELU6: case BN_ACT_CLIP: return !gradient;
      case BN_ACT_LEAKY_RELU: return !gradient && alpha <= 1;
      default: return false;
    }
  }
};

struct plan {
  bn_dtype dtype;
  const char *x;
  char *y;               // null for moments-only calls; dx in backward calls
  // The second input stream, walked like x with the d_stride strides: the
  // incoming gradient of a backward call, the residual of a forward call's
  // epilogue (null: none).
  union {
    const char *dy;
    const char *residual;
  };
  const uint8_t *mask;   // null when no mask
  int64_t p_base;        // channel index of the first element (after stride flips)
  int32_t n_outer;
  loop_dim outer[BN_MAX_RANK];  // outer[0] is outermost
  loop_dim inner;
  int64_t lines;         // product of outer sizes
  int64_t segments;      // pieces each line is cut into for load balance
  int64_t channels;      // C
  bool empty;            // some size is 0: no element at all
  bool inner_is_channel; // inner run walks channels (rows x C) vs one channel (planes x L)
  // Folded rows x C: contiguous rows of a few channels merged into one inner run
  // where element i belongs to channel i % period. Kernels walk it in "super
  // rows" of fold_len elements (a multiple of period and of the vector width),
  // with per-channel parameters replicated to fold_len. 0 when not folded.
  int64_t period;
  int64_t fold_len;
  // Write y with non-temporal stores (set by the caller, see stream_output):
  // an out-of-place output too large for the caches, so writing it around them
  // saves the read of its old lines and keeps x cached for a training
  // forward's normalize.
  bool stream_y;
  x_source x_from;
  // Bytes from x (and from dy) to data a plane's normalize or dx prefetches
  // alongside (0: none): the next chunk of a chunked training forward or
  // backward.
  int64_t prefetch_ahead;
  epilogue_params epilogue;
};

// Channels a rows x C block covers at once: bounds the block scratch below.
constexpr int64_t kRowsChannelChunk = 2048;

// Per-thread scratch for moments; all arrays hold `channels` entries except the
// block arrays, which hold min(inner run length, kRowsChannelChunk). Allocated by the caller so that
// kernel code instantiates no library templates (see the note above).
struct moments_scratch {
  double *count;
  double *mean;
  double *m2;
  double *shift;     // per-channel shift K of the shifted sums
  double *run_s1;    // per-channel float64 shifted sums not merged yet: of a super block
  double *run_s2;    // of rows (rows x C), of a channel's blocks across planes (planes x L)
  double *run_n;     // planes x L: the positions those sums hold
  uint8_t *shift_ok; // 1 once shift holds a value of that channel
  int64_t *shifts_missing;  // channels whose shift_ok is still 0 (skips the check when 0)
  // Rows x C, float64 per block position: the shift pre-pass's sums and counts
  // (rows_block_plain_sums), else a block's or super block's shifted sums
  // Σ(x−K), Σ(x−K)² before its positions are folded per channel.
  double *block_f64_a;
  double *block_f64_b;
  void *block_s1;    // accumulator-typed (float for <=32-bit data, double for float64)
  void *block_s2;
  void *block_n;
  void *block_shift;
};

// Normalization as y = (x − mean_hi)·scale + bias per channel, stored in the
// compute type (float for <=32-bit data, double for float64). mean_hi is the
// mean rounded to that type and bias = β − (mean − mean_hi)·scale, formed in
// float64. x − mean_hi is exact for x within a factor 2 of the mean (Sterbenz),
// so one subtraction and one fused multiply-add keep the output accurate at
// mean/std = 1e5 (a third array for the low part cost a register per vector).
struct affine_params {
  const void *mean_hi;
  const void *scale;
  const void *bias;
};

// Backward, with x̂ = ((x − mean_hi) − mean_lo)·invstd per channel:
//   sums:  Σdy, Σdy·x̂ over every position, and the used count (masked calls);
//   apply: dx = dy_scale·dy + used·(xc_scale·((x − mean_hi) − mean_lo) + shift).
// Arrays are in the compute type, per channel (replicated like affine_params
// for a folded plan).
struct backward_params {
  const void *mean_hi;
  const void *mean_lo;
  const void *invstd;
  const void *dy_scale;
  const void *xc_scale;
  const void *shift;
};

// Per-thread float64 sums, indexed like the parameters (a folded plan's
// entries k and k + period belong to the same channel).
struct backward_scratch {
  double *count;  // masked calls only
  double *sum_dy;
  double *sum_dy_xhat;
};

struct kernel_table {
  const char *name;
  void (*moments)(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s);
  // The team's moments partials merged in slot order into slot 0's (slot s's
  // arrays lie s * slot_stride doubles after slot 0's), then each channel's
  // mean, biased variance and count (count may be null); 0 for a channel no
  // element reached. True if some channel's mean or M2 is not finite.
  bool (*finish_moments)(const moments_scratch &slot0, int64_t slot_stride, int32_t team, int64_t channels,
                         double *mean, double *variance, double *count);
  void (*normalize)(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);
  void (*backward_sums)(const plan &p, int64_t item_begin, int64_t item_end,
                        const backward_params &b, const backward_scratch &s);
  void (*backward_apply)(const plan &p, int64_t item_begin, int64_t item_end,
                         const backward_params &b);
  // normalize with p.epilogue applied to every value (an active one); a
  // piecewise-linear forward's own walk.
  void (*normalize_epilogue)(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);
  void (*normalize_piecewise)(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a);

  // The normalize walk of p: plain, or with its epilogue.
  auto normalize_walk(const plan &p) const {
    if (!p.epilogue.active) return normalize;
    return p.epilogue.piecewise_linear() ? normalize_piecewise : normalize_epilogue;
  }
};

namespace scalar { extern const kernel_table table; }
namespace avx2 { extern const kernel_table table; }
namespace avx512 { extern const kernel_table table; }

}  // namespace bn_core

#endif
