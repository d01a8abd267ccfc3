/* Instruction counts of the core's calls on the bench/compare.py layouts (smaller
 * batches), for callgrind: each call runs between CALLGRIND_ZERO_STATS and
 * CALLGRIND_DUMP_STATS_AT("<case> <call>"), so every dump holds one call.
 * Run through bench/callgrind/count.sh, which prints one line per call. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <valgrind/callgrind.h>

#include "bn_core/bn_core.h"

typedef struct {
  const char *name;
  int32_t rank;
  int64_t shape[4];
  int32_t channel_axis;
} call_case;

/* compare.py's cases with the batch cut so that callgrind finishes in seconds. */
static const call_case kCases[] = {
    {"2x56x56x64", 4, {2, 56, 56, 64}, 3},    {"2x64x56x56", 4, {2, 64, 56, 56}, 1},
    {"8x14x14x256", 4, {8, 14, 14, 256}, 3},  {"8x256x14x14", 4, {8, 256, 14, 14}, 1},
    {"256x1024", 2, {256, 1024}, 1},          {"128x2048", 2, {128, 2048}, 1},
    {"2x224x224x3", 4, {2, 224, 224, 3}, 3},  {"2x3x224x224", 4, {2, 3, 224, 224}, 1},
    {"4x256x256x1", 4, {4, 256, 256, 1}, 3},  {"4x1x256x256", 4, {4, 1, 256, 256}, 1},
    {"1x56x56x256", 4, {1, 56, 56, 256}, 3},  {"1x256x56x56", 4, {1, 256, 56, 56}, 1},
    {"2x3", 2, {2, 3}, 1},
};

static void check(bn_status s, const char *what) {
  if (s != BN_OK) {
    fprintf(stderr, "%s: %s\n", what, bn_last_error());
    exit(1);
  }
}

static void run_case(const call_case *c) {
  int64_t n = 1, strides[4];
  for (int i = c->rank - 1; i >= 0; --i) {
    strides[i] = 4 * n;
    n *= c->shape[i];
  }
  int64_t channels = c->shape[c->channel_axis];
  float *x = malloc(4 * n), *y = malloc(4 * n), *dy = malloc(4 * n), *dx = malloc(4 * n);
  double *mean = malloc(8 * channels), *var = malloc(8 * channels);
  double *gamma = malloc(8 * channels), *beta = malloc(8 * channels);
  double *sum_dy = malloc(8 * channels), *sum_dy_xhat = malloc(8 * channels);
  uint32_t r = 12345;
  for (int64_t i = 0; i < n; ++i) {
    r = r * 1664525u + 1013904223u;
    x[i] = (float)(r >> 8) / 16777216.0f * 4.0f + 1.0f;
    dy[i] = (float)(r >> 16) / 65536.0f - 0.5f;
  }
  for (int64_t k = 0; k < channels; ++k) {
    gamma[k] = 1.0 + 0.01 * (double)k;
    beta[k] = 0.1;
  }
  const int32_t axes[1] = {c->channel_axis}, n_axes = 1;  /* the channel axis */
  bn_tensor tx = {x, BN_FLOAT32, c->rank, c->shape, strides};
  bn_tensor ty = {y, BN_FLOAT32, c->rank, c->shape, strides};
  bn_tensor tdy = {dy, BN_FLOAT32, c->rank, c->shape, strides};
  bn_tensor tdx = {dx, BN_FLOAT32, c->rank, c->shape, strides};
  char label[64];

  CALLGRIND_ZERO_STATS;
  check(bn_moments(&tx, axes, n_axes, NULL, mean, var, NULL), "moments");
  snprintf(label, sizeof label, "%s moments", c->name);
  CALLGRIND_DUMP_STATS_AT(label);
  check(bn_normalize(&tx, &ty, axes, n_axes, mean, var, gamma, beta, 1e-3), "normalize");
  snprintf(label, sizeof label, "%s normalize", c->name);
  CALLGRIND_DUMP_STATS_AT(label);
  check(bn_train_forward(&tx, &ty, axes, n_axes, NULL, gamma, beta, 1e-3, mean, var), "train");
  snprintf(label, sizeof label, "%s train", c->name);
  CALLGRIND_DUMP_STATS_AT(label);
  check(bn_backward(&tdy, &tx, &tdx, axes, n_axes, NULL, mean, var, gamma, 1e-3, 1, sum_dy,
                    sum_dy_xhat),
        "backward");
  snprintf(label, sizeof label, "%s backward", c->name);
  CALLGRIND_DUMP_STATS_AT(label);
  free(x), free(y), free(dy), free(dx), free(mean), free(var);
  free(gamma), free(beta), free(sum_dy), free(sum_dy_xhat);
}

int main(void) {
  check(bn_set_num_threads(1), "threads");
  check(bn_set_isa_by_name(getenv("CBN_ISA")), "CBN_ISA");
  for (size_t i = 0; i < sizeof kCases / sizeof kCases[0]; ++i) run_case(&kCases[i]);
  return 0;
}
