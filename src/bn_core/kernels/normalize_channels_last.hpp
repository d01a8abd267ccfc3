// Normalize channels-last rows (rows x C) in register tiles of channels.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// Normalize tiles: K vectors of channels whose parameters stay in registers
// while the tile walks down rows (loaded per row, the parameters would be 3 of
// every 4 loads, and the load ports rather than memory would bound an in-place
// channels-last normalize; bench/DESIGN.md). 3 parameter vectors per data
// vector fit the 16 registers of AVX2.
constexpr int kNormalizeTileVectors = 4;

// Wide rows (more channels than a tile) in blocks of kNormalizeBlockRows rows,
// kNormalizeBlockVectors vectors of channels at a time: the 3 parameter loads
// serve 8 vectors. Row by row they are 3 loads per vector on top of the data
// load, and from the caches the loads, not the stores, bound the walk
// (bench/DESIGN.md).
constexpr int kNormalizeBlockVectors = 2;
constexpr int64_t kNormalizeBlockRows = 4;
// Parameter bytes (3 arrays) that stay in L1 next to the data: from memory, rows
// of up to that many channels go one at a time. Memory bandwidth, not the
// parameter loads from L1, bounds that walk, and row order keeps one stream in
// and one out, which the prefetchers and the streaming stores' write-combining
// follow (bench/DESIGN.md).
constexpr int64_t kNormalizeL1ParamBytes = 8 << 10;

// K vectors of channels over n_rows rows, B rows at a time with all B·K loads
// before the stores (a walk down rows would otherwise load right behind stores
// to the lines it reads next). ahead: rows after these whose lines it
// prefetches (x, and y out of place unless streamed). epi: the epilogue, its
// residual at this tile's first element.
template <class E, bool Stream, int K, int B, class Epi>
[[gnu::always_inline]] inline void normalize_rows_tile(const char *x, int64_t x_row, char *y, int64_t y_row, int64_t n_rows,
                         int64_t ahead, const typename E::acc *mean_hi, const typename E::acc *scale,
                         const typename E::acc *bias, const Epi &epilogue) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  // A copy of its own: the stores through char pointers might write the
  // caller's, which would then be reloaded for every vector.
  const Epi epi = epilogue;
  vec mh[K], sc[K], b[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    mh[k] = load_acc<E>(mean_hi + k * W);
    sc[k] = load_acc<E>(scale + k * W);
    b[k] = load_acc<E>(bias + k * W);
  }
  prefetch_rows<0>(x + n_rows * x_row, x_row, ahead, K * W * E::size);
  if (!Stream && y != x) prefetch_rows<1>(y + n_rows * y_row, y_row, ahead, K * W * E::size);
  auto group = [&](int64_t r, auto size) {
    constexpr int G = decltype(size)::count;
    vec v[G][K];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) v[g][k] = E::load_vec(x + (r + g) * x_row + k * W * E::size);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        E::template store_vec<Stream>(y + (r + g) * y_row + k * W * E::size,
                                      epi.template apply<E>(normalized(v[g][k], mh[k], sc[k], b[k]),
                                                            (r + g) * epi.row + k * W * E::size));
  };
  int64_t r = 0;
  for (; r + B <= n_rows; r += B) group(r, row_group<B>{});
  for (; r < n_rows; ++r) group(r, row_group<1>{});
}

// Contiguous rows x C over a run of n_rows rows of channels [c0, c0 + len), in
// tiles of explicit vectors across channels (the autovectorized segment loop
// redoes its set-up, alignment and trip-count checks, on every row: more than a
// short row's work; bench/DESIGN.md).
// A run one tile spans goes in memory order; wider rows in blocks (above), or
// one at a time from memory while their parameters fit in L1.
template <class E, bool Stream, class Epi>
void normalize_rows_run(const char *x, int64_t x_row, char *y, int64_t y_row, int64_t n_rows,
                        int64_t len, const affine_params &a, int64_t c0, x_source x_from, const Epi &epi) {
  using acc = typename E::acc;
  constexpr int64_t W = E::lanes;
  const acc *mean_hi = static_cast<const acc *>(a.mean_hi) + c0;
  const acc *scale = static_cast<const acc *>(a.scale) + c0;
  const acc *bias = static_cast<const acc *>(a.bias) + c0;
  const bool one_tile = len <= kNormalizeTileVectors * W;
  const bool by_row = !one_tile && x_from == x_source::memory &&
                      3 * len * int64_t(sizeof(acc)) <= kNormalizeL1ParamBytes;
  const int64_t block = one_tile ? n_rows : by_row ? 1 : kNormalizeBlockRows;
  const bool prefetching = block == kNormalizeBlockRows && prefetch_next_rows(x_from, len * E::size);
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t nb = min_of(block, n_rows - r0);
    const int64_t ahead = prefetching ? min_of(block, n_rows - r0 - nb) : 0;
    const char *xb = x + r0 * x_row;
    char *yb = y + r0 * y_row;
    const Epi epi_b = epi.at(r0 * epi.row);
    // rows and ahead as compile-time constants for whole blocks: with them at
    // run time, each tile carries row loops, prefetch branches and pointers
    // spilled to the stack, a set-up as long as its 8 vectors of work
    // (bench/DESIGN.md).
    auto walk = [&](auto group, auto n_rows, auto n_ahead) {
      constexpr int B = decltype(group)::count;
      auto tile = [&](auto width, int64_t j) {
        normalize_rows_tile<E, Stream, decltype(width)::count, B>(xb + j * E::size, x_row, yb + j * E::size, y_row,
                                                                  n_rows, n_ahead, mean_hi + j, scale + j, bias + j,
                                                                  epi_b.at(j * E::size));
      };
      return B == 1 ? for_each_tile<kNormalizeTileVectors, W>(len, tile)
                    : for_each_tile<kNormalizeBlockVectors, W>(len, tile);
    };
    constexpr int64_t B = kNormalizeBlockRows;
    using one = std::integral_constant<int64_t, 1>;
    using none = std::integral_constant<int64_t, 0>;
    using whole = std::integral_constant<int64_t, B>;
    const int64_t vector_end = one_tile                ? walk(row_group<1>{}, nb, none{})
                               : by_row                ? walk(row_group<1>{}, one{}, none{})
                               : nb == B && ahead == 0 ? walk(row_group<B>{}, whole{}, none{})
                               : nb == B && ahead == B ? walk(row_group<B>{}, whole{}, whole{})
                                                       : walk(row_group<B>{}, nb, ahead);
    for (int64_t r = 0; vector_end < len && r < nb; ++r)
      for (int64_t k = vector_end; k < len; ++k)
        E::store(yb + r * y_row + k * E::size,
                 epi_b.template apply<E>(normalized(E::load(xb + r * x_row + k * E::size), mean_hi[k], scale[k], bias[k]),
                                         r * epi.row + k * E::size));
  }
}

