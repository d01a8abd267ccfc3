#include "planning.hpp"

#include <algorithm>
#include <cstdlib>

namespace bn_core {
namespace {

// Rows of C contiguous channels shorter than this many bytes are folded into
// one periodic run: walking them one short line at a time pays a line's set-up
// (odometer step, loop entry, scalar tail) for a few elements, far more than
// reading their bytes costs (bench/DESIGN.md, 'planning.cpp').
constexpr int64_t kFoldRowBytes = 128;
constexpr int64_t kFoldMinElements = 128;
constexpr int64_t kFoldLanes = 16;  // the widest vector: 16 floats

int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

void fold_short_rows(plan &p, int64_t es) {
  p.period = 0;
  p.fold_len = 0;
  if (!p.inner_is_channel || p.n_outer == 0 || p.empty) return;
  const loop_dim &in = p.inner, &row = p.outer[p.n_outer - 1];
  const int64_t row_channels = in.n;  // C
  const bool one_channel_dim = p.channels == row_channels && in.p_stride == 1 && p.p_base == 0;
  const bool rows_contiguous = in.x_stride == es && row.x_stride == row_channels * es && row.p_stride == 0;
  const bool y_contiguous = !p.y || (in.y_stride == es && row.y_stride == row_channels * es);
  const bool dy_contiguous = !p.dy || (in.d_stride == es && row.d_stride == row_channels * es);
  // A mask must be per element and laid out like x (a row-wide mask is not folded).
  const bool mask_contiguous = !p.mask || (in.m_stride != 0 && row.m_stride == row_channels * in.m_stride);
  if (!one_channel_dim || !rows_contiguous || !y_contiguous || !dy_contiguous || !mask_contiguous ||
      row_channels * es > kFoldRowBytes)
    return;
  int64_t len = row_channels * kFoldLanes / gcd(row_channels, kFoldLanes);
  while (len < kFoldMinElements) len *= 2;
  if (row.n * row_channels < 4 * len) return;  // too few rows to repay the replicated parameters
  p.inner = loop_dim{row.n * row_channels, es, p.y ? es : 0, in.m_stride, 1, p.dy ? es : 0};
  p.lines /= row.n;
  --p.n_outer;
  p.period = row_channels;
  p.fold_len = len;
}

// x's dims of size > 1 with their strides (y, mask, dy, channel index), each
// walking x forwards: a negative x stride is flipped and the plan's base
// pointers moved to that dim's last element. Returns the number of dims: none
// for an empty x, which reads nothing (its data may be NULL, its strides on an
// axis of size 0 anything, INT64_MIN included).
int32_t forward_dims(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask,
                     const bn_tensor *dy, const bool is_channel[], plan &p, loop_dim dims[]) {
  int64_t channel_stride = 1;
  int64_t p_stride[BN_MAX_RANK];
  for (int32_t i = x.rank - 1; i >= 0; --i) {
    p_stride[i] = is_channel[i] ? channel_stride : 0;
    if (is_channel[i]) channel_stride *= x.shape[i];
  }
  p.channels = channel_stride;
  for (int32_t i = 0; i < x.rank; ++i) p.empty |= x.shape[i] == 0;
  if (p.empty) return 0;
  int32_t n = 0;
  for (int32_t i = 0; i < x.rank; ++i) {
    if (x.shape[i] == 1) continue;
    loop_dim d{x.shape[i], x.strides[i], y ? y->strides[i] : 0,
               mask && mask->shape[i] != 1 ? mask->strides[i] : 0, p_stride[i],
               dy ? dy->strides[i] : 0};
    if (d.x_stride < 0) {
      const int64_t last = d.n - 1;
      p.x += last * d.x_stride;
      if (p.y) p.y += last * d.y_stride;
      if (p.mask) p.mask += last * d.m_stride;
      if (p.dy) p.dy += last * d.d_stride;
      p.p_base += last * d.p_stride;
      d.x_stride = -d.x_stride; d.y_stride = -d.y_stride; d.m_stride = -d.m_stride;
      d.p_stride = -d.p_stride; d.d_stride = -d.d_stride;
    }
    dims[n++] = d;
  }
  return n;
}

// Whether an outer dim's stride steps over exactly n inner steps (n * inner_stride,
// computed without overflow: a stride near the int64 range never merges).
bool continues(int64_t outer_stride, int64_t n, int64_t inner_stride) {
  int64_t span;
  return !__builtin_mul_overflow(n, inner_stride, &span) && outer_stride == span;
}

// Sorts dims outermost first and merges neighbours that walk every array as
// one dim. Returns the number left (at least 1).
int32_t merge_dims(loop_dim dims[], int32_t n) {
  stable_sort_dims(dims, dims + n, [](const loop_dim &a, const loop_dim &b) {
    if (a.x_stride != b.x_stride) return a.x_stride > b.x_stride;
    return std::abs(a.y_stride) > std::abs(b.y_stride);
  });
  int32_t merged = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (merged) {
      loop_dim &o = dims[merged - 1];
      const loop_dim &d = dims[i];
      if (continues(o.x_stride, d.n, d.x_stride) && continues(o.y_stride, d.n, d.y_stride) &&
          continues(o.m_stride, d.n, d.m_stride) && continues(o.p_stride, d.n, d.p_stride) &&
          continues(o.d_stride, d.n, d.d_stride)) {
        o = loop_dim{o.n * d.n, d.x_stride, d.y_stride, d.m_stride, d.p_stride, d.d_stride};
        continue;
      }
    }
    dims[merged++] = dims[i];
  }
  if (merged == 0) dims[merged++] = loop_dim{1, 0, 0, 0, 0, 0};
  return merged;
}

}  // namespace

int64_t element_bytes(bn_dtype dt) {
  return dt == BN_FLOAT64 ? 8 : dt == BN_FLOAT32 ? 4 : 2;
}

void make_plan(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask, const bn_tensor *dy,
               const bool is_channel[], plan &p) {
  p.dtype = x.dtype;
  p.x = static_cast<const char *>(x.data);
  p.y = y ? static_cast<char *>(y->data) : nullptr;
  p.dy = dy ? static_cast<const char *>(dy->data) : nullptr;
  p.mask = mask ? static_cast<const uint8_t *>(mask->data) : nullptr;
  p.p_base = 0;
  p.empty = false;
  p.stream_y = false;
  p.x_from = x_source::memory;
  p.prefetch_ahead = 0;
  p.epilogue = epilogue_params{};
  loop_dim dims[BN_MAX_RANK];
  const int32_t merged = merge_dims(dims, forward_dims(x, y, mask, dy, is_channel, p, dims));
  p.inner = dims[merged - 1];
  p.n_outer = merged - 1;
  p.lines = 1;
  for (int32_t i = 0; i < p.n_outer; ++i) {
    p.outer[i] = dims[i];
    p.lines *= dims[i].n;
  }
  p.inner_is_channel = p.inner.p_stride != 0;
  p.segments = 1;
  fold_short_rows(p, element_bytes(x.dtype));
}

bn_status plan_call(const call_args &call, const bn_tensor *y, const bn_tensor *dy, plan &p) {
  bool is_channel[BN_MAX_RANK];
  if (bn_status st = check_call(call, is_channel)) return st;
  make_plan(*call.x, y, call.mask, dy, is_channel, p);
  return BN_OK;
}

epilogue_params epilogue_of(const bn_epilogue *e) {
  if (!e || (e->activation == BN_ACT_IDENTITY && !e->residual)) return epilogue_params{};
  return epilogue_params{true, enum_value(e->activation), e->alpha, e->lo, e->hi, false};
}


}  // namespace bn_core
