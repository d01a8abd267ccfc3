// Random contract-valid arguments decoded from the fuzz input: shapes,
// strides (permuted, padded, reversed, broadcast, odd strides on size-1 axes),
// dtypes, axis lists, masks and data at a chosen scale.
#ifndef BN_FUZZ_GENERATE_HPP
#define BN_FUZZ_GENERATE_HPP

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "buffers.hpp"

namespace fuzz {

// The input's decisions, plus a PRNG seeded from it for bulk data (so a short
// input still gives varied values).
class generator {
 public:
  explicit generator(FuzzedDataProvider &in) : in_(in), state_(in.ConsumeIntegral<uint64_t>()) {}
  FuzzedDataProvider &in() { return in_; }
  // False once the input is used up (the provider then gives the range's minimum).
  bool chance(int one_in) { return in_.ConsumeIntegralInRange<int>(1, one_in) == one_in; }
  template <class T>
  T pick(std::initializer_list<T> menu) {
    return menu.begin()[in_.ConsumeIntegralInRange<size_t>(0, menu.size() - 1)];
  }
  uint64_t bits();    // splitmix64
  double uniform();   // in [-1, 1)

 private:
  FuzzedDataProvider &in_;
  uint64_t state_;
};

// How values are drawn: offset + spread * u with u uniform in [-1, 1).
struct value_scale {
  double offset, spread;
  bool integers;      // u rounded to multiples of 1/8: ties and repeats
  int non_finite;     // how many NaN/inf values to plant
};

std::vector<int64_t> random_shape(generator &g, int64_t max_elements);
// Strides for shape: a random memory order, padding and reversed axes, any
// stride on size-1 axes; stride 0 on larger axes only if may_broadcast.
std::vector<int64_t> random_strides(generator &g, const std::vector<int64_t> &shape, int64_t element_size,
                                    bool may_broadcast);
// A tensor of this dtype and shape, laid out and allocated.
void lay_out(generator &g, tensor_buffer &t, bn_dtype dtype, const std::vector<int64_t> &shape,
             bool may_broadcast);
// A mask for x's shape: each axis x's size or 1, random strides, random bits.
void random_mask(generator &g, tensor_buffer &mask, const std::vector<int64_t> &x_shape);

value_scale random_scale(generator &g, bn_dtype dtype);
// Writes values at the given offsets (x-shaped elements), rounded to t's dtype.
void fill(generator &g, tensor_buffer &t, const std::vector<int64_t> &offsets, const value_scale &s);

// A non-empty list of distinct axes of rank `rank`, in random order and sign.
std::vector<int32_t> random_axes(generator &g, int32_t rank);
// is_channel per axis, and the channel of each x element in row-major order.
std::vector<bool> channel_axes(const std::vector<int32_t> &axes, int32_t rank);
std::vector<int64_t> element_channels(const std::vector<int64_t> &shape, const std::vector<bool> &is_channel,
                                      int64_t &channels);

}  // namespace fuzz

#endif
