// One function per operation choosing the walk each plan takes (per layout), and
// the element type dispatch the entries (entries.hpp) go through.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// The longest super row of a folded plan up to max_len elements: parameters are
// replicated over fold_len, and rows of any divisor that is a multiple of the
// period and of the vector width see the same channels at the same positions.
template <class E>
int64_t folded_row(const plan &p, int64_t max_len) {
  int64_t row = p.fold_len;
  while (row > max_len && row % 2 == 0 && (row / 2) % p.period == 0 && (row / 2) % E::lanes == 0) row /= 2;
  return row;
}

// Planes x L: each line segment is one channel's, masked per element, per
// segment or not at all; pending sums merge once all segments are in.
template <class E>
[[gnu::always_inline]] inline
void planes_moments_items(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s) {
  const uint8_t *mask = p.mask;
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    const char *x = p.x + cur.x_off + seg.begin * p.inner.x_stride;
    if (!mask) {
      plane_moments<E, false>(x, p.inner.x_stride, nullptr, 0, seg.len, cur.p_off, s);
      return;
    }
    const uint8_t *m = mask + cur.m_off + seg.begin * p.inner.m_stride;
    if (p.inner.m_stride == 0) {  // one mask value for the whole segment
      if (*m) plane_moments<E, false>(x, p.inner.x_stride, nullptr, 0, seg.len, cur.p_off, s);
    } else {
      plane_moments<E, true>(x, p.inner.x_stride, m, p.inner.m_stride, seg.len, cur.p_off, s);
    }
  });
  for (int64_t c = 0; c < p.channels; ++c) plane_merge_pending<E>(c, s);
}

// Rows x C that are masked or strided (elements or channels not adjacent): up
// to kRowBlock consecutive rows sharing channels and length are gathered into
// one block for rows_block_moments. A folded plan's lines are cut into super rows of `row`
// positions.
template <class E>
[[gnu::always_inline]] inline
void rows_blocks_moments_items(const plan &p, int64_t item_begin, int64_t item_end, int64_t row,
                               const moments_scratch &s) {
  const uint8_t *mask = p.mask;
  const int64_t xs = p.inner.x_stride, ms = p.inner.m_stride;
  const char *rows_x[kRowBlock];
  const uint8_t *rows_m[kRowBlock];
  int64_t n_rows = 0, block_p = 0, block_len = 0;
  auto flush = [&] {
    for (int64_t j0 = 0; n_rows && j0 < block_len; j0 += kChannelChunk)
      rows_block_moments<E>(p, rows_x, rows_m, n_rows, block_p, j0,
                            min_of(kChannelChunk, block_len - j0), s);
    n_rows = 0;
  };
  auto push = [&](const char *x, const uint8_t *m, int64_t p_first, int64_t len) {
    if (n_rows == kRowBlock || (n_rows && (p_first != block_p || len != block_len))) flush();
    block_p = p_first;
    block_len = len;
    rows_x[n_rows] = x;
    rows_m[n_rows] = m;
    ++n_rows;
  };
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    const char *x = p.x + cur.x_off + seg.begin * xs;
    const uint8_t *m = mask ? mask + cur.m_off + seg.begin * ms : nullptr;
    if (!p.period) {
      push(x, m, cur.p_off + seg.begin * p.inner.p_stride, seg.len);
      return;
    }
    for (int64_t k = 0; k < seg.len; k += row)
      push(x + k * xs, m ? m + k * ms : nullptr, cur.p_off, min_of(row, seg.len - k));
  });
  flush();
}

// Statistics of the items [item_begin, item_end): planes x L segment by
// segment; unmasked contiguous rows x C in runs of rows; other rows x C in
// gathered blocks.
template <class E>
void moments_items(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s) {
  if (!p.inner_is_channel) {
    planes_moments_items<E>(p, item_begin, item_end, s);
    return;
  }
  const int64_t xs = p.inner.x_stride;
  // A folded plan walks super rows that one tile spans, so that it walks them in
  // memory order (a super row split over two tiles is walked twice).
  const int64_t row = p.period ? folded_row<E>(p, kMomentsTileVectors * E::lanes) : 0;
  if (p.mask || xs != E::size || p.inner.p_stride != 1) {
    rows_blocks_moments_items<E>(p, item_begin, item_end, row, s);
    return;
  }
  for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                    int64_t n_rows, const loop_dim &step) {
    rows_moments_run<E>(p, p.x + cur.x_off + seg.begin * xs, step.x_stride, n_rows,
                        cur.p_off + seg.begin, seg.len, s);
  });
}

