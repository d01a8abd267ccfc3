/* A process forked after a parallel call must not hang: the child starts on one
 * thread (its parent's OpenMP threads do not exist in it) and computes the same
 * moments; setting a thread count in the child takes effect as usual. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bn_core/bn_core.h"

enum { kRows = 1 << 16, kChannels = 4 }; /* well above the parallel grain */

/* Moments of x[r][c] = r % 7 + c
 * compared with a double loop here. Returns 0 when they agree. */
static int moments_agree(const double *data) {
  const int64_t shape[2] = {kRows, kChannels};
  const int64_t strides[2] = {kChannels * (int64_t)sizeof(double), sizeof(double)};
  const bn_tensor x = {(void *)data, BN_FLOAT64, 2, shape, strides};
  const int32_t axes[1] = {1};
  double mean[kChannels], variance[kChannels];
  if (bn_moments(&x, axes, 1, NULL, mean, variance, NULL) != BN_OK) {
    fprintf(stderr, "bn_moments: %s\n", bn_last_error());
    return 1;
  }
  for (int c = 0; c < kChannels; ++c) {
    double sum = 0, sq = 0;
    for (int r = 0; r < kRows; ++r) sum += data[r * kChannels + c];
    const double m = sum / kRows;
    for (int r = 0; r < kRows; ++r) sq += (data[r * kChannels + c] - m) * (data[r * kChannels + c] - m);
    if (fabs(mean[c] - m) > 1e-13 * fabs(m) || fabs(variance[c] - sq / kRows) > 1e-13 * sq / kRows) {
      fprintf(stderr, "channel %d: mean %.17g/%.17g variance %.17g/%.17g\n", c, mean[c], m, variance[c],
              sq / kRows);
      return 1;
    }
  }
  return 0;
}

static int child(const double *data) {
  alarm(120); /* a hang becomes a failure */
  int bad = 0;
  if (bn_get_num_threads() != 1) {
    fprintf(stderr, "child: %d threads, expected 1 after fork\n", (int)bn_get_num_threads());
    bad = 1;
  }
  bad |= moments_agree(data);
  bn_set_num_threads(3);
  if (bn_get_num_threads() != 3) {
    fprintf(stderr, "child: set 3 threads, got %d\n", (int)bn_get_num_threads());
    bad = 1;
  }
  return bad;
}

int main(void) {
  double *data = malloc(sizeof(double) * kRows * kChannels);
  if (!data) return 1;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChannels; ++c) data[r * kChannels + c] = (double)(r % 7 + c);
  bn_set_num_threads(2);
  int failed = moments_agree(data); /* starts the parent's thread pool */
  fflush(NULL);
  const pid_t pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) _exit(child(data));
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "forked child failed (status %d)\n", status);
    failed = 1;
  }
  if (bn_get_num_threads() != 2) {
    fprintf(stderr, "parent: %d threads, expected its own 2\n", (int)bn_get_num_threads());
    failed = 1;
  }
  failed |= moments_agree(data);
  free(data);
  printf(failed ? "fork test FAILED\n" : "fork test passed\n");
  return failed;
}
