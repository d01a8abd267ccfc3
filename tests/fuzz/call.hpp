// One fuzzed call: the tensors and arrays it owns, the arguments it passes
// (which invalid.cpp may break), and the C entry point it runs.
#ifndef BN_FUZZ_CALL_HPP
#define BN_FUZZ_CALL_HPP

#include <cstdint>
#include <string>
#include <vector>

#include "bn_core/bn_core.h"
#include "buffers.hpp"
#include "generate.hpp"
#include "reference.hpp"

namespace fuzz {

// The C entry points that take tensors.
enum class entry { moments, normalize, train_forward, backward, moments_partial, moments_finalize, backward_sums, backward_apply };

const char *entry_name(entry e);

// What out is: its own tensor, or x or dy itself (in place).
enum class out_kind { own, x, dy };

struct call {
  entry op = entry::moments;  // the first entry point of the scenario
  bn_dtype dtype = BN_FLOAT32;
  tensor_buffer x, out, dy, mask;
  out_kind out_is = out_kind::own;
  bool has_mask = false, has_out = false, has_dy = false;
  std::vector<int32_t> axes;
  elements e;  // x as stored, with channels and the mask
  std::vector<int64_t> out_offsets, dy_offsets, x_offsets;
  std::vector<double> dy_values;
  double_array mean, variance, gamma, beta, count, sum_dy, sum_dy_xhat, shift, partial;
  double epsilon = 0;
  int32_t training = 1;

  const tensor_buffer &out_tensor() const;  // out, x or dy
  const std::vector<int64_t> &out_element_offsets() const;
};

// The arguments one entry point receives, as a C caller would pass them.
struct args {
  bn_tensor x{}, out{}, dy{}, mask{};
  const bn_tensor *x_ptr = nullptr, *out_ptr = nullptr, *dy_ptr = nullptr, *mask_ptr = nullptr;
  const int32_t *axes = nullptr;
  int32_t n_axes = 0;
  double *mean = nullptr, *variance = nullptr, *gamma = nullptr, *beta = nullptr, *count = nullptr,
         *sum_dy = nullptr, *sum_dy_xhat = nullptr, *shift = nullptr, *partial = nullptr;
  int64_t channels = 0;  // bn_moments_finalize's
  double epsilon = 0;
  int32_t training = 1;
  // Storage for a broken descriptor's shape, strides or axes.
  std::vector<int64_t> shape_storage, strides_storage;
  std::vector<int32_t> axes_storage;
};

// A contract-valid call of scenario `op` (moments_partial: partial then
// finalize; backward_sums: sums then apply).
void build_call(generator &g, entry op, call &c);
void pass_arguments(const call &c, args &a);
// The call in words (dtype, layouts, axes, scalars) for a finding's report.
std::string describe(const call &c);
bn_status invoke(entry op, const args &a);

}  // namespace fuzz

#endif
