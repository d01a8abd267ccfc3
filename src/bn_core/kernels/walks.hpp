// The walks every operation shares: tiles of channels (K vectors kept in registers
// down rows), and the lines of a plan taken as contiguous runs of rows, folded
// super rows, or single segments (glossary: README.md).
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- tiles of channels ------------------------------------------------------------

// Rows x C kernels walk channels in tiles of K whole vectors whose per-channel
// values (parameters or partial sums) stay in registers while the tile walks
// down rows. K is a compile-time width, handed to the tile as a tag.
template <int K> struct vectors { static constexpr int count = K; };
// A compile-time count of rows a tile handles together, handed over the same way.
template <int B> struct row_group { static constexpr int count = B; };

template <int K, int64_t W, class F>
void part_tile(int64_t n_vectors, int64_t j, F &tile) {
  if constexpr (K > 0) {
    if (n_vectors == K) tile(vectors<K>{}, j);
    else part_tile<K - 1, W>(n_vectors, j, tile);
  }
}

// Lines of one L1 data cache set (32 KiB, 8-way on Zen 3 and Zen 4; Intel's
// 48 KiB caches have 12): a walk keeping more of them live evicts its own.
constexpr int64_t kL1Ways = 8;

// Whether a tile walking `rows` rows at a time down `streams` (rows `row_bytes`
// apart; an in-place output is its input, one stream) keeps more lines of one
// L1 set live than the set holds. Rows a multiple of 4 KiB apart (p rows per
// 4 KiB: every p-th row) land in the same set, and so do streams at the same
// offset in their pages, as malloc places large buffers: 8 rows of 4 KiB of x,
// dy and dx are 24 lines for 8 ways, and the tile reloads from L2 what it has
// just brought in (2.5x the time of a walk with the streams apart). A walk a
// row at a time keeps a few lines per stream.
template <int N>
bool tile_walk_overfills_l1_set(const char *const (&streams)[N], int64_t row_bytes, int64_t rows,
                                int64_t tile_bytes) {
  constexpr int64_t page = 4096;
  const int64_t step = (row_bytes % page + page) % page;  // any stride, without overflow
  int64_t period = 0;  // rows per 4 KiB, when rows come back to the same set within the walk
  for (int64_t k = 1; k < rows && period == 0; ++k) {
    const int64_t gap = k * step % page;
    if (gap < tile_bytes || gap > page - tile_bytes) period = k;
  }
  if (period == 0) return false;
  const int64_t lines_per_stream = (rows + period - 1) / period, span = page / period;
  int64_t most = 0;  // distinct streams sharing a set
  for (int i = 0; i < N; ++i) {
    int64_t sharing = 0;
    for (int j = 0; j < N; ++j) {
      bool seen = false;  // a stream listed twice counts once
      for (int k = 0; k < j; ++k) seen |= streams[k] == streams[j];
      const int64_t gap = static_cast<int64_t>((reinterpret_cast<uintptr_t>(streams[j]) -
                                                reinterpret_cast<uintptr_t>(streams[i])) % span);
      sharing += !seen && (gap < tile_bytes || gap > span - tile_bytes);
    }
    most = most > sharing ? most : sharing;
  }
  return most * lines_per_stream > kL1Ways;
}

// Calls tile(vectors<K>{}, j) over channels [0, len) in tiles of Max vectors of
// W lanes, the last one shorter; returns where the whole vectors end (the
// caller's scalar tail starts there).
template <int Max, int64_t W, class F>
int64_t for_each_tile(int64_t len, F &&tile) {
  int64_t j = 0;
  for (; j + Max * W <= len; j += Max * W) tile(vectors<Max>{}, j);
  part_tile<Max - 1, W>((len - j) / W, j, tile);
  return len / W * W;
}

// The normalization of one value or vector: (x − mean_hi)·scale + bias (see
// affine_params), for scalars and vectors alike.
template <class V, class P>
inline V normalized(V x, P mean_hi, P scale, P bias) {
  return (x - mean_hi) * scale + bias;
}

// ---- walking the lines of a plan -----------------------------------------------

// Byte offsets of a line's first element in x, y, the mask and dy, and its
// channel index.
struct line_offsets {
  int64_t x_off, y_off, m_off, p_off, d_off;

  void advance(const loop_dim &dim, int64_t k) {
    x_off += k * dim.x_stride; y_off += k * dim.y_stride; m_off += k * dim.m_stride;
    p_off += k * dim.p_stride; d_off += k * dim.d_stride;
  }
};

// Odometer over the outer dims.
struct line_cursor : line_offsets {
  int64_t idx[BN_MAX_RANK];

  line_cursor(const plan &p, int64_t line) : line_offsets{0, 0, 0, p.p_base, 0} {
    for (int32_t d = p.n_outer - 1; d >= 0; --d) {
      const loop_dim &dim = p.outer[d];
      idx[d] = line % dim.n;
      line /= dim.n;
      advance(dim, idx[d]);
    }
  }

