/* C99 tests of the bn_core C API. Every result is compared with a
 * double-precision loop written here (odometer over the tensor's own strides,
 * two-pass moments, the backward's formulas with compensated sums), on many
 * layouts, strides, masks and all four dtypes, on every SIMD level this CPU has
 * and on 1 and 2 threads: moments, normalization, the training forward (also in
 * chunks of channels, under small cache sizes), the backward, and the
 * distributed phases on the batch cut into shards (one empty). Then hand-derived
 * values, and every error status, each with a non-empty bn_last_error(). */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"

/* A failing call must return `expected` and leave a message. */
#define CHECK_STATUS(call, expected, what)                                                   \
  do {                                                                                       \
    const bn_status got_ = (call);                                                           \
    CHECK(got_ == (expected), "%s: status %d, expected %d (%s)", what, (int)got_,            \
          (int)(expected), bn_last_error());                                                 \
    CHECK(strlen(bn_last_error()) > 0, "%s: empty bn_last_error()", what);                   \
  } while (0)

static double uniform(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return (double)(*state >> 8) / (double)(1u << 24);
}

/* ---- 16-bit formats, written here so that the reference does not use the library's ---- */

static double f16_to_double(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  double v;
  if (exponent == 0) v = ldexp(fraction, -24); /* subnormal */
  else if (exponent == 31) v = fraction ? NAN : INFINITY;
  else v = ldexp(fraction + 1024, exponent - 25);
  return (h & 0x8000) ? -v : v;
}

/* Round to nearest even (nearbyint in the default rounding mode). */
static uint16_t double_to_f16(double d) {
  const uint16_t sign = signbit(d) ? 0x8000 : 0;
  const double a = fabs(d);
  if (a < ldexp(1, -14)) return sign | (uint16_t)nearbyint(a * ldexp(1, 24)); /* 1024 is 2^-14 */
  int e;
  frexp(a, &e); /* a = m 2^e, m in [0.5, 1) */
  --e;
  double mantissa = nearbyint(ldexp(a, 10 - e)); /* in [1024, 2048] */
  if (mantissa == 2048) {
    mantissa = 1024;
    ++e;
  }
  if (e + 15 >= 31) return sign | 0x7c00;
  return sign | (uint16_t)((e + 15) << 10) | (uint16_t)(mantissa - 1024);
}

