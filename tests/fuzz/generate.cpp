#include "generate.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fuzz {
namespace {

constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// The exponent of the spread (base 2) and the largest offset/spread exponent
// per dtype. float32/bfloat16 stay within 2^±50 and mean/std <= 2^16, float64
// spreads below 2^500: beyond, the training backward's coefficient s² leaves
// the compute type's range (tests/fuzz/README.md).
struct scale_range {
  int min_exponent, max_exponent, max_offset_exponent;
};

scale_range range_of(bn_dtype dtype) {
  switch (dtype) {
    case BN_FLOAT64: return {-1070, 500, 40};
    case BN_FLOAT16: return {-14, 10, 4};
    default: return {-30, 50, 16};
  }
}

// Strides of a size-1 axis never move the pointer: any value is valid.
int64_t size_one_stride(generator &g, int64_t element_size) {
  return g.pick<int64_t>({0, element_size, -element_size, kInt64Min, kInt64Max, int64_t(1) << 62, 12345});
}

}  // namespace

uint64_t generator::bits() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double generator::uniform() { return static_cast<double>(bits() >> 11) * 0x1p-52 - 1.0; }

std::vector<int64_t> random_shape(generator &g, int64_t max_elements) {
  int32_t rank = g.in().ConsumeIntegralInRange<int32_t>(1, 5);
  if (g.chance(32)) rank = g.in().ConsumeIntegralInRange<int32_t>(6, BN_MAX_RANK);
  std::vector<int64_t> shape(static_cast<size_t>(rank));
  for (int64_t &n : shape) n = g.pick<int64_t>({1, 1, 2, 3, 4, 5, 7, 8, 16, 17, 31, 64, 100, 0});
  if (rank > 5)  // long shapes are mostly size-1 axes
    for (size_t i = 5; i < shape.size(); ++i) shape[i] = g.chance(8) ? 2 : 1;
  if (g.chance(16)) shape[g.in().ConsumeIntegralInRange<size_t>(0, shape.size() - 1)] = max_elements;
  for (;;) {  // an empty tensor's other sizes stay within the bound too (they make the channel count)
    int64_t count = 1;
    for (int64_t n : shape)
      if (__builtin_mul_overflow(count, std::max<int64_t>(n, 1), &count)) count = kInt64Max;
    if (count <= max_elements) return shape;
    int64_t &largest = *std::max_element(shape.begin(), shape.end());
    largest = (largest + 1) / 2;
  }
}

std::vector<int64_t> random_strides(generator &g, const std::vector<int64_t> &shape, int64_t element_size,
                                    bool may_broadcast) {
  std::vector<size_t> order(shape.size());  // innermost first
  for (size_t i = 0; i < order.size(); ++i) order[i] = order.size() - 1 - i;
  for (size_t i = 0; i + 1 < order.size(); ++i)
    if (g.chance(3)) std::swap(order[i], order[g.in().ConsumeIntegralInRange<size_t>(i, order.size() - 1)]);
  const bool empty = std::find(shape.begin(), shape.end(), 0) != shape.end();
  std::vector<int64_t> strides(shape.size());
  int64_t step = element_size * g.pick<int64_t>({1, 1, 1, 2, 3});
  for (size_t d : order) {
    if (shape[d] == 1 || (shape[d] == 0 && g.chance(2))) {
      strides[d] = size_one_stride(g, element_size);
    } else if (empty && g.chance(3)) {  // nothing is read: large strides are fine
      strides[d] = g.pick<int64_t>({int64_t(1) << 40, -(int64_t(1) << 33), 0, -element_size});
    } else if (may_broadcast && g.chance(6)) {
      strides[d] = 0;
    } else {
      strides[d] = g.chance(4) ? -step : step;
      step = step * std::max<int64_t>(shape[d], 1) + element_size * g.pick<int64_t>({0, 0, 0, 1, 5});
    }
  }
  return strides;
}

void lay_out(generator &g, tensor_buffer &t, bn_dtype dtype, const std::vector<int64_t> &shape,
             bool may_broadcast) {
  t.dtype = dtype;
  t.shape = shape;
  t.strides = random_strides(g, shape, element_bytes(dtype), may_broadcast);
  t.allocate(g.chance(2));
}

void random_mask(generator &g, tensor_buffer &mask, const std::vector<int64_t> &x_shape) {
  std::vector<int64_t> shape = x_shape;
  for (int64_t &n : shape)
    if (g.chance(3)) n = 1;
  lay_out(g, mask, BN_UINT8, shape, true);
  const int density = g.pick<int>({0, 1, 2, 3, 4, 4});  // quarters of positions used
  for (int64_t offset : element_offsets(mask, shape))
    mask.set(offset, static_cast<int>(g.bits() % 4) < density ? 1 + g.bits() % 255 : 0);
}

value_scale random_scale(generator &g, bn_dtype dtype) {
  const scale_range r = range_of(dtype);
  value_scale s;
  s.spread = g.chance(12) ? 0.0 : std::ldexp(1.0, g.in().ConsumeIntegralInRange<int>(r.min_exponent, r.max_exponent));
  const double base = s.spread > 0 ? s.spread : std::ldexp(1.0, r.min_exponent);
  s.offset = g.chance(3) ? 0.0 : base * std::ldexp(g.uniform(), g.in().ConsumeIntegralInRange<int>(0, r.max_offset_exponent));
  s.integers = g.chance(4);
  s.non_finite = g.chance(8) ? g.in().ConsumeIntegralInRange<int>(1, 3) : 0;
  return s;
}

void fill(generator &g, tensor_buffer &t, const std::vector<int64_t> &offsets, const value_scale &s) {
  for (int64_t offset : offsets) {
    double u = g.uniform();
    if (s.integers) u = std::round(u * 8) / 8;
    t.set(offset, s.offset + s.spread * u);
  }
  if (offsets.empty()) return;
  const double specials[] = {std::nan(""), HUGE_VAL, -HUGE_VAL};
  for (int k = 0; k < s.non_finite; ++k)
    t.set(offsets[g.bits() % offsets.size()], specials[g.bits() % 3]);
}

std::vector<int32_t> random_axes(generator &g, int32_t rank) {
  std::vector<int32_t> all(static_cast<size_t>(rank));
  for (int32_t i = 0; i < rank; ++i) all[static_cast<size_t>(i)] = i;
  for (size_t i = 0; i + 1 < all.size(); ++i)
    std::swap(all[i], all[g.in().ConsumeIntegralInRange<size_t>(i, all.size() - 1)]);
  const int32_t count = g.chance(3) ? g.in().ConsumeIntegralInRange<int32_t>(1, rank) : 1;
  std::vector<int32_t> axes(all.begin(), all.begin() + count);
  for (int32_t &a : axes)
    if (g.chance(2)) a -= rank;  // the same axis counted from the end
  return axes;
}

std::vector<bool> channel_axes(const std::vector<int32_t> &axes, int32_t rank) {
  std::vector<bool> is_channel(static_cast<size_t>(rank), false);
  for (int32_t a : axes) is_channel[static_cast<size_t>(a < 0 ? a + rank : a)] = true;
  return is_channel;
}

std::vector<int64_t> element_channels(const std::vector<int64_t> &shape, const std::vector<bool> &is_channel,
                                      int64_t &channels) {
  std::vector<int64_t> channel_stride(shape.size(), 0);
  channels = 1;
  for (size_t d = shape.size(); d-- > 0;)
    if (is_channel[d]) {
      channel_stride[d] = channels;
      channels *= shape[d];
    }
  return row_major_sums(shape, channel_stride);
}

}  // namespace fuzz
