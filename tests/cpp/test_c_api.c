/* C99 tests of the bn_core C API against double-precision loops written here. */
#include <math.h>
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

static double uniform(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return (double)(*state >> 8) / (double)(1u << 24);
}

/* NHWC (channels last) and NCHW (channels first) float32 batches: moments and
 * training forward against a float64 two-pass loop. */
static void test_layouts(int channels_last, int n_threads) {
  enum { N = 4, H = 5, W = 7, C = 3 };
  static float x[N * H * W * C], y[N * H * W * C];
  unsigned seed = 12345u;
  int64_t shape[4], strides[4];
  if (channels_last) {
    int64_t s[4] = {N, H, W, C}, st[4] = {H * W * C * 4, W * C * 4, C * 4, 4};
    memcpy(shape, s, sizeof s);
    memcpy(strides, st, sizeof st);
  } else {
    int64_t s[4] = {N, C, H, W}, st[4] = {C * H * W * 4, H * W * 4, W * 4, 4};
    memcpy(shape, s, sizeof s);
    memcpy(strides, st, sizeof st);
  }
  const int axis = channels_last ? 3 : 1;
  for (int i = 0; i < N * H * W * C; ++i) x[i] = (float)(1000.0 + 3.0 * uniform(&seed));
  bn_tensor xt = {x, BN_FLOAT32, 4, shape, strides};
  bn_tensor yt = {y, BN_FLOAT32, 4, shape, strides};
  int32_t axes[1] = {axis};
  double mean[C], var[C], gamma[C] = {1.0, 2.0, 0.5}, beta[C] = {0.0, -1.0, 3.0};
  bn_set_num_threads(n_threads);
  CHECK(bn_train_forward(&xt, &yt, axes, 1, NULL, gamma, beta, 1e-3, mean, var) == BN_OK, "%s",
        bn_last_error());
  for (int c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    const int count = N * H * W;
    for (int i = 0; i < N * H * W * C; ++i) {
      const int ch = channels_last ? i % C : (i / (H * W)) % C;
      if (ch == c) sum += x[i];
    }
    const double mu = sum / count;
    for (int i = 0; i < N * H * W * C; ++i) {
      const int ch = channels_last ? i % C : (i / (H * W)) % C;
      if (ch == c) sq += (x[i] - mu) * (x[i] - mu);
    }
    const double v = sq / count;
    CHECK(fabs(mean[c] - mu) <= 1e-9 * fabs(mu), "mean[%d] %.12g vs %.12g", c, mean[c], mu);
    CHECK(fabs(var[c] - v) <= 1e-6 * v, "var[%d] %.12g vs %.12g", c, var[c], v);
    for (int i = 0; i < N * H * W * C; ++i) {
      const int ch = channels_last ? i % C : (i / (H * W)) % C;
      if (ch != c) continue;
      const double ref = (x[i] - mu) * gamma[c] / sqrt(v + 1e-3) + beta[c];
      CHECK(fabs(y[i] - ref) <= 1e-5 * (1 + fabs(ref)), "y[%d] %.9g vs %.9g", i, y[i], ref);
    }
  }
  bn_set_num_threads(0);
}

static void test_errors(void) {
  float data[6] = {0};
  int64_t shape[2] = {2, 3}, strides[2] = {12, 4};
  bn_tensor xt = {data, BN_FLOAT32, 2, shape, strides};
  int32_t axes[1] = {1}, bad_axes[1] = {2}, dup_axes[2] = {1, -1};
  double mean[3], var[3];
  CHECK(bn_moments(NULL, axes, 1, NULL, mean, var, NULL) == BN_ERR_NULL, "null x");
  CHECK(strlen(bn_last_error()) > 0, "message set");
  CHECK(bn_moments(&xt, bad_axes, 1, NULL, mean, var, NULL) == BN_ERR_AXIS, "axis range");
  CHECK(bn_moments(&xt, dup_axes, 2, NULL, mean, var, NULL) == BN_ERR_AXIS, "duplicate axis");
  bn_tensor bad = xt;
  bad.rank = 0;
  CHECK(bn_moments(&bad, axes, 1, NULL, mean, var, NULL) == BN_ERR_RANK, "rank 0");
  bad = xt;
  bad.dtype = BN_UINT8;
  CHECK(bn_moments(&bad, axes, 1, NULL, mean, var, NULL) == BN_ERR_DTYPE, "mask dtype as data");
  int64_t huge[2] = {INT64_MAX / 2, 4};
  bad = xt;
  bad.shape = huge;
  CHECK(bn_moments(&bad, axes, 1, NULL, mean, var, NULL) == BN_ERR_OVERFLOW, "overflow");
  int64_t negative[2] = {-1, 3};
  bad = xt;
  bad.shape = negative;
  CHECK(bn_moments(&bad, axes, 1, NULL, mean, var, NULL) == BN_ERR_SHAPE, "negative size");
  CHECK(bn_normalize(&xt, &xt, axes, 1, mean, var, NULL, NULL, -1.0) == BN_ERR_VALUE, "epsilon");
  CHECK(bn_set_isa_by_name("sse9") == BN_ERR_VALUE, "unknown isa name");
}

int main(void) {
  for (int threads = 1; threads <= 2; ++threads) {
    test_layouts(1, threads);
    test_layouts(0, threads);
  }
  test_errors();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
