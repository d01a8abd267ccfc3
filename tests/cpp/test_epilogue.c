/* C99 tests of the fused epilogue (bn_normalize_epilogue,
 * bn_train_forward_epilogue) and its backward (bn_backward_epilogue): every
 * activation, with and without a residual (contiguous, strided, and y itself),
 * on channels-first and channels-last layouts in float32 and float64 on every
 * SIMD level this CPU has, against a double-precision reference written here;
 * then the status of each invalid descriptor. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"

enum { N = 3, C = 5, L = 37, COUNT = N * C * L };

static double activate(bn_activation act, double z, double alpha, double lo, double hi) {
  switch (act) {
    case BN_ACT_RELU: return z < 0 ? 0 : z;
    case BN_ACT_RELU6: return z < 0 ? 0 : z > 6 ? 6 : z;
    case BN_ACT_LEAKY_RELU: return z < 0 ? alpha * z : z;
    case BN_ACT_CLIP: return z < lo ? lo : z > hi ? hi : z;
    case BN_ACT_SILU: return z / (1 + exp(-z));
    case BN_ACT_GELU_TANH: return 0.5 * z * (1 + tanh(sqrt(2 / acos(-1.0)) * (z + 0.044715 * z * z * z)));
    default: return z;
  }
}

/* act'(z) as PyTorch takes it at the kinks. */
static double slope(bn_activation act, double z, double alpha, double lo, double hi) {
  const double s = 1 / (1 + exp(-z)), k = sqrt(2 / acos(-1.0));
  const double t = tanh(k * (z + 0.044715 * z * z * z));
  switch (act) {
    case BN_ACT_RELU: return z > 0;
    case BN_ACT_RELU6: return z > 0 && z < 6;
    case BN_ACT_LEAKY_RELU: return z > 0 ? 1 : alpha;
    case BN_ACT_CLIP: return z > lo && z < hi;
    case BN_ACT_SILU: return s * (1 + z * (1 - s));
    case BN_ACT_GELU_TANH: return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z);
    default: return 1;
  }
}

/* Element (n, c, l) of a buffer whose layout is channels-first (N, C, L) or,
 * channels_last, (N, L, C), `spread` elements apart. */
static int64_t index_of(int channels_last, int64_t spread, int64_t n, int64_t c, int64_t l) {
  return spread * (channels_last ? (n * L + l) * C + c : (n * C + c) * L + l);
}

static double get(const void *data, bn_dtype dt, int64_t i) {
  return dt == BN_FLOAT64 ? ((const double *)data)[i] : ((const float *)data)[i];
}

static void put(void *data, bn_dtype dt, int64_t i, double v) {
  if (dt == BN_FLOAT64) ((double *)data)[i] = v;
  else ((float *)data)[i] = (float)v;
}

typedef struct {
  int64_t shape[3], strides[3];
  bn_tensor t;
} view;

/* A view of data as logical (N, C, L) in the given layout. */
static void view_make(view *v, void *data, bn_dtype dt, int channels_last, int64_t spread) {
  const int64_t es = dt == BN_FLOAT64 ? 8 : 4;
  v->shape[0] = N; v->shape[1] = C; v->shape[2] = L;
  v->strides[0] = es * spread * C * L;
  v->strides[1] = es * spread * (channels_last ? 1 : L);
  v->strides[2] = es * spread * (channels_last ? C : 1);
  v->t.data = data; v->t.dtype = dt; v->t.rank = 3; v->t.shape = v->shape; v->t.strides = v->strides;
}

