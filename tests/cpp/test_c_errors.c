/* C99 tests of the bn_core C API's bad and edge inputs: every error status,
 * each with a non-empty bn_last_error() and nothing written (scratch sizes that
 * overflow or cannot be allocated included); then inputs at the edges that must
 * succeed: empty tensors with NULL data and extreme strides, and backward
 * products that would overflow in a naive formula. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "bn_core/bn_core.h"
#include "check.h"

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

/* Small valid arguments, each test breaking one at a time: a (2, 3) float32 x
 * and dy, a uint8 mask of that shape, a float64 tensor of that shape, the
 * per-channel arrays and the channel axis 1. Made in place: the tensors point
 * into the struct. */
typedef struct {
  float data[6], grad[6];
  double other[6];
  double mean[3], var[3], count[3], sum_dy[3], sum_dy_xhat[3], partial[9];
  uint8_t mask_data[6];
  int64_t shape[2], strides[2], mask_strides[2], other_strides[2];
  bn_tensor x, dy, mask, f64;
  int32_t axes[1];
} args;

static void args_make(args *a) {
  static const args zero;
  *a = zero;
  for (int i = 0; i < 6; ++i) a->mask_data[i] = 1;
  for (int c = 0; c < 3; ++c) a->var[c] = a->count[c] = 1;
  a->shape[0] = 2, a->shape[1] = 3;
  a->strides[0] = 12, a->strides[1] = 4;
  a->mask_strides[0] = 3, a->mask_strides[1] = 1;
  a->other_strides[0] = 24, a->other_strides[1] = 8;
  const bn_tensor x = {a->data, BN_FLOAT32, 2, a->shape, a->strides};
  const bn_tensor dy = {a->grad, BN_FLOAT32, 2, a->shape, a->strides};
  const bn_tensor mask = {a->mask_data, BN_UINT8, 2, a->shape, a->mask_strides};
  const bn_tensor f64 = {a->other, BN_FLOAT64, 2, a->shape, a->other_strides};
  a->x = x, a->dy = dy, a->mask = mask, a->f64 = f64;
  a->axes[0] = 1;
}

