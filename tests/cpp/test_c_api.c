/* C99 tests of the bn_core C API. Every result is compared with a
 * double-precision loop written here (odometer over the tensor's own strides,
 * two-pass moments), on many layouts, strides, masks and all four dtypes, on
 * every SIMD level this CPU has and on 1 and 2 threads; then every error
 * status, each with a non-empty bn_last_error(). */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_core/bn_core.h"

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++checks;                                              \
    if (!(cond)) {                                         \
      ++failures;                                          \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fprintf(stderr, "\n");                               \
    }                                                      \
  } while (0)

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

static int check_moments(const char *what, const reference *r, bn_dtype dt, const double *mean,
                         const double *variance, const double *count) {
  const double tol = stat_tolerance(dt);
  int ok = 1;
  for (int64_t c = 0; c < r->channels; ++c) {
    const double sd = sqrt(r->variance[c]);
    /* Errors relative to the spread, plus the float64 merge's floor of a few
     * roundings of the mean (what remains at mean/std = 1e4 in float64). */
    const double merge_floor = 8 * DBL_EPSILON * fabs(r->mean[c]);
    const double mean_err = fabs(mean[c] - r->mean[c]), var_err = fabs(variance[c] - r->variance[c]);
    if (mean_err > tol * sd + merge_floor || var_err > tol * r->variance[c] + merge_floor * sd ||
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

static void run_case(const layout_case *lc, bn_dtype dt, const bn_isa *isas, int n_isas) {
  char what[256];
  unsigned seed = 2024u;
  buffer x, x_pristine, y, mask;
  make_case_buffer(&x, lc, dt, lc->x_strides);
  make_case_buffer(&x_pristine, lc, dt, lc->x_strides);
  if (lc->in_place) y = x;
  else make_case_buffer(&y, lc, dt, lc->y_strides);
  /* Every byte of the allocation gets a value, so broadcast and reversed views read data. */
  const int64_t es = element_size(dt);
  for (int64_t i = 0; i < x.span / es; ++i)
    store(x_pristine.allocation + i * es, dt, lc->offset + lc->spread * (uniform(&seed) - 0.5));
  const bn_tensor *mask_t = NULL;
  if (lc->mask_rank) {
    int64_t contiguous[kMaxCaseRank];
    contiguous_strides(lc->mask_rank, lc->mask_shape, contiguous);
    buffer_make(&mask, BN_UINT8, lc->mask_rank, lc->mask_shape, contiguous);
    for (int64_t i = 0; i < mask.span; ++i)
      mask.allocation[i] = (char)(lc->mask_period > 0 ? i % lc->mask_period != 0 : uniform(&seed) > 0.3);
    mask_t = &mask.t;
  }

  reference r;
  reference_moments(&x_pristine.t, lc->axes, lc->n_axes, mask_t, &r);
  /* One spare entry each: never malloc(0). */
  double *gamma = malloc((size_t)(r.channels + 1) * sizeof(double));
  double *beta = malloc((size_t)(r.channels + 1) * sizeof(double));
  double *mean = malloc((size_t)(r.channels + 1) * sizeof(double));
  double *variance = malloc((size_t)(r.channels + 1) * sizeof(double));
  double *count = malloc((size_t)(r.channels + 1) * sizeof(double));
  for (int64_t c = 0; c < r.channels; ++c) {
    gamma[c] = 0.5 + uniform(&seed);
    beta[c] = uniform(&seed) - 0.5;
  }
  const double epsilon = 1e-3;

  for (int i = 0; i < n_isas; ++i) {
    CHECK(bn_set_isa(isas[i]) == BN_OK, "set %s: %s", bn_isa_name(isas[i]), bn_last_error());
    for (int32_t threads = 1; threads <= 2; ++threads) {
      bn_set_num_threads(threads);
      snprintf(what, sizeof what, "%s, %s, %s, %d thread(s)", lc->name, kDtypeNames[dt],
               bn_isa_name(isas[i]), (int)threads);

      copy_buffer(&x, &x_pristine);
      CHECK(bn_moments(&x.t, lc->axes, lc->n_axes, mask_t, mean, variance, count) == BN_OK, "%s: moments: %s",
            what, bn_last_error());
      check_moments(what, &r, dt, mean, variance, count);

      /* Inference with the reference statistics, with and without gamma/beta. */
      CHECK(bn_normalize(&x.t, &y.t, lc->axes, lc->n_axes, r.mean, r.variance, gamma, beta, epsilon) == BN_OK,
            "%s: normalize: %s", what, bn_last_error());
      check_output(what, &x_pristine.t, &y.t, &r, r.mean, r.variance, gamma, beta, epsilon);
      copy_buffer(&x, &x_pristine);
      CHECK(bn_normalize(&x.t, &y.t, lc->axes, lc->n_axes, r.mean, r.variance, NULL, NULL, epsilon) == BN_OK,
            "%s: normalize: %s", what, bn_last_error());
      check_output(what, &x_pristine.t, &y.t, &r, r.mean, r.variance, NULL, NULL, epsilon);

      copy_buffer(&x, &x_pristine);
      CHECK(bn_train_forward(&x.t, &y.t, lc->axes, lc->n_axes, mask_t, gamma, beta, epsilon, mean, variance) ==
                BN_OK,
            "%s: train_forward: %s", what, bn_last_error());
      /* y must be normalized with the statistics returned (checked just above). */
      if (check_moments(what, &r, dt, mean, variance, NULL))
        check_output(what, &x_pristine.t, &y.t, &r, mean, variance, gamma, beta, epsilon);
    }
  }
  bn_set_num_threads(0);

  free(gamma);
  free(beta);
  free(mean);
  free(variance);
  free(count);
  reference_free(&r);
  if (lc->mask_rank) free(mask.allocation);
  if (!lc->in_place) free(y.allocation);
  free(x_pristine.allocation);
  free(x.allocation);
}

static void test_layouts(void) {
  bn_isa isas[3];
  int n_isas = 0;
  const bn_isa all[3] = {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512};
  for (int i = 0; i < 3; ++i)
    if (all[i] <= bn_best_isa()) isas[n_isas++] = all[i];
  for (size_t k = 0; k < sizeof kCases / sizeof kCases[0]; ++k)
    for (int dt = BN_FLOAT32; dt <= BN_BFLOAT16; ++dt) run_case(&kCases[k], (bn_dtype)dt, isas, n_isas);
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
}

/* ---- errors --------------------------------------------------------------------- */

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
   * any address space, so no allocator can hand it out). ASan's operator new
   * reports such a request and aborts instead of throwing std::bad_alloc. */
#ifndef __SANITIZE_ADDRESS__
  int64_t many_channels[2] = {0, (int64_t)1 << 44};
  bad = x;
  bad.shape = many_channels;
  CHECK_STATUS(bn_moments(&bad, axes, 1, NULL, mean, var, NULL), BN_ERR_ALLOC, "moments scratch");
  CHECK_STATUS(bn_train_forward(&bad, &bad, axes, 1, NULL, NULL, NULL, 1e-3, mean, var), BN_ERR_ALLOC,
               "train_forward scratch");
#endif

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

int main(void) {
  test_formats();
  test_hand_values();
  test_layouts();
  test_errors();
  test_settings();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