static void run_case(bn_dtype dt, int channels_last, int residual_kind, bn_activation act, int training) {
  /* residual_kind: 0 none, 1 contiguous, 2 strided (every other element), 3 y itself */
  const int64_t es = dt == BN_FLOAT64 ? 8 : 4, spread = residual_kind == 2 ? 2 : 1;
  char *x = malloc(COUNT * es), *y = malloc(COUNT * es), *r = malloc(2 * COUNT * es);
  double mean[C], var[C], gamma[C], beta[C], ref_r[COUNT];
  const double alpha = 0.1, lo = -0.5, hi = 0.75, eps = 1e-5;
  unsigned seed = 7u + (unsigned)act;
  for (int64_t i = 0; i < COUNT; ++i) {
    seed = seed * 1664525u + 1013904223u;
    put(x, dt, i, 3.0 + 2.0 * ((double)(seed >> 8) / (1 << 24) - 0.5));
    seed = seed * 1664525u + 1013904223u;
    ref_r[i] = (double)(seed >> 8) / (1 << 24) - 0.5;
  }
  for (int c = 0; c < C; ++c) {
    mean[c] = 3.0 + 0.01 * c; var[c] = 0.3 + 0.05 * c; gamma[c] = 1.5 - 0.2 * c; beta[c] = 0.1 * c - 0.2;
  }
  view xv, yv, rv;
  view_make(&xv, x, dt, channels_last, 1);
  view_make(&yv, y, dt, channels_last, 1);
  view_make(&rv, residual_kind == 3 ? (void *)y : (void *)r, dt, channels_last, spread);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t at = index_of(channels_last, 1, n, c, l);
        if (residual_kind == 3) put(y, dt, at, ref_r[at]);
        else put(r, dt, index_of(channels_last, spread, n, c, l), ref_r[at]);
        ref_r[at] = residual_kind ? get(residual_kind == 3 ? y : r, dt,
                                        residual_kind == 3 ? at : index_of(channels_last, spread, n, c, l)) : 0.0;
      }
  const bn_epilogue e = {act, alpha, lo, hi, residual_kind ? &rv.t : NULL};
  const int32_t axis = 1;
  bn_status st;
  if (training) {
    st = bn_train_forward_epilogue(&xv.t, &yv.t, &axis, 1, NULL, gamma, beta, eps, mean, var, &e);
  } else {
    st = bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, gamma, beta, eps, &e);
  }
  CHECK(st == BN_OK, "status %d: %s", (int)st, bn_last_error());
  const double tol = dt == BN_FLOAT64 ? 1e-12 : 3e-6;
  double worst = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t at = index_of(channels_last, 1, n, c, l);
        const double z = (get(x, dt, at) - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c] + ref_r[at];
        const double want = activate(act, z, alpha, lo, hi), err = fabs(get(y, dt, at) - want) / (1 + fabs(want));
        if (err > worst) worst = err;
      }
  CHECK(worst <= tol, "%s %s residual %d act %d training %d: error %g", dt == BN_FLOAT64 ? "float64" : "float32",
        channels_last ? "channels-last" : "channels-first", residual_kind, (int)act, training, worst);
  free(x); free(y); free(r);
}

static void test_values_on_isa(const bn_dtype *dtypes) {
  for (int d = 0; d < 2; ++d)
    for (int cl = 0; cl < 2; ++cl)
      for (int rk = 0; rk < 4; ++rk)
        for (int act = BN_ACT_IDENTITY; act <= BN_ACT_GELU_TANH; ++act)
          for (int training = 0; training < 2; ++training) run_case(dtypes[d], cl, rk, (bn_activation)act, training);
}

static void test_values(void) {
  const bn_dtype dtypes[2] = {BN_FLOAT32, BN_FLOAT64};
  for (int isa = BN_ISA_SCALAR; isa <= BN_ISA_AVX512; ++isa) {
    if (bn_set_isa((bn_isa)isa) != BN_OK) continue; /* a SIMD level this CPU lacks */
    test_values_on_isa(dtypes);
  }
  bn_set_isa(bn_best_isa());
}

