// Backward, any layout: the operands of a line segment, Σdy and Σdy·x̂ of a
// segment (contiguous plane, strided, masked) and dx of a segment.
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- backward --------------------------------------------------------------------

// The operands of one line segment.
struct grad_segment {
  const char *x;
  const char *dy;
  char *dx;            // null for the sums pass
  const uint8_t *m;    // null when unmasked
  int64_t c0;          // first channel (parameter index)
  int64_t len;
};

inline grad_segment grad_segment_at(const plan &p, const line_offsets &cur, segment seg) {
  const loop_dim &in = p.inner;
  return grad_segment{p.x + cur.x_off + seg.begin * in.x_stride,
                      p.dy + cur.d_off + seg.begin * in.d_stride,
                      p.y ? p.y + cur.y_off + seg.begin * in.y_stride : nullptr,
                      p.mask ? p.mask + cur.m_off + seg.begin * in.m_stride : nullptr,
                      cur.p_off + (p.inner_is_channel ? seg.begin * in.p_stride : 0), seg.len};
}

// Calls f(segment) over [item_begin, item_end); a folded line is handed over
// one super row at a time with c0 = 0, so parameter index j is its position.
template <class F>
void for_each_grad_segment(const plan &p, int64_t item_begin, int64_t item_end, F &&f) {
  const loop_dim &in = p.inner;
  for_each_item(p, item_begin, item_end, [&](const line_offsets &cur, segment seg) {
    grad_segment g = grad_segment_at(p, cur, seg);
    if (!p.period) {
      f(g);
      return;
    }
    for (int64_t k = 0; k < seg.len; k += p.fold_len) {
      f(grad_segment{g.x + k * in.x_stride, g.dy + k * in.d_stride,
                     g.dx ? g.dx + k * in.y_stride : nullptr, g.m ? g.m + k * in.m_stride : nullptr,
                     0, min_of(p.fold_len, seg.len - k)});
    }
  });
}

// Σdy and Σdy·x̂ of one channel's contiguous unmasked run, in blocks of
// compute-type vector partial sums folded into float64 (as plane moments).
template <class E>
void plane_grad_sums_contiguous(const char *x, const char *dy, int64_t len, typename E::acc mh,
                                typename E::acc ml, typename E::acc invstd, double &sum_dy,
                                double &sum_dy_xhat) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes, block = plane_block<E>();
  auto xhat = [&](int64_t at) { return ((E::load_vec(x + at * E::size) - mh) - ml) * invstd; };
  int64_t i = 0;
  while (len >= W && i < len) {
    const int64_t end = min_of(len, i + block);
    vec a0 = {}, a1 = {}, b0 = {}, b1 = {};
    for (; i + 2 * W <= end; i += 2 * W) {
      const vec d0 = E::load_vec(dy + i * E::size), d1 = E::load_vec(dy + (i + W) * E::size);
      a0 += d0; b0 += d0 * xhat(i);
      a1 += d1; b1 += d1 * xhat(i + W);
    }
    // One more vector, then the one ending at the run's end (its lanes already
    // summed dropped): a scalar tail is up to W - 1 dependent float64 adds, a
    // large share of a short plane (14x14 = 12 vectors + 4).
    if (i + W <= end) {
      const vec d = E::load_vec(dy + i * E::size);
      a0 += d; b0 += d * xhat(i);
      i += W;
    }
    if (i < end && end == len) {
      const vec d = E::load_vec(dy + (len - W) * E::size);
      a1 += last_lanes(d, len - i);
      b1 += last_lanes(d * xhat(len - W), len - i);
      i = len;
    }
    sum_dy += lane_sum(a0 + a1);
    sum_dy_xhat += lane_sum(b0 + b1);
  }
  for (; i < len; ++i) {
    const double d = E::load(dy + i * E::size);
    sum_dy += d;
    sum_dy_xhat += d * static_cast<double>(((E::load(x + i * E::size) - mh) - ml) * invstd);
  }
}

template <class E, bool Contig, bool Masked>
void grad_sums_segment(const plan &p, const grad_segment &g, const backward_params &b,
                       const backward_scratch &s) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(b.mean_hi);
  const acc *__restrict mean_lo = static_cast<const acc *>(b.mean_lo);
  const acc *__restrict invstd = static_cast<const acc *>(b.invstd);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ds = Contig ? E::size : p.inner.d_stride;
  const int64_t ms = p.inner.m_stride;
  const char *x = g.x, *dy = g.dy;
  const uint8_t *m = g.m;
  const int64_t len = g.len;
  auto used = [&](int64_t i) { return Masked ? double(m[i * ms] != 0) : 1.0; };
  if (!p.inner_is_channel) {
    const int64_t c = g.c0;
    if (Contig && !Masked) {
      plane_grad_sums_contiguous<E>(x, dy, len, mean_hi[c], mean_lo[c], invstd[c],
                                    s.sum_dy[c], s.sum_dy_xhat[c]);
      return;
    }
    double dy_total = 0, dy_xhat_total = 0, used_total = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double d = E::load(dy + i * ds);
      dy_total += d;
      dy_xhat_total += d * static_cast<double>(((E::load(x + i * xs) - mean_hi[c]) - mean_lo[c]) * invstd[c]);
      if (Masked) used_total += used(i);
    }
    s.sum_dy[c] += dy_total;
    s.sum_dy_xhat[c] += dy_xhat_total;
    if (Masked) s.count[c] += used_total;
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  double *__restrict sum_dy = s.sum_dy, *__restrict sum_dy_xhat = s.sum_dy_xhat;
  double *__restrict count = s.count;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = g.c0 + j * ps;
    const acc d = E::load(dy + j * ds);
    const acc xhat = ((E::load(x + j * xs) - mean_hi[c]) - mean_lo[c]) * invstd[c];
    sum_dy[c] += static_cast<double>(d);
    sum_dy_xhat[c] += static_cast<double>(d) * static_cast<double>(xhat);
    if (Masked) count[c] += used(j);
  }
}

