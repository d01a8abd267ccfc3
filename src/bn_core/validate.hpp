// Validation of the C entry points' arguments, in one place: every call is
// checked before anything is planned, allocated or written, and a failure
// leaves its message for bn_last_error() and touches nothing.
#ifndef BN_CORE_VALIDATE_HPP
#define BN_CORE_VALIDATE_HPP

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <initializer_list>
#include <limits>
#include <new>
#include <string>

#include "bn_core/bn_core.h"

namespace bn_core {

// An enum argument's value read as the int32 a C caller passed: loading an
// out-of-range value through the enum type is undefined behaviour in C++.
template <class Enum>
int32_t enum_value(const Enum &e) {
  static_assert(sizeof(Enum) == sizeof(int32_t), "C enums are int-sized here");
  int32_t v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

// Records message as this thread's last error and returns status.
bn_status fail(bn_status status, const std::string &message);
bn_status out_of_memory();
const char *last_error_message();

// Whether e says an allocation could not be made: std::bad_alloc, or the
// std::length_error of a container asked for more than its max_size().
inline bool is_allocation_failure(const std::exception &e) {
  return dynamic_cast<const std::bad_alloc *>(&e) || dynamic_cast<const std::length_error *>(&e);
}

// Runs an entry point's body so that no C++ exception crosses the C API: an
// allocation the library cannot make is BN_ERR_ALLOC, anything else the
// status below with its message.
template <class Body>
bn_status guarded(Body &&body) noexcept {
  try {
    return body();
  } catch (const std::exception &e) {
    if (is_allocation_failure(e)) return out_of_memory();
    return fail(BN_ERR_VALUE, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(BN_ERR_VALUE, "internal error");
  }
}

// Sizes computed from a caller's descriptors saturate instead of wrapping
// (operands >= 0): a saturated size reads as too large, so its allocation
// fails with a status and a cache comparison takes the large-tensor path.
inline int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

inline int64_t saturating_add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

struct named_tensor {
  const bn_tensor *tensor;
  const char *name;
};

struct named_array {
  const void *data;
  const char *name;
};

// What one entry point takes: x and its channel axes always; tensors that must
// have x's shape and dtype (outputs and gradients); an optional mask (uint8,
// broadcastable to x); per-channel arrays that must not be NULL; epsilon when
// the call takes one.
struct call_args {
  const bn_tensor *x;
  std::initializer_list<named_tensor> like_x;
  const bn_tensor *mask;
  const int32_t *axes;
  int32_t n_axes;
  std::initializer_list<named_array> arrays;
  const double *epsilon;  // null: the call takes none
  const bn_epilogue *epilogue = nullptr;  // a forward call's (null: none); y is like_x's first
};

// Checks a call's arguments. On success is_channel[i] says whether x's axis i
// is a channel axis.
bn_status check_call(const call_args &call, bool is_channel[]);

// The extra tensors of a backward through an epilogue (after check_call):
// the epilogue itself (required), the forward's output (optional, like x),
// and the tensor the call writes g into (g, or dresidual; optional), which
// may be dy or output itself but shares no memory with x, the residual or dx.
struct gradient_tensors {
  const bn_epilogue *epilogue;
  const bn_tensor *output, *dy, *dx;
  const bn_tensor *written;
  const char *written_name;
};
bn_status check_gradient_tensors(const bn_tensor &x, const gradient_tensors &t);

// Each array must be non-NULL.
bn_status check_arrays(std::initializer_list<named_array> arrays);

}  // namespace bn_core

#endif