static void test_errors(void) {
  float x[COUNT], y[COUNT], r[COUNT + 1];
  double mean[C] = {0}, var[C] = {1, 1, 1, 1, 1};
  view xv, yv, rv, partial;
  view_make(&xv, x, BN_FLOAT32, 0, 1);
  view_make(&yv, y, BN_FLOAT32, 0, 1);
  view_make(&rv, r, BN_FLOAT32, 0, 1);
  view_make(&partial, x + 1, BN_FLOAT32, 0, 1);
  for (int i = 0; i < COUNT; ++i) y[i] = -7.0f;
  const int32_t axis = 1;
  bn_epilogue e = {(bn_activation)7, 0, 0, 0, NULL};
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_VALUE,
               "unknown activation");
  e.activation = BN_ACT_LEAKY_RELU; e.alpha = NAN;
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_VALUE,
               "NaN alpha");
  e.activation = BN_ACT_CLIP; e.lo = 1; e.hi = 0;
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_VALUE,
               "lo > hi");
  e.lo = NAN;
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_VALUE,
               "NaN lo");
  e.activation = BN_ACT_RELU;
  e.residual = &partial.t;
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_VALUE,
               "residual partly overlapping x");
  rv.shape[2] = L - 1;
  e.residual = &rv.t;
  CHECK_STATUS(bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e), BN_ERR_SHAPE,
               "residual shape");
  rv.shape[2] = L;
  rv.t.dtype = BN_FLOAT64;
  CHECK_STATUS(bn_train_forward_epilogue(&xv.t, &yv.t, &axis, 1, NULL, NULL, NULL, 0.0, mean, var, &e),
               BN_ERR_DTYPE, "residual dtype");
  int untouched = 1;
  for (int i = 0; i < COUNT; ++i) untouched &= y[i] == -7.0f;
  CHECK(untouched, "a failed call wrote y");
}

/* One backward through the epilogue: residual_kind 0 none, 1 contiguous, 2
 * strided; with_output: the forward's y given; dresidual wanted or not; dx
 * written over dy (in_place). The statistics are x's own (training) or fixed. */
typedef struct {
  bn_dtype dt;
  int channels_last, residual_kind, with_output, want_dresidual, in_place, training;
  bn_activation act;
} grad_case;

static void fill_case(const grad_case *k, char *x, char *r, char *dy, double *mean, double *var) {
  unsigned seed = 11u + (unsigned)k->act;
  const int64_t spread = k->residual_kind == 2 ? 2 : 1;
  for (int64_t i = 0; i < COUNT; ++i) {
    seed = seed * 1664525u + 1013904223u;
    put(x, k->dt, i, 2.0 + 1.5 * ((double)(seed >> 8) / (1 << 24) - 0.5) + 0.1 * (i % C));
    seed = seed * 1664525u + 1013904223u;
    put(r, k->dt, i * spread, (double)(seed >> 8) / (1 << 24) - 0.5);
    seed = seed * 1664525u + 1013904223u;
    put(dy, k->dt, i, (double)(seed >> 8) / (1 << 24) - 0.5);
  }
  for (int64_t c = 0; c < C; ++c) { /* float64 batch statistics of channel c */
    double s = 0, s2 = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l) s += get(x, k->dt, index_of(k->channels_last, 1, n, c, l));
    mean[c] = s / (N * L);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l) {
        const double d = get(x, k->dt, index_of(k->channels_last, 1, n, c, l)) - mean[c];
        s2 += d * d;
      }
    var[c] = k->training ? s2 / (N * L) : 0.2 + 0.03 * c;
    if (!k->training) mean[c] += 0.05;
  }
}

/* worst = max(worst, error), out of line: GCC 12 for aarch64 crashed (an
 * internal compiler error in the vectorizer) on these reductions inlined. */
static __attribute__((noinline)) void note_error(double *worst, double error) {
  if (error > *worst) *worst = error;
}

