/* The tests' counters and CHECK: a failed condition is printed with its place
 * and counted; main reports the totals. One test program per translation unit.
 * Also CHECK_STATUS for the C API's failing calls, and the tests' random numbers. */
#ifndef BN_CORE_TESTS_CHECK_H
#define BN_CORE_TESTS_CHECK_H

#include <stdio.h>
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

/* A failing call must return `expected` and leave a message. */
#define CHECK_STATUS(call, expected, what)                                                   \
  do {                                                                                       \
    const bn_status got_ = (call);                                                           \
    CHECK(got_ == (expected), "%s: status %d, expected %d (%s)", what, (int)got_,            \
          (int)(expected), bn_last_error());                                                 \
    CHECK(strlen(bn_last_error()) > 0, "%s: empty bn_last_error()", what);                   \
  } while (0)

/* Uniform in [0, 1): a linear congruential generator, the same sequence on every
 * platform for a seed. */
static inline double uniform(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return (double)(*state >> 8) / (double)(1u << 24);
}

#endif
