// Checks of results against the reference, of error statuses, and of
// outputs a failing call must leave untouched. Any mismatch prints what and
// where, then aborts, so that libFuzzer reports the input.
#ifndef BN_FUZZ_CHECKS_HPP
#define BN_FUZZ_CHECKS_HPP

#include <cstdint>
#include <string>
#include <vector>

#include "bn_core/bn_core.h"
#include "reference.hpp"

namespace fuzz {

// What a finding's report starts with: the input's configuration and call.
void set_finding_context(const std::string &context);
[[noreturn]] void finding(const std::string &what);

tolerance tolerance_of(bn_dtype dtype);

// got must be want within bound (+ the tolerance's atol): NaN for NaN, the
// same infinity for an infinity; an infinity also passes where the bound
// reaches past the largest finite. A NaN bound skips the check.
void expect_close(const char *what, int64_t i, double got, double want, double bound, const tolerance &tol);

// Statistics of one channel against the reference: exact where its used
// values are finite, not both finite where one is NaN or inf.
void expect_moments(const char *what, int64_t c, double mean, double variance, const moments_ref &ref,
                    const tolerance &tol);

// The error allowed in a channel's mean and variance (or M2/N).
double mean_error(const moments_ref &ref, int64_t c, const tolerance &tol);
double variance_error(const moments_ref &ref, int64_t c, const tolerance &tol);

void expect_status(const char *call, bn_status got, bn_status expected);

// Bytes of the buffers a failing call must not write.
class untouched {
 public:
  void watch(const void *data, int64_t bytes);
  void verify(const char *call) const;

 private:
  struct region {
    const unsigned char *data;
    std::vector<unsigned char> copy;
  };
  std::vector<region> regions_;
};

}  // namespace fuzz

#endif
