// The fused epilogue of the normalize walks, y = act(z + residual): the
// activations on scalars and vectors alike, and the two epilogue types a walk
// is compiled with (the only compile-time variant: the activation is a runtime
// switch per vector, a branch every vector takes the same way, which the
// memory-bound walks do not notice; one variant per activation would multiply
// the build time).
// Part of the kernel source (kernels/all.hpp lists the parts in order).

namespace bn_core {
namespace BN_ISA_NS {
namespace {

// ---- lanes of scalars and vectors ------------------------------------------------

// The lane type of a vector (a scalar is its own lane) and the signed integer
// type of the same width, so that one formula serves the scalar tails and the
// vectors.
template <class V> struct lanes_of { using lane = std::remove_reference_t<decltype(V{}[0])>; using bits = decltype(V{} < V{}); };
template <> struct lanes_of<float> { using lane = float; using bits = int32_t; };
template <> struct lanes_of<double> { using lane = double; using bits = int64_t; };

// v broadcast to V's lanes.
template <class V, class T>
inline V splat(T v) {
  return V{} + static_cast<typename lanes_of<V>::lane>(v);
}

// exp(x) to about 1 ulp: x = n·ln2 + r with |r| <= ln2/2 (ln2 in two parts,
// Cody and Waite), e^r by its Taylor polynomial (degree 7 in float, 13 in
// double: the first omitted term is under a tenth of an ulp there), and 2^n put
// into the exponent field. n is rounded with the shifter 1.5·2^mantissa bits,
// whose low bits then hold n: no float to integer conversion, which AVX2 lacks
// for doubles. Below the smallest normal result, 0; above the largest, the
// largest power reached (the callers only need e^x <= 1 or a huge value).
template <class V>
inline V exp_of(V x) {
  using T = typename lanes_of<V>::lane;
  using I = typename lanes_of<V>::bits;
  constexpr bool wide = sizeof(T) == 8;
  constexpr int mantissa = wide ? 52 : 23, bias = wide ? 1023 : 127;
  const T lowest = wide ? T(-708.0) : T(-87.0), highest = wide ? T(709.0) : T(88.0);
  const T shifter = T(1.5) * (wide ? T(4503599627370496.0) : T(8388608.0));
  const V low = splat<V>(lowest), high = splat<V>(highest);
  const V clamped = x < low ? low : (x > high ? high : x);
  const V shifted = clamped * splat<V>(1.4426950408889634) + splat<V>(shifter);
  const V n = shifted - splat<V>(shifter);
  V r = clamped - n * splat<V>(wide ? 0.6931471803691238 : 0.693359375);
  r = r - n * splat<V>(wide ? 1.9082149292705877e-10 : -2.12194440e-4);
  // Horner's rule on the coefficients 1/k!: one multiply-add per degree.
  constexpr int degree = wide ? 13 : 7;
  constexpr auto inverse_factorial = [](int k) {
    double f = 1.0;
    for (int i = 2; i <= k; ++i) f *= i;
    return 1.0 / f;
  };
  V poly = splat<V>(inverse_factorial(degree));
#pragma GCC unroll 16
  for (int k = degree - 1; k >= 0; --k) poly = poly * r + splat<V>(inverse_factorial(k));
  I shifted_bits, shifter_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const V shifter_v = splat<V>(shifter);
  std::memcpy(&shifter_bits, &shifter_v, sizeof shifter_bits);
  const I scale_bits = (shifted_bits - shifter_bits + I{} + bias) << mantissa;
  V scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const V result = poly * scale;
  return x < low ? V{} : result;
}

// sigmoid(t) = 1/(1 + e^−t), from e = e^−|t| <= 1 so that neither branch
// cancels or overflows: 1/(1 + e) for t >= 0, e/(1 + e) below.
template <class V>
inline V sigmoid_of(V t) {
  const V e = exp_of(t < V{} ? t : -t);
  const V one = splat<V>(1.0);
  return (t < V{} ? e : one) / (one + e);
}

// The tanh approximation of gelu, 0.5·z·(1 + tanh(u)) with
// u = √(2/π)·(z + 0.044715·z³), as z·sigmoid(2u): 0.5·(1 + tanh(u)) is
// sigmoid(2u), exact to the rounding of e^−2|u| in both tails (1 + tanh(u) for
// a very negative z would cancel).
template <class V>
inline V gelu_tanh_argument(V z) {
  return splat<V>(2 * 0.7978845608028654) * (z + splat<V>(0.044715) * z * z * z);
}

// The activation in compute-type values (T: float or double), read once per
// walk from epilogue_params.
template <class T>
struct activation {
  int32_t kind;
  T alpha, lo, hi;