// Whether every vector store of a run of rows lands on a vector-aligned address
// (streaming stores need it): the first row, the row step and the storage
// vector all aligned.
template <class E>
bool vector_aligned(const char *y, int64_t y_row) {
  const int64_t align = E::lanes * E::size;
  return reinterpret_cast<uintptr_t>(y) % align == 0 && y_row % align == 0;
}

// Channels of back-to-back rows whose parameters normalize_rows_rotated keeps on
// the stack (3 arrays of them).
constexpr int64_t kRotatedMaxChannels = 4096;

// Streams back-to-back rows (x_row = y_row = len elements, a whole number of
// vectors) into a y that is not vector-aligned (NumPy's large arrays start 16
// bytes into a page): seen from its first aligned element, head elements on, y
// is rows of the same length whose channels are rotated by head, all aligned.
// The first row's head gets plain stores (it shares a line with what precedes
// y), the last row's rest streamed ones. Its own function, so that only this
// walk's frame holds the rotated parameters.
// An epilogue's second stream (residual or dy) must have x's rows (epi.row ==
// row), so that it is rotated alike.
template <class E, class Epi>
__attribute__((noinline)) void normalize_rows_rotated(const plan &p, const char *x, char *y, int64_t row,
                                                      int64_t n_rows, int64_t len, int64_t head,
                                                      const affine_params &a, int64_t c0, const Epi &epi) {
  using acc = typename E::acc;
  acc rotated[3][kRotatedMaxChannels];
  const acc *params[3] = {static_cast<const acc *>(a.mean_hi), static_cast<const acc *>(a.scale),
                          static_cast<const acc *>(a.bias)};
  for (int i = 0; i < 3; ++i)
    for (int64_t k = 0; k < len; ++k) rotated[i][k] = params[i][c0 + (head + k) % len];
  const affine_params rotated_a{rotated[0], rotated[1], rotated[2]};
  normalize_rows_run<E, false>(x, row, y, row, 1, head, a, c0, p.x_from, epi);
  normalize_rows_run<E, true>(x + head * E::size, row, y + head * E::size, row, n_rows - 1, len,
                              rotated_a, 0, p.x_from, epi.at(head * E::size));
  const int64_t last = (n_rows - 1) * row + head * E::size;
  normalize_rows_run<E, true>(x + last, row, y + last, row, 1, len - head, a, c0 + head, p.x_from,
                              epi.at(last));
}

// epi: the epilogue, its residual at the run's first element.
template <class E, class Epi>
void normalize_rows(const plan &p, const char *x, int64_t x_row, char *y, int64_t y_row,
                    int64_t n_rows, int64_t len, const affine_params &a, int64_t c0, const Epi &epi) {
  constexpr int64_t align = E::lanes * E::size;
  const int64_t head = (align - reinterpret_cast<uintptr_t>(y) % align) % align / E::size;
  const int64_t row_bytes = len * E::size;
  const bool second_rows_match = !epi.residual || epi.row == row_bytes;
  if (p.stream_y && head != 0 && x_row == row_bytes && y_row == row_bytes && row_bytes % align == 0 &&
      second_rows_match && reinterpret_cast<uintptr_t>(y) % E::size == 0 && n_rows >= 2 &&
      len <= kRotatedMaxChannels)
    normalize_rows_rotated<E>(p, x, y, row_bytes, n_rows, len, head, a, c0, epi);
  else if (p.stream_y && vector_aligned<E>(y, y_row))
    normalize_rows_run<E, true>(x, x_row, y, y_row, n_rows, len, a, c0, p.x_from, epi);
  else
    normalize_rows_run<E, false>(x, x_row, y, y_row, n_rows, len, a, c0, p.x_from, epi);
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
