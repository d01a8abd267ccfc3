// Tensors and per-channel arrays on heap blocks of exactly the bytes they
// span, so that AddressSanitizer reports any access past them.
#ifndef BN_FUZZ_BUFFERS_HPP
#define BN_FUZZ_BUFFERS_HPP

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "bn_core/bn_core.h"

namespace fuzz {

struct free_block {
  void operator()(void *p) const { std::free(p); }
};
using block_ptr = std::unique_ptr<unsigned char, free_block>;

int64_t element_bytes(bn_dtype dtype);  // 1 for BN_UINT8
double round_to(bn_dtype dtype, double v);  // v as stored in dtype (round to nearest even)

// A tensor over one block whose first and last bytes are the lowest and the
// highest byte its strides reach (negative strides included).
struct tensor_buffer {
  bn_dtype dtype = BN_FLOAT32;
  std::vector<int64_t> shape, strides;
  block_ptr block;
  int64_t bytes = 0;
  unsigned char *data = nullptr;  // element 0, inside the block (NULL or a 0-byte block when empty)

  // Allocates the block for dtype, shape and strides (set before).
  void allocate(bool null_when_empty);
  bn_tensor descriptor() const;
  bool empty() const;
  double get(int64_t offset) const;  // the element at a byte offset from data
  void set(int64_t offset, double v);
};

// Σ index[d]·steps[d] for every index of shape, in row-major order.
std::vector<int64_t> row_major_sums(const std::vector<int64_t> &shape, const std::vector<int64_t> &steps);

// Byte offsets of t's elements in the row-major order of `shape` (x's shape):
// t's axes of size 1 broadcast (index 0), as a mask's do.
std::vector<int64_t> element_offsets(const tensor_buffer &t, const std::vector<int64_t> &shape);

// n doubles in a block of exactly 8n bytes; absent() is a NULL argument.
class double_array {
 public:
  double_array() = default;
  explicit double_array(int64_t n);
  double *get() const { return block_ ? reinterpret_cast<double *>(block_.get()) : nullptr; }
  bool absent() const { return !block_; }
  int64_t size() const { return n_; }
  double &operator[](int64_t i) const { return get()[i]; }

 private:
  block_ptr block_;
  int64_t n_ = 0;
};

}  // namespace fuzz

#endif
