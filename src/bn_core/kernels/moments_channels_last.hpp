// Statistics of channels-last lines (rows x C: the inner run walks channels):
// per-row accumulation (masked/strided), register tiles down blocks of rows, and
// runs of rows in super blocks.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- moments: rows x C (the inner run walks channels) ----------------------------

template <class E, bool Contig, bool Masked>
void row_accumulate(const char *x, int64_t xs, const uint8_t *m, int64_t ms, int64_t len,
                    const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2,
                    typename E::acc *cnt) {
  using acc = typename E::acc;
  const int64_t step = Contig ? E::size : xs;
  for (int64_t j = 0; j < len; ++j) {
    acc d = E::load(x + j * step) - shift[j];
    if (Masked) {
      const bool used = m[j * ms] != 0;
      d = used ? d : acc(0);
      cnt[j] += used ? acc(1) : acc(0);
    }
    s1[j] += d;
    s2[j] += d * d;
  }
}

// One unmasked contiguous row added to block sums held in memory (L1), in
// memory order: the walk for rows too wide for one tile that come from memory.
template <class E>
void row_sums_in_order(const char *x, int64_t len, const typename E::acc *shift,
                       typename E::acc *s1, typename E::acc *s2) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    const vec d = E::load_vec(x + j * E::size) - load_acc<E>(shift + j);
    const vec sum1 = load_acc<E>(s1 + j) + d, sum2 = load_acc<E>(s2 + j) + d * d;
    std::memcpy(s1 + j, &sum1, sizeof(vec));
    std::memcpy(s2 + j, &sum2, sizeof(vec));
  }
  row_accumulate<E, true, false>(x + j * E::size, E::size, nullptr, 0, len - j, shift + j, s1 + j,
                                 s2 + j, nullptr);
}

// Unmasked contiguous rows: tiles of K vectors of channels whose sums stay in
// registers over all rows of the block (instead of loading and storing the
// block sums per row). 3 registers per vector (shift and two sums): 4 vectors
// fit the 16 registers of AVX2, 8 the 32 of AVX-512, which then reads each row
// in longer contiguous runs, fewer and longer streams for the hardware
// prefetchers from the L3 and from memory (bench/DESIGN.md).
constexpr int kMomentsTileVectors = kVecBytes >= 64 ? 8 : 4;

// Rows whose lines a tile prefetches at its own channels while it walks the
// current block: the next block's (0 rows: none).
struct rows_ahead {
  const char *first;
  int64_t step;
  int64_t rows;
};

// rest_of_row(r) runs after the tile's vectors of row r (a walk in memory order
// that handles the rest of each row; a no-op for tiles walking down rows).
template <class E, int K, class Rest>
void rows_tile_sums(const char *const *rows, int64_t n_rows, int64_t j, const rows_ahead &next,
                    const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2,
                    Rest &&rest_of_row) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec k[K], a[K], b[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    k[q] = load_acc<E>(shift + j + q * W);
    a[q] = vec{};
    b[q] = vec{};
  }
  // No rows ahead: next.first is null, and null + offset is undefined.
  if (next.rows > 0) prefetch_rows<0>(next.first + j * E::size, next.step, next.rows, K * W * E::size);
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const vec d = E::load_vec(rows[r] + (j + q * W) * E::size) - k[q];
      a[q] += d;
      b[q] += d * d;
    }
    rest_of_row(r);
  }
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    const vec sum1 = load_acc<E>(s1 + j + q * W) + a[q], sum2 = load_acc<E>(s2 + j + q * W) + b[q];
    std::memcpy(s1 + j + q * W, &sum1, sizeof(vec));
    std::memcpy(s2 + j + q * W, &sum2, sizeof(vec));
  }
}

