#include "invalid.hpp"

#include <cstring>
#include <limits>

namespace fuzz {
namespace {

constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();

// A C caller's enum argument may hold any int: written byte-wise, as the
// core reads it (loading an out-of-range enum is undefined in C++).
void set_dtype(bn_tensor &t, int32_t value) { std::memcpy(&t.dtype, &value, sizeof value); }

// The tensors op takes, and whether each is a mask.
struct tensor_arg {
  bn_tensor *t;
  const bn_tensor **ptr;
  bool is_mask;
};

std::vector<tensor_arg> tensors_of(entry op, args &a) {
  std::vector<tensor_arg> tensors;
  if (op == entry::moments_finalize) return tensors;
  tensors.push_back({&a.x, &a.x_ptr, false});
  if (a.out_ptr && op != entry::backward_sums) tensors.push_back({&a.out, &a.out_ptr, false});
  if (a.dy_ptr) tensors.push_back({&a.dy, &a.dy_ptr, false});
  if (a.mask_ptr && op != entry::normalize) tensors.push_back({&a.mask, &a.mask_ptr, true});
  return tensors;
}

std::vector<double **> required_arrays(entry op, args &a) {
  switch (op) {
    case entry::moments_partial: return {&a.partial};
    case entry::moments_finalize: return {&a.partial, &a.mean, &a.variance};
    case entry::backward_sums:
    case entry::backward_apply: return {&a.mean, &a.variance, &a.count, &a.sum_dy, &a.sum_dy_xhat};
    default: return {&a.mean, &a.variance};
  }
}

// Shape and strides of t copied into a's storage, resized to `rank` (new
// axes of size 1), so that they may be changed.
void own_shape(args &a, bn_tensor &t, int32_t rank) {
  a.shape_storage.assign(t.shape, t.shape + t.rank);
  a.strides_storage.assign(t.strides, t.strides + t.rank);
  a.shape_storage.resize(static_cast<size_t>(rank), 1);
  a.strides_storage.resize(static_cast<size_t>(rank), 0);
  t.rank = rank;
  t.shape = a.shape_storage.data();
  t.strides = a.strides_storage.data();
}

bn_status break_layout(generator &g, args &a, const tensor_arg &victim, bool is_x) {
  bn_tensor &t = *victim.t;
  const size_t axis = g.in().ConsumeIntegralInRange<size_t>(0, static_cast<size_t>(t.rank - 1));
  switch (g.in().ConsumeIntegralInRange<int>(0, 3)) {
    case 0:  // a negative size
      own_shape(a, t, t.rank);
      a.shape_storage[axis] = g.pick<int64_t>({-1, kInt64Min, -(int64_t(1) << 40)});
      return BN_ERR_SHAPE;
    case 1:  // a byte offset past int64: INT64_MIN or 2^62 strides over 3 elements
      own_shape(a, t, t.rank);
      a.shape_storage[axis] = 3;
      a.strides_storage[axis] = g.pick<int64_t>({kInt64Min, int64_t(1) << 62, -(int64_t(1) << 62)});
      return BN_ERR_OVERFLOW;
    case 2:  // an element count past int64
      own_shape(a, t, t.rank < 2 ? 2 : t.rank);
      a.shape_storage[0] = a.shape_storage[1] = int64_t(1) << 32;
      return BN_ERR_OVERFLOW;
    default:  // not x's shape (a mask: not broadcastable to it either), or not its rank
      if (is_x || !t.data) return BN_OK;  // (an empty tensor made non-empty would fail on its NULL data first)
      if (g.chance(2)) {
        own_shape(a, t, t.rank < BN_MAX_RANK && g.chance(2) ? t.rank + 1 : t.rank > 1 ? t.rank - 1 : t.rank + 1);
      } else {
        own_shape(a, t, t.rank);
        a.shape_storage[axis] = a.x.shape[axis] + 2;
        a.strides_storage[axis] = 0;  // (a size-1 axis may have had any stride: no overflow first)
      }
      return BN_ERR_SHAPE;
  }
}

bn_status break_tensor(generator &g, args &a, const tensor_arg &victim, bool is_x) {
  bn_tensor &t = *victim.t;
  switch (g.in().ConsumeIntegralInRange<int>(0, 5)) {
    case 0:
      if (victim.is_mask) return BN_OK;  // no mask is fine
      *victim.ptr = nullptr;
      return BN_ERR_NULL;
    case 1:
      t.rank = g.pick<int32_t>({0, -1, BN_MAX_RANK + 1, std::numeric_limits<int32_t>::min()});
      return BN_ERR_RANK;
    case 2:
      (g.chance(2) ? t.shape : t.strides) = nullptr;
      return BN_ERR_NULL;
    case 3: {
      const int32_t other = victim.is_mask ? BN_FLOAT32 : is_x ? BN_UINT8 : (t.dtype == BN_FLOAT64 ? BN_FLOAT32 : BN_FLOAT64);
      set_dtype(t, g.chance(2) ? other : g.pick<int32_t>({5, -1, 1000, std::numeric_limits<int32_t>::min()}));
      return BN_ERR_DTYPE;
    }
    case 4:
      for (int32_t i = 0; i < t.rank; ++i)
        if (t.shape[i] == 0) return BN_OK;  // empty: NULL data is fine
      t.data = nullptr;
      return BN_ERR_NULL;
    default:
      return break_layout(g, a, victim, is_x);
  }
}

bn_status break_axes(generator &g, args &a) {
  const int32_t rank = a.x.rank;
  a.axes_storage.assign(a.axes, a.axes + a.n_axes);
  switch (g.in().ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
      a.axes = nullptr;
      return BN_ERR_NULL;
    case 1:
      a.n_axes = g.pick<int32_t>({0, -1, rank + 1, std::numeric_limits<int32_t>::min()});
      return BN_ERR_AXIS;
    case 2:
      a.axes_storage[g.in().ConsumeIntegralInRange<size_t>(0, a.axes_storage.size() - 1)] =
          g.pick<int32_t>({rank, -rank - 1, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()});
      break;
    default: {  // the first axis again, maybe counted from the other end
      const int32_t first = a.axes_storage[0];
      a.axes_storage.push_back(g.chance(2) ? first : first < 0 ? first + rank : first - rank);
    }
  }
  a.axes = a.axes_storage.data();
  a.n_axes = static_cast<int32_t>(a.axes_storage.size());
  return BN_ERR_AXIS;
}

bool takes_epsilon(entry op) {
  return op != entry::moments && op != entry::moments_partial && op != entry::moments_finalize;
}

}  // namespace

bn_status break_one_argument(generator &g, entry op, args &a) {
  const std::vector<tensor_arg> tensors = tensors_of(op, a);
  const std::vector<double **> arrays = required_arrays(op, a);
  switch (g.in().ConsumeIntegralInRange<int>(0, 4)) {
    case 0:
      if (tensors.empty()) break;
      {
        const size_t i = g.in().ConsumeIntegralInRange<size_t>(0, tensors.size() - 1);
        return break_tensor(g, a, tensors[i], i == 0);
      }
    case 1:
      if (tensors.empty()) break;
      return break_axes(g, a);
    case 2:
      *arrays[g.in().ConsumeIntegralInRange<size_t>(0, arrays.size() - 1)] = nullptr;
      return BN_ERR_NULL;
    case 3:
      if (!takes_epsilon(op)) break;
      a.epsilon = g.pick<double>({std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                                  -std::numeric_limits<double>::infinity(), -1.0, -5e-324});
      return BN_ERR_VALUE;
    default:
      break;
  }
  if (op != entry::moments_finalize) return BN_OK;
  a.channels = g.pick<int64_t>({-1, kInt64Min});
  return BN_ERR_SHAPE;
}

}  // namespace fuzz
