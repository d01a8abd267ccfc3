/* The C tests' double-precision reference: 16-bit formats decoded and rounded
 * here (not with the library's code), tensors over their own strided
 * allocations, two-pass moments and the backward's formulas with compensated
 * sums, walked by an odometer over each tensor's own strides; and the checks of
 * the library's results against them, with each dtype's tolerance. Functions
 * are static, as check.h's counters are: one test program includes it. */
#ifndef BN_CORE_TESTS_REFERENCE_H
#define BN_CORE_TESTS_REFERENCE_H

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"

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

#endif
