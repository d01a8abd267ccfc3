// Backward of unmasked contiguous channels-last rows (rows x C): register tiles
// of channels for the sums and for dx.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// Σdy and Σdy·x̂ of unmasked contiguous rows x C: tiles of channels keep float
// partial sums in registers over blocks of kRowBlock rows, folded into the
// float64 sums per block (summed per element in float64 through memory, each
// element would add a conversion and the loads and stores of its two sums to
// its arithmetic). A tile has 5 values per vector: with AVX2, 2 vectors fit
// the 16 registers. With AVX-512, 16 vectors (256 float32 channels) put the
// sums in the 32 registers and the parameters become memory operands (L1 hits
// that cost no register); each tile then walks as many channels as possible in
// memory order, so a row is read in few long runs rather than many short ones
// (bench/DESIGN.md, 'kernels/backward_channels_last.hpp').
constexpr int kGradTileVectors = kVecBytes >= 64 ? 16 : 2;
// Rows a backward tile walks before the next tile: a few streams, which the
// prefetchers follow; a tile walking down many rows reads a short piece of each,
// more streams than they track (bench/DESIGN.md).
constexpr int64_t kGradRowBlock = 8;

// Rows a tile of `tile` channels walks before the next tile. One tile covering
// the row walks the run in memory order: no blocks needed. From memory, wider
// rows go one at a time: the bandwidth hides the parameter loads, and the tile
// walk defeated the hardware prefetchers. So do rows whose block would overfill
// an L1 set (tile_walk_overfills_l1_set).
inline int64_t rows_per_block(int64_t n_rows, int64_t len, int64_t tile, bool from_memory,
                              bool overfills_l1_set) {
  return len <= tile ? n_rows : from_memory || overfills_l1_set ? 1 : kGradRowBlock;
}

template <class E, int K>
void grad_rows_tile_sums(const char *x, const char *dy, int64_t x_row, int64_t d_row, int64_t n_rows,
                         const typename E::acc *mean_hi, const typename E::acc *mean_lo,
                         const typename E::acc *invstd, double *sum_dy, double *sum_dy_xhat) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  vec mh[K], ml[K], is[K], a[K], h[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    mh[q] = load_acc<E>(mean_hi + q * W);
    ml[q] = load_acc<E>(mean_lo + q * W);
    is[q] = load_acc<E>(invstd + q * W);
    a[q] = vec{};
    h[q] = vec{};
  }
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const vec d = E::load_vec(dy + r * d_row + q * W * E::size);
      a[q] += d;
      h[q] += d * (((E::load_vec(x + r * x_row + q * W * E::size) - mh[q]) - ml[q]) * is[q]);
    }
  }
  for (int q = 0; q < K; ++q)
    for (int64_t l = 0; l < W; ++l) {
      sum_dy[q * W + l] += static_cast<double>(a[q][l]);
      sum_dy_xhat[q * W + l] += static_cast<double>(h[q][l]);
    }
}

// g: the run's first row; the others follow at the row step (both copies:
// stores through dx could otherwise alias them and force reloads).
template <class E>
void grad_rows_sums(const plan &p, const grad_segment g, const loop_dim step, int64_t n_rows,
                    const backward_params &b, const backward_scratch &s) {
  using acc = typename E::acc;
  const acc *mean_hi = static_cast<const acc *>(b.mean_hi) + g.c0;
  const acc *mean_lo = static_cast<const acc *>(b.mean_lo) + g.c0;
  const acc *invstd = static_cast<const acc *>(b.invstd) + g.c0;
  double *sum_dy = s.sum_dy + g.c0, *sum_dy_xhat = s.sum_dy_xhat + g.c0;
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRowBlock) {
    const int64_t nb = min_of(kRowBlock, n_rows - r0);
    const char *xb = g.x + r0 * step.x_stride, *db = g.dy + r0 * step.d_stride;
    const int64_t j = for_each_tile<kGradTileVectors, E::lanes>(g.len, [&](auto width, int64_t j0) {
      grad_rows_tile_sums<E, decltype(width)::count>(xb + j0 * E::size, db + j0 * E::size, step.x_stride,
                                                     step.d_stride, nb, mean_hi + j0, mean_lo + j0,
                                                     invstd + j0, sum_dy + j0, sum_dy_xhat + j0);
    });
    for (int64_t r = 0; j < g.len && r < nb; ++r)
      grad_sums_segment<E, true, false>(
          p, grad_segment{xb + r * step.x_stride + j * E::size, db + r * step.d_stride + j * E::size,
                          nullptr, nullptr, g.c0 + j, g.len - j}, b, s);
  }
}

// dx of unmasked contiguous rows x C, in tiles whose five parameters stay in
// registers (as normalize_rows_run).
template <class E, int K>
void grad_rows_tile_apply(const char *x, const char *dy, char *dx, int64_t x_row, int64_t d_row,
                          int64_t y_row, int64_t n_rows, const backward_params &b, int64_t c) {
  using acc = typename E::acc;
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes;
  auto param = [c](const void *p, int q) { return load_acc<E>(static_cast<const acc *>(p) + c + q * W); };
  vec mh[K], ml[K], dy_sc[K], xc[K], sh[K];
#pragma GCC unroll 16
  for (int q = 0; q < K; ++q) {
    mh[q] = param(b.mean_hi, q);
    ml[q] = param(b.mean_lo, q);
    dy_sc[q] = param(b.dy_scale, q);
    xc[q] = param(b.xc_scale, q);
    sh[q] = param(b.shift, q);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma GCC unroll 16
    for (int q = 0; q < K; ++q) {
      const int64_t at = q * W * E::size;
      const vec centred = (E::load_vec(x + r * x_row + at) - mh[q]) - ml[q];
      E::store_vec(dx + r * y_row + at, dy_sc[q] * E::load_vec(dy + r * d_row + at) + (xc[q] * centred + sh[q]));
    }
  }
}

// g: the run's first row; the others follow at the row step (both copies:
// stores through dx could otherwise alias them and force reloads).
template <class E>
void grad_rows_apply(const plan &p, const grad_segment g, const loop_dim step, int64_t n_rows,
                     const backward_params &b) {
  constexpr int64_t tile = kGradTileVectors * E::lanes;
  const char *const streams[3] = {g.x, g.dy, g.dx};
  const bool overfills = step.x_stride == step.d_stride && step.x_stride == step.y_stride &&
                         tile_walk_overfills_l1_set(streams, step.x_stride, kGradRowBlock, tile * E::size);
  const int64_t block = rows_per_block(n_rows, g.len, tile, p.x_from == x_source::memory, overfills);
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t nb = min_of(block, n_rows - r0);
    const char *xb = g.x + r0 * step.x_stride, *db = g.dy + r0 * step.d_stride;
    char *yb = g.dx + r0 * step.y_stride;
    const int64_t j = for_each_tile<kGradTileVectors, E::lanes>(g.len, [&](auto width, int64_t j0) {
      grad_rows_tile_apply<E, decltype(width)::count>(xb + j0 * E::size, db + j0 * E::size,
                                                      yb + j0 * E::size, step.x_stride, step.d_stride,
                                                      step.y_stride, nb, b, g.c0 + j0);
    });
    for (int64_t r = 0; j < g.len && r < nb; ++r)
      grad_apply_segment<E, true, false>(
          p, grad_segment{xb + r * step.x_stride + j * E::size, db + r * step.d_stride + j * E::size,
                          yb + r * step.y_stride + j * E::size, nullptr, g.c0 + j, g.len - j}, b);
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