  static constexpr bool has_slope = true;  // serves the gradient passes too
  static activation of(const epilogue_params &e) { return {e.activation, T(e.alpha), T(e.lo), T(e.hi)}; }

  // act(z); a NaN z stays NaN (the comparisons are false for it).
  template <class V>
  V operator()(V z) const {
    switch (kind) {
      case BN_ACT_RELU: return z < V{} ? V{} : z;
      case BN_ACT_RELU6: {
        const V six = splat<V>(6.0);
        return z < V{} ? V{} : (z > six ? six : z);
      }
      case BN_ACT_LEAKY_RELU: return z < V{} ? z * splat<V>(alpha) : z;
      case BN_ACT_CLIP: {
        const V l = splat<V>(lo), h = splat<V>(hi);
        return z < l ? l : (z > h ? h : z);
      }
      case BN_ACT_SILU: return z * sigmoid_of(z);
      case BN_ACT_GELU_TANH: return z * sigmoid_of(gelu_tanh_argument(z));
      default: return z;
    }
  }

  // act'(v), v the activation's input z, or its output for the piecewise-linear
  // activations whose output has z's sign and bounds (relu, relu6, clip, leaky
  // relu of a slope >= 0: the caller checks). At a kink, the slope PyTorch
  // takes: 0 for relu at 0, and clip's (and relu6's) interior is open. Their
  // bounds are named before the bitwise &, which has no short circuit to lose:
  // clang warns of a bitwise & whose operand calls a function.
  template <class V>
  V slope(V v) const {
    const V one = splat<V>(1.0), zero = V{};
    switch (kind) {
      case BN_ACT_RELU: return v > zero ? one : zero;
      case BN_ACT_RELU6: {
        const V six = splat<V>(6.0);
        return ((v > zero) & (v < six)) ? one : zero;
      }
      case BN_ACT_LEAKY_RELU: return v > zero ? one : splat<V>(alpha);
      case BN_ACT_CLIP: {
        const V l = splat<V>(lo), h = splat<V>(hi);
        return ((v > l) & (v < h)) ? one : zero;
      }
      case BN_ACT_SILU: {  // s·(1 + v·(1 − s))
        const V s = sigmoid_of(v);
        return s * (one + v * (one - s));
      }
      case BN_ACT_GELU_TANH: {  // s + v·s·(1 − s)·(2u)', s = sigmoid(2u)
        const V s = sigmoid_of(gelu_tanh_argument(v));
        const V du = splat<V>(2 * 0.7978845608028654) * (one + splat<V>(3 * 0.044715) * v * v);
        return s + v * s * (one - s) * du;
      }
      default: return one;
    }
  }
};

// The piecewise-linear activations (identity, relu, relu6, clip, leaky relu of
// a slope <= 1) as one formula without branches: the larger of z and
// negative·z (z's negative side scaled by a slope <= 1), clamped to [lo, hi]
// (no bound: an infinity). act(z) bit for bit, NaN and signed zeros included,
// in four vector instructions: walked per vector, a switch on the activation
// would cost more than the normalization itself (its branches and the
// registers its other cases need).
template <class T>
struct clamp_activation {
  T negative, lo, hi;