static double bf16_to_double(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Inputs only (rounds twice: double -> float -> bfloat16). */
static uint16_t double_to_bf16(double d) {
  const float f = (float)d;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static int64_t element_size(bn_dtype dt) { return dt == BN_FLOAT64 ? 8 : dt == BN_FLOAT32 ? 4 : 2; }

static double load(const char *p, bn_dtype dt) {
  switch (dt) {
    case BN_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case BN_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case BN_FLOAT16: { uint16_t v; memcpy(&v, p, 2); return f16_to_double(v); }
    default: { uint16_t v; memcpy(&v, p, 2); return bf16_to_double(v); }
  }
}

static void store(char *p, bn_dtype dt, double value) {
  switch (dt) {
    case BN_FLOAT32: { const float v = (float)value; memcpy(p, &v, 4); break; }
    case BN_FLOAT64: memcpy(p, &value, 8); break;
    case BN_FLOAT16: { const uint16_t v = double_to_f16(value); memcpy(p, &v, 2); break; }
    default: { const uint16_t v = double_to_bf16(value); memcpy(p, &v, 2); break; }
  }
}

static void test_formats(void) {
  /* Hand-derived binary16 and bfloat16 encodings. */
  CHECK(double_to_f16(1.0) == 0x3c00 && double_to_f16(-2.0) == 0xc000, "f16 1, -2");
  CHECK(double_to_f16(65504.0) == 0x7bff && double_to_f16(65520.0) == 0x7c00, "f16 max, overflow");
  CHECK(double_to_f16(ldexp(1, -24)) == 0x0001 && double_to_f16(ldexp(1, -14)) == 0x0400, "f16 tiny");
  CHECK(double_to_f16(1.0 + ldexp(1, -11)) == 0x3c00, "f16 tie to even, down");
  CHECK(double_to_f16(1.0 + 3 * ldexp(1, -11)) == 0x3c02, "f16 tie to even, up");
  CHECK(double_to_f16(1.0 / 3.0) == 0x3555, "f16 1/3");
  CHECK(f16_to_double(0x3555) == 0.333251953125 && f16_to_double(0x0001) == ldexp(1, -24), "f16 decode");
  CHECK(double_to_bf16(1.0) == 0x3f80 && double_to_bf16(-0.5) == 0xbf00, "bf16 1, -0.5");
  CHECK(double_to_bf16(1.0 + ldexp(1, -8)) == 0x3f80 && double_to_bf16(1.0 + 3 * ldexp(1, -8)) == 0x3f82,
        "bf16 ties to even");
  CHECK(bf16_to_double(0x4049) == 3.140625, "bf16 decode");
}

/* ---- strided buffers ---------------------------------------------------------- */

/* A tensor over its own allocation: `data` points at element index 0, which for
 * negative strides is not the allocation's start. */
typedef struct {
  char *allocation;
  bn_tensor t;
  int64_t shape[BN_MAX_RANK];
  int64_t strides[BN_MAX_RANK];
  int64_t span; /* bytes in the allocation */
} buffer;

static void buffer_make(buffer *b, bn_dtype dt, int32_t rank, const int64_t *shape,
                        const int64_t *element_strides) {
  const int64_t es = dt == BN_UINT8 ? 1 : element_size(dt);
  int64_t lo = 0, hi = 0;
  for (int32_t i = 0; i < rank; ++i) {
    b->shape[i] = shape[i];
    b->strides[i] = element_strides[i] * es;
    if (shape[i] == 0) continue;
    const int64_t reach = (shape[i] - 1) * element_strides[i];
    if (reach < 0) lo += reach;
    else hi += reach;
  }
  b->span = (hi - lo + 1) * es;
  b->allocation = malloc((size_t)b->span);
  b->t.data = b->allocation - lo * es;
  b->t.dtype = dt;
  b->t.rank = rank;
  b->t.shape = b->shape;
  b->t.strides = b->strides;
}

static void contiguous_strides(int32_t rank, const int64_t *shape, int64_t *element_strides) {
  int64_t s = 1;
  for (int32_t i = rank - 1; i >= 0; --i) {
    element_strides[i] = s;
    s *= shape[i];
  }
}

/* Byte offset of the element at multi-index idx; size-1 (broadcast) dims add nothing. */
static int64_t offset_of(const bn_tensor *t, const int64_t *idx) {
  int64_t off = 0;
  for (int32_t i = 0; i < t->rank; ++i)
    if (t->shape[i] != 1) off += idx[i] * t->strides[i];
  return off;
}

/* Advances a row-major multi-index; returns 0 after the last one. */
static int next_index(int32_t rank, const int64_t *shape, int64_t *idx) {
  for (int32_t i = rank - 1; i >= 0; --i) {
    if (++idx[i] < shape[i]) return 1;
    idx[i] = 0;
  }
  return 0;
}

static int64_t element_count(int32_t rank, const int64_t *shape) {
  int64_t n = 1;
  for (int32_t i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

/* Channel index: row-major over the channel axes in increasing axis order. */
static int64_t channel_of(int32_t rank, const int64_t *shape, const int *is_channel, const int64_t *idx) {
  int64_t c = 0;
  for (int32_t i = 0; i < rank; ++i)
    if (is_channel[i]) c = c * shape[i] + idx[i];
  return c;
}

/* ---- the double-precision reference ------------------------------------------- */

typedef struct {
  int64_t channels;
  int is_channel[BN_MAX_RANK];
  double *mean, *variance, *count;
} reference;

/* Corrected two-pass (Chan, Golub & LeVeque): a first mean, then the sums of
 * deviations from it, which also correct the mean's rounding. */
static void reference_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                              const bn_tensor *mask, reference *r) {
  memset(r->is_channel, 0, sizeof r->is_channel);
  r->channels = 1;
  for (int32_t k = 0; k < n_axes; ++k) {
    const int32_t axis = axes[k] < 0 ? axes[k] + x->rank : axes[k];
    r->is_channel[axis] = 1;
    r->channels *= x->shape[axis];
  }
  r->mean = calloc((size_t)r->channels, sizeof(double));
  r->variance = calloc((size_t)r->channels, sizeof(double));
  r->count = calloc((size_t)r->channels, sizeof(double));
  double *deviation_sum = calloc((size_t)r->channels, sizeof(double));
  if (element_count(x->rank, x->shape) > 0) {
    for (int pass = 0; pass < 2; ++pass) {
      int64_t idx[BN_MAX_RANK] = {0};
      do {
        if (mask && !((const uint8_t *)mask->data)[offset_of(mask, idx)]) continue;
        const int64_t c = channel_of(x->rank, x->shape, r->is_channel, idx);
        const double v = load((const char *)x->data + offset_of(x, idx), x->dtype);
        if (pass == 0) {
          r->mean[c] += v;
          r->count[c] += 1;
        } else {
          deviation_sum[c] += v - r->mean[c];
          r->variance[c] += (v - r->mean[c]) * (v - r->mean[c]);
        }
      } while (next_index(x->rank, x->shape, idx));
      for (int64_t c = 0; c < r->channels; ++c) {
        const double n = r->count[c];
        if (n == 0) continue;
        if (pass == 0) {
          r->mean[c] /= n;
        } else {
          r->variance[c] = (r->variance[c] - deviation_sum[c] * deviation_sum[c] / n) / n;
          r->mean[c] += deviation_sum[c] / n;
        }
      }
    }
  }
  free(deviation_sum);
}

static void reference_free(reference *r) {
  free(r->mean);
  free(r->variance);
  free(r->count);
}

/* Bounds. The statistics of <= 32-bit data are summed in float32 blocks
 * (shifted by the channel's mean) and merged in float64; outputs are rounded
 * once to their format (2^-11 relative for float16, 2^-8 for bfloat16). */
static double stat_tolerance(bn_dtype dt) { return dt == BN_FLOAT64 ? 1e-12 : 2e-6; }

static double output_tolerance(bn_dtype dt) {
  switch (dt) {
    case BN_FLOAT64: return 1e-12;
    case BN_FLOAT32: return 1e-6;
    case BN_FLOAT16: return 1e-3;
    default: return 8e-3;
  }
}

/* finalized_shift: the shift K when the moments come from bn_moments_finalize
 * (NULL otherwise), whose S2 - S1^2/N cancels N (mean - K)^2: a few roundings
 * of (mean - K)^2 more in the variance. */
static int check_moments(const char *what, const reference *r, bn_dtype dt, const double *mean,
                         const double *variance, const double *count, const double *finalized_shift) {
  const double tol = stat_tolerance(dt);
  int ok = 1;
  for (int64_t c = 0; c < r->channels; ++c) {
    const double sd = sqrt(r->variance[c]);
    /* Errors relative to the spread, plus the float64 merge's floor of a few
     * roundings of the mean (what remains at mean/std = 1e4 in float64). */
    const double merge_floor = 8 * DBL_EPSILON * fabs(r->mean[c]);
    const double offset = finalized_shift ? r->mean[c] - finalized_shift[c] : 0.0;
    const double cancel_floor = 8 * DBL_EPSILON * offset * offset;
    const double mean_err = fabs(mean[c] - r->mean[c]), var_err = fabs(variance[c] - r->variance[c]);
    if (mean_err > tol * sd + merge_floor || var_err > tol * r->variance[c] + merge_floor * sd + cancel_floor ||
        (count && count[c] != r->count[c])) {
      ok = 0;
      CHECK(0, "%s: channel %" PRId64 ": mean %.17g var %.17g count %g; expected %.17g %.17g %g", what, c,
            mean[c], variance[c], count ? count[c] : -1.0, r->mean[c], r->variance[c], r->count[c]);
      break;
    }
  }
  return ok;
}

/* y against (x - mean) * gamma / sqrt(variance + eps) + beta from x_ref, a pristine copy of x. */
static void check_output(const char *what, const bn_tensor *x_ref, const bn_tensor *y, const reference *r,
                         const double *mean, const double *variance, const double *gamma,
                         const double *beta, double epsilon) {
  const double tol = output_tolerance(y->dtype);
  int64_t idx[BN_MAX_RANK] = {0};
  ++checks;
  if (element_count(x_ref->rank, x_ref->shape) == 0) return;
  do {
    const int64_t c = channel_of(x_ref->rank, x_ref->shape, r->is_channel, idx);
    const double x = load((const char *)x_ref->data + offset_of(x_ref, idx), x_ref->dtype);
    const double expected = (x - mean[c]) * (gamma ? gamma[c] : 1.0) / sqrt(variance[c] + epsilon) +
                            (beta ? beta[c] : 0.0);
    const double got = load((const char *)y->data + offset_of(y, idx), y->dtype);
    if (!(fabs(got - expected) <= tol * (1.0 + fabs(expected)))) {
      ++failures;
      fprintf(stderr, "FAIL %s: y at channel %" PRId64 " is %.17g; expected %.17g\n", what, c, got, expected);
      return;
    }
  } while (next_index(x_ref->rank, x_ref->shape, idx));
}

/* The backward in float64 (bn_core.h's formulas) from pristine dy and x, with the
 * reference statistics, for gamma = 1 (the checks scale by gamma). */
typedef struct {
  double *sum_dy, *sum_dy_xhat;   /* per channel, over every position */
  double *abs_dy, *abs_dy_xhat;   /* Σ|dy|, Σ|dy·x̂|: the scale of the sums' rounding */
  double *dx_training, *dx_fixed; /* per element, row-major over the shape */
  double *dx_scale;               /* per element: the magnitude of the terms dx_training adds up */
} reference_grad;

/* Neumaier's compensated sum: *sum + *carry is the sum of everything added to
 * within a rounding or two, whatever the count (a plain float64 loop over 40000
 * values strays further than the library's blocked sums). */
static void add_compensated(double *sum, double *carry, double v) {
  const double t = *sum + v;
  *carry += fabs(*sum) >= fabs(v) ? (*sum - t) + v : (v - t) + *sum;
  *sum = t;
}

static void reference_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *mask,
                               const reference *r, double epsilon, reference_grad *g) {
  const int64_t elements = element_count(x->rank, x->shape);
  /* One spare entry each: never calloc(0). */
  g->sum_dy = calloc((size_t)r->channels + 1, sizeof(double));
  g->sum_dy_xhat = calloc((size_t)r->channels + 1, sizeof(double));
  g->abs_dy = calloc((size_t)r->channels + 1, sizeof(double));
  g->abs_dy_xhat = calloc((size_t)r->channels + 1, sizeof(double));
  g->dx_training = calloc((size_t)elements + 1, sizeof(double));
  g->dx_fixed = calloc((size_t)elements + 1, sizeof(double));
  g->dx_scale = calloc((size_t)elements + 1, sizeof(double));
  double *carry_dy = calloc((size_t)r->channels + 1, sizeof(double));
  double *carry_dy_xhat = calloc((size_t)r->channels + 1, sizeof(double));
  for (int pass = 0; pass < 2 && elements > 0; ++pass) {
    int64_t idx[BN_MAX_RANK] = {0}, k = 0;
    do {
      const int64_t c = channel_of(x->rank, x->shape, r->is_channel, idx);
      const double s = 1.0 / sqrt(r->variance[c] + epsilon);
      const double xhat = (load((const char *)x->data + offset_of(x, idx), x->dtype) - r->mean[c]) * s;
      const double d = load((const char *)dy->data + offset_of(dy, idx), dy->dtype);
      if (pass == 0) {
        add_compensated(&g->sum_dy[c], &carry_dy[c], d);
        add_compensated(&g->sum_dy_xhat[c], &carry_dy_xhat[c], d * xhat);
        g->abs_dy[c] += fabs(d);
        g->abs_dy_xhat[c] += fabs(d * xhat);
      } else {
        /* w / N, and 0 for a channel with no used position (w = 0 there). */
        const int used = !mask || ((const uint8_t *)mask->data)[offset_of(mask, idx)];
        const double w = used && r->count[c] > 0 ? 1.0 / r->count[c] : 0.0;
        g->dx_training[k] = s * (d - w * (g->sum_dy[c] + xhat * g->sum_dy_xhat[c]));
        g->dx_scale[k] = s * (fabs(d) + w * (g->abs_dy[c] + fabs(xhat) * g->abs_dy_xhat[c]));
        g->dx_fixed[k] = s * d;
      }
      ++k;
    } while (next_index(x->rank, x->shape, idx));
    if (pass == 0)
      for (int64_t c = 0; c < r->channels; ++c) {
        g->sum_dy[c] += carry_dy[c];
        g->sum_dy_xhat[c] += carry_dy_xhat[c];
      }
  }
  free(carry_dy);
  free(carry_dy_xhat);
}

static void reference_grad_free(reference_grad *g) {
  free(g->sum_dy);
  free(g->sum_dy_xhat);
  free(g->abs_dy);
  free(g->abs_dy_xhat);
  free(g->dx_training);
  free(g->dx_fixed);
  free(g->dx_scale);
}

/* The sums of <= 32-bit data are float32 blocks of Σdy and Σdy·x̂ folded into
 * float64, like the moments: stat_tolerance of the sums of magnitudes. */
static void check_grad_sums(const char *what, const reference *r, const reference_grad *g, bn_dtype dt,
                            const double *sum_dy, const double *sum_dy_xhat, const double *count) {
  const double tol = stat_tolerance(dt);
  for (int64_t c = 0; c < r->channels; ++c) {
    if (fabs(sum_dy[c] - g->sum_dy[c]) > tol * g->abs_dy[c] ||
        fabs(sum_dy_xhat[c] - g->sum_dy_xhat[c]) > tol * g->abs_dy_xhat[c] || (count && count[c] != r->count[c])) {
      CHECK(0, "%s: channel %" PRId64 ": sum_dy %.17g sum_dy_xhat %.17g count %g; expected %.17g %.17g %g", what,
            c, sum_dy[c], sum_dy_xhat[c], count ? count[c] : -1.0, g->sum_dy[c], g->sum_dy_xhat[c], r->count[c]);
      return;
    }
  }
  ++checks;
}

/* dx adds terms that hold the channel's sums (their rounding: stat_tolerance of
 * the terms' magnitudes) and is rounded once to its format. */
static double grad_tolerance(bn_dtype dt) { return stat_tolerance(dt) + output_tolerance(dt); }

/* dx against gamma times the reference's per-element values (gamma NULL: 1),
 * within grad_tolerance of gamma times scale (NULL: |expected|); below float16's
 * smallest spacing (2^-24, subnormal) its rounding is absolute. */
static void check_dx(const char *what, const bn_tensor *dx, const reference *r, const double *expected,
                     const double *scale, const double *gamma) {
  const double tol = grad_tolerance(dx->dtype), floor = dx->dtype == BN_FLOAT16 ? ldexp(1, -24) : 0.0;
  int64_t idx[BN_MAX_RANK] = {0}, k = 0;
  ++checks;
  if (element_count(dx->rank, dx->shape) == 0) return;
  do {
    const int64_t c = channel_of(dx->rank, dx->shape, r->is_channel, idx);
    const double g = gamma ? gamma[c] : 1.0, want = g * expected[k];
    const double bound = tol * fabs(g) * (scale ? scale[k] : fabs(expected[k])) + floor;
    const double got = load((const char *)dx->data + offset_of(dx, idx), dx->dtype);
    if (!(fabs(got - want) <= bound)) {
      ++failures;
      fprintf(stderr, "FAIL %s: dx at channel %" PRId64 ", element %" PRId64 " is %.17g; expected %.17g\n", what,
              c, k, got, want);
      return;
    }
    ++k;
  } while (next_index(dx->rank, dx->shape, idx));
}

/* ---- layout cases -------------------------------------------------------------- */

enum { kMaxCaseRank = 5 };

typedef struct {
  const char *name;
  int32_t rank;
  int64_t shape[kMaxCaseRank];
  int64_t x_strides[kMaxCaseRank]; /* in elements, any sign, 0 allowed; all 0: contiguous */
  int64_t y_strides[kMaxCaseRank]; /* in elements; all 0: contiguous */
  int32_t n_axes;
  int32_t axes[kMaxCaseRank];
  int32_t mask_rank;               /* 0: no mask; else x's rank */
  int64_t mask_shape[kMaxCaseRank];
  int64_t mask_period;             /* > 0: mask element i is 0 iff i % period == 0; else ~30% zeros */
  int in_place;                    /* y is x */
  double offset, spread;           /* x = offset + spread * (uniform - 0.5) */
} layout_case;

static const layout_case kCases[] = {
    {"NHWC", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 0, {0}, 0, 0, 3.0, 4.0},
    {"NHWC C=3 (folded rows)", 4, {4, 6, 7, 3}, {0}, {0}, 1, {-1}, 0, {0}, 0, 0, -2.0, 1.0},
    {"NCHW", 4, {3, 4, 5, 6}, {0}, {0}, 1, {1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"NCHW view of NHWC memory", 4, {3, 6, 4, 5}, {120, 1, 30, 6}, {0}, 1, {1}, 0, {0}, 0, 0, 1.0, 2.0},
    {"axes {-1, 1}", 4, {3, 4, 5, 6}, {0}, {0}, 2, {-1, 1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"axes {0, 1} of rank 3", 3, {4, 5, 6}, {0}, {0}, 2, {0, 1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"rank 5, middle axis", 5, {2, 3, 2, 4, 3}, {0}, {0}, 1, {2}, 0, {0}, 0, 0, 3.0, 4.0},
    {"reversed H and C (negative strides)", 4, {3, 4, 5, 6}, {120, -30, 6, -1}, {0}, 1, {3}, 0, {0}, 0, 0,
     3.0, 4.0},
    {"reversed N, y reversed C", 4, {3, 6, 4, 5}, {-120, 20, 5, 1}, {120, -20, 5, 1}, 1, {1}, 0, {0}, 0, 0,
     3.0, 4.0},
    {"broadcast N (zero stride)", 4, {4, 5, 6, 3}, {0, 18, 3, 1}, {0}, 1, {3}, 0, {0}, 0, 0, 3.0, 4.0},
    {"broadcast C (zero stride)", 3, {5, 6, 4}, {6, 1, 0}, {0}, 1, {2}, 0, {0}, 0, 0, 3.0, 4.0},
    {"every other W (sliced)", 4, {3, 4, 5, 6}, {240, 60, 12, 1}, {1, 3, 12, 60}, 1, {3}, 0, {0}, 0, 0,
     3.0, 4.0},
    {"rank 1, one element per channel", 1, {7}, {0}, {0}, 1, {0}, 0, {0}, 0, 0, 3.0, 4.0},
    {"one channel of 40000 (split lines)", 2, {40000, 1}, {0}, {0}, 1, {1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"empty batch", 3, {0, 4, 3}, {0}, {0}, 1, {2}, 0, {0}, 0, 0, 3.0, 4.0},
    {"mean/std ~ 1e4", 2, {300, 5}, {0}, {0}, 1, {1}, 0, {0}, 0, 0, 1e4, 2.0},
    {"large NHWC (threads)", 4, {8, 16, 16, 24}, {0}, {0}, 1, {3}, 0, {0}, 0, 0, 3.0, 4.0},
    {"large NCHW (threads)", 4, {2, 3, 96, 96}, {0}, {0}, 1, {1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"in place NHWC", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 0, {0}, 0, 1, 3.0, 4.0},
    {"in place, reversed NCHW", 4, {3, 4, 5, 6}, {-120, 30, 6, 1}, {0}, 1, {1}, 0, {0}, 0, 1, 3.0, 4.0},
    {"mask, x's shape", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 4, {3, 4, 5, 6}, 0, 0, 3.0, 4.0},
    {"mask (N, H, W, 1) (Keras)", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 4, {3, 4, 5, 1}, 0, 0, 3.0, 4.0},
    {"mask (N, 1, H, W) on NCHW", 4, {3, 4, 5, 6}, {0}, {0}, 1, {1}, 4, {3, 1, 5, 6}, 0, 0, 3.0, 4.0},
    {"mask (N, 1, 1, 1): first sample out", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 4, {3, 1, 1, 1}, 3, 0, 3.0,
     4.0},
    {"mask (1, 1, 1, C): channels 0 and 3 empty", 4, {3, 4, 5, 6}, {0}, {0}, 1, {3}, 4, {1, 1, 1, 6}, 3,
     0, 3.0, 4.0},
    {"mask on axes {-1, 1}, strided x", 4, {3, 6, 4, 5}, {120, 1, 30, 6}, {0}, 2, {-1, 1}, 4,
     {3, 6, 4, 5}, 0, 0, 3.0, 4.0},
    {"mask, large NHWC C=3 (threads)", 4, {8, 40, 40, 3}, {0}, {0}, 1, {3}, 4, {8, 40, 40, 1}, 0, 0, 3.0,
     4.0},
};

static int all_zero(const int64_t *v, int32_t n) {
  for (int32_t i = 0; i < n; ++i)
    if (v[i]) return 0;
  return 1;
}

static void make_case_buffer(buffer *b, const layout_case *lc, bn_dtype dt, const int64_t *strides) {
  int64_t contiguous[kMaxCaseRank] = {0};
  contiguous_strides(lc->rank, lc->shape, contiguous);
  buffer_make(b, dt, lc->rank, lc->shape, all_zero(strides, lc->rank) ? contiguous : strides);
}

static void copy_buffer(buffer *to, const buffer *from) {
  memcpy(to->allocation, from->allocation, (size_t)from->span);
}

static const char *const kDtypeNames[] = {"float32", "float64", "float16", "bfloat16"};

/* One layout case in one dtype: its buffers, pristine copies of the inputs and
 * the float64 references. The backward's dx is laid out like y, and dy like y
 * where the case gives y strides of its own (a layout other than x's), else like
 * x (so with x's zero and negative strides); an in-place case writes dx into dy. */
typedef struct {
  const layout_case *lc;
  buffer x, x_pristine, y, mask, dy, dy_pristine, dx;
  const bn_tensor *mask_t; /* NULL or &mask.t */
  reference r;
  reference_grad g;
  /* C values each, plus a spare entry: never malloc(0). */
  double *gamma, *beta, *mean, *variance, *count, *sum_dy, *sum_dy_xhat;
  double epsilon;
} test_case;

static double *channel_array(const reference *r, int64_t per_channel) {
  return calloc((size_t)(per_channel * r->channels + 1), sizeof(double));
}

/* Every byte of an allocation gets a value, so broadcast and reversed views read data. */
static void fill_buffer(buffer *b, double offset, double spread, unsigned *seed) {
  const bn_dtype dt = b->t.dtype;
  const int64_t es = element_size(dt);
  for (int64_t i = 0; i < b->span / es; ++i)
    store(b->allocation + i * es, dt, offset + spread * (uniform(seed) - 0.5));
}

static void test_case_make(test_case *tc, const layout_case *lc, bn_dtype dt) {
  unsigned seed = 2024u;
  tc->lc = lc;
  make_case_buffer(&tc->x, lc, dt, lc->x_strides);
  make_case_buffer(&tc->x_pristine, lc, dt, lc->x_strides);
  const int64_t *dy_strides = all_zero(lc->y_strides, lc->rank) ? lc->x_strides : lc->y_strides;
  make_case_buffer(&tc->dy, lc, dt, dy_strides);
  make_case_buffer(&tc->dy_pristine, lc, dt, dy_strides);
  if (lc->in_place) {
    tc->y = tc->x;
    tc->dx = tc->dy;
  } else {
    make_case_buffer(&tc->y, lc, dt, lc->y_strides);
    make_case_buffer(&tc->dx, lc, dt, lc->y_strides);
  }
  fill_buffer(&tc->x_pristine, lc->offset, lc->spread, &seed);
  fill_buffer(&tc->dy_pristine, 0.2, 1.0, &seed); /* Σdy is not 0 */
  tc->mask_t = NULL;
  if (lc->mask_rank) {
    int64_t contiguous[kMaxCaseRank];
    contiguous_strides(lc->mask_rank, lc->mask_shape, contiguous);
    buffer_make(&tc->mask, BN_UINT8, lc->mask_rank, lc->mask_shape, contiguous);
    for (int64_t i = 0; i < tc->mask.span; ++i)
      tc->mask.allocation[i] = (char)(lc->mask_period > 0 ? i % lc->mask_period != 0 : uniform(&seed) > 0.3);
    tc->mask_t = &tc->mask.t;
  }

  tc->epsilon = 1e-3;
  reference_moments(&tc->x_pristine.t, lc->axes, lc->n_axes, tc->mask_t, &tc->r);
  reference_backward(&tc->dy_pristine.t, &tc->x_pristine.t, tc->mask_t, &tc->r, tc->epsilon, &tc->g);
  tc->gamma = channel_array(&tc->r, 1);
  tc->beta = channel_array(&tc->r, 1);
  tc->mean = channel_array(&tc->r, 1);
  tc->variance = channel_array(&tc->r, 1);
  tc->count = channel_array(&tc->r, 1);
  tc->sum_dy = channel_array(&tc->r, 1);
  tc->sum_dy_xhat = channel_array(&tc->r, 1);
  for (int64_t c = 0; c < tc->r.channels; ++c) {
    tc->gamma[c] = 0.5 + uniform(&seed);
    tc->beta[c] = uniform(&seed) - 0.5;
  }
}

static void test_case_free(test_case *tc) {
  free(tc->gamma);
  free(tc->beta);
  free(tc->mean);
  free(tc->variance);
  free(tc->count);
  free(tc->sum_dy);
  free(tc->sum_dy_xhat);
  reference_grad_free(&tc->g);
  reference_free(&tc->r);
  if (tc->lc->mask_rank) free(tc->mask.allocation);
  if (!tc->lc->in_place) {
    free(tc->y.allocation);
    free(tc->dx.allocation);
  }
  free(tc->dy_pristine.allocation);
  free(tc->dy.allocation);
  free(tc->x_pristine.allocation);
  free(tc->x.allocation);
}

static void check_forward(test_case *tc, const char *what) {
  const layout_case *lc = tc->lc;
  const reference *r = &tc->r;
  const bn_dtype dt = tc->x.t.dtype;
  copy_buffer(&tc->x, &tc->x_pristine);
  CHECK(bn_moments(&tc->x.t, lc->axes, lc->n_axes, tc->mask_t, tc->mean, tc->variance, tc->count) == BN_OK,
        "%s: moments: %s", what, bn_last_error());
  check_moments(what, r, dt, tc->mean, tc->variance, tc->count, NULL);

  /* Inference with the reference statistics, with and without gamma/beta. */
  CHECK(bn_normalize(&tc->x.t, &tc->y.t, lc->axes, lc->n_axes, r->mean, r->variance, tc->gamma, tc->beta,
                     tc->epsilon) == BN_OK,
        "%s: normalize: %s", what, bn_last_error());
  check_output(what, &tc->x_pristine.t, &tc->y.t, r, r->mean, r->variance, tc->gamma, tc->beta, tc->epsilon);
  copy_buffer(&tc->x, &tc->x_pristine);
  CHECK(bn_normalize(&tc->x.t, &tc->y.t, lc->axes, lc->n_axes, r->mean, r->variance, NULL, NULL, tc->epsilon) ==
            BN_OK,
        "%s: normalize: %s", what, bn_last_error());
  check_output(what, &tc->x_pristine.t, &tc->y.t, r, r->mean, r->variance, NULL, NULL, tc->epsilon);

  copy_buffer(&tc->x, &tc->x_pristine);
  CHECK(bn_train_forward(&tc->x.t, &tc->y.t, lc->axes, lc->n_axes, tc->mask_t, tc->gamma, tc->beta, tc->epsilon,
                         tc->mean, tc->variance) == BN_OK,
        "%s: train_forward: %s", what, bn_last_error());
  /* y must be normalized with the statistics returned (checked just above). */
  if (check_moments(what, r, dt, tc->mean, tc->variance, NULL, NULL))
    check_output(what, &tc->x_pristine.t, &tc->y.t, r, tc->mean, tc->variance, tc->gamma, tc->beta, tc->epsilon);
}

/* bn_backward with the reference statistics: through them with and without
 * gamma and the sums, and with them fixed. */
static void check_backward(test_case *tc, const char *what) {
  const layout_case *lc = tc->lc;
  const reference *r = &tc->r;
  const reference_grad *g = &tc->g;
  const bn_dtype dt = tc->x.t.dtype;
  char label[320];
  copy_buffer(&tc->x, &tc->x_pristine); /* an in-place forward left y there */

  snprintf(label, sizeof label, "%s, backward (training)", what);
  copy_buffer(&tc->dy, &tc->dy_pristine);
  CHECK(bn_backward(&tc->dy.t, &tc->x.t, &tc->dx.t, lc->axes, lc->n_axes, tc->mask_t, r->mean, r->variance,
                    tc->gamma, tc->epsilon, 1, tc->sum_dy, tc->sum_dy_xhat) == BN_OK,
        "%s: %s", label, bn_last_error());
  check_grad_sums(label, r, g, dt, tc->sum_dy, tc->sum_dy_xhat, NULL);
  check_dx(label, &tc->dx.t, r, g->dx_training, g->dx_scale, tc->gamma);

  snprintf(label, sizeof label, "%s, backward (training, no gamma, no sums)", what);
  copy_buffer(&tc->dy, &tc->dy_pristine);
  CHECK(bn_backward(&tc->dy.t, &tc->x.t, &tc->dx.t, lc->axes, lc->n_axes, tc->mask_t, r->mean, r->variance, NULL,
                    tc->epsilon, 1, NULL, NULL) == BN_OK,
        "%s: %s", label, bn_last_error());
  check_dx(label, &tc->dx.t, r, g->dx_training, g->dx_scale, NULL);

  snprintf(label, sizeof label, "%s, backward (fixed statistics)", what);
  copy_buffer(&tc->dy, &tc->dy_pristine);
  CHECK(bn_backward(&tc->dy.t, &tc->x.t, &tc->dx.t, lc->axes, lc->n_axes, tc->mask_t, r->mean, r->variance,
                    tc->gamma, tc->epsilon, 0, tc->sum_dy, tc->sum_dy_xhat) == BN_OK,
        "%s: %s", label, bn_last_error());
  check_grad_sums(label, r, g, dt, tc->sum_dy, tc->sum_dy_xhat, NULL);
  check_dx(label, &tc->dx.t, r, g->dx_fixed, NULL, tc->gamma);
}

/* ---- distributed phases: the batch in shards, as on several ranks ------------------ */

enum { kShards = 3 };

typedef struct {
  int64_t shape[kMaxCaseRank], mask_shape[kMaxCaseRank];
  bn_tensor x, dy, dx, mask;
  const bn_tensor *mask_t; /* NULL or &mask */
} shard;

/* t restricted to [first, first + n) along axis. */
static bn_tensor slice_of(const bn_tensor *t, int64_t *shape, int32_t axis, int64_t first, int64_t n) {
  bn_tensor s = *t;
  memcpy(shape, t->shape, (size_t)t->rank * sizeof *shape);
  shape[axis] = n;
  s.shape = shape;
  /* An empty slice keeps t's pointer: first may be one past the end. */
  if (n > 0) s.data = (char *)t->data + first * t->strides[axis];
  return s;
}

/* The case's tensors split along the first reduced axis (size n) into [0, h),
 * [h, h) (an empty rank) and [h, n). Returns 0 when every axis is a channel axis. */
static int make_shards(const test_case *tc, shard *shards) {
  int32_t axis = 0;
  while (axis < tc->lc->rank && tc->r.is_channel[axis]) ++axis;
  if (axis == tc->lc->rank) return 0;
  const int64_t n = tc->lc->shape[axis], h = (n + 1) / 2;
  const int64_t first[kShards] = {0, h, h}, count[kShards] = {h, 0, n - h};
  for (int i = 0; i < kShards; ++i) {
    shard *s = &shards[i];
    s->x = slice_of(&tc->x.t, s->shape, axis, first[i], count[i]);
    s->dy = slice_of(&tc->dy.t, s->shape, axis, first[i], count[i]);
    s->dx = slice_of(&tc->dx.t, s->shape, axis, first[i], count[i]);
    s->mask_t = NULL;
    if (tc->mask_t) {
      s->mask = tc->mask_t->shape[axis] == 1 ? *tc->mask_t
                                             : slice_of(tc->mask_t, s->mask_shape, axis, first[i], count[i]);
      s->mask_t = &s->mask;
    }
  }
  return 1;
}

/* The shards' partial moments and backward sums, added up as an allreduce would,
 * must give the whole batch's moments, sums and dx. */
static void check_shards(test_case *tc, const char *what) {
  const layout_case *lc = tc->lc;
  const reference *r = &tc->r;
  const int64_t C = r->channels;
  shard shards[kShards];
  if (!make_shards(tc, shards)) return;
  /* 3 C values: counts, then the two sums (moments: S1, S2; backward: Σdy, Σdy·x̂). */
  double *partial = channel_array(r, 3), *total = channel_array(r, 3);
  /* Shifts: none (0), and a moving mean half a standard deviation off the mean. */
  double *no_shift = channel_array(r, 1), *shift = channel_array(r, 1);
  for (int64_t c = 0; c < C; ++c) shift[c] = r->mean[c] + 0.5 * sqrt(r->variance[c]);
  char label[320];
  copy_buffer(&tc->x, &tc->x_pristine);
  copy_buffer(&tc->dy, &tc->dy_pristine); /* an in-place backward left dx there */

  for (int shifted = 0; shifted < 2; ++shifted) {
    snprintf(label, sizeof label, "%s, shards: moments_partial/finalize (%s)", what,
             shifted ? "shift" : "no shift");
    memset(total, 0, (size_t)(3 * C) * sizeof(double));
    for (int i = 0; i < kShards; ++i) {
      CHECK(bn_moments_partial(&shards[i].x, lc->axes, lc->n_axes, shards[i].mask_t, shifted ? shift : NULL,
                               partial) == BN_OK,
            "%s: shard %d: %s", label, i, bn_last_error());
      for (int64_t j = 0; j < 3 * C; ++j) total[j] += partial[j];
    }
    CHECK(bn_moments_finalize(C, total, shifted ? shift : NULL, tc->mean, tc->variance) == BN_OK, "%s: %s", label,
          bn_last_error());
    check_moments(label, r, tc->x.t.dtype, tc->mean, tc->variance, total, shifted ? shift : no_shift);
  }

  snprintf(label, sizeof label, "%s, shards: backward_sums/apply", what);
  memset(total, 0, (size_t)(3 * C) * sizeof(double));
  for (int i = 0; i < kShards; ++i) {
    CHECK(bn_backward_sums(&shards[i].dy, &shards[i].x, lc->axes, lc->n_axes, shards[i].mask_t, r->mean,
                           r->variance, tc->epsilon, partial, partial + C, partial + 2 * C) == BN_OK,
          "%s: shard %d: %s", label, i, bn_last_error());
    for (int64_t j = 0; j < 3 * C; ++j) total[j] += partial[j];
  }
  check_grad_sums(label, r, &tc->g, tc->x.t.dtype, total + C, total + 2 * C, total);
  for (int i = 0; i < kShards; ++i)
    CHECK(bn_backward_apply(&shards[i].dy, &shards[i].x, &shards[i].dx, lc->axes, lc->n_axes, shards[i].mask_t,
                            r->mean, r->variance, tc->gamma, tc->epsilon, total, total + C, total + 2 * C) == BN_OK,
          "%s: shard %d: %s", label, i, bn_last_error());
  check_dx(label, &tc->dx.t, r, tc->g.dx_training, tc->g.dx_scale, tc->gamma);

  free(partial);
  free(total);
  free(no_shift);
  free(shift);
}

static void run_case(const layout_case *lc, bn_dtype dt, const bn_isa *isas, int n_isas) {
  test_case tc;
  test_case_make(&tc, lc, dt);
  for (int i = 0; i < n_isas; ++i) {
    CHECK(bn_set_isa(isas[i]) == BN_OK, "set %s: %s", bn_isa_name(isas[i]), bn_last_error());
    for (int32_t threads = 1; threads <= 2; ++threads) {
      char what[256];
      bn_set_num_threads(threads);
      snprintf(what, sizeof what, "%s, %s, %s, %d thread(s)", lc->name, kDtypeNames[dt], bn_isa_name(isas[i]),
               (int)threads);
      check_forward(&tc, what);
      check_backward(&tc, what);
      check_shards(&tc, what);
    }
  }
  bn_set_num_threads(0);
  test_case_free(&tc);
}

/* Channels-first tensors larger than half the L3 train in chunks of channels, one
 * thread per chunk; under kChunkingCaches these small ones do (257 channels: the
 * last chunk is shorter; 2^16 elements and more: two threads). */
static const int64_t kChunkingCaches[2] = {4096, 65536}; /* L2, L3 */
static const layout_case kChunkedCases[] = {
    {"NCHW in chunks of channels", 4, {4, 257, 8, 8}, {0}, {0}, 1, {1}, 0, {0}, 0, 0, 3.0, 4.0},
    {"NCHW in chunks, mask (N, 1, H, W)", 4, {4, 257, 8, 8}, {0}, {0}, 1, {1}, 4, {4, 1, 8, 8}, 0, 0, 3.0, 4.0},
    {"NCHW in chunks, mask x's shape", 4, {4, 257, 8, 8}, {0}, {0}, 1, {1}, 4, {4, 257, 8, 8}, 5, 0, 3.0, 4.0},
    {"NCHW in chunks, C reversed, y NHWC", 4, {4, 257, 8, 8}, {16448, -64, 8, 1}, {16448, 1, 2056, 257}, 1, {1},
     0, {0}, 0, 0, 3.0, 4.0},
};

static void test_layouts(void) {
  bn_isa isas[3];
  int n_isas = 0;
  const bn_isa all[3] = {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512};
  for (int i = 0; i < 3; ++i)
    if (all[i] <= bn_best_isa()) isas[n_isas++] = all[i];
  for (size_t k = 0; k < sizeof kCases / sizeof kCases[0]; ++k)
    for (int dt = BN_FLOAT32; dt <= BN_BFLOAT16; ++dt) run_case(&kCases[k], (bn_dtype)dt, isas, n_isas);

  CHECK(bn_set_cache_bytes(kChunkingCaches[0], kChunkingCaches[1]) == BN_OK, "set cache sizes");
  for (size_t k = 0; k < sizeof kChunkedCases / sizeof kChunkedCases[0]; ++k)
    for (int dt = BN_FLOAT32; dt <= BN_BFLOAT16; ++dt) run_case(&kChunkedCases[k], (bn_dtype)dt, isas, n_isas);
  CHECK(bn_set_cache_bytes(0, 0) == BN_OK, "restore the detected cache sizes");
  CHECK(bn_set_isa(bn_best_isa()) == BN_OK, "restore the best SIMD level");
}

/* Hand-derived: channel 0 holds {1, 2, 3, 4} (mean 2.5, variance 1.25), channel 1
 * holds {10, 10, 10, 14} of which the mask drops the 14 (mean 10, variance 0). */
static void test_hand_values(void) {
  float x[8] = {1, 10, 2, 10, 3, 10, 4, 14}, y[8];
  uint8_t m[8] = {1, 1, 1, 1, 1, 1, 1, 0};
  int64_t shape[2] = {4, 2}, strides[2] = {8, 4}, mstrides[2] = {2, 1};
  bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides}, yt = {y, BN_FLOAT32, 2, shape, strides};
  bn_tensor mt = {m, BN_UINT8, 2, shape, mstrides};
  int32_t axes[1] = {1};
  double mean[2], var[2], count[2], gamma[2] = {2.0, 1.0}, beta[2] = {1.0, -1.0};
  CHECK(bn_moments(&xt, axes, 1, &mt, mean, var, count) == BN_OK, "%s", bn_last_error());
  CHECK(mean[0] == 2.5 && var[0] == 1.25 && count[0] == 4, "channel 0: %g %g %g", mean[0], var[0], count[0]);
  CHECK(mean[1] == 10 && var[1] == 0 && count[1] == 3, "channel 1: %g %g %g", mean[1], var[1], count[1]);
  /* epsilon 0.0025: 1 / sqrt(1.25 + 0.0025) = 0.8935..., and 1 / sqrt(0 + 0.0025) = 20. */
  CHECK(bn_train_forward(&xt, &yt, axes, 1, &mt, gamma, beta, 0.0025, mean, var) == BN_OK, "%s",
        bn_last_error());
  const double s0 = 2.0 / sqrt(1.2525);
  CHECK(fabs(y[0] - (-1.5 * s0 + 1)) < 1e-6 && fabs(y[6] - (1.5 * s0 + 1)) < 1e-6, "y channel 0: %g %g",
        y[0], y[6]);
  CHECK(y[1] == -1.0f && y[7] == 79.0f, "y channel 1 (masked 14 still normalized): %g %g", y[1], y[7]);

  /* The same batch as two ranks of two rows, shift {2, 0}. Rows 0-1: channel 0
   * {1, 2} (n 2, mean 1.5, M2 0.5) and channel 1 {10, 10}; rows 2-3: {3, 4} (n 2,
   * mean 3.5, M2 0.5) and {10} (14 masked). Buffers: n, n (mean - K), M2 + n (mean - K)^2. */
  int64_t half_shape[2] = {2, 2};
  const bn_tensor top = {x, BN_FLOAT32, 2, half_shape, strides};
  const bn_tensor bottom = {x + 4, BN_FLOAT32, 2, half_shape, strides};
  const bn_tensor top_mask = {m, BN_UINT8, 2, half_shape, mstrides};
  const bn_tensor bottom_mask = {m + 4, BN_UINT8, 2, half_shape, mstrides};
  const double shift[2] = {2.0, 0.0};
  const double top_partial[6] = {2, 2, 2 * -0.5, 20, 0.5 + 2 * 0.25, 200};
  const double bottom_partial[6] = {2, 1, 2 * 1.5, 10, 0.5 + 2 * 2.25, 100};
  double partial[6], total[6];
  CHECK(bn_moments_partial(&top, axes, 1, &top_mask, shift, partial) == BN_OK, "%s", bn_last_error());
  CHECK(memcmp(partial, top_partial, sizeof partial) == 0, "rows 0-1: %g %g %g %g %g %g", partial[0], partial[1],
        partial[2], partial[3], partial[4], partial[5]);
  for (int i = 0; i < 6; ++i) total[i] = partial[i];
  CHECK(bn_moments_partial(&bottom, axes, 1, &bottom_mask, shift, partial) == BN_OK, "%s", bn_last_error());
  CHECK(memcmp(partial, bottom_partial, sizeof partial) == 0, "rows 2-3: %g %g %g %g %g %g", partial[0],
        partial[1], partial[2], partial[3], partial[4], partial[5]);
  for (int i = 0; i < 6; ++i) total[i] += partial[i];
  /* Summed: n {4, 3}, S1 {2, 30}, S2 {6, 300}: mean 2 + 2/4, variance (6 - 2^2/4)/4;
   * mean 30/3, variance (300 - 30^2/3)/3. */
  CHECK(bn_moments_finalize(2, total, shift, mean, var) == BN_OK, "%s", bn_last_error());
  CHECK(mean[0] == 2.5 && var[0] == 1.25 && mean[1] == 10 && var[1] == 0, "finalized: %g %g %g %g", mean[0],
        var[0], mean[1], var[1]);
  /* No position anywhere: 0 and 0. */
  const double nothing[3] = {0, 0, 0};
  CHECK(bn_moments_finalize(1, nothing, NULL, mean, var) == BN_OK && mean[0] == 0 && var[0] == 0,
        "empty channel: %g %g", mean[0], var[0]);
}

/* Hand-derived backward, rows x 2 channels, the last row masked out of both;
 * epsilon 0.3125 makes 1/sqrt(variance + epsilon) simple.
 * Channel 0: x {1, 2, 3, 4 | 9}, mean 2.5, variance 1.25, s = 1/sqrt(1.5625) = 0.8,
 *   x̂ {-1.2, -0.4, 0.4, 1.2 | 5.2}, dy {0, 0, 0, 1 | 0}: Σdy 1, Σdy·x̂ 1.2; gamma 2:
 *   dx = 1.6 (dy - (1 + 1.2 x̂)/4) = {0.176, -0.208, -0.592, 0.624 | 0}.
 * Channel 1: x {-0.5, 0.5, -0.5, 0.5 | 2}, mean 0, variance 0.25, s = 1/sqrt(0.5625) = 4/3,
 *   x̂ {-2/3, 2/3, -2/3, 2/3 | 8/3}, dy {1, 1, 1, 1 | 3}: Σdy 7 and Σdy·x̂ 0 + 8 = 8 count
 *   the masked row too; gamma 1: dx = 4/3 (1 - (7 + 8 x̂)/4) = 7/9 at x̂ = -2/3 and -25/9
 *   at 2/3; the masked row gets s dy = 4.
 * Fixed statistics: dx = gamma s dy = {0, 4/3, 0, 4/3, 0, 4/3, 1.6, 4/3, 0, 4}. */
static void test_hand_backward(void) {
  float x[10] = {1, -0.5f, 2, 0.5f, 3, -0.5f, 4, 0.5f, 9, 2}, dy[10] = {0, 1, 0, 1, 0, 1, 1, 1, 0, 3}, dx[10];
  uint8_t rows[5] = {1, 1, 1, 1, 0};
  int64_t shape[2] = {5, 2}, strides[2] = {8, 4}, mask_shape[2] = {5, 1}, mask_strides[2] = {1, 1};
  const bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides}, dyt = {dy, BN_FLOAT32, 2, shape, strides};
  const bn_tensor dxt = {dx, BN_FLOAT32, 2, shape, strides}, mt = {rows, BN_UINT8, 2, mask_shape, mask_strides};
  const int32_t axes[1] = {-1};
  const double mean[2] = {2.5, 0}, var[2] = {1.25, 0.25}, gamma[2] = {2, 1}, eps = 0.3125;
  const double training_dx[10] = {0.176, 7.0 / 9, -0.208, -25.0 / 9, -0.592, 7.0 / 9, 0.624, -25.0 / 9, 0, 4};
  const double fixed_dx[10] = {0, 4.0 / 3, 0, 4.0 / 3, 0, 4.0 / 3, 1.6, 4.0 / 3, 0, 4};
  double sum_dy[2], sum_dy_xhat[2], count[2];

  /* Any training != 0 goes through the statistics. */
  CHECK(bn_backward(&dyt, &xt, &dxt, axes, 1, &mt, mean, var, gamma, eps, 2, sum_dy, sum_dy_xhat) == BN_OK, "%s",
        bn_last_error());
  CHECK(fabs(sum_dy[0] - 1) < 1e-6 && fabs(sum_dy[1] - 7) < 1e-6 && fabs(sum_dy_xhat[0] - 1.2) < 1e-6 &&
            fabs(sum_dy_xhat[1] - 8) < 1e-6,
        "sums %g %g %g %g", sum_dy[0], sum_dy[1], sum_dy_xhat[0], sum_dy_xhat[1]);
  for (int i = 0; i < 10; ++i) CHECK(fabs(dx[i] - training_dx[i]) < 1e-6, "training dx[%d] %g", i, dx[i]);

  /* The two distributed phases on one rank give the same. */
  CHECK(bn_backward_sums(&dyt, &xt, axes, 1, &mt, mean, var, eps, count, sum_dy, sum_dy_xhat) == BN_OK, "%s",
        bn_last_error());
  CHECK(count[0] == 4 && count[1] == 4 && fabs(sum_dy_xhat[1] - 8) < 1e-6, "phase 1: count %g %g", count[0],
        count[1]);
  CHECK(bn_backward_apply(&dyt, &xt, &dxt, axes, 1, &mt, mean, var, gamma, eps, count, sum_dy, sum_dy_xhat) ==
            BN_OK,
        "%s", bn_last_error());
  for (int i = 0; i < 10; ++i) CHECK(fabs(dx[i] - training_dx[i]) < 1e-6, "phase 2 dx[%d] %g", i, dx[i]);

  /* Fixed statistics, in place into dy. */
  CHECK(bn_backward(&dyt, &xt, &dyt, axes, 1, &mt, mean, var, gamma, eps, 0, NULL, NULL) == BN_OK, "%s",
        bn_last_error());
  for (int i = 0; i < 10; ++i) CHECK(fabs(dy[i] - fixed_dx[i]) < 1e-6, "fixed dx[%d] %g", i, dy[i]);
}

/* ---- errors --------------------------------------------------------------------- */

/* A stride-0 tensor whose channel count makes the scratch sizes overflow int64
 * (7 arrays of C doubles per thread; 3C + 1 for the backward's sums): each call
 * fails with BN_ERR_ALLOC (bn_moments_partial: BN_ERR_OVERFLOW, its 3C doubles
 * cannot exist) before writing anything, and no C++ exception (a
 * vector's length_error) escapes through the C API. */
static void test_scratch_size_overflow(void) {
  float value = 1.0f;
  double mean[1] = {7}, var[1] = {7}, partial[3] = {7, 7, 7};
  int32_t axis[1] = {0};
  const int32_t threads = bn_get_num_threads();
  bn_set_num_threads(1);
  for (int k = 0; k < 2; ++k) {
    int64_t shape[1] = {k == 0 ? (int64_t)2589016712099585948 : (int64_t)1 << 61}, stride[1] = {0};
    const bn_tensor x = {&value, BN_FLOAT32, 1, shape, stride};
    CHECK_STATUS(bn_moments(&x, axis, 1, NULL, mean, var, NULL), BN_ERR_ALLOC, "moments: huge C");
    CHECK_STATUS(bn_moments_partial(&x, axis, 1, NULL, NULL, partial), BN_ERR_OVERFLOW, "partial: huge C");
    CHECK_STATUS(bn_normalize(&x, &x, axis, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_ALLOC, "normalize: huge C");
    CHECK_STATUS(bn_train_forward(&x, &x, axis, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_ALLOC,
                 "train_forward: huge C");
    CHECK_STATUS(bn_backward(&x, &x, &x, axis, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_ALLOC,
                 "backward: huge C");
    CHECK(mean[0] == 7 && var[0] == 7 && partial[0] == 7 && value == 1.0f, "huge C: nothing written");
  }
  bn_set_num_threads(threads);
}

static void test_errors(void) {
  float data[6] = {0};
  double mean[3], var[3];
  uint8_t mask_data[6] = {1, 1, 1, 1, 1, 1};
  int64_t shape[2] = {2, 3}, strides[2] = {12, 4}, mask_strides[2] = {3, 1};
  const bn_tensor x = {data, BN_FLOAT32, 2, shape, strides};
  const bn_tensor mask = {mask_data, BN_UINT8, 2, shape, mask_strides};
  int32_t axes[1] = {1};
  bn_tensor bad;

  /* BN_ERR_NULL */
  CHECK_STATUS(bn_moments(NULL, axes, 1, NULL, mean, var, NULL), BN_ERR_NULL, "moments: x NULL");
  CHECK_STATUS(bn_moments(&x, NULL, 1, NULL, mean, var, NULL), BN_ERR_NULL, "moments: axes NULL");
  CHECK_STATUS(bn_moments(&x, axes, 1, NULL, NULL, var, NULL), BN_ERR_NULL, "moments: mean NULL");
  CHECK_STATUS(bn_moments(&x, axes, 1, NULL, mean, NULL, NULL), BN_ERR_NULL, "moments: variance NULL");
  bad = x;
  bad.data = NULL;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_NULL, "moments: data NULL");
  bad = x;
  bad.shape = NULL;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_NULL, "moments: shape NULL");
  bad = x;
  bad.strides = NULL;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_NULL, "moments: strides NULL");
  bad = mask;
  bad.data = NULL;
  CHECK_STATUS(bn_moments(&x, axes, 1, &bad, mean, var, NULL), BN_ERR_NULL, "moments: mask data NULL");
  CHECK_STATUS(bn_normalize(&x, NULL, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: y NULL");
  CHECK_STATUS(bn_normalize(NULL, &x, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: x NULL");
  CHECK_STATUS(bn_normalize(&x, &x, axes, 1, NULL, var, NULL, NULL, 1e-3), BN_ERR_NULL,
               "normalize: mean NULL");
  CHECK_STATUS(bn_normalize(&x, &x, axes, 1, mean, NULL, NULL, NULL, 1e-3), BN_ERR_NULL,
               "normalize: variance NULL");
  CHECK_STATUS(bn_normalize(&x, &x, NULL, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_NULL,
               "normalize: axes NULL");
  CHECK_STATUS(bn_train_forward(&x, NULL, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_NULL,
               "train_forward: y NULL");
  CHECK_STATUS(bn_train_forward(&x, &x, axes, 1, NULL, NULL, NULL, 1e-3, NULL, var), BN_ERR_NULL,
               "train_forward: mean NULL");
  CHECK_STATUS(bn_train_forward(&x, &x, axes, 1, NULL, NULL, NULL, 1e-3, mean, NULL), BN_ERR_NULL,
               "train_forward: variance NULL");

  /* BN_ERR_RANK */
  bad = x;
  bad.rank = 0;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_RANK, "rank 0");
  bad.rank = -1;
  CHECK_STATUS(bn_normalize(&bad, &x, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_RANK, "rank -1");
  bad.rank = BN_MAX_RANK + 1;
  CHECK_STATUS(bn_train_forward(&bad, &x, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_RANK,
               "rank above BN_MAX_RANK");
  int64_t ones[BN_MAX_RANK], ones_strides[BN_MAX_RANK];
  for (int i = 0; i < BN_MAX_RANK; ++i) {
    ones[i] = i == BN_MAX_RANK - 1 ? 3 : 1;
    ones_strides[i] = 4;
  }
  const bn_tensor deepest = {data, BN_FLOAT32, BN_MAX_RANK, ones, ones_strides};
  int32_t last_axis[1] = {-1};
  CHECK(bn_moments(&deepest, last_axis, 1, NULL, mean, var, NULL) == BN_OK && mean[2] == 0.0,
        "rank BN_MAX_RANK is allowed: %s", bn_last_error());

  /* BN_ERR_SHAPE */
  int64_t negative[2] = {-1, 3}, other[2] = {3, 2}, mask_bad[2] = {2, 2}, mask_row[2] = {2, 1};
  bad = x;
  bad.shape = negative;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_SHAPE, "negative size");
  bad = x;
  bad.shape = other;
  CHECK_STATUS(bn_normalize(&x, &bad, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_SHAPE,
               "y shape differs");
  bad = x;
  bad.rank = 1;
  CHECK_STATUS(bn_train_forward(&x, &bad, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_SHAPE,
               "y rank differs");
  bad = mask;
  bad.shape = mask_bad;
  CHECK_STATUS(bn_moments(&x, axes, 1, &bad, mean, var, NULL), BN_ERR_SHAPE, "mask does not broadcast");
  bad = mask;
  bad.rank = 1;
  CHECK_STATUS(bn_train_forward(&x, &x, axes, 1, &bad, NULL, NULL, 1e-3, mean, var), BN_ERR_SHAPE,
               "mask rank differs");
  bad = mask;
  bad.shape = mask_row; /* a broadcastable mask is fine */
  CHECK(bn_moments(&x, axes, 1, &bad, mean, var, NULL) == BN_OK, "mask (2, 1): %s", bn_last_error());

  /* BN_ERR_AXIS */
  int32_t out_of_range[1] = {2}, below[1] = {-3}, twice[2] = {1, -1};
  CHECK_STATUS(bn_moments(&x, out_of_range, 1, NULL, mean, var, NULL), BN_ERR_AXIS, "axis 2 of rank 2");
  CHECK_STATUS(bn_normalize(&x, &x, below, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_AXIS, "axis -3 of rank 2");
  CHECK_STATUS(bn_train_forward(&x, &x, twice, 2, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_AXIS,
               "axis given twice");
  CHECK_STATUS(bn_moments(&x, axes, 0, NULL, mean, var, NULL), BN_ERR_AXIS, "no axis");
  CHECK_STATUS(bn_moments(&x, twice, 3, NULL, mean, var, NULL), BN_ERR_AXIS, "more axes than the rank");

  /* BN_ERR_DTYPE */
  bad = x;
  bad.dtype = BN_UINT8;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_DTYPE, "uint8 data");
  /* Unknown values inside each enum's range of values (0-7 for bn_dtype, 0-3 for
   * bn_isa): C++, where the core reads them, leaves values beyond it undefined. */
  bad.dtype = (bn_dtype)7;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_DTYPE, "unknown dtype");
  bad = x;
  bad.dtype = BN_FLOAT64;
  CHECK_STATUS(bn_normalize(&x, &bad, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_DTYPE,
               "y dtype differs");
  CHECK_STATUS(bn_moments(&x, axes, 1, &x, mean, var, NULL), BN_ERR_DTYPE, "float32 mask");

  /* BN_ERR_OVERFLOW */
  int64_t huge[2] = {INT64_MAX / 2, 4}, three[2] = {3, 3};
  int64_t span_sum[2] = {INT64_MAX, 4}, span_product[2] = {INT64_MAX / 2 + 1, 4}, lowest[2] = {12, INT64_MIN};
  bad = x;
  bad.shape = huge;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_OVERFLOW, "element count");
  bad = x;
  bad.strides = span_sum;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_OVERFLOW, "byte span sum");
  bad.shape = three;
  bad.strides = span_product;
  CHECK_STATUS(bn_normalize(&bad, &bad, axes, 1, mean, var, NULL, NULL, 1e-3), BN_ERR_OVERFLOW,
               "byte span product");
  bad = x;
  bad.strides = lowest;
  CHECK_STATUS(bn_train_forward(&x, &bad, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_OVERFLOW,
               "INT64_MIN stride of y");

  /* BN_ERR_ALLOC: no element, but 2^44 channels of per-thread scratch (far beyond
   * any address space, so no allocator can hand it out; ctest runs this with
   * ASan's allocator_may_return_null=1, so that a sanitized build reports the
   * failed allocation to the core instead of aborting). */
  int64_t many_channels[2] = {0, (int64_t)1 << 44};
  bad = x;
  bad.shape = many_channels;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_ALLOC, "moments scratch");
  CHECK_STATUS(bn_train_forward(&bad, &bad, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_ALLOC,
               "train_forward scratch");
  test_scratch_size_overflow();

  /* BN_ERR_VALUE */
  CHECK_STATUS(bn_normalize(&x, &x, axes, 1, mean, var, NULL, NULL, -1.0), BN_ERR_VALUE, "epsilon < 0");
  CHECK_STATUS(bn_normalize(&x, &x, axes, 1, mean, var, NULL, NULL, NAN), BN_ERR_VALUE, "epsilon NaN");
  CHECK_STATUS(bn_train_forward(&x, &x, axes, 1, NULL, NULL, NULL, INFINITY, mean, var), BN_ERR_VALUE,
               "epsilon inf");
  CHECK_STATUS(bn_set_isa((bn_isa)3), BN_ERR_VALUE, "unknown SIMD level");
  CHECK_STATUS(bn_set_isa_by_name("sse9"), BN_ERR_VALUE, "unknown SIMD level name");

  /* BN_ERR_UNSUPPORTED: every level above the best one (none on an AVX-512 CPU). */
  for (int isa = BN_ISA_SCALAR; isa <= BN_ISA_AVX512; ++isa) {
    if (isa <= (int)bn_best_isa()) {
      CHECK(bn_set_isa((bn_isa)isa) == BN_OK && bn_get_isa() == (bn_isa)isa, "set %s", bn_isa_name((bn_isa)isa));
      CHECK(bn_set_isa_by_name(bn_isa_name((bn_isa)isa)) == BN_OK, "set '%s'", bn_isa_name((bn_isa)isa));
    } else {
      CHECK_STATUS(bn_set_isa((bn_isa)isa), BN_ERR_UNSUPPORTED, bn_isa_name((bn_isa)isa));
      CHECK_STATUS(bn_set_isa_by_name(bn_isa_name((bn_isa)isa)), BN_ERR_UNSUPPORTED, bn_isa_name((bn_isa)isa));
    }
  }
  CHECK(bn_set_isa_by_name(NULL) == BN_OK && bn_get_isa() == bn_best_isa(), "NULL name: the best level");
  CHECK(bn_set_isa_by_name("") == BN_OK && bn_get_isa() == bn_best_isa(), "empty name: the best level");
}

/* The backward and the distributed phases: their own arguments (dy, dx, the sums,
 * partial) and the checks they share with the calls above. */
static void test_errors_backward(void) {
  float data[6] = {0}, grad[6] = {0};
  double other[6] = {0};
  double mean[3] = {0}, var[3] = {1, 1, 1}, count[3] = {1, 1, 1}, sum_dy[3] = {0}, sum_dy_xhat[3] = {0};
  double partial[9] = {0};
  uint8_t mask_data[6] = {1, 1, 1, 1, 1, 1};
  int64_t shape[2] = {2, 3}, strides[2] = {12, 4}, mask_strides[2] = {3, 1}, other_strides[2] = {24, 8};
  const bn_tensor x = {data, BN_FLOAT32, 2, shape, strides}, dy = {grad, BN_FLOAT32, 2, shape, strides};
  const bn_tensor mask = {mask_data, BN_UINT8, 2, shape, mask_strides};
  const bn_tensor f64 = {other, BN_FLOAT64, 2, shape, other_strides};
  int32_t axes[1] = {1}, out_of_range[1] = {2}, twice[2] = {1, -1};
  bn_tensor bad;

  /* BN_ERR_NULL */
  CHECK_STATUS(bn_backward(NULL, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dy NULL");
  CHECK_STATUS(bn_backward(&dy, NULL, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: x NULL");
  CHECK_STATUS(bn_backward(&dy, &x, NULL, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dx NULL");
  CHECK_STATUS(bn_backward(&dy, &x, &dy, NULL, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: axes NULL");
  CHECK_STATUS(bn_backward(&dy, &x, &dy, axes, 1, NULL, NULL, var, NULL, 1e-3, 0, NULL, NULL), BN_ERR_NULL,
               "backward: mean NULL");
  CHECK_STATUS(bn_backward(&dy, &x, &dy, axes, 1, NULL, mean, NULL, NULL, 1e-3, 0, NULL, NULL), BN_ERR_NULL,
               "backward: variance NULL");
  bad = dy;
  bad.data = NULL;
  CHECK_STATUS(bn_backward(&bad, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dy data NULL");
  CHECK_STATUS(bn_backward_sums(&dy, &x, axes, 1, NULL, mean, var, 1e-3, NULL, sum_dy, sum_dy_xhat), BN_ERR_NULL,
               "backward_sums: count NULL");
  CHECK_STATUS(bn_backward_sums(&dy, &x, axes, 1, NULL, mean, var, 1e-3, count, NULL, sum_dy_xhat), BN_ERR_NULL,
               "backward_sums: sum_dy NULL");
  CHECK_STATUS(bn_backward_sums(&dy, &x, axes, 1, NULL, mean, var, 1e-3, count, sum_dy, NULL), BN_ERR_NULL,
               "backward_sums: sum_dy_xhat NULL");
  CHECK_STATUS(bn_backward_sums(NULL, &x, axes, 1, NULL, mean, var, 1e-3, count, sum_dy, sum_dy_xhat), BN_ERR_NULL,
               "backward_sums: dy NULL");
  CHECK_STATUS(bn_backward_apply(&dy, &x, NULL, axes, 1, NULL, mean, var, NULL, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_NULL, "backward_apply: dx NULL");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, NULL, sum_dy, sum_dy_xhat),
               BN_ERR_NULL, "backward_apply: count NULL");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, count, NULL, sum_dy_xhat),
               BN_ERR_NULL, "backward_apply: sum_dy NULL");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, count, sum_dy, NULL),
               BN_ERR_NULL, "backward_apply: sum_dy_xhat NULL");
  CHECK_STATUS(bn_moments_partial(&x, axes, 1, NULL, NULL, NULL), BN_ERR_NULL, "moments_partial: partial NULL");
  CHECK_STATUS(bn_moments_partial(NULL, axes, 1, NULL, NULL, partial), BN_ERR_NULL, "moments_partial: x NULL");
  CHECK_STATUS(bn_moments_partial(&x, NULL, 1, NULL, NULL, partial), BN_ERR_NULL, "moments_partial: axes NULL");
  CHECK_STATUS(bn_moments_finalize(3, NULL, NULL, mean, var), BN_ERR_NULL, "moments_finalize: partial NULL");
  CHECK_STATUS(bn_moments_finalize(3, partial, NULL, NULL, var), BN_ERR_NULL, "moments_finalize: mean NULL");
  CHECK_STATUS(bn_moments_finalize(3, partial, NULL, mean, NULL), BN_ERR_NULL, "moments_finalize: variance NULL");

  /* BN_ERR_RANK */
  bad = x;
  bad.rank = 0;
  CHECK_STATUS(bn_backward(&dy, &bad, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_RANK,
               "backward: x rank 0");
  CHECK_STATUS(bn_moments_partial(&bad, axes, 1, NULL, NULL, partial), BN_ERR_RANK, "moments_partial: rank 0");

  /* BN_ERR_SHAPE */
  int64_t other_shape[2] = {3, 2}, mask_bad[2] = {2, 2};
  bad = dy;
  bad.shape = other_shape;
  CHECK_STATUS(bn_backward(&bad, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: dy shape differs");
  CHECK_STATUS(bn_backward(&dy, &x, &bad, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: dx shape differs");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &bad, axes, 1, NULL, mean, var, NULL, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_SHAPE, "backward_apply: dx shape differs");
  bad = dy;
  bad.rank = 1;
  CHECK_STATUS(bn_backward_sums(&bad, &x, axes, 1, NULL, mean, var, 1e-3, count, sum_dy, sum_dy_xhat), BN_ERR_SHAPE,
               "backward_sums: dy rank differs");
  bad = mask;
  bad.shape = mask_bad;
  CHECK_STATUS(bn_backward(&dy, &x, &dy, axes, 1, &bad, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: mask does not broadcast");
  CHECK_STATUS(bn_moments_partial(&x, axes, 1, &bad, NULL, partial), BN_ERR_SHAPE,
               "moments_partial: mask does not broadcast");
  CHECK_STATUS(bn_moments_finalize(-1, partial, NULL, mean, var), BN_ERR_SHAPE, "moments_finalize: channels -1");

  /* BN_ERR_DTYPE */
  CHECK_STATUS(bn_backward(&f64, &x, &dy, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_DTYPE,
               "backward: dy dtype differs");
  CHECK_STATUS(bn_backward(&dy, &x, &f64, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_DTYPE,
               "backward: dx dtype differs");
  CHECK_STATUS(bn_backward_sums(&f64, &x, axes, 1, NULL, mean, var, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_DTYPE, "backward_sums: dy dtype differs");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &f64, axes, 1, NULL, mean, var, NULL, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_DTYPE, "backward_apply: dx dtype differs");
  CHECK_STATUS(bn_backward(&dy, &x, &dy, axes, 1, &x, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_DTYPE,
               "backward: float32 mask");
  CHECK_STATUS(bn_moments_partial(&mask, axes, 1, NULL, NULL, partial), BN_ERR_DTYPE, "moments_partial: uint8 x");

  /* BN_ERR_AXIS */
  CHECK_STATUS(bn_backward(&dy, &x, &dy, out_of_range, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_AXIS,
               "backward: axis 2 of rank 2");
  CHECK_STATUS(bn_backward_sums(&dy, &x, twice, 2, NULL, mean, var, 1e-3, count, sum_dy, sum_dy_xhat), BN_ERR_AXIS,
               "backward_sums: axis given twice");
  CHECK_STATUS(bn_backward_apply(&dy, &x, &dy, axes, 0, NULL, mean, var, NULL, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_AXIS, "backward_apply: no axis");
  CHECK_STATUS(bn_moments_partial(&x, out_of_range, 1, NULL, NULL, partial), BN_ERR_AXIS,
               "moments_partial: axis 2 of rank 2");

  /* BN_ERR_VALUE */
  CHECK_STATUS(bn_backward(&dy, &x, &dy, axes, 1, NULL, mean, var, NULL, -1.0, 1, NULL, NULL), BN_ERR_VALUE,
               "backward: epsilon < 0");
  CHECK_STATUS(bn_backward_sums(&dy, &x, axes, 1, NULL, mean, var, NAN, count, sum_dy, sum_dy_xhat), BN_ERR_VALUE,
               "backward_sums: epsilon NaN");
  CHECK_STATUS(
      bn_backward_apply(&dy, &x, &dy, axes, 1, NULL, mean, var, NULL, INFINITY, count, sum_dy, sum_dy_xhat),
      BN_ERR_VALUE, "backward_apply: epsilon inf");

  /* BN_ERR_OVERFLOW */
  int64_t lowest[2] = {12, INT64_MIN};
  bad = dy;
  bad.strides = lowest;
  CHECK_STATUS(bn_backward(&dy, &x, &bad, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_OVERFLOW,
               "backward: INT64_MIN stride of dx");

  /* BN_ERR_ALLOC: 2^44 channels of scratch, as in test_errors. */
#ifndef __SANITIZE_ADDRESS__
  int64_t many_channels[2] = {0, (int64_t)1 << 44};
  bad = x;
  bad.shape = many_channels;
  CHECK_STATUS(bn_backward(&bad, &bad, &bad, axes, 1, NULL, mean, var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_ALLOC,
               "backward scratch");
  CHECK_STATUS(bn_backward_sums(&bad, &bad, axes, 1, NULL, mean, var, 1e-3, count, sum_dy, sum_dy_xhat),
               BN_ERR_ALLOC, "backward_sums scratch");
  CHECK_STATUS(bn_moments_partial(&bad, axes, 1, NULL, NULL, partial), BN_ERR_ALLOC, "moments_partial scratch");
#endif
}

/* ---- threads, SIMD names, version, thread-local errors ----------------------------- */

static void *fail_in_other_thread(void *message_out) {
  int32_t axes[1] = {0};
  double mean[1], var[1];
  bn_moments(NULL, axes, 1, NULL, mean, var, NULL);
  snprintf((char *)message_out, 256, "%s", bn_last_error());
  return NULL;
}

static void test_settings(void) {
  const int32_t default_threads = bn_get_num_threads();
  CHECK(default_threads >= 1, "default threads %d", (int)default_threads);
  CHECK(bn_set_num_threads(3) == BN_OK && bn_get_num_threads() == 3, "3 threads");
  CHECK(bn_set_num_threads(0) == BN_OK && bn_get_num_threads() == default_threads, "default restored");
  CHECK(bn_set_num_threads(-5) == BN_OK && bn_get_num_threads() == default_threads, "n < 0: default");

  CHECK(strcmp(bn_isa_name(BN_ISA_SCALAR), "scalar") == 0 && strcmp(bn_isa_name(BN_ISA_AVX2), "avx2") == 0 &&
            strcmp(bn_isa_name(BN_ISA_AVX512), "avx512") == 0,
        "SIMD level names");
#if !defined(__x86_64__)
  CHECK(bn_best_isa() == BN_ISA_SCALAR, "not x86-64: the portable path only");
#endif
  int major = -1, minor = -1, patch = -1;
  CHECK(sscanf(bn_version(), "%d.%d.%d", &major, &minor, &patch) == 3 && major >= 0, "version '%s'",
        bn_version());
  CHECK(strlen(bn_build_info()) > 0, "build info");

  /* Cache sizes: detected, overridden, restored per level by a value <= 0. */
  int64_t l2 = 0, l3 = 0, detected_l2 = 0, detected_l3 = 0;
  bn_get_cache_bytes(&detected_l2, &detected_l3);
  CHECK(detected_l2 > 0 && detected_l3 > 0, "detected caches %" PRId64 " %" PRId64, detected_l2, detected_l3);
  CHECK(bn_set_cache_bytes(4096, 65536) == BN_OK, "set caches");
  bn_get_cache_bytes(&l2, &l3);
  CHECK(l2 == 4096 && l3 == 65536, "caches %" PRId64 " %" PRId64, l2, l3);
  CHECK(bn_set_cache_bytes(0, 1 << 20) == BN_OK, "restore L2");
  bn_get_cache_bytes(&l2, &l3);
  CHECK(l2 == detected_l2 && l3 == 1 << 20, "L2 restored, L3 set: %" PRId64 " %" PRId64, l2, l3);
  CHECK(bn_set_cache_bytes(-1, -1) == BN_OK, "restore both");
  bn_get_cache_bytes(&l2, NULL); /* either output may be NULL */
  bn_get_cache_bytes(NULL, &l3);
  CHECK(l2 == detected_l2 && l3 == detected_l3, "restored: %" PRId64 " %" PRId64, l2, l3);

  /* bn_last_error is per thread: another thread's failure leaves ours alone. */
  int32_t axes[1] = {5};
  float data[1] = {0};
  int64_t shape[1] = {1}, strides[1] = {4};
  bn_tensor x = {data, BN_FLOAT32, 1, shape, strides};
  double mean[1], var[1];
  CHECK(bn_moments(&x, axes, 1, NULL, mean, var, NULL) == BN_ERR_AXIS, "axis error");
  char ours[256], theirs[256];
  snprintf(ours, sizeof ours, "%s", bn_last_error());
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, fail_in_other_thread, theirs) == 0, "pthread_create");
  pthread_join(thread, NULL);
  CHECK(strstr(theirs, "x is NULL") != NULL, "other thread's message '%s'", theirs);
  CHECK(strcmp(bn_last_error(), ours) == 0 && strstr(ours, "axis 5") != NULL, "our message '%s' kept",
        bn_last_error());
}

/* The team policy: results bitwise the same whether the whole team or the caller
 * alone ran a 2-thread call; an unknown policy is an error; calls are counted. */
static void test_team_policy(void) {
  enum { rows = 8192, cols = 16 };
  static float x[rows * cols];
  unsigned seed = 11;
  for (int i = 0; i < rows * cols; ++i) x[i] = (float)(3.0 * uniform(&seed) + 1.0);
  int64_t shape[2] = {rows, cols}, strides[2] = {cols * 4, 4};
  const bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides};
  const int32_t axis = 1;
  double mean[2][cols], var[2][cols];
  const bn_team_policy policies[2] = {BN_TEAM_FULL, BN_TEAM_CALLER_ONLY};
  bn_set_num_threads(2);
  for (int i = 0; i < 2; ++i) {
    CHECK(bn_set_team_policy(policies[i]) == BN_OK, "set team policy %d", i);
    CHECK(bn_moments(&xt, &axis, 1, NULL, mean[i], var[i], NULL) == BN_OK, "moments: %s", bn_last_error());
  }
  CHECK(memcmp(mean[0], mean[1], sizeof mean[0]) == 0 && memcmp(var[0], var[1], sizeof var[0]) == 0,
        "moments bitwise equal on the whole team and on the caller alone");
  bn_team_state state;
  bn_get_team_state(&state);
  CHECK(state.policy == BN_TEAM_CALLER_ONLY && state.caller_only_calls >= 1 && state.caller_only_ms == 0.0,
        "team state: policy %d, %lld calls on the caller", (int)state.policy, (long long)state.caller_only_calls);
  bn_team_policy bad;
  const int32_t bad_value = 7;
  memcpy(&bad, &bad_value, sizeof bad);
  CHECK_STATUS(bn_set_team_policy(bad), BN_ERR_VALUE, "unknown team policy");
  CHECK(bn_set_team_policy(BN_TEAM_ADAPTIVE) == BN_OK, "adaptive again");
  bn_set_num_threads(0);
}

/* Cache sizes up to INT64_MAX: the schedule's size comparisons (L2 times the
 * thread count, L3 plus the other threads' L2s) must not overflow (UBSan). */
static void test_huge_cache_sizes(void) {
  enum { rows = 8192, cols = 16 };
  static float x[rows * cols], y[rows * cols];
  unsigned seed = 5;
  for (int i = 0; i < rows * cols; ++i) x[i] = (float)(2.0 * uniform(&seed) - 0.5);
  int64_t shape[2] = {rows, cols}, strides[2] = {cols * 4, 4};
  const bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides}, yt = {y, BN_FLOAT32, 2, shape, strides};
  const int32_t axis = 1;
  double mean[2][cols], var[2][cols];
  bn_set_num_threads(3);
  CHECK(bn_moments(&xt, &axis, 1, NULL, mean[0], var[0], NULL) == BN_OK, "moments: %s", bn_last_error());
  CHECK(strncmp(bn_cache_origin(), "detected L2 ", 12) == 0, "cache origin: %s", bn_cache_origin());
  CHECK(bn_set_cache_bytes(INT64_MAX, INT64_MAX) == BN_OK, "largest cache sizes");
  CHECK(strcmp(bn_cache_origin(), "set by bn_set_cache_bytes") == 0, "cache origin: %s", bn_cache_origin());
  CHECK(bn_moments(&xt, &axis, 1, NULL, mean[1], var[1], NULL) == BN_OK, "moments: %s", bn_last_error());
  CHECK(memcmp(mean[0], mean[1], sizeof mean[0]) == 0 && memcmp(var[0], var[1], sizeof var[0]) == 0,
        "moments do not depend on the cache sizes");
  CHECK(bn_normalize(&xt, &yt, &axis, 1, mean[1], var[1], NULL, NULL, 0.0) == BN_OK, "normalize: %s",
        bn_last_error());
  double worst = 0;
  for (int i = 0; i < rows * cols; ++i)
    worst = fmax(worst, fabs(y[i] - (x[i] - mean[1][i % cols]) / sqrt(var[1][i % cols])));
  CHECK(worst < 1e-5, "normalize under the largest cache sizes: error %g", worst);
  CHECK(bn_train_forward(&xt, &yt, &axis, 1, NULL, NULL, NULL, 1e-3, mean[1], var[1]) == BN_OK,
        "train forward: %s", bn_last_error());
  bn_set_cache_bytes(0, 0);
  bn_set_num_threads(0);
}

/* An empty x may have NULL data whatever its strides: a negative stride on an
 * axis of size 3 before the axis of size 0 must not move the NULL pointer
 * (NULL + offset: UBSan's pointer-overflow check), nor may INT64_MIN on the
 * axis of size 0 be negated. */
static void test_empty_null_negative_strides(void) {
  int64_t shape[3] = {3, 2, 0}, strides[3] = {-8, -4, INT64_MIN};
  const bn_tensor x = {NULL, BN_FLOAT32, 3, shape, strides}, y = x, dy = x;
  const int32_t axis = 0;
  double mean[3] = {1, 1, 1}, var[3] = {1, 1, 1}, sums[2][3];
  const double zeros[3] = {0, 0, 0};
  CHECK(bn_moments(&x, &axis, 1, NULL, mean, var, NULL) == BN_OK && mean[2] == 0 && var[2] == 0,
        "empty moments: %s", bn_last_error());
  CHECK(bn_train_forward(&x, &y, &axis, 1, NULL, NULL, NULL, 1e-3, mean, var) == BN_OK,
        "empty training forward: %s", bn_last_error());
  CHECK(bn_normalize(&x, &y, &axis, 1, zeros, zeros, NULL, NULL, 1e-3) == BN_OK, "empty normalize: %s",
        bn_last_error());
  CHECK(bn_backward(&dy, &x, &y, &axis, 1, NULL, zeros, zeros, NULL, 1e-3, 1, sums[0], sums[1]) == BN_OK &&
            sums[0][1] == 0 && sums[1][1] == 0,
        "empty backward: %s", bn_last_error());
}

/* A training backward where variance + epsilon is the smallest double: gamma*s*s
 * overflows, but the channel is constant (Σdy·x̂ = 0), so dx = gamma*s*(dy - mean(dy))
 * is finite; the coefficient of x - mean must be 0, not inf*0 = NaN. */
static void test_backward_tiny_epsilon(void) {
  double x[3] = {2.5, 2.5, 2.5}, dy[3] = {1, -2, 4}, dx[3], mean = 2.5, var = 0, gamma = 0.5;
  int64_t shape[2] = {3, 1}, strides[2] = {8, 8};
  const bn_tensor xt = {x, BN_FLOAT64, 2, shape, strides}, dyt = {dy, BN_FLOAT64, 2, shape, strides},
                  dxt = {dx, BN_FLOAT64, 2, shape, strides};
  const int32_t axis = 1;
  const double smallest = 4.9406564584124654e-324; /* DBL_TRUE_MIN, C11 */
  const double s = 1 / sqrt(smallest);
  for (int isa = BN_ISA_SCALAR; isa <= (int)bn_best_isa(); ++isa) {
    bn_set_isa((bn_isa)isa);
    CHECK(bn_backward(&dyt, &xt, &dxt, &axis, 1, NULL, &mean, &var, &gamma, smallest, 1, NULL, NULL) == BN_OK,
          "backward: %s", bn_last_error());
    for (int i = 0; i < 3; ++i)
      CHECK(fabs(dx[i] - gamma * s * (dy[i] - 1.0)) <= 1e-12 * gamma * s * 4, "%s: dx[%d] = %g, expected %g",
            bn_isa_name((bn_isa)isa), i, dx[i], gamma * s * (dy[i] - 1.0));
  }
  bn_set_isa(bn_best_isa());
}

/* A masked-out position whose x is far from the mean: the coefficient of x - mean
 * (about 5e37) is finite in float32 but its product with x - mean (1e30) is not.
 * The position is not used, so dx there is just gamma*s*dy, not inf*0 = NaN. */
static void test_masked_out_product_overflow(void) {
  float x[3] = {0, 2, 1e30f}, dy[3] = {0, 1e38f, 2}, dx[3];
  uint8_t used[3] = {1, 1, 0};
  int64_t shape[2] = {3, 1}, strides[2] = {4, 4}, mask_strides[2] = {1, 1};
  const bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides}, dyt = {dy, BN_FLOAT32, 2, shape, strides},
                  dxt = {dx, BN_FLOAT32, 2, shape, strides}, mask = {used, BN_UINT8, 2, shape, mask_strides};
  const int32_t axis = 1;
  const double mean = 1, var = 1; /* the moments of the used values 0 and 2 */
  for (int isa = BN_ISA_SCALAR; isa <= (int)bn_best_isa(); ++isa) {
    bn_set_isa((bn_isa)isa);
    CHECK(bn_backward(&dyt, &xt, &dxt, &axis, 1, &mask, &mean, &var, NULL, 1e-20, 1, NULL, NULL) == BN_OK,
          "backward: %s", bn_last_error());
    CHECK(isfinite(dx[0]) && isfinite(dx[1]) && fabs(dx[2] - 2.0) <= 1e-6, "%s: dx = %g %g %g, expected dx[2] = 2",
          bn_isa_name((bn_isa)isa), dx[0], dx[1], dx[2]);
  }
  bn_set_isa(bn_best_isa());
}

int main(void) {
  test_formats();
  test_hand_values();
  test_hand_backward();
  test_layouts();
  test_errors();
  test_errors_backward();
  test_settings();
  test_team_policy();
  test_huge_cache_sizes();
  test_empty_null_negative_strides();
  test_backward_tiny_epsilon();
  test_masked_out_product_overflow();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