template <class E>
void rows_tile_accumulate(const char *const *rows, int64_t n_rows, int64_t len, const rows_ahead &next,
                          const typename E::acc *shift, typename E::acc *s1,
                          typename E::acc *s2) {
  const int64_t j = for_each_tile<kMomentsTileVectors, E::lanes>(len, [&](auto width, int64_t j0) {
    rows_tile_sums<E, decltype(width)::count>(rows, n_rows, j0, next, shift, s1, s2, [](int64_t) {});
  });
  for (int64_t r = 0; j < len && r < n_rows; ++r)
    row_accumulate<E, true, false>(rows[r] + j * E::size, E::size, nullptr, 0, len - j, shift + j,
                                   s1 + j, s2 + j, nullptr);
}

// Rows from memory, wider than one tile, in memory order: the sums of each
// row's first vectors stay in registers across the block's rows and the rest of
// each row goes through the block sums in L1. With the 32 registers of AVX-512
// that register part is up to 16 vectors of the row; the 16 registers of AVX2
// hold only 4, too small a share of a wide row to repay splitting each row in
// two walks, so there whole rows go through L1 (bench/DESIGN.md).
constexpr bool kInOrderTileInRegisters = kVecBytes >= 64;

// The register tile of that walk is twice a walking tile wide where the row
// allows: 32 sums in the 32 registers (the shifts become memory operands, one
// sum spills): each row's stores to the block sums wait for its loads from
// memory, and with half as many columns in registers they filled the store
// queue.
template <class E, int K>
void rows_sums_in_order_from(const char *const *rows, int64_t n_rows, int64_t len,
                             const typename E::acc *shift, typename E::acc *s1, typename E::acc *s2) {
  constexpr int64_t tile = K * E::lanes;
  rows_tile_sums<E, K>(rows, n_rows, 0, rows_ahead{}, shift, s1, s2, [&](int64_t r) {
    if (len > tile)
      row_sums_in_order<E>(rows[r] + tile * E::size, len - tile, shift + tile, s1 + tile, s2 + tile);
  });
}

// Rows wider than one tile (the walk is only taken for those).
template <class E>
void rows_sums_in_order(const char *const *rows, int64_t n_rows, int64_t len, const typename E::acc *shift,
                        typename E::acc *s1, typename E::acc *s2) {
  constexpr int wide = 2 * kMomentsTileVectors;
  if (!kInOrderTileInRegisters) {
    for (int64_t r = 0; r < n_rows; ++r) row_sums_in_order<E>(rows[r], len, shift, s1, s2);
  } else if (len >= wide * E::lanes) {
    rows_sums_in_order_from<E, wide>(rows, n_rows, len, shift, s1, s2);
  } else {
    rows_sums_in_order_from<E, kMomentsTileVectors>(rows, n_rows, len, shift, s1, s2);
  }
}

// Shifts of a block's positions: the first `distinct` positions take their
// channels' shifts (channel stride apart) and later positions repeat them, as
// the positions of a folded super row repeat its channels.
template <class A>
[[gnu::always_inline]] inline
void shifts_of_positions(const double *shift, int64_t stride, int64_t distinct, int64_t len, A *k) {
  for (int64_t j = 0; j < distinct; ++j) k[j] = static_cast<A>(shift[j * stride]);
  for (int64_t j = distinct; j < len; ++j) k[j] = k[j - distinct];
}

// One block of rows x C: up to kRowBlock rows sharing channels and length, each
// pointed at the block's first position.
struct rows_block {
  const char *x[kRowBlock];
  const uint8_t *m[kRowBlock];  // each row's mask (nullptr in unmasked calls)
  const char *used[kRowBlock];  // without a per-element mask: the rows a per-row mask keeps
  int64_t n_rows, n_used, len;
  int64_t x_stride, m_stride;   // bytes between positions
  bool contig;                  // positions are adjacent elements
  bool masked;
  bool per_element_mask;        // the mask varies along a row (m_stride != 0)
  // Whether row r counts at all (a per-element mask decides per position).
  bool kept(int64_t r) const { return !masked || per_element_mask || m[r][0] != 0; }
};

