#include "buffers.hpp"

#include <cstring>
#include <new>

namespace fuzz {
namespace {

block_ptr allocate_exactly(int64_t bytes) {
  // malloc(0) gives a unique block of no accessible byte under ASan.
  void *p = std::malloc(static_cast<size_t>(bytes));
  if (!p && bytes > 0) throw std::bad_alloc();
  return block_ptr(static_cast<unsigned char *>(p));
}

uint16_t to_bfloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

float from_bfloat16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

int64_t element_bytes(bn_dtype dtype) {
  switch (dtype) {
    case BN_FLOAT64: return 8;
    case BN_FLOAT32: return 4;
    case BN_UINT8: return 1;
    default: return 2;
  }
}

double round_to(bn_dtype dtype, double v) {
  switch (dtype) {
    case BN_FLOAT32: return static_cast<float>(v);
    case BN_FLOAT16: return static_cast<_Float16>(v);
    case BN_BFLOAT16: return from_bfloat16(to_bfloat16(static_cast<float>(v)));
    default: return v;
  }
}

bool tensor_buffer::empty() const {
  for (int64_t n : shape)
    if (n == 0) return true;
  return false;
}

void tensor_buffer::allocate(bool null_when_empty) {
  if (empty()) {
    bytes = 0;
    block = null_when_empty ? nullptr : allocate_exactly(0);
    data = block.get();
    return;
  }
  int64_t lowest = 0, highest = 0;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 2) continue;
    const int64_t reach = (shape[i] - 1) * strides[i];
    (reach < 0 ? lowest : highest) += reach;
  }
  bytes = highest - lowest + element_bytes(dtype);
  block = allocate_exactly(bytes);
  data = block.get() - lowest;
}

bn_tensor tensor_buffer::descriptor() const {
  return bn_tensor{data, dtype, static_cast<int32_t>(shape.size()), shape.data(), strides.data()};
}

double tensor_buffer::get(int64_t offset) const {
  const unsigned char *p = data + offset;
  switch (dtype) {
    case BN_FLOAT64: { double v; std::memcpy(&v, p, 8); return v; }
    case BN_FLOAT32: { float v; std::memcpy(&v, p, 4); return v; }
    case BN_FLOAT16: { _Float16 v; std::memcpy(&v, p, 2); return v; }
    case BN_BFLOAT16: { uint16_t v; std::memcpy(&v, p, 2); return from_bfloat16(v); }
    default: return *p;
  }
}

void tensor_buffer::set(int64_t offset, double v) {
  unsigned char *p = data + offset;
  switch (dtype) {
    case BN_FLOAT64: std::memcpy(p, &v, 8); break;
    case BN_FLOAT32: { const float f = static_cast<float>(v); std::memcpy(p, &f, 4); break; }
    case BN_FLOAT16: { const _Float16 h = static_cast<_Float16>(v); std::memcpy(p, &h, 2); break; }
    case BN_BFLOAT16: { const uint16_t b = to_bfloat16(static_cast<float>(v)); std::memcpy(p, &b, 2); break; }
    default: *p = static_cast<unsigned char>(v);  // a mask byte: non-zero is used
  }
}

std::vector<int64_t> row_major_sums(const std::vector<int64_t> &shape, const std::vector<int64_t> &steps) {
  int64_t count = 1;
  for (int64_t n : shape) count *= n;
  std::vector<int64_t> sums(static_cast<size_t>(count));
  std::vector<int64_t> index(shape.size(), 0);
  int64_t sum = 0;
  for (int64_t e = 0; e < count; ++e) {
    sums[static_cast<size_t>(e)] = sum;
    for (size_t d = shape.size(); d-- > 0;) {  // odometer, last axis fastest
      if (++index[d] < shape[d]) {
        sum += steps[d];
        break;
      }
      sum -= (shape[d] - 1) * steps[d];
      index[d] = 0;
    }
  }
  return sums;
}

std::vector<int64_t> element_offsets(const tensor_buffer &t, const std::vector<int64_t> &shape) {
  std::vector<int64_t> steps(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) steps[d] = t.shape[d] == 1 ? 0 : t.strides[d];
  return row_major_sums(shape, steps);
}

double_array::double_array(int64_t n) : block_(allocate_exactly(n * 8)), n_(n) {}

}  // namespace fuzz
