// Normalize one line segment: a channels-first plane (one channel's contiguous
// run), or any segment element by element (strided, or channels-last rows that
// take no tile).
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- normalize -------------------------------------------------------------------

// One channel's contiguous run: plain stores up to a vector-aligned y, then
// vectors (streaming with Stream). A vector store that straddles two cache
// lines (NumPy's large arrays start 16 bytes into a page) is two stores to the
// cache, and a streaming store must be aligned (bench/DESIGN.md,
// 'kernels/normalize_channels_first.hpp'). ahead > 0: also prefetch x's lines
// that many bytes on (a training forward's next chunk, fetched while this one
// runs from the caches). epi: the epilogue (a contiguous residual). Flattened:
// at the epilogue walks' -O2 the inliner leaves the epilogue's apply a call per
// vector in each copy of the vector loop.
template <class E, bool Stream, class Epi>
[[gnu::flatten]] void normalize_plane(const char *x, char *y, int64_t len, typename E::acc mh, typename E::acc sc,
                     typename E::acc b, int64_t ahead, const Epi &epi) {
  using vec = typename E::vec;
  constexpr int64_t W = E::lanes, align = W * E::size;
  auto vector_with = [&](const auto &e, int64_t at) {
    return e.template apply<E>(normalized<vec>(load_whole_vec<E>(x + at * E::size), mh, sc, b), at * E::size);
  };
  auto vector_at = [&](int64_t at) { return vector_with(epi, at); };
  auto value_at = [&](int64_t at) {
    return epi.template apply<E>(normalized(E::load(x + at * E::size), mh, sc, b), at * E::size);
  };
  const uintptr_t y_at = reinterpret_cast<uintptr_t>(y);
  // Out of place (y never partly overlaps x), the elements before y's first
  // aligned vector and after its last go in one unaligned vector each, which
  // store some values twice: two vector steps instead of up to 2(W - 1) scalar
  // load-convert-store steps, which short planes (7x7, 14x14) pay on every
  // plane. In place that would normalize them twice. Streamed, a plain store
  // first reads its line from memory, the read streaming avoids, and the
  // line's streaming stores must then evict it (bench/DESIGN.md). A residual
  // that is y would be added twice too.
  const bool overlap_stores = !Stream && x != y && len >= W && y_at % E::size == 0 && !epi.has_residual;
  // A y off the element size never aligns: streamed, it is all plain stores.
  const int64_t peel_end = Stream || y_at % E::size == 0 ? len : 0;
  int64_t i = 0;
  if (overlap_stores && y_at % align) {
    E::template store_vec<false>(y, vector_at(0));
    i = static_cast<int64_t>(align - y_at % align) / E::size;
  }
  for (; i < peel_end && (y_at + i * E::size) % align; ++i)
    E::store(y + i * E::size, value_at(i));
  // The vector loop once per combination of the plane's run-time choices (the
  // epilogue's second stream or none, prefetching or not): as tests in the
  // loop, their branches were a third of its instructions. The epilogue by
  // value: the stores through char pointers might write a referenced one, whose
  // members would then be reloaded for every vector.
  auto vectors = [&](const auto e, auto prefetching) {
    for (; i + W <= len; i += W) {
      if constexpr (decltype(prefetching)::value) __builtin_prefetch(x + i * E::size + ahead, 0, 2);
      E::template store_vec<Stream>(y + i * E::size, vector_with(e, i));
    }
  };
  const auto alone = epi.first_stream_only();
  if (epi.residual) ahead ? vectors(epi, std::true_type{}) : vectors(epi, std::false_type{});
  else ahead ? vectors(alone, std::true_type{}) : vectors(alone, std::false_type{});
  if (overlap_stores && i < len) {
    E::template store_vec<false>(y + (len - W) * E::size, vector_at(len - W));
    i = len;
  }
  for (; i < len; ++i) E::store(y + i * E::size, value_at(i));
}

// One line segment. Contig: x and y (and a residual) unit-stride (and, for
// rows x C, unit channel stride), so the compiler sees plain arrays.
template <class E, bool Contig, class Epi>
void normalize_segment(const plan &p, const char *x, char *y, int64_t c0, int64_t len,
                       const affine_params &a, const Epi &epi) {
  using acc = typename E::acc;
  const acc *__restrict mean_hi = static_cast<const acc *>(a.mean_hi);
  const acc *__restrict scale = static_cast<const acc *>(a.scale);
  const acc *__restrict bias = static_cast<const acc *>(a.bias);
  const int64_t xs = Contig ? E::size : p.inner.x_stride;
  const int64_t ys = Contig ? E::size : p.inner.y_stride;
  if (!p.inner_is_channel) {
    const acc mh = mean_hi[c0], sc = scale[c0], b = bias[c0];
    if (Contig && p.stream_y) normalize_plane<E, true>(x, y, len, mh, sc, b, p.prefetch_ahead, epi);
    else if (Contig) normalize_plane<E, false>(x, y, len, mh, sc, b, p.prefetch_ahead, epi);
    else
      for (int64_t i = 0; i < len; ++i)
        E::store(y + i * ys, epi.template apply<E>(normalized(E::load(x + i * xs), mh, sc, b), i * epi.stride));
    return;
  }
  const int64_t ps = Contig ? 1 : p.inner.p_stride;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = c0 + j * ps;
    E::store(y + j * ys,
             epi.template apply<E>(normalized(E::load(x + j * xs), mean_hi[c], scale[c], bias[c]), j * epi.stride));
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