static void test_null_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_NULL */
  CHECK_STATUS(bn_moments(NULL, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_NULL, "moments: x NULL");
  CHECK_STATUS(bn_moments(&a.x, NULL, 1, NULL, a.mean, a.var, NULL), BN_ERR_NULL, "moments: axes NULL");
  CHECK_STATUS(bn_moments(&a.x, a.axes, 1, NULL, NULL, a.var, NULL), BN_ERR_NULL, "moments: mean NULL");
  CHECK_STATUS(bn_moments(&a.x, a.axes, 1, NULL, a.mean, NULL, NULL), BN_ERR_NULL, "moments: variance NULL");
  bad = a.x;
  bad.data = NULL;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_NULL, "moments: data NULL");
  bad = a.x;
  bad.shape = NULL;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_NULL, "moments: shape NULL");
  bad = a.x;
  bad.strides = NULL;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_NULL, "moments: strides NULL");
  bad = a.mask;
  bad.data = NULL;
  CHECK_STATUS(bn_moments(&a.x, a.axes, 1, &bad, a.mean, a.var, NULL), BN_ERR_NULL, "moments: mask data NULL");
  CHECK_STATUS(bn_normalize(&a.x, NULL, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: y NULL");
  CHECK_STATUS(bn_normalize(NULL, &a.x, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: x NULL");
  CHECK_STATUS(bn_normalize(&a.x, &a.x, a.axes, 1, NULL, a.var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: mean NULL");
  CHECK_STATUS(bn_normalize(&a.x, &a.x, a.axes, 1, a.mean, NULL, NULL, NULL, 1e-3), BN_ERR_NULL,
               "normalize: variance NULL");
  CHECK_STATUS(bn_normalize(&a.x, &a.x, NULL, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_NULL, "normalize: axes NULL");
  CHECK_STATUS(bn_train_forward(&a.x, NULL, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_NULL,
               "train_forward: y NULL");
  CHECK_STATUS(bn_train_forward(&a.x, &a.x, a.axes, 1, NULL, NULL, NULL, 1e-3, NULL, a.var), BN_ERR_NULL,
               "train_forward: mean NULL");
  CHECK_STATUS(bn_train_forward(&a.x, &a.x, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, NULL), BN_ERR_NULL,
               "train_forward: variance NULL");
}

static void test_rank_and_shape_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_RANK */
  bad = a.x;
  bad.rank = 0;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_RANK, "rank 0");
  bad.rank = -1;
  CHECK_STATUS(bn_normalize(&bad, &a.x, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_RANK, "rank -1");
  bad.rank = BN_MAX_RANK + 1;
  CHECK_STATUS(bn_train_forward(&bad, &a.x, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_RANK,
               "rank above BN_MAX_RANK");
  int64_t ones[BN_MAX_RANK], ones_strides[BN_MAX_RANK];
  for (int i = 0; i < BN_MAX_RANK; ++i) {
    ones[i] = i == BN_MAX_RANK - 1 ? 3 : 1;
    ones_strides[i] = 4;
  }
  const bn_tensor deepest = {a.data, BN_FLOAT32, BN_MAX_RANK, ones, ones_strides};
  int32_t last_axis[1] = {-1};
  CHECK(bn_moments(&deepest, last_axis, 1, NULL, a.mean, a.var, NULL) == BN_OK && a.mean[2] == 0.0,
        "rank BN_MAX_RANK is allowed: %s", bn_last_error());

  /* BN_ERR_SHAPE */
  int64_t negative[2] = {-1, 3}, swapped[2] = {3, 2}, mask_bad[2] = {2, 2}, mask_row[2] = {2, 1};
  bad = a.x;
  bad.shape = negative;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_SHAPE, "negative size");
  bad = a.x;
  bad.shape = swapped;
  CHECK_STATUS(bn_normalize(&a.x, &bad, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_SHAPE, "y shape differs");
  bad = a.x;
  bad.rank = 1;
  CHECK_STATUS(bn_train_forward(&a.x, &bad, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_SHAPE,
               "y rank differs");
  bad = a.mask;
  bad.shape = mask_bad;
  CHECK_STATUS(bn_moments(&a.x, a.axes, 1, &bad, a.mean, a.var, NULL), BN_ERR_SHAPE, "mask does not broadcast");
  bad = a.mask;
  bad.rank = 1;
  CHECK_STATUS(bn_train_forward(&a.x, &a.x, a.axes, 1, &bad, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_SHAPE,
               "mask rank differs");
  bad = a.mask;
  bad.shape = mask_row; /* a broadcastable a.mask is fine */
  CHECK(bn_moments(&a.x, a.axes, 1, &bad, a.mean, a.var, NULL) == BN_OK, "mask (2, 1): %s", bn_last_error());
}

static void test_axis_and_dtype_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_AXIS */
  int32_t out_of_range[1] = {2}, below[1] = {-3}, twice[2] = {1, -1};
  CHECK_STATUS(bn_moments(&a.x, out_of_range, 1, NULL, a.mean, a.var, NULL), BN_ERR_AXIS, "axis 2 of rank 2");
  CHECK_STATUS(bn_normalize(&a.x, &a.x, below, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_AXIS, "axis -3 of rank 2");
  CHECK_STATUS(bn_train_forward(&a.x, &a.x, twice, 2, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_AXIS,
               "axis given twice");
  CHECK_STATUS(bn_moments(&a.x, a.axes, 0, NULL, a.mean, a.var, NULL), BN_ERR_AXIS, "no axis");
  CHECK_STATUS(bn_moments(&a.x, twice, 3, NULL, a.mean, a.var, NULL), BN_ERR_AXIS, "more axes than the rank");

  /* BN_ERR_DTYPE */
  bad = a.x;
  bad.dtype = BN_UINT8;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_DTYPE, "uint8 data");
  /* Unknown values inside each enum's range of values (0-7 for bn_dtype, 0-3 for
   * bn_isa): C++, where the core reads them, leaves values beyond it undefined. */
  bad.dtype = (bn_dtype)7;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_DTYPE, "unknown dtype");
  bad = a.x;
  bad.dtype = BN_FLOAT64;
  CHECK_STATUS(bn_normalize(&a.x, &bad, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_DTYPE, "y dtype differs");
  CHECK_STATUS(bn_moments(&a.x, a.axes, 1, &a.x, a.mean, a.var, NULL), BN_ERR_DTYPE, "float32 mask");
}

static void test_overflow_and_alloc_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_OVERFLOW */
  int64_t huge[2] = {INT64_MAX / 2, 4}, three[2] = {3, 3};
  int64_t span_sum[2] = {INT64_MAX, 4}, span_product[2] = {INT64_MAX / 2 + 1, 4}, lowest[2] = {12, INT64_MIN};
  bad = a.x;
  bad.shape = huge;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_OVERFLOW, "element count");
  bad = a.x;
  bad.strides = span_sum;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_OVERFLOW, "byte span sum");
  bad.shape = three;
  bad.strides = span_product;
  CHECK_STATUS(bn_normalize(&bad, &bad, a.axes, 1, a.mean, a.var, NULL, NULL, 1e-3), BN_ERR_OVERFLOW,
               "byte span product");
  bad = a.x;
  bad.strides = lowest;
  CHECK_STATUS(bn_train_forward(&a.x, &bad, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_OVERFLOW,
               "INT64_MIN stride of y");

  /* BN_ERR_ALLOC: no element, but 2^44 channels of per-thread scratch (far beyond
   * any address space, so no allocator can hand it out; ctest runs this with
   * ASan's allocator_may_return_null=1, so that a sanitized build reports the
   * failed allocation to the core instead of aborting). */
  int64_t many_channels[2] = {0, (int64_t)1 << 44};
  bad = a.x;
  bad.shape = many_channels;
  CHECK_STATUS(bn_moments(&bad, a.axes, 1, NULL, a.mean, a.var, NULL), BN_ERR_ALLOC, "moments scratch");
  CHECK_STATUS(bn_train_forward(&bad, &bad, a.axes, 1, NULL, NULL, NULL, 1e-3, a.mean, a.var), BN_ERR_ALLOC,
               "train_forward scratch");
  test_scratch_size_overflow();
}

static void test_value_and_isa_errors(void) {
  args a;
  args_make(&a);

  /* BN_ERR_VALUE */
  CHECK_STATUS(bn_normalize(&a.x, &a.x, a.axes, 1, a.mean, a.var, NULL, NULL, -1.0), BN_ERR_VALUE, "epsilon < 0");
  CHECK_STATUS(bn_normalize(&a.x, &a.x, a.axes, 1, a.mean, a.var, NULL, NULL, NAN), BN_ERR_VALUE, "epsilon NaN");
  CHECK_STATUS(bn_train_forward(&a.x, &a.x, a.axes, 1, NULL, NULL, NULL, INFINITY, a.mean, a.var), BN_ERR_VALUE,
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
static void test_backward_null_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_NULL */
  CHECK_STATUS(bn_backward(NULL, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dy NULL");
  CHECK_STATUS(bn_backward(&a.dy, NULL, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: x NULL");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, NULL, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dx NULL");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, NULL, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: axes NULL");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, NULL, a.var, NULL, 1e-3, 0, NULL, NULL), BN_ERR_NULL,
               "backward: mean NULL");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, NULL, NULL, 1e-3, 0, NULL, NULL), BN_ERR_NULL,
               "backward: variance NULL");
  bad = a.dy;
  bad.data = NULL;
  CHECK_STATUS(bn_backward(&bad, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_NULL,
               "backward: dy data NULL");
  CHECK_STATUS(bn_backward_sums(&a.dy, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, NULL, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_NULL, "backward_sums: count NULL");
  CHECK_STATUS(bn_backward_sums(&a.dy, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, NULL, a.sum_dy_xhat),
               BN_ERR_NULL, "backward_sums: sum_dy NULL");
  CHECK_STATUS(bn_backward_sums(&a.dy, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, NULL),
               BN_ERR_NULL, "backward_sums: sum_dy_xhat NULL");
  CHECK_STATUS(bn_backward_sums(NULL, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_NULL, "backward_sums: dy NULL");
  CHECK_STATUS(bn_backward_apply(&a.dy, &a.x, NULL, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, a.count, a.sum_dy,
                                 a.sum_dy_xhat),
               BN_ERR_NULL, "backward_apply: dx NULL");
  CHECK_STATUS(
      bn_backward_apply(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, NULL, a.sum_dy, a.sum_dy_xhat),
      BN_ERR_NULL, "backward_apply: count NULL");
  CHECK_STATUS(
      bn_backward_apply(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, a.count, NULL, a.sum_dy_xhat),
      BN_ERR_NULL, "backward_apply: sum_dy NULL");
  CHECK_STATUS(
      bn_backward_apply(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, a.count, a.sum_dy, NULL),
      BN_ERR_NULL, "backward_apply: sum_dy_xhat NULL");
  CHECK_STATUS(bn_moments_partial(&a.x, a.axes, 1, NULL, NULL, NULL), BN_ERR_NULL, "moments_partial: partial NULL");
  CHECK_STATUS(bn_moments_partial(NULL, a.axes, 1, NULL, NULL, a.partial), BN_ERR_NULL, "moments_partial: x NULL");
  CHECK_STATUS(bn_moments_partial(&a.x, NULL, 1, NULL, NULL, a.partial), BN_ERR_NULL, "moments_partial: axes NULL");
  CHECK_STATUS(bn_moments_finalize(3, NULL, NULL, a.mean, a.var), BN_ERR_NULL, "moments_finalize: partial NULL");
  CHECK_STATUS(bn_moments_finalize(3, a.partial, NULL, NULL, a.var), BN_ERR_NULL, "moments_finalize: mean NULL");
  CHECK_STATUS(bn_moments_finalize(3, a.partial, NULL, a.mean, NULL), BN_ERR_NULL, "moments_finalize: variance NULL");
}

static void test_backward_rank_and_shape_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_RANK */
  bad = a.x;
  bad.rank = 0;
  CHECK_STATUS(bn_backward(&a.dy, &bad, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_RANK,
               "backward: x rank 0");
  CHECK_STATUS(bn_moments_partial(&bad, a.axes, 1, NULL, NULL, a.partial), BN_ERR_RANK, "moments_partial: rank 0");

  /* BN_ERR_SHAPE */
  int64_t other_shape[2] = {3, 2}, mask_bad[2] = {2, 2};
  bad = a.dy;
  bad.shape = other_shape;
  CHECK_STATUS(bn_backward(&bad, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: dy shape differs");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &bad, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: dx shape differs");
  CHECK_STATUS(bn_backward_apply(&a.dy, &a.x, &bad, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, a.count, a.sum_dy,
                                 a.sum_dy_xhat),
               BN_ERR_SHAPE, "backward_apply: dx shape differs");
  bad = a.dy;
  bad.rank = 1;
  CHECK_STATUS(bn_backward_sums(&bad, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_SHAPE, "backward_sums: dy rank differs");
  bad = a.mask;
  bad.shape = mask_bad;
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, a.axes, 1, &bad, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_SHAPE,
               "backward: mask does not broadcast");
  CHECK_STATUS(bn_moments_partial(&a.x, a.axes, 1, &bad, NULL, a.partial), BN_ERR_SHAPE,
               "moments_partial: mask does not broadcast");
  CHECK_STATUS(bn_moments_finalize(-1, a.partial, NULL, a.mean, a.var), BN_ERR_SHAPE, "moments_finalize: channels -1");
}

static void test_backward_dtype_axis_and_value_errors(void) {
  args a;
  args_make(&a);
  int32_t out_of_range[1] = {2}, twice[2] = {1, -1};

  /* BN_ERR_DTYPE */
  CHECK_STATUS(bn_backward(&a.f64, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL),
               BN_ERR_DTYPE, "backward: dy dtype differs");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.f64, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL),
               BN_ERR_DTYPE, "backward: dx dtype differs");
  CHECK_STATUS(bn_backward_sums(&a.f64, &a.x, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_DTYPE, "backward_sums: dy dtype differs");
  CHECK_STATUS(bn_backward_apply(&a.dy, &a.x, &a.f64, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, a.count, a.sum_dy,
                                 a.sum_dy_xhat),
               BN_ERR_DTYPE, "backward_apply: dx dtype differs");
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, a.axes, 1, &a.x, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_DTYPE,
               "backward: float32 mask");
  CHECK_STATUS(bn_moments_partial(&a.mask, a.axes, 1, NULL, NULL, a.partial), BN_ERR_DTYPE, "moments_partial: uint8 x");

  /* BN_ERR_AXIS */
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, out_of_range, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL),
               BN_ERR_AXIS, "backward: axis 2 of rank 2");
  CHECK_STATUS(bn_backward_sums(&a.dy, &a.x, twice, 2, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_AXIS, "backward_sums: axis given twice");
  CHECK_STATUS(bn_backward_apply(&a.dy, &a.x, &a.dy, a.axes, 0, NULL, a.mean, a.var, NULL, 1e-3, a.count, a.sum_dy,
                                 a.sum_dy_xhat),
               BN_ERR_AXIS, "backward_apply: no axis");
  CHECK_STATUS(bn_moments_partial(&a.x, out_of_range, 1, NULL, NULL, a.partial), BN_ERR_AXIS,
               "moments_partial: axis 2 of rank 2");

  /* BN_ERR_VALUE */
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, -1.0, 1, NULL, NULL), BN_ERR_VALUE,
               "backward: epsilon < 0");
  CHECK_STATUS(bn_backward_sums(&a.dy, &a.x, a.axes, 1, NULL, a.mean, a.var, NAN, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_VALUE, "backward_sums: epsilon NaN");
  CHECK_STATUS(bn_backward_apply(&a.dy, &a.x, &a.dy, a.axes, 1, NULL, a.mean, a.var, NULL, INFINITY, a.count, a.sum_dy,
                                 a.sum_dy_xhat),
               BN_ERR_VALUE, "backward_apply: epsilon inf");
}

static void test_backward_overflow_and_alloc_errors(void) {
  args a;
  args_make(&a);
  bn_tensor bad;

  /* BN_ERR_OVERFLOW */
  int64_t lowest[2] = {12, INT64_MIN};
  bad = a.dy;
  bad.strides = lowest;
  CHECK_STATUS(bn_backward(&a.dy, &a.x, &bad, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL),
               BN_ERR_OVERFLOW, "backward: INT64_MIN stride of dx");

  /* BN_ERR_ALLOC: 2^44 channels of scratch, as in test_overflow_and_alloc_errors. */
#ifndef __SANITIZE_ADDRESS__
  int64_t many_channels[2] = {0, (int64_t)1 << 44};
  bad = a.x;
  bad.shape = many_channels;
  CHECK_STATUS(bn_backward(&bad, &bad, &bad, a.axes, 1, NULL, a.mean, a.var, NULL, 1e-3, 1, NULL, NULL), BN_ERR_ALLOC,
               "backward scratch");
  CHECK_STATUS(bn_backward_sums(&bad, &bad, a.axes, 1, NULL, a.mean, a.var, 1e-3, a.count, a.sum_dy, a.sum_dy_xhat),
               BN_ERR_ALLOC, "backward_sums scratch");
  CHECK_STATUS(bn_moments_partial(&bad, a.axes, 1, NULL, NULL, a.partial), BN_ERR_ALLOC, "moments_partial scratch");
#endif
}

/* ---- edge inputs that must succeed ----------------------------------------------- */

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
  test_null_errors();
  test_rank_and_shape_errors();
  test_axis_and_dtype_errors();
  test_overflow_and_alloc_errors();
  test_value_and_isa_errors();
  test_backward_null_errors();
  test_backward_rank_and_shape_errors();
  test_backward_dtype_axis_and_value_errors();
  test_backward_overflow_and_alloc_errors();
  test_empty_null_negative_strides();
  test_backward_tiny_epsilon();
  test_masked_out_product_overflow();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