  static constexpr bool has_slope = false;  // forward walks only
  static clamp_activation of(const epilogue_params &e) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    switch (e.activation) {
      case BN_ACT_RELU: return {T(1), T(0), inf};
      case BN_ACT_RELU6: return {T(1), T(0), T(6)};
      case BN_ACT_LEAKY_RELU: return {T(e.alpha), -inf, inf};
      case BN_ACT_CLIP: return {T(1), T(e.lo), T(e.hi)};
      default: return {T(1), -inf, inf};
    }
  }

  template <class V>
  V operator()(V z) const {
    const V scaled_z = z * splat<V>(negative);
    const V scaled = scaled_z > z ? scaled_z : z;
    const V above = scaled < splat<V>(lo) ? splat<V>(lo) : scaled;
    return above > splat<V>(hi) ? splat<V>(hi) : above;
  }
};

// ---- the variants of a normalize walk --------------------------------------------

// Plain: the normalized value as it is. Every member a walk uses is a constant
// or returns its argument, so the walk compiles to the code it had before
// epilogues existed.
struct no_epilogue {
  static constexpr int64_t row = 0, stride = 0;
  static constexpr const char *residual = nullptr;
  static constexpr bool has_residual = false;
  no_epilogue at(int64_t) const { return *this; }
  no_epilogue first_stream_only() const { return *this; }
  template <class E, class V>
  V apply(V z, int64_t) const { return z; }
};

// With an epilogue: z + the residual at the same position (at: its byte
// offset from `residual`, which the walk moves like x), then the activation.
// In a gradient pass the second stream is the incoming gradient dy instead,
// and the value is dy·act'(z) (epilogue_params::gradient). row and stride are
// the second stream's row step and inner stride in bytes. Act: activation<T>,
// any activation and the gradient pass, or clamp_activation<T>, the forward
// of the piecewise-linear ones (a walk of its own, normalize_piecewise_entry).
template <class T, template <class> class Act>
struct with_epilogue {
  const char *residual;  // the second stream (dy in a gradient pass); null: none
  int64_t row, stride;
  Act<T> act;
  bool has_residual, gradient;

  with_epilogue(const plan &p, const char *at, int64_t row_step)
      : residual(at), row(row_step), stride(p.inner.d_stride), act(Act<T>::of(p.epilogue)),
        has_residual(p.residual != nullptr), gradient(p.epilogue.gradient) {}

  with_epilogue at(int64_t bytes) const {
    with_epilogue moved = *this;
    if (residual) moved.residual += bytes;
    return moved;
  }

  // This epilogue where it has no second stream, as a copy whose null residual
  // the compiler sees: a loop over it tests nothing per vector.
  with_epilogue first_stream_only() const {
    with_epilogue alone = *this;
    alone.residual = nullptr;
    return alone;
  }

  template <class E, class V>
  V apply(V z, int64_t at) const {
    if (!residual) return act(z);
    V second;
    if constexpr (std::is_same_v<V, typename E::vec>) second = E::load_vec(residual + at);
    else second = E::load(residual + at);
    if constexpr (Act<T>::has_slope) {
      if (gradient) return second * act.slope(z);
    }
    return act(z + second);
  }
};

// The epilogue of a walk whose residual starts `elements` inner steps into the
// line at residual offset d_off, its rows `row_step` bytes apart.
template <class Epi>
inline Epi epilogue_at(const plan &p, int64_t d_off, int64_t elements, int64_t row_step) {
  if constexpr (std::is_same_v<Epi, no_epilogue>) {
    return Epi{};
  } else {
    const char *r = p.residual ? p.residual + d_off + elements * p.inner.d_stride : nullptr;
    return Epi(p, r, row_step);
  }
}

}  // namespace
}  // namespace BN_ISA_NS
}  // namespace bn_core
