#include "float64_moments.hpp"

#include <cstring>

namespace bn_core {
namespace {

double load_element(bn_dtype dtype, const char *at) {
  float value;
  if (dtype == BN_FLOAT32) {
    std::memcpy(&value, at, sizeof value);
  } else {  // bfloat16: the upper half of a float32
    uint16_t half;
    std::memcpy(&half, at, sizeof half);
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    std::memcpy(&value, &bits, sizeof value);
  }
  return value;
}

// Calls visit(channel, value) for every used element of a channel with
// redo[channel] != 0, walking p's lines with an odometer over its outer dims.
template <class Visit>
void for_each_redone_element(const plan &p, const uint8_t *redo, Visit &&visit) {
  if (p.empty) return;
  const loop_dim &in = p.inner;
  int64_t index[BN_MAX_RANK] = {};
  int64_t x_offset = 0, m_offset = 0, channel_offset = p.p_base;
  for (int64_t line = 0; line < p.lines; ++line) {
    for (int64_t i = 0; i < in.n; ++i) {
      const int64_t c = channel_offset + (p.period ? i % p.period : i * in.p_stride);
      if (!redo[c] || (p.mask && !p.mask[m_offset + i * in.m_stride])) continue;
      visit(c, load_element(p.dtype, p.x + x_offset + i * in.x_stride));
    }
    for (int32_t d = p.n_outer - 1; d >= 0; --d) {
      const loop_dim &o = p.outer[d];
      x_offset += o.x_stride;
      m_offset += o.m_stride;
      channel_offset += o.p_stride;
      if (++index[d] < o.n) break;
      index[d] = 0;
      x_offset -= o.n * o.x_stride;
      m_offset -= o.n * o.m_stride;
      channel_offset -= o.n * o.p_stride;
    }
  }
}

}  // namespace

void float64_moments(const plan &p, const uint8_t *redo, double *mean, double *variance,
                     double *count, double *sum, double *n) {
  const int64_t channels = p.channels;
  for (int64_t c = 0; c < channels; ++c) sum[c] = n[c] = 0.0;
  for_each_redone_element(p, redo, [&](int64_t c, double value) {
    sum[c] += value;
    n[c] += 1.0;
  });
  for (int64_t c = 0; c < channels; ++c) {
    if (!redo[c]) continue;
    mean[c] = n[c] > 0 ? sum[c] / n[c] : 0.0;
    sum[c] = 0.0;  // from here on: Σ(x − mean)²
  }
  for_each_redone_element(p, redo, [&](int64_t c, double value) {
    const double deviation = value - mean[c];
    sum[c] += deviation * deviation;
  });
  for (int64_t c = 0; c < channels; ++c) {
    if (!redo[c]) continue;
    variance[c] = n[c] > 0 ? sum[c] / n[c] : 0.0;
    if (count) count[c] = n[c];
  }
}

}  // namespace bn_core