// Channels of a block's positions: position j has channel first + j * stride.
// Folded super rows repeat their channels every period (and fit one chunk, so
// their blocks start at position 0): their first period positions are all the
// distinct channels.
struct rows_block_channels {
  int64_t first, stride, period, distinct;
  int64_t at(int64_t j) const { return first + (period ? j % period : j) * stride; }
};

// The block of rows [rows_begin, rows_begin + n_rows) over positions [j0, j0 + len).
template <class E>
[[gnu::always_inline]] inline
rows_block rows_block_at(const plan &p, const char *const *rows_begin, const uint8_t *const *rows_m_begin,
                         int64_t n_rows, int64_t j0, int64_t len) {
  rows_block b;
  b.n_rows = n_rows;
  b.len = len;
  b.x_stride = p.inner.x_stride;
  b.m_stride = p.inner.m_stride;
  b.contig = b.x_stride == E::size;
  b.masked = p.mask != nullptr;
  b.per_element_mask = b.masked && b.m_stride != 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    b.x[r] = rows_begin[r] + j0 * b.x_stride;
    b.m[r] = rows_m_begin[r] ? rows_m_begin[r] + j0 * b.m_stride : nullptr;
  }
  b.n_used = 0;
  if (!b.per_element_mask)
    for (int64_t r = 0; r < n_rows; ++r)
      if (b.kept(r)) b.used[b.n_used++] = b.x[r];
  return b;
}

// Whether some channel of the block has no shift yet.
[[gnu::always_inline]] inline
bool rows_block_lacks_shift(const rows_block_channels &ch, const moments_scratch &s) {
  bool lacks = false;
  if (*s.shifts_missing)
    for (int64_t j = 0; j < ch.distinct; ++j) lacks |= !s.shift_ok[ch.first + j * ch.stride];
  return lacks;
}

