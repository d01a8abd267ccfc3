#include "validate.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace bn_core {
namespace {

thread_local std::string last_error;

const char *dtype_name(bn_dtype dt) {
  switch (dt) {
    case BN_FLOAT32: return "float32";
    case BN_FLOAT64: return "float64";
    case BN_FLOAT16: return "float16";
    case BN_BFLOAT16: return "bfloat16";
    case BN_UINT8: return "uint8";
  }
  return "unknown";
}

std::string shape_str(const bn_tensor &t) {
  std::string s = "(";
  for (int32_t i = 0; i < t.rank; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.rank == 1 ? ",)" : ")");
}

// Sizes multiply without overflow even when one is 0 (a channel count is a
// product of some of them), and no byte offset inside t overflows.
bool sizes_overflow(const bn_tensor &t) {
  int64_t count = 1, nonzero_count = 1, span = 0;
  bool overflow = false;
  for (int32_t i = 0; i < t.rank; ++i) {
    const int64_t n = t.shape[i], stride = t.strides[i];
    overflow |= __builtin_mul_overflow(count, n, &count);
    overflow |= __builtin_mul_overflow(nonzero_count, n ? n : 1, &nonzero_count);
    if (n > 1) {
      int64_t reach;
      if (stride == std::numeric_limits<int64_t>::min()) overflow = true;
      else overflow |= __builtin_mul_overflow(n - 1, stride < 0 ? -stride : stride, &reach) ||
                       __builtin_add_overflow(span, reach, &span);
    }
  }
  return overflow;
}

bn_status check_tensor(const bn_tensor *t, const char *name, bool is_mask) {
  if (!t) return fail(BN_ERR_NULL, std::string(name) + " is NULL");
  if (t->rank < 1 || t->rank > BN_MAX_RANK)
    return fail(BN_ERR_RANK, std::string(name) + " has rank " + std::to_string(t->rank) + "; expected 1 to " +
                                 std::to_string(BN_MAX_RANK));
  if (!t->shape || !t->strides) return fail(BN_ERR_NULL, std::string(name) + " has a NULL shape or strides");
  const int32_t dt = enum_value(t->dtype);
  if (dt < BN_FLOAT32 || dt > BN_UINT8 || is_mask != (dt == BN_UINT8))
    return fail(BN_ERR_DTYPE, std::string(name) + " has dtype " +
                                  (dt >= 0 && dt <= BN_UINT8 ? dtype_name(t->dtype) : std::to_string(dt)) +
                                  (is_mask ? "; expected uint8" : "; expected float32, float64, float16 or bfloat16"));
  bool empty = false;
  for (int32_t i = 0; i < t->rank; ++i) {
    if (t->shape[i] < 0)
      return fail(BN_ERR_SHAPE, std::string(name) + " has negative size " + std::to_string(t->shape[i]) + " at axis " +
                                    std::to_string(i));
    empty |= t->shape[i] == 0;
  }
  if (sizes_overflow(*t)) return fail(BN_ERR_OVERFLOW, std::string(name) + " " + shape_str(*t) + ": sizes or byte offsets overflow int64");
  if (!empty && !t->data) return fail(BN_ERR_NULL, std::string(name) + " has NULL data");
  return BN_OK;
}

bn_status check_axes(const int32_t *axes, int32_t n_axes, int32_t rank, bool is_channel[]) {
  if (!axes) return fail(BN_ERR_NULL, "axes is NULL");
  if (n_axes < 1 || n_axes > rank)
    return fail(BN_ERR_AXIS, "n_axes is " + std::to_string(n_axes) + "; expected 1 to the rank " + std::to_string(rank));
  std::fill(is_channel, is_channel + rank, false);
  for (int32_t k = 0; k < n_axes; ++k) {
    const int32_t a = axes[k];
    if (a < -rank || a >= rank)
      return fail(BN_ERR_AXIS, "axis " + std::to_string(a) + " is out of range for rank " + std::to_string(rank));
    const int32_t axis = a < 0 ? a + rank : a;
    if (is_channel[axis]) return fail(BN_ERR_AXIS, "axis " + std::to_string(a) + " is given twice");
    is_channel[axis] = true;
  }
  return BN_OK;
}

// t has x's shape (a mask: broadcastable to it) and, unless a mask, x's dtype.
bn_status check_like_x(const bn_tensor &x, const bn_tensor *t, const char *name, bool is_mask) {
  if (bn_status st = check_tensor(t, name, is_mask)) return st;
  if (t->rank != x.rank)
    return fail(BN_ERR_SHAPE, std::string(name) + " has rank " + std::to_string(t->rank) + "; expected x's rank " + std::to_string(x.rank));
  for (int32_t i = 0; i < x.rank; ++i) {
    const bool ok = t->shape[i] == x.shape[i] || (is_mask && t->shape[i] == 1);
    if (!ok)
      return fail(BN_ERR_SHAPE, std::string(name) + " has shape " + shape_str(*t) + "; expected " +
                                    (is_mask ? "a shape broadcastable to " : "") + "x's shape " + shape_str(x));
  }
  if (!is_mask && t->dtype != x.dtype)
    return fail(BN_ERR_DTYPE, std::string(name) + " has dtype " + dtype_name(t->dtype) + "; expected x's dtype " + dtype_name(x.dtype));
  return BN_OK;
}

bn_status check_epsilon(double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    return fail(BN_ERR_VALUE, "epsilon is " + std::to_string(eps) + "; expected a finite value >= 0");
  return BN_OK;
}

// The bytes [first, last) t's elements span (nothing for an empty t).
struct byte_span {
  const char *first, *last;
};

byte_span span_of(const bn_tensor &t) {
  const char *base = static_cast<const char *>(t.data);
  int64_t low = 0, high = t.dtype == BN_FLOAT64 ? 8 : t.dtype == BN_UINT8 ? 1 : t.dtype == BN_FLOAT32 ? 4 : 2;
  for (int32_t i = 0; i < t.rank; ++i) {
    if (t.shape[i] == 0) return byte_span{base, base};
    const int64_t reach = (t.shape[i] - 1) * t.strides[i];
    (reach < 0 ? low : high) += reach;
  }
  return byte_span{base + low, base + high};
}

// Whether a and b share memory without being the same elements in the same
// layout (which an elementwise walk reads before it writes). Spans are compared,
// so interleaved views that share no element count as overlapping.
bool partly_overlap(const bn_tensor &a, const bn_tensor &b) {
  const byte_span sa = span_of(a), sb = span_of(b);
  if (sa.first == sa.last || sb.first == sb.last || sa.last <= sb.first || sb.last <= sa.first) return false;
  return !(a.data == b.data && std::equal(a.strides, a.strides + a.rank, b.strides));
}

bn_status check_epilogue(const bn_epilogue &e, const bn_tensor &x, const bn_tensor *y) {
  const int32_t act = enum_value(e.activation);
  if (act < BN_ACT_IDENTITY || act > BN_ACT_GELU_TANH)
    return fail(BN_ERR_VALUE, "epilogue activation is " + std::to_string(act) + "; expected a bn_activation (0 to 6)");
  if (act == BN_ACT_LEAKY_RELU && !std::isfinite(e.alpha))
    return fail(BN_ERR_VALUE, "epilogue alpha is " + std::to_string(e.alpha) + "; expected a finite slope");
  if (act == BN_ACT_CLIP && !(e.lo <= e.hi))
    return fail(BN_ERR_VALUE, "epilogue clip bounds are (" + std::to_string(e.lo) + ", " + std::to_string(e.hi) +
                                  "); expected lo <= hi, neither NaN");
  if (!e.residual) return BN_OK;
  if (bn_status st = check_like_x(x, e.residual, "residual", false)) return st;
  if (partly_overlap(*e.residual, x) || (y && partly_overlap(*e.residual, *y)))
    return fail(BN_ERR_VALUE, std::string("residual partly overlaps ") + (partly_overlap(*e.residual, x) ? "x" : "y") +
                                  "; expected it to be x, y or separate memory");
  return BN_OK;
}

// Whether a and b share any byte of their spans (identical views included).
bool share_memory(const bn_tensor &a, const bn_tensor &b) {
  const byte_span sa = span_of(a), sb = span_of(b);
  return sa.first != sa.last && sb.first != sb.last && sa.first < sb.last && sb.first < sa.last;
}

}  // namespace

