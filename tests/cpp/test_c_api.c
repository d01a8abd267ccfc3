/* C99 tests of the bn_core C API's values. Every result is compared with the
 * double-precision reference of reference.h on many layouts, strides, masks and
 * all four dtypes, on every SIMD level this CPU has and on 1 and 2 threads:
 * moments, normalization, the training forward (also in chunks of channels,
 * under small cache sizes), the backward, and the distributed phases on the
 * batch cut into shards (one empty). Then hand-derived values. Errors are
 * test_c_errors.c's, settings test_c_settings.c's. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"
#include "reference.h"

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

int main(void) {
  test_formats();
  test_hand_values();
  test_hand_backward();
  test_layouts();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
