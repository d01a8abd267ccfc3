// The backward of a call already checked, for the entry points that run it
// after work of their own (the backward through an epilogue).
#ifndef BN_CORE_BACKWARD_HPP
#define BN_CORE_BACKWARD_HPP

#include <cstdint>

#include "bn_core/bn_core.h"

namespace bn_core {

// bn_backward's arguments; dy is the gradient the normalized output receives.
struct backward_request {
  const bn_tensor *dy, *x, *dx;
  const int32_t *axes;
  int32_t n_axes;
  const bn_tensor *mask;
  const double *mean, *variance, *gamma;
  double epsilon;
  bool training;
  double *sum_dy, *sum_dy_xhat;  // may be null
};

// bn_backward on a call check_call has passed (is_channel: its channel dims):
// planned, then run in one team or in chunks of channels.
bn_status backward_checked(const backward_request &r, const bool is_channel[]);

}  // namespace bn_core

#endif
