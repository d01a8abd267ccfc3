// Statistics recomputed in float64 for the channels whose float32 block sums
// overflowed.
//
// The kernels add float32 and bfloat16 data up in float32 blocks and merge the
// blocks in float64: fast and accurate over the usual range, but a block's
// Σ(x−K)² passes float32's 3.4e38 once deviations reach ~1.8e19, and x − K itself
// overflows for data spanning more than 3.4e38 (±3e38). Finite data must still
// get finite statistics, so moments_state::finish hands every channel whose
// merged mean or variance is not finite to float64_moments, a plain two-pass
// walk in float64 (one more read of x per pass, paid only by those channels).
// A channel whose data holds NaN or Inf takes this path too and keeps its NaN.
#ifndef BN_CORE_FLOAT64_MOMENTS_HPP
#define BN_CORE_FLOAT64_MOMENTS_HPP

#include <cstdint>

#include "plan.hpp"

namespace bn_core {

// Whether p's data is accumulated in float32 blocks that can overflow (float16's
// range is too small for that).
inline bool float32_blocks_can_overflow(bn_dtype dtype) {
  return dtype == BN_FLOAT32 || dtype == BN_BFLOAT16;
}

// Channels c with redo[c] != 0 get mean[c], variance[c] and count[c] (count may
// be null) from two float64 passes over p's used elements. sum and n are
// scratch arrays of p.channels doubles.
void float64_moments(const plan &p, const uint8_t *redo, double *mean, double *variance,
                     double *count, double *sum, double *n);

}  // namespace bn_core

#endif
