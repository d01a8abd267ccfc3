// Planning: a call's tensors reduced to the canonical loop plan the kernels
// walk (see plan.hpp), with contiguous rows of a few channels folded into one
// periodic run.
#ifndef BN_CORE_PLANNING_HPP
#define BN_CORE_PLANNING_HPP

#include "plan.hpp"
#include "validate.hpp"

namespace bn_core {

int64_t element_bytes(bn_dtype dt);  // of x, y and dy (masks are 1 byte)

// Sorts a tensor's few dims (at most BN_MAX_RANK) stably, before(a, b) saying
// that a goes first: an insertion sort, because std::stable_sort allocates a
// buffer, and on a tiny call that allocation cost more than the rest of its plan.
template <class T, class Before>
void stable_sort_dims(T *first, T *last, Before before) {
  for (T *i = first + 1; i < last; ++i) {
    const T value = *i;
    T *j = i;
    for (; j > first && before(value, j[-1]); --j) *j = j[-1];
    *j = value;
  }
}

// Drops size-1 dims, turns negative x strides positive, orders dims by x stride
// (memory order) and merges dims that walk memory as one. The innermost
// remaining dim becomes the inner run. y, mask and dy may be null (dy is given
// for backward calls only, y is dx there).
void make_plan(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask, const bn_tensor *dy,
               const bool is_channel[], plan &p);

// Checks a call (check_call), then plans it: x with y (dx of a backward call),
// the call's mask, and dy (backward calls only, else null).
bn_status plan_call(const call_args &call, const bn_tensor *y, const bn_tensor *dy, plan &p);

// An entry point: body(p) on the plan of the call (plan_call's arguments), run
// only once the call is checked, and guarded (no exception crosses the C API).
template <class Body>
bn_status planned_call(const call_args &call, const bn_tensor *y, const bn_tensor *dy, Body &&body) noexcept {
  return guarded([&] {
    plan p;
    if (bn_status st = plan_call(call, y, dy, p)) return st;
    return body(p);
  });
}

// The epilogue the kernels apply for a call's bn_epilogue (checked): inactive
// for none, and for identity without a residual (the plain walk).
epilogue_params epilogue_of(const bn_epilogue *e);

// A forward entry point (normalize, training forward): planned_call with the
// epilogue's residual as the plan's second input and its parameters in p.
template <class Body>
bn_status planned_forward(const call_args &call, const bn_tensor *y, Body &&body) noexcept {
  const bn_tensor *residual = call.epilogue ? call.epilogue->residual : nullptr;
  return planned_call(call, y, residual, [&](plan &p) {
    p.epilogue = epilogue_of(call.epilogue);
    return body(p);
  });
}

}  // namespace bn_core

#endif