// Sums and counts of the block's kept elements per position, in float64
// (s.block_f64_a, s.block_f64_b). They only give a shift, which need not be exact,
// so contiguous rows sum in float tiles (a scalar float64 loop, one dependent
// add per element, would take longer than the block's vector shifted sums),
// relative to the first row so that values near the float range do not
// overflow the sum.
template <class E>
[[gnu::always_inline]] inline
void rows_block_plain_sums(const rows_block &b, const moments_scratch &s) {
  using acc = typename E::acc;
  const int64_t len = b.len;
  if (b.contig && !b.per_element_mask && b.n_used > 0) {
    acc *s1 = static_cast<acc *>(s.block_s1);
    acc *s2 = static_cast<acc *>(s.block_s2);
    acc *k = static_cast<acc *>(s.block_shift);
    for (int64_t j = 0; j < len; ++j) { k[j] = E::load(b.used[0] + j * E::size); s1[j] = 0; s2[j] = 0; }
    rows_tile_accumulate<E>(b.used, b.n_used, len, rows_ahead{}, k, s1, s2);
    for (int64_t j = 0; j < len; ++j) {
      s.block_f64_a[j] = static_cast<double>(k[j]) * static_cast<double>(b.n_used) + s1[j];
      s.block_f64_b[j] = static_cast<double>(b.n_used);
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j) { s.block_f64_a[j] = 0; s.block_f64_b[j] = 0; }
  for (int64_t r = 0; r < b.n_rows; ++r) {
    if (!b.kept(r)) continue;
    for (int64_t j = 0; j < len; ++j) {
      if (b.per_element_mask && b.m[r][j * b.m_stride] == 0) continue;
      s.block_f64_a[j] += E::load(b.x[r] + j * b.x_stride);
      s.block_f64_b[j] += 1;
    }
  }
}

// Channels without a shift take the block's mean: the two-pass start of their
// shifted sums.
template <class E>
[[gnu::always_inline]] inline
void rows_block_take_missing_shifts(const rows_block &b, const rows_block_channels &ch,
                                    const moments_scratch &s) {
  rows_block_plain_sums<E>(b, s);
  for (int64_t j = 0; j < b.len; ++j) {
    const int64_t c = ch.at(j);
    if (!s.shift_ok[c] && s.block_f64_b[j] > 0) {
      s.shift[c] = s.block_f64_a[j] / s.block_f64_b[j];
      s.shift_ok[c] = 1;
      --*s.shifts_missing;
    }
  }
}

// The block's shifted sums per position in s1, s2, and with a per-element mask
// the kept positions in cnt.
template <class E>
[[gnu::always_inline]] inline
void rows_block_shifted_sums(const rows_block &b, const typename E::acc *k, typename E::acc *s1,
                             typename E::acc *s2, typename E::acc *cnt) {
  const int64_t len = b.len, xs = b.x_stride, ms = b.m_stride;
  for (int64_t j = 0; j < len; ++j) {
    s1[j] = 0; s2[j] = 0; cnt[j] = 0;
  }
  if (b.per_element_mask) {
    for (int64_t r = 0; r < b.n_rows; ++r) {
      if (b.contig) row_accumulate<E, true, true>(b.x[r], xs, b.m[r], ms, len, k, s1, s2, cnt);
      else row_accumulate<E, false, true>(b.x[r], xs, b.m[r], ms, len, k, s1, s2, cnt);
    }
  } else if (b.contig) {
    rows_tile_accumulate<E>(b.used, b.n_used, len, rows_ahead{}, k, s1, s2);
  } else {
    for (int64_t r = 0; r < b.n_used; ++r)
      row_accumulate<E, false, false>(b.used[r], xs, nullptr, 0, len, k, s1, s2, cnt);
  }
}

// Chan's merge per distinct channel of a block whose positions are not its
// channels one to one (folded, strided or masked per element): a folded super
// row's positions of one channel share its shift, so their sums add up and the
// channel merges once per block rather than once per position.
template <class A>
[[gnu::always_inline]] inline
void rows_block_merge_per_channel(const rows_block &b, const rows_block_channels &ch, const A *k, A *s1,
                                  A *s2, A *cnt, const moments_scratch &s) {
  const int64_t len = b.len, distinct = ch.distinct;
  double *sum1 = s.block_f64_a, *sum2 = s.block_f64_b;
  fold_positions(s1, len, distinct, sum1);  // only folded rows have more positions than channels
  fold_positions(s2, len, distinct, sum2);
  fold_positions(cnt, len, distinct, cnt);  // counts of at most 2^16 positions: exact in float
  // Positions of each channel per row: the whole periods of a folded super row.
  const double repeats = ch.period ? static_cast<double>(len / ch.period) : 1.0;
  const double rows_used = static_cast<double>(b.n_used);
  for (int64_t j = 0; j < distinct; ++j) {
    const double n_b = b.per_element_mask ? static_cast<double>(cnt[j]) : rows_used * repeats;
    if (n_b == 0) continue;
    const int64_t c = ch.at(j);
    merge_shifted_sums(sum1 + j, sum2 + j, k + j, n_b, 1, s.count + c, s.mean + c, s.m2 + c, s.shift + c);
  }
}

// One block of rows x C (any stride, masked or not) over positions [j0, j0 + len)
// of their segment, whose position 0 has channel p_begin: shifts for channels
// that lack one, then the shifted sums, merged into the channels' statistics.
template <class E>
void rows_block_moments(const plan &p, const char *const *rows_begin,
                        const uint8_t *const *rows_m_begin, int64_t n_rows, int64_t p_begin,
                        int64_t j0, int64_t len, const moments_scratch &s) {
  using acc = typename E::acc;
  const rows_block b = rows_block_at<E>(p, rows_begin, rows_m_begin, n_rows, j0, len);
  const int64_t ps = p.inner.p_stride;
  const rows_block_channels ch{p_begin + j0 * ps, ps, p.period, p.period ? min_of(len, p.period) : len};
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *cnt = static_cast<acc *>(s.block_n);
  acc *k = static_cast<acc *>(s.block_shift);
  if (rows_block_lacks_shift(ch, s)) rows_block_take_missing_shifts<E>(b, ch, s);
  shifts_of_positions(s.shift + ch.first, ps, ch.distinct, len, k);
  rows_block_shifted_sums<E>(b, k, s1, s2, cnt);
  if (b.per_element_mask || p.period || ps != 1) {
    rows_block_merge_per_channel(b, ch, k, s1, s2, cnt, s);
    return;
  }
  // Positions are the channels: one merge for the block's rows.
  if (b.n_used > 0)
    merge_shifted_sums(s1, s2, k, static_cast<double>(b.n_used), len, s.count + ch.first,
                       s.mean + ch.first, s.m2 + ch.first, s.shift + ch.first);
}

// A super block of a run is bounded in bytes so that its channel chunks are
// re-read from L2, and in rows.
constexpr int64_t kSuperBlockBytes = 256 * 1024;
constexpr int64_t kSuperBlockMaxRows = 1024;

// A run of unmasked contiguous rows x C: n_rows rows x_row bytes apart from x,
// over channels [c_first, c_first + len), and how its blocks walk them.
struct rows_run {
  const char *x;
  int64_t x_row, n_rows, c_first, len;
  // Rows wider than a tile that come from memory go one at a time in memory
  // order (rows_sums_in_order): a tile walking down the block's rows reads a
  // short piece of each of them, more streams at once than the hardware
  // prefetchers follow, which its own prefetches do not make up for
  // (bench/DESIGN.md).
  bool by_row;
  // Tiles prefetch the next block's rows at their channels where the hardware
  // prefetchers would not follow a walk down rows (prefetch_next_rows). A tile
  // spanning the whole row already walks memory in order.
  bool prefetch_next;
};

// The run of rows x_row bytes apart from x, and how its blocks walk.
template <class E>
[[gnu::always_inline]] inline
rows_run rows_run_at(const plan &p, const char *x, int64_t x_row, int64_t n_rows, int64_t c_first,
                     int64_t len) {
  const bool one_tile = len <= kMomentsTileVectors * E::lanes;
  return rows_run{x, x_row, n_rows, c_first, len, !one_tile && p.x_from == x_source::memory,
                  !one_tile && prefetch_next_rows(p.x_from, len * E::size)};
}

// Points rows[0, nb) at the run's rows r0.. at position j0.
template <class E>
[[gnu::always_inline]] inline
void point_run_rows(const rows_run &run, int64_t r0, int64_t nb, int64_t j0, const char **rows) {
  for (int64_t r = 0; r < nb; ++r) rows[r] = run.x + (r0 + r) * run.x_row + j0 * E::size;
}

// Rows per super block. With one channel chunk each row is read once, so the
// super block need not fit L2 and the merge, two float64 divisions per
// channel, runs once per kSuperBlockMaxRows rows: on wide rows, once per block
// it would be a visible share of the work (bench/DESIGN.md).
template <class E>
[[gnu::always_inline]] inline
int64_t super_block_rows(int64_t len) {
  const int64_t by_bytes = len <= kChannelChunk ? kSuperBlockMaxRows
                                                : kSuperBlockBytes / (len * E::size) / kRowBlock * kRowBlock;
  return min_of(kSuperBlockMaxRows, by_bytes > kRowBlock ? by_bytes : kRowBlock);
}

// While shifts are missing, the run's first block goes through
// rows_block_moments (their two-pass start). Returns the rows it took.
template <class E>
[[gnu::always_inline]] inline
int64_t rows_run_first_block(const plan &p, const rows_run &run, const moments_scratch &s) {
  const char *rows[kRowBlock];
  const uint8_t *no_mask[kRowBlock] = {};
  const int64_t nb = min_of(kRowBlock, run.n_rows);
  point_run_rows<E>(run, 0, nb, 0, rows);
  for (int64_t j0 = 0; j0 < run.len; j0 += kChannelChunk)
    rows_block_moments<E>(p, rows, no_mask, nb, run.c_first, j0, min_of(kChannelChunk, run.len - j0), s);
  return nb;
}

// The shifted sums of the run's block of rows [b0, b0 + nb) over positions
// [j0, j0 + len) in s1, s2 (float, in L1).
template <class E>
[[gnu::always_inline]] inline
void rows_run_block_sums(const rows_run &run, int64_t b0, int64_t nb, int64_t j0, int64_t len,
                         const typename E::acc *k, typename E::acc *s1, typename E::acc *s2) {
  const char *rows[kRowBlock];
  point_run_rows<E>(run, b0, nb, j0, rows);
  const rows_ahead next{rows[0] + nb * run.x_row, run.x_row,
                        run.prefetch_next ? min_of(kRowBlock, run.n_rows - b0 - nb) : 0};
  for (int64_t j = 0; j < len; ++j) { s1[j] = 0; s2[j] = 0; }
  if (run.by_row)
    rows_sums_in_order<E>(rows, nb, len, k, s1, s2);
  else
    rows_tile_accumulate<E>(rows, nb, len, next, k, s1, s2);
}

// The run's rows [r0, r1) (a super block) over the channel chunk at position j0:
// its blocks' float sums added up in float64, then one merge per channel.
template <class E>
[[gnu::always_inline]] inline
void rows_super_block_moments(const plan &p, const rows_run &run, int64_t r0, int64_t r1, int64_t j0,
                              const moments_scratch &s) {
  using acc = typename E::acc;
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *k = static_cast<acc *>(s.block_shift);
  const int64_t cl = min_of(kChannelChunk, run.len - j0), c0 = run.c_first + j0;
  const int64_t distinct = p.period ? p.period : cl;
  double *__restrict sum1 = p.period ? s.block_f64_a : s.run_s1 + c0;
  double *__restrict sum2 = p.period ? s.block_f64_b : s.run_s2 + c0;
  shifts_of_positions(s.shift + c0, 1, distinct, cl, k);
  for (int64_t j = 0; j < cl; ++j) {
    sum1[j] = 0;
    sum2[j] = 0;
  }
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    rows_run_block_sums<E>(run, b0, min_of(kRowBlock, r1 - b0), j0, cl, k, s1, s2);
    for (int64_t j = 0; j < cl; ++j) {
      sum1[j] += static_cast<double>(s1[j]);
      sum2[j] += static_cast<double>(s2[j]);
    }
  }
  if (p.period) {
    fold_positions(sum1, cl, distinct, s.run_s1 + c0);
    fold_positions(sum2, cl, distinct, s.run_s2 + c0);
  }
  merge_shifted_sums(s.run_s1 + c0, s.run_s2 + c0, k, static_cast<double>((r1 - r0) * (cl / distinct)),
                     distinct, s.count + c0, s.mean + c0, s.m2 + c0, s.shift + c0);
}

// Unmasked contiguous rows x C over a run of rows, in super blocks: float tile
// blocks of kRowBlock rows are folded into float64 per-channel sums, and Chan's
// merge runs once per super block (its float64 divisions per channel cost more
// than a channel's float sums over kRowBlock rows). The rows of a folded plan
// are its super rows (len a multiple of the period, within one channel chunk):
// each position sums on its own, and the positions of a channel add up before
// the merge.
template <class E>
void rows_moments_run(const plan &p, const char *x, int64_t x_row, int64_t n_rows, int64_t c_first,
                      int64_t len, const moments_scratch &s) {
  const rows_run run = rows_run_at<E>(p, x, x_row, n_rows, c_first, len);
  const int64_t super_rows = super_block_rows<E>(len);
  int64_t r0 = *s.shifts_missing ? rows_run_first_block<E>(p, run, s) : 0;
  for (; r0 < n_rows; r0 += super_rows) {
    const int64_t r1 = min_of(n_rows, r0 + super_rows);
    for (int64_t j0 = 0; j0 < len; j0 += kChannelChunk) rows_super_block_moments<E>(p, run, r0, r1, j0, s);
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
