/* .Call glue between R and the bn_core C API.
 *
 * An R array is column-major: dims (d1, ..., dk) with d1 varying fastest. The
 * core is handed the same memory with the axes reversed (shape (dk, ..., d1),
 * byte strides (8*d1*...*d(k-1), ..., 8)), so R axis r (0-based) is core axis
 * k-1-r. The core orders channels row-major over its axes in increasing order,
 * which on the reversed view is column-major over R's axes: per-channel
 * vectors come out in R's own order for arrays of several channel axes.
 * Inputs are read in place (never written); outputs are fresh R arrays. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include <R.h>
#include <R_ext/Rdynload.h>
#include <Rinternals.h>

#include "bn_core/bn_core.h"

typedef struct r_view {
  int32_t rank;
  int64_t shape[BN_MAX_RANK];
  int64_t strides[BN_MAX_RANK];
  bn_tensor tensor;
} r_view;

static void fail_core(const char *what) { Rf_error("cbn: %s failed: %s", what, bn_last_error()); }

/* The reversed-axes view of an R array (or plain vector, rank 1) of doubles or raw bytes. */
static void view_array(SEXP x, r_view *v) {
  int is_double = TYPEOF(x) == REALSXP;
  if (!is_double && TYPEOF(x) != RAWSXP) Rf_error("cbn: internal: expected a double or raw array");
  SEXP dim = Rf_getAttrib(x, R_DimSymbol);
  int64_t item = is_double ? (int64_t)sizeof(double) : 1;
  int32_t rank = Rf_isNull(dim) ? 1 : (int32_t)XLENGTH(dim);
  if (rank > BN_MAX_RANK) Rf_error("cbn: arrays of more than %d dimensions are not supported", BN_MAX_RANK);
  int64_t stride = item;
  for (int32_t r = 0; r < rank; ++r) {
    int64_t size = Rf_isNull(dim) ? (int64_t)XLENGTH(x) : (int64_t)INTEGER(dim)[r];
    v->shape[rank - 1 - r] = size;
    v->strides[rank - 1 - r] = stride;
    stride *= size;
  }
  v->rank = rank;
  v->tensor.data = is_double ? (void *)REAL(x) : (void *)RAW(x);
  v->tensor.dtype = is_double ? BN_FLOAT64 : BN_UINT8;
  v->tensor.rank = rank;
  v->tensor.shape = v->shape;
  v->tensor.strides = v->strides;
}

/* 0-based R axes -> core axes of the reversed view. */
static int32_t core_axes(SEXP axes, int32_t rank, int32_t *out) {
  R_xlen_t n = XLENGTH(axes);
  if (n < 1 || n > BN_MAX_RANK) Rf_error("cbn: between 1 and %d axes are needed", BN_MAX_RANK);
  for (R_xlen_t i = 0; i < n; ++i) out[i] = rank - 1 - INTEGER(axes)[i];
  return (int32_t)n;
}

static const bn_tensor *optional_mask(SEXP mask, r_view *v) {
  if (Rf_isNull(mask)) return NULL;
  view_array(mask, v);
  return &v->tensor;
}

static const double *optional_doubles(SEXP values) { return Rf_isNull(values) ? NULL : REAL(values); }

/* A fresh double array with x's dims (no dimnames: outputs are plain arrays). */
static SEXP alloc_like(SEXP x) {
  SEXP y = PROTECT(Rf_allocVector(REALSXP, XLENGTH(x)));
  SEXP dim = Rf_getAttrib(x, R_DimSymbol);
  if (!Rf_isNull(dim)) Rf_setAttrib(y, R_DimSymbol, Rf_duplicate(dim));
  UNPROTECT(1);
  return y;
}

static int64_t channel_count(const r_view *v, const int32_t *axes, int32_t n_axes) {
  int64_t c = 1;
  for (int32_t i = 0; i < n_axes; ++i) {
    if (axes[i] < 0 || axes[i] >= v->rank) Rf_error("cbn: internal: axis out of range");
    c *= v->shape[axes[i]];
  }
  return c;
}

static SEXP named_list(int n, const char **names, SEXP *values) {
  SEXP out = PROTECT(Rf_allocVector(VECSXP, n));
  SEXP nm = PROTECT(Rf_allocVector(STRSXP, n));
  for (int i = 0; i < n; ++i) {
    SET_VECTOR_ELT(out, i, values[i]);
    SET_STRING_ELT(nm, i, Rf_mkChar(names[i]));
  }
  Rf_setAttrib(out, R_NamesSymbol, nm);
  UNPROTECT(2);
  return out;
}

SEXP cbn_moments_c(SEXP x, SEXP axes, SEXP mask) {
  r_view xv, mv;
  int32_t ax[BN_MAX_RANK];
  view_array(x, &xv);
  int32_t n_axes = core_axes(axes, xv.rank, ax);
  int64_t c = channel_count(&xv, ax, n_axes);
  SEXP mean = PROTECT(Rf_allocVector(REALSXP, c));
  SEXP variance = PROTECT(Rf_allocVector(REALSXP, c));
  SEXP count = PROTECT(Rf_allocVector(REALSXP, c));
  if (bn_moments(&xv.tensor, ax, n_axes, optional_mask(mask, &mv), REAL(mean), REAL(variance),
                 REAL(count)) != BN_OK)
    fail_core("bn_moments");
  const char *names[] = {"mean", "variance", "count"};
  SEXP values[] = {mean, variance, count};
  SEXP out = named_list(3, names, values);
  UNPROTECT(3);
  return out;
}