// One channel's coefficients: dx = dy_scale·dy + (xc_scale·(x − mean) + shift),
// the mean in two parts (hi + lo).
template <class E>
struct plane_grad_coefficients {
  typename E::acc mean_hi, mean_lo, dy_scale, xc_scale, shift;

  // dx of x and dy, one value or a vector of them.
  template <class V>
  [[gnu::always_inline]] V dx(V x, V dy) const {
    return dy_scale * dy + (xc_scale * ((x - mean_hi) - mean_lo) + shift);
  }
};

// dx of one channel's contiguous unmasked run, up to its last whole vector;
// returns where the caller's element loop takes over. Explicit vectors: the
// autovectorized loop's set-up (alignment peeling, trip-count checks) on every
// plane is about as long as a short plane's (14x14) work. The vector loop once
// per (prefetching or not, streaming or not). ahead > 0: also prefetch x's and
// dy's lines that many bytes on (a chunked backward's next chunk, fetched while
// this one runs from the caches). Streamed: plain stores up to dx's first
// aligned vector, since a streaming store must be aligned; a dx off the element
// size never aligns and takes plain stores throughout. k by value: a store
// through dx might write a referenced one, reloaded then for every vector.
template <class E>
[[gnu::always_inline]] inline int64_t grad_apply_plane(const char *x, const char *dy, char *dx, int64_t len,
                                                      const plane_grad_coefficients<E> k, int64_t ahead,
                                                      bool stream) {
  constexpr int64_t align = E::lanes * E::size;
  const uintptr_t dx_at = reinterpret_cast<uintptr_t>(dx);
  stream = stream && dx_at % E::size == 0;
  int64_t i = 0;
  for (; stream && i < len && (dx_at + i * E::size) % align; ++i)
    E::store(dx + i * E::size, k.dx(E::load(x + i * E::size), E::load(dy + i * E::size)));
  const int64_t last_vector = len - E::lanes;
  auto vectors = [&](auto prefetching, auto streaming) {
    for (; i <= last_vector; i += E::lanes) {
      if constexpr (decltype(prefetching)::value) {
        __builtin_prefetch(x + i * E::size + ahead, 0, 2);
        __builtin_prefetch(dy + i * E::size + ahead, 0, 2);
      }
      E::template store_vec<decltype(streaming)::value>(
          dx + i * E::size, k.dx(E::load_vec(x + i * E::size), E::load_vec(dy + i * E::size)));
    }
  };
  auto stores = [&](auto prefetching) {
    stream ? vectors(prefetching, std::true_type{}) : vectors(prefetching, std::false_type{});
  };
  ahead ? stores(std::true_type{}) : stores(std::false_type{});
  return i;
}

template <class E, bool Contig, bool Masked>
void grad_apply_segment(const plan &p, const grad_segment &g, const backward_params &b) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(b.mean_hi);
  const acc *__restrict mean_lo = static_cast<const acc *>(b.mean_lo);
  const acc *__restrict dy_scale = static_cast<const acc *>(b.dy_scale);
  const acc *__restrict xc_scale = static_cast<const acc *>(b.xc_scale);
  const acc *__restrict shift = static_cast<const acc *>(b.shift);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ds = Contig ? E::size : p.inner.d_stride;
  const int64_t ys = Contig ? E::size : p.inner.y_stride;
  const int64_t ms = p.inner.m_stride;
  // Locals, not g's fields: a store through dx could otherwise alias g.
  const char *x = g.x, *dy = g.dy;
  char *dx = g.dx;
  const uint8_t *m = g.m;
  const int64_t len = g.len, c0 = g.c0;
  // The statistics' term only where the mask uses the position: a select, not a
  // product with the mask's 0, which would turn a term that overflowed (a huge
  // coefficient times a far outlier) into NaN where dx is just γ·s·dy.
  auto where_used = [&](int64_t i, acc term) { return !Masked || m[i * ms] ? term : acc(0); };
  if (!p.inner_is_channel) {
    const acc mh = mean_hi[c0], ml = mean_lo[c0], dy_sc = dy_scale[c0], xc = xc_scale[c0], sh = shift[c0];
    int64_t i = 0;
    if constexpr (Contig && !Masked) {
      i = grad_apply_plane<E>(x, dy, dx, len, {mh, ml, dy_sc, xc, sh}, p.prefetch_ahead, p.stream_y);
    }
    for (; i < len; ++i) {
      const acc centred = (E::load(x + i * xs) - mh) - ml;
      E::store(dx + i * ys, dy_sc * E::load(dy + i * ds) + where_used(i, xc * centred + sh));
    }
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = c0 + j * ps;
    const acc centred = (E::load(x + j * xs) - mean_hi[c]) - mean_lo[c];
    E::store(dx + j * ys, dy_scale[c] * E::load(dy + j * ds) + where_used(j, xc_scale[c] * centred + shift[c]));
  }
}

// Contig: x, dy (and dx) unit-stride, and unit channel stride for rows x C.
template <class E>
bool grad_contiguous(const plan &p) {
  const loop_dim &in = p.inner;
  return in.x_stride == E::size && in.d_stride == E::size &&
         (!p.y || in.y_stride == E::size) && (!p.inner_is_channel || in.p_stride == 1);
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
