/* Open finding of the fuzzer (tests/fuzz/README.md, "Open findings"): float64
 * data whose variance exceeds DBL_MAX get variance 0, not inf. Build against the
 * core and run: it prints the variance of one channel of 31 values uniform in
 * +-1e200 (true variance ~3e399: inf in float64). */
#include <stdio.h>
#include <stdlib.h>

#include "bn_core/bn_core.h"

int main(void) {
  double x[31 * 8], mean[8], variance[8];
  srand(1);
  for (int i = 0; i < 31 * 8; ++i) x[i] = 1e200 * (2.0 * rand() / RAND_MAX - 1);
  int64_t shape[2] = {31, 8}, strides[2] = {64, 8};
  const bn_tensor xt = {x, BN_FLOAT64, 2, shape, strides};
  const int32_t axis = 1;
  if (bn_moments(&xt, &axis, 1, NULL, mean, variance, NULL) != BN_OK) return 2;
  printf("variance[0] = %g (expected inf)\n", variance[0]);
  return variance[0] == 0;
}