bn_status check_gradient_tensors(const bn_tensor &x, const gradient_tensors &t) {
  if (!t.epilogue) return fail(BN_ERR_NULL, "epilogue is NULL");
  if (t.output)
    if (bn_status st = check_like_x(x, t.output, "output", false)) return st;
  if (!t.written) return BN_OK;
  if (bn_status st = check_like_x(x, t.written, t.written_name, false)) return st;
  const bn_tensor &w = *t.written;
  const bn_tensor *residual = t.epilogue->residual;
  const char *clash = share_memory(w, x) ? "x"
                      : residual && share_memory(w, *residual) ? "the residual"
                      : t.dx && share_memory(w, *t.dx) ? "dx"
                      : partly_overlap(w, *t.dy) ? "dy"
                      : t.output && partly_overlap(w, *t.output) ? "output" : nullptr;
  if (clash)
    return fail(BN_ERR_VALUE, std::string(t.written_name) + " overlaps " + clash +
                                  "; expected separate memory (or dy or output itself)");
  return BN_OK;
}

bn_status fail(bn_status status, const std::string &message) {
  last_error = message;
  return status;
}

bn_status out_of_memory() { return fail(BN_ERR_ALLOC, "out of memory for per-thread scratch"); }

const char *last_error_message() { return last_error.c_str(); }

bn_status check_arrays(std::initializer_list<named_array> arrays) {
  for (const named_array &a : arrays)
    if (!a.data) return fail(BN_ERR_NULL, std::string(a.name) + " is NULL");
  return BN_OK;
}

bn_status check_call(const call_args &call, bool is_channel[]) {
  if (bn_status st = check_tensor(call.x, "x", false)) return st;
  const bn_tensor &x = *call.x;
  for (const named_tensor &t : call.like_x)
    if (bn_status st = check_like_x(x, t.tensor, t.name, false)) return st;
  if (bn_status st = check_axes(call.axes, call.n_axes, x.rank, is_channel)) return st;
  if (call.mask)
    if (bn_status st = check_like_x(x, call.mask, "mask", true)) return st;
  if (bn_status st = check_arrays(call.arrays)) return st;
  if (call.epsilon)
    if (bn_status st = check_epsilon(*call.epsilon)) return st;
  if (call.epilogue) return check_epilogue(*call.epilogue, x, call.like_x.size() ? call.like_x.begin()->tensor : nullptr);
  return BN_OK;
}

}  // namespace bn_core