SEXP cbn_normalize_c(SEXP x, SEXP axes, SEXP mean, SEXP variance, SEXP gamma, SEXP beta,
                     SEXP epsilon) {
  r_view xv, yv;
  int32_t ax[BN_MAX_RANK];
  view_array(x, &xv);
  int32_t n_axes = core_axes(axes, xv.rank, ax);
  SEXP y = PROTECT(alloc_like(x));
  view_array(y, &yv);
  if (bn_normalize(&xv.tensor, &yv.tensor, ax, n_axes, REAL(mean), REAL(variance),
                   optional_doubles(gamma), optional_doubles(beta), Rf_asReal(epsilon)) != BN_OK)
    fail_core("bn_normalize");
  UNPROTECT(1);
  return y;
}

SEXP cbn_train_forward_c(SEXP x, SEXP axes, SEXP mask, SEXP gamma, SEXP beta, SEXP epsilon) {
  r_view xv, yv, mv;
  int32_t ax[BN_MAX_RANK];
  view_array(x, &xv);
  int32_t n_axes = core_axes(axes, xv.rank, ax);
  int64_t c = channel_count(&xv, ax, n_axes);
  SEXP y = PROTECT(alloc_like(x));
  SEXP mean = PROTECT(Rf_allocVector(REALSXP, c));
  SEXP variance = PROTECT(Rf_allocVector(REALSXP, c));
  view_array(y, &yv);
  if (bn_train_forward(&xv.tensor, &yv.tensor, ax, n_axes, optional_mask(mask, &mv),
                       optional_doubles(gamma), optional_doubles(beta), Rf_asReal(epsilon),
                       REAL(mean), REAL(variance)) != BN_OK)
    fail_core("bn_train_forward");
  const char *names[] = {"y", "mean", "variance"};
  SEXP values[] = {y, mean, variance};
  SEXP out = named_list(3, names, values);
  UNPROTECT(3);
  return out;
}

SEXP cbn_backward_c(SEXP dy, SEXP x, SEXP axes, SEXP mask, SEXP mean, SEXP variance, SEXP gamma,
                    SEXP epsilon, SEXP training) {
  r_view dyv, xv, dxv, mv;
  int32_t ax[BN_MAX_RANK];
  view_array(dy, &dyv);
  view_array(x, &xv);
  int32_t n_axes = core_axes(axes, xv.rank, ax);
  int64_t c = channel_count(&xv, ax, n_axes);
  SEXP dx = PROTECT(alloc_like(x));
  SEXP sum_dy = PROTECT(Rf_allocVector(REALSXP, c));
  SEXP sum_dy_xhat = PROTECT(Rf_allocVector(REALSXP, c));
  view_array(dx, &dxv);
  if (bn_backward(&dyv.tensor, &xv.tensor, &dxv.tensor, ax, n_axes, optional_mask(mask, &mv),
                  REAL(mean), REAL(variance), optional_doubles(gamma), Rf_asReal(epsilon),
                  Rf_asLogical(training) ? 1 : 0, REAL(sum_dy), REAL(sum_dy_xhat)) != BN_OK)
    fail_core("bn_backward");
  const char *names[] = {"dx", "sum_dy", "sum_dy_xhat"};
  SEXP values[] = {dx, sum_dy, sum_dy_xhat};
  SEXP out = named_list(3, names, values);
  UNPROTECT(3);
  return out;
}

SEXP cbn_set_threads_c(SEXP n) {
  if (bn_set_num_threads((int32_t)Rf_asInteger(n)) != BN_OK) fail_core("bn_set_num_threads");
  return Rf_ScalarInteger(bn_get_num_threads());
}

SEXP cbn_set_isa_c(SEXP name) {
  if (bn_set_isa_by_name(CHAR(STRING_ELT(name, 0))) != BN_OK) fail_core("bn_set_isa_by_name");
  return Rf_mkString(bn_isa_name(bn_get_isa()));
}

SEXP cbn_config_c(void) {
  SEXP version = PROTECT(Rf_mkString(bn_version()));
  SEXP isa = PROTECT(Rf_mkString(bn_isa_name(bn_get_isa())));
  SEXP best = PROTECT(Rf_mkString(bn_isa_name(bn_best_isa())));
  SEXP threads = PROTECT(Rf_ScalarInteger(bn_get_num_threads()));
  SEXP build = PROTECT(Rf_mkString(bn_build_info()));
  const char *names[] = {"version", "isa", "best_isa", "threads", "build"};
  SEXP values[] = {version, isa, best, threads, build};
  SEXP out = named_list(5, names, values);
  UNPROTECT(5);
  return out;
}

/* libgomp's thread pool does not survive fork(): a child (parallel::mclapply)
 * that opened a team of several threads would hang. The child keeps to one
 * thread, which never starts the pool. Setting the count again is harmless
 * next to any other handler doing the same. */
static void child_after_fork(void) { bn_set_num_threads(1); }

/* Through void (*)(void), the generic function pointer type: R's DL_FUNC
 * registration without -Wcast-function-type warnings. */
#define CALL_ENTRY(name, n_args) {#name, (DL_FUNC)(void (*)(void))&name, n_args}

static const R_CallMethodDef call_methods[] = {
    CALL_ENTRY(cbn_moments_c, 3),       CALL_ENTRY(cbn_normalize_c, 7),
    CALL_ENTRY(cbn_train_forward_c, 6), CALL_ENTRY(cbn_backward_c, 9),
    CALL_ENTRY(cbn_set_threads_c, 1),   CALL_ENTRY(cbn_set_isa_c, 1),
    CALL_ENTRY(cbn_config_c, 0),        {NULL, NULL, 0}};

void R_init_cbn(DllInfo *dll) {
  R_registerRoutines(dll, NULL, call_methods, NULL, NULL);
  R_useDynamicSymbols(dll, FALSE);
  R_forceSymbols(dll, TRUE);
  pthread_atfork(NULL, NULL, child_after_fork);
}