/* The largest error of dx, dgamma, dbeta and dresidual against the float64 formula. */
static double grad_error(const grad_case *k, const char *x, const char *r, const double *dy_ref, const char *dx,
                         const char *dres, const double *mean, const double *var, const double *gamma,
                         const double *beta, const double *sum_dy, const double *sum_dy_xhat) {
  const double alpha = 0.1, lo = -0.5, hi = 0.75, eps = 1e-5;
  const int64_t spread = k->residual_kind == 2 ? 2 : 1;
  double worst = 0;
  for (int64_t c = 0; c < C; ++c) {
    double g[N * L], xhat[N * L], sg = 0, sgx = 0;
    const double s = 1 / sqrt(var[c] + eps);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t at = index_of(k->channels_last, 1, n, c, l), j = n * L + l;
        xhat[j] = (get(x, k->dt, at) - mean[c]) * s;
        const double res = k->residual_kind ? get(r, k->dt, index_of(k->channels_last, spread, n, c, l)) : 0;
        g[j] = dy_ref[at] * slope(k->act, xhat[j] * gamma[c] + beta[c] + res, alpha, lo, hi);
        sg += g[j];
        sgx += g[j] * xhat[j];
        if (dres) note_error(&worst, fabs(get(dres, k->dt, at) - g[j]));
      }
    note_error(&worst, fabs(sum_dy[c] - sg) / (N * L));
    note_error(&worst, fabs(sum_dy_xhat[c] - sgx) / (N * L));
    for (int64_t j = 0; j < N * L; ++j) {
      const double want = k->training ? gamma[c] * s * (g[j] - (sg + xhat[j] * sgx) / (N * L)) : gamma[c] * s * g[j];
      note_error(&worst, fabs(get(dx, k->dt, index_of(k->channels_last, 1, j / L, c, j % L)) - want) / (1 + fabs(want)));
    }
  }
  return worst;
}

static void run_grad_case(const grad_case *k) {
  const int64_t es = k->dt == BN_FLOAT64 ? 8 : 4, spread = k->residual_kind == 2 ? 2 : 1;
  char *x = malloc(COUNT * es), *y = malloc(COUNT * es), *r = malloc(2 * COUNT * es), *dy = malloc(COUNT * es);
  char *dx = k->in_place ? dy : malloc(COUNT * es), *dres = malloc(COUNT * es);
  double mean[C], var[C], gamma[C], beta[C], sum_dy[C], sum_dy_xhat[C], dy_ref[COUNT];
  fill_case(k, x, r, dy, mean, var);
  for (int64_t i = 0; i < COUNT; ++i) dy_ref[i] = get(dy, k->dt, i);
  for (int c = 0; c < C; ++c) { gamma[c] = 1.5 - 0.2 * c; beta[c] = 0.1 * c - 0.2; }
  view xv, yv, rv, dyv, dxv, dresv;
  view_make(&xv, x, k->dt, k->channels_last, 1);
  view_make(&yv, y, k->dt, k->channels_last, 1);
  view_make(&rv, r, k->dt, k->channels_last, spread);
  view_make(&dyv, dy, k->dt, k->channels_last, 1);
  view_make(&dxv, dx, k->dt, k->channels_last, 1);
  view_make(&dresv, dres, k->dt, k->channels_last, 1);
  const bn_epilogue e = {k->act, 0.1, -0.5, 0.75, k->residual_kind ? &rv.t : NULL};
  const int32_t axis = 1;
  bn_status st = bn_normalize_epilogue(&xv.t, &yv.t, &axis, 1, mean, var, gamma, beta, 1e-5, &e);
  CHECK(st == BN_OK, "forward status %d: %s", (int)st, bn_last_error());
  st = bn_backward_epilogue(&dyv.t, &xv.t, &dxv.t, &axis, 1, NULL, mean, var, gamma, beta, 1e-5, k->training,
                            sum_dy, sum_dy_xhat, &e, k->with_output ? &yv.t : NULL,
                            k->want_dresidual ? &dresv.t : NULL);
  CHECK(st == BN_OK, "backward status %d: %s", (int)st, bn_last_error());
  const double worst = grad_error(k, x, r, dy_ref, dx, k->want_dresidual ? dres : NULL, mean, var, gamma, beta,
                                  sum_dy, sum_dy_xhat);
  CHECK(worst <= (k->dt == BN_FLOAT64 ? 1e-11 : 2e-5),
        "backward %s %s residual %d output %d dresidual %d in place %d act %d training %d: error %g",
        k->dt == BN_FLOAT64 ? "float64" : "float32", k->channels_last ? "channels-last" : "channels-first",
        k->residual_kind, k->with_output, k->want_dresidual, k->in_place, (int)k->act, k->training, worst);
  free(x); free(y); free(r); free(dy); free(dres);
  if (!k->in_place) free(dx);
}

