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
// block sums per row). 3 registers per vector: 4 vectors fit the 16 registers of
// AVX2, 8 the 32 of AVX-512, whose longer runs per row took (2048,2048)
// statistics from the L3 0.30 -> 0.26 ms and (32,56,56,128) from memory
// 1.77 -> 1.42 ms at 2 threads.
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
// each row goes through the block sums in L1. With AVX-512 that took
// (64,56,56,256) statistics at 2 threads from 9.8-10.3 to 8.9-9.9 ms
// (interleaved, run in either order); with AVX2 it was slower (8.0-9.0 ->
// 8.7-10.3 ms), so there whole rows go through L1.
constexpr bool kInOrderTileInRegisters = kVecBytes >= 64;

// The register tile of that walk is twice a walking tile wide where the row
// allows: 32 sums in the 32 registers (the shifts become memory operands, one
// sum spills). Each row's stores to the block sums wait for its loads from
// memory and filled the store queue: (64,56,56,256) statistics went 10.0-10.6 ->
// 6.2-7.7 ms at 2 threads and 18.2-18.8 -> 9.2-9.8 ms at 1 (a read: 4.2-6.9).
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

// One block of rows over channels [j0, j0 + len) of their segment.
template <class E>
void rows_block_moments(const plan &p, const char *const *rows_begin,
                        const uint8_t *const *rows_m_begin, int64_t n_rows, int64_t p_begin,
                        int64_t j0, int64_t len, const moments_scratch &s) {
  using acc = typename E::acc;
  const int64_t xs = p.inner.x_stride, ms = p.inner.m_stride, ps = p.inner.p_stride;
  const char *rows_x[kRowBlock];
  const uint8_t *rows_m[kRowBlock];
  for (int64_t r = 0; r < n_rows; ++r) {
    rows_x[r] = rows_begin[r] + j0 * xs;
    rows_m[r] = rows_m_begin[r] ? rows_m_begin[r] + j0 * ms : nullptr;
  }
  // Channel of position j. Folded super rows repeat their channels every period
  // (and fit one chunk, so j0 = 0 there): their first period positions are all
  // the distinct channels.
  const int64_t c_first = p_begin + j0 * ps;
  auto channel = [&](int64_t j) { return c_first + (p.period ? j % p.period : j) * ps; };
  const int64_t distinct = p.period ? min_of(len, p.period) : len;
  const bool masked = p.mask != nullptr;
  const bool per_element_mask = masked && ms != 0;
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *cnt = static_cast<acc *>(s.block_n);
  acc *k = static_cast<acc *>(s.block_shift);
  auto used_row = [&](int64_t r) { return !masked || per_element_mask || rows_m[r][0] != 0; };

  const bool contig = xs == E::size;
  const char *used[kRowBlock];
  int64_t n_used = 0;
  if (!per_element_mask)
    for (int64_t r = 0; r < n_rows; ++r)
      if (used_row(r)) used[n_used++] = rows_x[r];

  bool need_shift = false;
  if (*s.shifts_missing)
    for (int64_t j = 0; j < distinct; ++j) need_shift |= !s.shift_ok[c_first + j * ps];
  if (need_shift) {
    // The block's mean gives each channel a shift. It need not be exact, so
    // contiguous rows sum in float tiles (the scalar float64 loop cost more
    // than the block's shifted sums), relative to the first row so that values
    // near the float range do not overflow the sum.
    if (contig && !per_element_mask && n_used > 0) {
      for (int64_t j = 0; j < len; ++j) { k[j] = E::load(used[0] + j * E::size); s1[j] = 0; s2[j] = 0; }
      rows_tile_accumulate<E>(used, n_used, len, rows_ahead{}, k, s1, s2);
      for (int64_t j = 0; j < len; ++j) {
        s.block_sum[j] = static_cast<double>(k[j]) * static_cast<double>(n_used) + s1[j];
        s.block_cnt[j] = static_cast<double>(n_used);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) { s.block_sum[j] = 0; s.block_cnt[j] = 0; }
      for (int64_t r = 0; r < n_rows; ++r) {
        if (!used_row(r)) continue;
        for (int64_t j = 0; j < len; ++j) {
          if (per_element_mask && rows_m[r][j * ms] == 0) continue;
          s.block_sum[j] += E::load(rows_x[r] + j * xs);
          s.block_cnt[j] += 1;
        }
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = channel(j);
      if (!s.shift_ok[c] && s.block_cnt[j] > 0) {
        s.shift[c] = s.block_sum[j] / s.block_cnt[j];
        s.shift_ok[c] = 1;
        --*s.shifts_missing;
      }
    }
  }
  for (int64_t j = 0; j < distinct; ++j) k[j] = static_cast<acc>(s.shift[c_first + j * ps]);
  for (int64_t j = distinct; j < len; ++j) k[j] = k[j - distinct];
  for (int64_t j = 0; j < len; ++j) {
    s1[j] = 0; s2[j] = 0; cnt[j] = 0;
  }
  const double rows_used = static_cast<double>(n_used);
  if (per_element_mask) {
    for (int64_t r = 0; r < n_rows; ++r) {
      if (contig) row_accumulate<E, true, true>(rows_x[r], xs, rows_m[r], ms, len, k, s1, s2, cnt);
      else row_accumulate<E, false, true>(rows_x[r], xs, rows_m[r], ms, len, k, s1, s2, cnt);
    }
  } else {
    if (contig) {
      rows_tile_accumulate<E>(used, n_used, len, rows_ahead{}, k, s1, s2);
    } else {
      for (int64_t r = 0; r < n_used; ++r)
        row_accumulate<E, false, false>(used[r], xs, nullptr, 0, len, k, s1, s2, cnt);
    }
  }
  if (!per_element_mask && !p.period && ps == 1) {
    if (rows_used > 0)
      merge_shifted_sums(s1, s2, k, rows_used, len, s.count + c_first, s.mean + c_first,
                         s.m2 + c_first, s.shift + c_first);
    return;
  }
  // Per distinct channel: a folded super row's columns of one channel share its
  // shift, so their sums add up and the channel merges once per block (a merge
  // per column chained 64 merges per channel and block at 3 channels, and the
  // statistics of (32,224,224,3) took 1.2-1.4x as long).
  double *sum1 = s.block_sum, *sum2 = s.block_cnt;
  fold_positions(s1, len, distinct, sum1);  // only folded rows have more columns than channels
  fold_positions(s2, len, distinct, sum2);
  fold_positions(cnt, len, distinct, cnt);  // counts of at most 2^16 positions: exact in float
  const double columns = p.period ? static_cast<double>(len / p.period) : 1.0;  // super rows hold whole periods
  for (int64_t j = 0; j < distinct; ++j) {
    const double n_b = per_element_mask ? static_cast<double>(cnt[j]) : rows_used * columns;
    if (n_b == 0) continue;
    const int64_t c = channel(j);
    merge_shifted_sums(sum1 + j, sum2 + j, k + j, n_b, 1, s.count + c, s.mean + c, s.m2 + c, s.shift + c);
  }
}

// Unmasked contiguous rows x C over a run of rows, in super blocks: float tile
// blocks of kRowBlock rows are folded into float64 per-channel sums, and Chan's
// merge runs once per super block (per 32-row block it cost more than the
// sums). A super block is bounded in bytes so that its channel chunks are
// re-read from L2. The run's first block goes through rows_block_moments while
// shifts are missing (their two-pass start). The rows of a folded plan are its
// super rows (len a multiple of the period, within one channel chunk): each
// position sums on its own, and the positions of a channel add up before the merge.
constexpr int64_t kSuperBlockBytes = 256 * 1024;
constexpr int64_t kSuperBlockMaxRows = 1024;

template <class E>
void rows_moments_run(const plan &p, const char *x, int64_t x_row, int64_t n_rows, int64_t c_first,
                      int64_t len, const moments_scratch &s) {
  using acc = typename E::acc;
  acc *s1 = static_cast<acc *>(s.block_s1);
  acc *s2 = static_cast<acc *>(s.block_s2);
  acc *k = static_cast<acc *>(s.block_shift);
  const char *rows[kRowBlock];
  const uint8_t *no_mask[kRowBlock] = {};
  auto block_rows = [&](int64_t r0, int64_t nb, int64_t j0) {
    for (int64_t r = 0; r < nb; ++r) rows[r] = x + (r0 + r) * x_row + j0 * E::size;
  };
  int64_t r0 = 0;
  if (*s.shifts_missing) {
    const int64_t nb = min_of(kRowBlock, n_rows);
    block_rows(0, nb, 0);
    for (int64_t j0 = 0; j0 < len; j0 += kChannelChunk)
      rows_block_moments<E>(p, rows, no_mask, nb, c_first, j0, min_of(kChannelChunk, len - j0), s);
    r0 = nb;
  }
  const bool walks_in_order = len <= kMomentsTileVectors * E::lanes;
  // Wider rows from memory go one at a time in memory order
  // (rows_sums_in_order): (64,56,56,256) at 2 threads took 1.6x a plain read in
  // tiles down the block's rows (prefetched), 1.5x this way with 8 vectors' sums
  // in registers, 1.1-1.2x with 16.
  const bool by_row = !walks_in_order && p.x_from == x_source::memory;
  // One channel chunk reads each row once: its super block need not fit L2, and
  // the merge (divisions per channel) then runs once per kSuperBlockMaxRows rows
  // instead of per 32 at 2048 channels ((2048,2048) statistics from the L3:
  // 0.35 -> 0.30 ms at 2 threads).
  const int64_t by_bytes = len <= kChannelChunk ? kSuperBlockMaxRows
                                                : kSuperBlockBytes / (len * E::size) / kRowBlock * kRowBlock;
  const int64_t super_rows = min_of(kSuperBlockMaxRows, by_bytes > kRowBlock ? by_bytes : kRowBlock);
  for (; r0 < n_rows; r0 += super_rows) {
    const int64_t r1 = min_of(n_rows, r0 + super_rows);
    for (int64_t j0 = 0; j0 < len; j0 += kChannelChunk) {
      const int64_t cl = min_of(kChannelChunk, len - j0), c0 = c_first + j0;
      const int64_t distinct = p.period ? p.period : cl;
      double *__restrict sum1 = p.period ? s.block_sum : s.run_s1 + c0;
      double *__restrict sum2 = p.period ? s.block_cnt : s.run_s2 + c0;
      for (int64_t j = 0; j < distinct; ++j) k[j] = static_cast<acc>(s.shift[c0 + j]);
      for (int64_t j = distinct; j < cl; ++j) k[j] = k[j - distinct];
      for (int64_t j = 0; j < cl; ++j) {
        sum1[j] = 0;
        sum2[j] = 0;
      }
      for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
        const int64_t nb = min_of(kRowBlock, r1 - b0);
        block_rows(b0, nb, j0);
        // Tiles prefetch the next block (from the L3 too: without it,
        // (32,56,56,64) took twice as long). One tile across the row walks
        // memory in order.
        const rows_ahead next{rows[0] + nb * x_row, x_row,
                              walks_in_order || p.x_from == x_source::l2 ? 0 : min_of(kRowBlock, n_rows - b0 - nb)};
        for (int64_t j = 0; j < cl; ++j) { s1[j] = 0; s2[j] = 0; }
        if (by_row)
          rows_sums_in_order<E>(rows, nb, cl, k, s1, s2);
        else
          rows_tile_accumulate<E>(rows, nb, cl, next, k, s1, s2);
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
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