  // Moves count >= 1 lines ahead; count must not pass the end of the innermost
  // outer dim (only the last step may carry).
  void skip(const plan &p, int64_t count) {
    const int32_t d = p.n_outer - 1;
    idx[d] += count - 1;
    advance(p.outer[d], count - 1);
    next(p);
  }

  void next(const plan &p) {
    for (int32_t d = p.n_outer - 1; d >= 0; --d) {
      const loop_dim &dim = p.outer[d];
      advance(dim, 1);
      if (++idx[d] < dim.n) return;
      idx[d] = 0;
      advance(dim, -dim.n);
    }
  }
};

// A work item is one segment of one line: [begin, begin + len) of the inner run.
struct segment { int64_t begin, len; };

// Calls f(first, segment, n_lines) for the items [item_begin, item_end) in
// memory order: n_lines whole lines (segment = all of each), the first at
// `first`, each one step of the innermost outer dim (run_step(p)) after the
// last — or one segment of one line (n_lines = 1) when lines are cut.
// Stepping the odometer per line costs more than a short line's work (a
// 64-channel row), and handing kernels whole runs lets them keep per-channel
// values in registers across rows.
template <class F>
void for_each_run(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  if (item_begin >= item_end) return;
  const int64_t n = p.inner.n, segments = p.segments;
  if (segments == 1) {
    line_cursor cur(p, item_begin);
    if (p.n_outer == 0) {
      f(static_cast<const line_offsets &>(cur), segment{0, n}, int64_t{1});
      return;
    }
    const loop_dim &rows = p.outer[p.n_outer - 1];
    for (int64_t line = item_begin; line < item_end;) {
      const int64_t run = min_of(rows.n - cur.idx[p.n_outer - 1], item_end - line);
      f(static_cast<const line_offsets &>(cur), segment{0, n}, run);
      cur.skip(p, run);
      line += run;
    }
    return;
  }
  // Folded runs are cut at super-row boundaries so element i stays channel i % period.
  const int64_t align = p.period ? p.fold_len : 1;
  const int64_t seg_len = ((n + segments - 1) / segments + align - 1) / align * align;
  line_cursor cur(p, item_begin / segments);
  int64_t seg = item_begin % segments;
  for (int64_t k = item_begin; k < item_end; ++k) {
    const int64_t begin = min_of(seg * seg_len, n);
    const int64_t len = min_of(seg_len, n - begin);
    if (len) f(static_cast<const line_offsets &>(cur), segment{begin, len}, int64_t{1});
    if (++seg == segments) {
      seg = 0;
      cur.next(p);
    }
  }
}

// The step between the lines of a run.
inline const loop_dim &run_step(const plan &p) { return p.outer[p.n_outer - 1]; }

// Calls f(first, segment, n_rows, step) for the runs of rows x C lines of
// [item_begin, item_end) whose rows share their channels; step is the row step
// (all zero for a lone row). Rows of a ghost-batch view have their own channels
// (the row step moves the parameters) and are handed over one per run.
template <class F>
void for_each_rows_run(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  for_each_run(p, item_begin, item_end, [&](const line_offsets &first, segment seg, int64_t n_lines) {
    const loop_dim step = n_lines > 1 ? run_step(p) : loop_dim{};  // a lone line never steps
    if (step.p_stride == 0) {
      f(first, seg, n_lines, step);
      return;
    }
    line_offsets at = first;
    for (int64_t r = 0; r < n_lines; ++r, at.advance(step, 1))
      f(static_cast<const line_offsets &>(at), seg, int64_t{1}, loop_dim{});
  });
}

// for_each_rows_run, or for a folded plan each line segment as a run of super
// rows of `row` elements (a divisor of fold_len, so that position j of every
// super row has parameter j: the offsets keep p_off) and its rest, shorter than
// a row, as a lone row.
template <class F>
void for_each_rows_or_super_rows_run(const plan &p, int64_t item_begin, int64_t item_end, int64_t row, F &&f) {
  if (!p.period) {
    for_each_rows_run(p, item_begin, item_end, f);
    return;
  }
  const loop_dim &in = p.inner;
  const loop_dim along{0, in.x_stride, in.y_stride, in.m_stride, 0, in.d_stride};
  const loop_dim step{0, row * in.x_stride, row * in.y_stride, row * in.m_stride, 0, row * in.d_stride};
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    line_offsets at = cur;
    at.advance(along, seg.begin);
    const int64_t whole = seg.len / row, done = whole * row;
    if (whole) f(static_cast<const line_offsets &>(at), segment{0, row}, whole, step);
    at.advance(along, done);
    if (done < seg.len) f(static_cast<const line_offsets &>(at), segment{0, seg.len - done}, int64_t{1}, loop_dim{});
  });
}

// Calls f(offsets, segment) per line segment, in memory order.
template <class F>
void for_each_item(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  for_each_run(p, item_begin, item_end, [&](const line_offsets &first, segment seg, int64_t n_lines) {
    line_offsets at = first;
    for (int64_t r = 0;;) {
      f(static_cast<const line_offsets &>(at), seg);
      if (++r == n_lines) return;
      at.advance(run_step(p), 1);
    }
  });
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