static void test_gradients(void) {
  for (int isa = BN_ISA_SCALAR; isa <= BN_ISA_AVX512; ++isa) {
    if (bn_set_isa((bn_isa)isa) != BN_OK) continue;
    for (int bits = 0; bits < 128; ++bits)
      for (int act = BN_ACT_IDENTITY; act <= BN_ACT_GELU_TANH; ++act) {
        const grad_case k = {bits & 1 ? BN_FLOAT64 : BN_FLOAT32, (bits >> 1) & 1, ((bits >> 2) & 3) % 3,
                             (bits >> 4) & 1, (bits >> 5) & 1, (bits >> 6) & 1, 1, (bn_activation)act};
        grad_case both = k;
        for (both.training = 0; both.training < 2; ++both.training) run_grad_case(&both);
      }
  }
  bn_set_isa(bn_best_isa());
}

static void test_gradient_errors(void) {
  float x[COUNT], dy[COUNT], dx[COUNT], g[COUNT];
  double mean[C] = {0}, var[C] = {1, 1, 1, 1, 1}, s1[C], s2[C];
  view xv, dyv, dxv, gv, partial;
  view_make(&xv, x, BN_FLOAT32, 0, 1);
  view_make(&dyv, dy, BN_FLOAT32, 0, 1);
  view_make(&dxv, dx, BN_FLOAT32, 0, 1);
  view_make(&gv, g, BN_FLOAT32, 0, 1);
  view_make(&partial, dy + 1, BN_FLOAT32, 0, 1);
  for (int i = 0; i < COUNT; ++i) { x[i] = (float)i; dy[i] = 1.0f; dx[i] = g[i] = -7.0f; }
  const int32_t axis = 1;
  const bn_epilogue e = {BN_ACT_RELU, 0, 0, 0, NULL};
  CHECK_STATUS(bn_backward_epilogue(&dyv.t, &xv.t, &dxv.t, &axis, 1, NULL, mean, var, NULL, NULL, 0.0, 1, s1, s2,
                                    NULL, NULL, NULL), BN_ERR_NULL, "no epilogue");
  CHECK_STATUS(bn_backward_epilogue(&dyv.t, &xv.t, &dxv.t, &axis, 1, NULL, mean, var, NULL, NULL, 0.0, 1, s1, s2,
                                    &e, NULL, &xv.t), BN_ERR_VALUE, "dresidual is x");
  CHECK_STATUS(bn_backward_epilogue(&dyv.t, &xv.t, &dxv.t, &axis, 1, NULL, mean, var, NULL, NULL, 0.0, 1, s1, s2,
                                    &e, NULL, &dxv.t), BN_ERR_VALUE, "dresidual is dx");
  CHECK_STATUS(bn_epilogue_gradient(&dyv.t, &xv.t, &partial.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e, NULL),
               BN_ERR_VALUE, "g partly overlapping dy");
  gv.shape[2] = L - 1;
  CHECK_STATUS(bn_epilogue_gradient(&dyv.t, &xv.t, &dxv.t, &axis, 1, mean, var, NULL, NULL, 0.0, &e, &gv.t),
               BN_ERR_SHAPE, "output shape");
  int untouched = 1;
  for (int i = 0; i < COUNT; ++i) untouched &= dx[i] == -7.0f && g[i] == -7.0f;
  CHECK(untouched, "a failed call wrote dx or g");
}

int main(void) {
  test_values();
  test_gradients();
  test_gradient_errors();
  test_errors();
  printf("%d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
