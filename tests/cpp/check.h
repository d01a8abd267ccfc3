/* The tests' counters and CHECK: a failed condition is printed with its place
 * and counted; main reports the totals. One test program per translation unit. */
#ifndef BN_CORE_TESTS_CHECK_H
#define BN_CORE_TESTS_CHECK_H

#include <stdio.h>

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

#endif
