#include "checks.hpp"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace fuzz {

namespace {
std::string finding_context;
}  // namespace

void set_finding_context(const std::string &context) { finding_context = context; }

void finding(const std::string &what) {
  std::fprintf(stderr, "bn_core fuzz finding: %s\n  in: %s\n", what.c_str(), finding_context.c_str());
  std::abort();
}

tolerance tolerance_of(bn_dtype dtype) {
  // out_rtol: a few roundings of the output dtype; stats_rtol: the float32
  // blocked sums (well inside the 1e-6 of variance the kernels promise at
  // mean/std 1e5 on typical data, loose enough for adversarial blocks).
  const double f32 = 0x1p-24;
  switch (dtype) {
    case BN_FLOAT64: return {0x1p-53, 16 * 0x1p-53, 64 * 4.9406564584124654e-324, 1e-10, DBL_MAX};
    case BN_FLOAT16: return {f32, 4 * 0x1p-11, 0x1p-23, 1e-4, 65504.0};
    case BN_BFLOAT16: return {f32, 4 * 0x1p-8, 2 * FLT_MIN, 1e-4, 0x1.fep127};
    default: return {f32, 16 * f32, 2 * FLT_MIN, 1e-4, FLT_MAX};
  }
}

void expect_close(const char *what, int64_t i, double got, double want, double bound, const tolerance &tol) {
  if (std::isnan(bound)) return;
  bool ok;
  if (std::isnan(want)) ok = std::isnan(got);
  else if (std::isinf(want)) ok = got == want;
  else if (std::isinf(got))  // a value past the largest finite, of a sign the bound allows
    ok = (std::signbit(got) == std::signbit(want) || std::fabs(want) <= bound) &&
         std::fabs(want) + bound >= tol.max_finite;
  else ok = std::fabs(got - want) <= bound + tol.out_atol;
  if (ok) return;
  char message[256];
  std::snprintf(message, sizeof message, "%s[%lld] = %.17g, expected %.17g (allowed error %.3g)", what,
                static_cast<long long>(i), got, want, bound + tol.out_atol);
  finding(message);
}

void expect_moments(const char *what, int64_t c, double mean, double variance, const moments_ref &ref,
                    const tolerance &tol) {
  if (ref.non_finite[c]) {
    if (std::isfinite(mean) && std::isfinite(variance))
      finding(std::string(what) + ": finite statistics of channel " + std::to_string(c) + " with a NaN or inf in it");
    return;
  }
  const double stats_atol = tol.unit == 0x1p-53 ? 4 * DBL_MIN : FLT_MIN;
  const tolerance stats{tol.unit, 0, stats_atol, 0, DBL_MAX};
  const std::string name = std::string(what) + " channel";
  expect_close((name + " mean").c_str(), c, mean, ref.mean[c], mean_error(ref, c, tol), stats);
  expect_close((name + " variance").c_str(), c, variance, ref.variance[c], variance_error(ref, c, tol), stats);
}

// The mean is off by the sums' relative error of the spread and by rounding of
// the data's magnitude: in float32 sums, or in float64 merges of partial means
// (each rounds at 2^-53·|mean|; blocks and threads make dozens).
double mean_error(const moments_ref &ref, int64_t c, const tolerance &tol) {
  return tol.stats_rtol * ref.spread[c] + std::fmax(4 * tol.unit, 64 * 0x1p-53) * ref.magnitude[c];
}

// The variance by the sums' relative error, by the mean's rounding squared, and
// by each merge of partial (count, mean, M2) triples, whose float64 means move
// M2/N by up to ~2^-52·|mean|·spread (as in tests/conftest.py).
double variance_error(const moments_ref &ref, int64_t c, const tolerance &tol) {
  const double rounding = 4 * tol.unit * ref.magnitude[c];
  return tol.stats_rtol * (ref.variance[c] + rounding * rounding) + 64 * 0x1p-53 * std::fabs(ref.mean[c]) * ref.spread[c];
}

void expect_status(const char *call, bn_status got, bn_status expected) {
  const char *message = bn_last_error();
  if (got == expected && (expected == BN_OK || (message && *message))) return;
  finding(std::string(call) + ": status " + std::to_string(got) + ", expected " + std::to_string(expected) +
          " (message: '" + (message ? message : "(null)") + "')");
}

void untouched::watch(const void *data, int64_t bytes) {
  if (!data || bytes <= 0) return;
  const auto *p = static_cast<const unsigned char *>(data);
  regions_.push_back(region{p, std::vector<unsigned char>(p, p + bytes)});
}

void untouched::verify(const char *call) const {
  for (const region &r : regions_)
    if (std::memcmp(r.data, r.copy.data(), r.copy.size()) != 0)
      finding(std::string(call) + " failed but wrote to an output");
}

}  // namespace fuzz
