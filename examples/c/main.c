/* bn_core from C99, built with pkg-config:
 *   cc -std=c99 $(pkg-config --cflags bn_core) main.c $(pkg-config --libs bn_core) -lm
 * (add --static to the second pkg-config for the static library).
 * Two channels, channels last: {1, 2, 3, 4} (mean 2.5, variance 1.25) and
 * {10, 10, 10, 10} (mean 10, variance 0). */
#include <math.h>
#include <stdio.h>

#include "bn_core/bn_core.h"

int main(void) {
  float x[8] = {1, 10, 2, 10, 3, 10, 4, 10}, y[8];
  const int64_t shape[2] = {4, 2}, strides[2] = {2 * sizeof(float), sizeof(float)};
  const bn_tensor xt = {x, BN_FLOAT32, 2, shape, strides}, yt = {y, BN_FLOAT32, 2, shape, strides};
  const int32_t axes[1] = {1};
  double mean[2], variance[2];
  if (bn_train_forward(&xt, &yt, axes, 1, NULL, NULL, NULL, 0.0025, mean, variance) != BN_OK) {
    fprintf(stderr, "bn_train_forward: %s\n", bn_last_error());
    return 1;
  }
  printf("bn_core %s: mean %g %g, variance %g %g, y[0] %g\n", bn_version(), mean[0], mean[1], variance[0],
         variance[1], y[0]);
  /* epsilon 0.0025: y[0] = (1 - 2.5) / sqrt(1.2525) and y[1] = 0 / sqrt(0.0025). */
  const int ok = mean[0] == 2.5 && variance[0] == 1.25 && mean[1] == 10 && variance[1] == 0 &&
                 fabs(y[0] + 1.5 / sqrt(1.2525)) < 1e-6 && y[1] == 0;
  printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