// Epi: no_epilogue, or with_epilogue (normalize_epilogue_entry), which walks a
// residual alongside x (contiguous walks need it contiguous too).
template <class E, class Epi>
void normalize_items(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a) {
  const int64_t xs = p.inner.x_stride, ys = p.inner.y_stride, ps = p.inner.p_stride;
  const bool residual_contig = std::is_same_v<Epi, no_epilogue> || !p.residual || p.inner.d_stride == E::size;
  const bool contig = xs == E::size && ys == E::size && (!p.inner_is_channel || ps == 1) && residual_contig;
  if (contig && p.inner_is_channel) {  // folded plans are contiguous
    // A folded plan's longest super row that one tile spans walks in order.
    const int64_t row = folded_row<E>(p, kNormalizeTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      normalize_rows<E>(p, p.x + cur.x_off + seg.begin * xs, step.x_stride, p.y + cur.y_off + seg.begin * ys,
                        step.y_stride, n_rows, seg.len, a, cur.p_off + seg.begin,
                        epilogue_at<Epi>(p, cur.d_off, seg.begin, step.d_stride));
    });
    if (p.stream_y) end_streaming();
    return;
  }
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    const char *x = p.x + cur.x_off + seg.begin * xs;
    char *y = p.y + cur.y_off + seg.begin * ys;
    const int64_t c0 = cur.p_off + (p.inner_is_channel ? seg.begin * ps : 0);
    const Epi epi = epilogue_at<Epi>(p, cur.d_off, seg.begin, 0);
    if (contig) normalize_segment<E, true>(p, x, y, c0, seg.len, a, epi);
    else normalize_segment<E, false>(p, x, y, c0, seg.len, a, epi);
  });
  if (p.stream_y) end_streaming();
}

template <class E>
void backward_sums_items(const plan &p, int64_t item_begin, int64_t item_end,
                         const backward_params &b, const backward_scratch &s) {
  const bool contig = grad_contiguous<E>(p), masked = p.mask != nullptr;
  if (contig && !masked && p.inner_is_channel) {
    const int64_t row = folded_row<E>(p, kGradTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      grad_rows_sums<E>(p, grad_segment_at(p, cur, seg), step, n_rows, b, s);
    });
    return;
  }
  for_each_grad_segment(p, item_begin, item_end, [&](const grad_segment &g) {
    if (masked) {
      if (contig) grad_sums_segment<E, true, true>(p, g, b, s);
      else grad_sums_segment<E, false, true>(p, g, b, s);
    } else {
      if (contig) grad_sums_segment<E, true, false>(p, g, b, s);
      else grad_sums_segment<E, false, false>(p, g, b, s);
    }
  });
}

template <class E>
void backward_apply_items(const plan &p, int64_t item_begin, int64_t item_end,
                          const backward_params &b) {
  const bool contig = grad_contiguous<E>(p), masked = p.mask != nullptr;
  if (contig && !masked && p.inner_is_channel) {
    const int64_t row = folded_row<E>(p, kGradTileVectors * E::lanes);
    for_each_rows_or_super_rows_run(p, item_begin, item_end, row, [&](const line_offsets &cur, segment seg,
                                                                      int64_t n_rows, const loop_dim &step) {
      grad_rows_apply<E>(p, grad_segment_at(p, cur, seg), step, n_rows, b);
    });
    return;
  }
  for_each_grad_segment(p, item_begin, item_end, [&](const grad_segment &g) {
    if (masked) {
      if (contig) grad_apply_segment<E, true, true>(p, g, b);
      else grad_apply_segment<E, false, true>(p, g, b);
    } else {
      if (contig) grad_apply_segment<E, true, false>(p, g, b);
      else grad_apply_segment<E, false, false>(p, g, b);
    }
  });
  if (p.stream_y) end_streaming();
}

// Calls f(E{}) with the element type E of dtype (validated by the caller).
template <class F>
void with_element_type(bn_dtype dtype, F &&f) {
  switch (dtype) {
    case BN_FLOAT32: f(f32_elem{}); break;
    case BN_FLOAT64: f(f64_elem{}); break;
    case BN_FLOAT16: f(f16_elem{}); break;
    case BN_BFLOAT16: f(bf16_elem{}); break;
    default: break;
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
