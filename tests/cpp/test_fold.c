/* C99 tests of bn_fold: a dense layer and a convolution (both weight layouts)
 * folded with a batch normalization, checked against the unfolded pair computed
 * here in double precision; float32 weights, in place; every error status. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "bn_core/bn_core.h"
#include "check.h"

enum { IN = 3, OUT = 4 };

static const double kMean[OUT] = {0.5, -1.0, 2.0, 0.0}, kVar[OUT] = {4.0, 0.25, 1.0, 9.0},
                    kGamma[OUT] = {1.5, -0.5, 2.0, 1.0}, kBeta[OUT] = {0.1, 0.2, -0.3, 0.0},
                    kBias[OUT] = {1.0, 0.0, -2.0, 0.5}, kEps = 1e-3;
static const double kInput[IN] = {0.3, -1.2, 2.5};

static double weight_value(int i, int o) { return 0.1 * (i + 1) - 0.05 * o * o + 0.01 * i * o; }

/* bn(dense(x))[o] with the unfolded weights, in double precision. */
static double unfolded(int o) {
  double z = kBias[o];
  for (int i = 0; i < IN; ++i) z += kInput[i] * weight_value(i, o);
  return (z - kMean[o]) / sqrt(kVar[o] + kEps) * kGamma[o] + kBeta[o];
}

/* Dense weights as (in, out) (out_axis -1, Keras) or (out, in) (out_axis 0, PyTorch). */
static void test_dense_layouts(void) {
  for (int torch_layout = 0; torch_layout < 2; ++torch_layout) {
    double w[IN * OUT], bias_out[OUT];
    const int64_t shape_keras[2] = {IN, OUT}, shape_torch[2] = {OUT, IN};
    const int64_t strides_keras[2] = {OUT * 8, 8}, strides_torch[2] = {IN * 8, 8};
    for (int i = 0; i < IN; ++i)
      for (int o = 0; o < OUT; ++o) w[torch_layout ? o * IN + i : i * OUT + o] = weight_value(i, o);
    const bn_tensor t = {w, BN_FLOAT64, 2, torch_layout ? shape_torch : shape_keras,
                         torch_layout ? strides_torch : strides_keras};
    const bn_status st = bn_fold(&t, &t, torch_layout ? 0 : -1, kBias, kMean, kVar, kGamma, kBeta,
                                 kEps, bias_out);
    CHECK(st == BN_OK, "dense fold (%s): status %d (%s)", torch_layout ? "torch" : "keras", (int)st,
          bn_last_error());
    for (int o = 0; o < OUT; ++o) {
      double z = bias_out[o];
      for (int i = 0; i < IN; ++i) z += kInput[i] * w[torch_layout ? o * IN + i : i * OUT + o];
      CHECK(fabs(z - unfolded(o)) <= 1e-13 * (1 + fabs(unfolded(o))), "dense %d: %.17g vs %.17g", o, z,
            unfolded(o));
    }
  }
}

/* A float32 (out, in, 2, 1) convolution weight scaled out of place, no bias,
 * gamma or beta: every weight is w * rsqrt(var + eps) rounded to float32. */
static void test_conv_float32_defaults(void) {
  float w[OUT * IN * 2], folded[OUT * IN * 2];
  for (int k = 0; k < OUT * IN * 2; ++k) w[k] = (float)(0.25 * k - 3.0);
  const int64_t shape[4] = {OUT, IN, 2, 1}, strides[4] = {IN * 2 * 4, 2 * 4, 4, 4};
  const bn_tensor t = {w, BN_FLOAT32, 4, shape, strides}, out = {folded, BN_FLOAT32, 4, shape, strides};
  double bias_out[OUT];
  CHECK(bn_fold(&t, &out, 0, NULL, kMean, kVar, NULL, NULL, kEps, bias_out) == BN_OK, "conv fold: %s",
        bn_last_error());
  for (int k = 0; k < OUT * IN * 2; ++k) {
    const int o = k / (IN * 2);
    const double expected = w[k] / sqrt(kVar[o] + kEps);
    CHECK(fabs(folded[k] - expected) <= 2.5e-7 * fabs(expected), "conv weight %d: %.9g vs %.9g", k, folded[k],
          expected);
  }
  for (int o = 0; o < OUT; ++o) {
    const double expected = -kMean[o] / sqrt(kVar[o] + kEps);
    CHECK(fabs(bias_out[o] - expected) <= 1e-15 * fabs(expected) + 1e-300, "conv bias %d", o);
  }
}

/* Errors leave weight_out and bias_out untouched. */
static void test_errors(void) {
  double w[IN * OUT] = {0}, out_w[IN * OUT], bias_out[OUT] = {7, 7, 7, 7};
  for (int k = 0; k < IN * OUT; ++k) out_w[k] = 5.0;
  const int64_t shape[2] = {IN, OUT}, strides[2] = {OUT * 8, 8};
  const bn_tensor t = {w, BN_FLOAT64, 2, shape, strides}, o = {out_w, BN_FLOAT64, 2, shape, strides};
  const int64_t other_shape[2] = {OUT, IN}, other_strides[2] = {IN * 8, 8};
  const bn_tensor mismatched = {out_w, BN_FLOAT64, 2, other_shape, other_strides};
  struct { bn_status got, expected; const char *what; } cases[] = {
      {bn_fold(NULL, &o, -1, NULL, kMean, kVar, NULL, NULL, kEps, bias_out), BN_ERR_NULL, "null weight"},
      {bn_fold(&t, &o, 2, NULL, kMean, kVar, NULL, NULL, kEps, bias_out), BN_ERR_AXIS, "axis 2 of rank 2"},
      {bn_fold(&t, &o, -1, NULL, NULL, kVar, NULL, NULL, kEps, bias_out), BN_ERR_NULL, "null mean"},
      {bn_fold(&t, &o, -1, NULL, kMean, kVar, NULL, NULL, kEps, NULL), BN_ERR_NULL, "null bias_out"},
      {bn_fold(&t, &o, -1, NULL, kMean, kVar, NULL, NULL, -1.0, bias_out), BN_ERR_VALUE, "negative epsilon"},
      {bn_fold(&t, &mismatched, -1, NULL, kMean, kVar, NULL, NULL, kEps, bias_out), BN_ERR_SHAPE, "shape"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    CHECK(cases[i].got == cases[i].expected, "%s: status %d, expected %d", cases[i].what, (int)cases[i].got,
          (int)cases[i].expected);
    CHECK(strlen(bn_last_error()) > 0 || cases[i].got == BN_OK, "%s: no message", cases[i].what);
  }
  for (int k = 0; k < IN * OUT; ++k) CHECK(out_w[k] == 5.0, "weight_out written by a failed call");
  for (int c = 0; c < OUT; ++c) CHECK(bias_out[c] == 7.0, "bias_out written by a failed call");
}

int main(void) {
  test_dense_layouts();
  test_conv_float32_defaults();
  test_errors();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
