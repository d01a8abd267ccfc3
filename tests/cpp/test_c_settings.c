/* C99 tests of the bn_core C API's settings: thread counts, SIMD level names,
 * the version, cache sizes (up to INT64_MAX), the team policy (results bitwise
 * the same on the whole team and on the caller alone) and bn_last_error being
 * per thread. */
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"

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

int main(void) {
  test_settings();
  test_team_policy();
  test_huge_cache_sizes();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
