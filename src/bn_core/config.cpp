// The configuration entry points (threads, cache sizes, the team policy) and
// what the library says about itself; the ISA entry points are in dispatch.cpp.
#include <string>

#include "bn_core/bn_core.h"
#include "schedule.hpp"
#include "team.hpp"
#include "validate.hpp"

#ifndef BN_CORE_VERSION
#define BN_CORE_VERSION "0.0.0"
#endif

using namespace bn_core;

extern "C" {

bn_status bn_set_cache_bytes(int64_t l2, int64_t l3) {
  override_cache_bytes(l2, l3);
  return BN_OK;
}

void bn_get_cache_bytes(int64_t *l2, int64_t *l3) {
  if (l2) *l2 = cache_bytes(2);
  if (l3) *l3 = cache_bytes(3);
}

const char *bn_cache_origin(void) {
  thread_local std::string origin;
  try {
    origin = cache_origin();
  } catch (...) {  // out of memory: a C caller gets a string all the same
    return "unknown (out of memory)";
  }
  return origin.c_str();
}

bn_status bn_set_num_threads(int32_t n) {
  set_max_threads(n);
  return BN_OK;
}

int32_t bn_get_num_threads(void) { return max_threads(); }

bn_status bn_set_team_policy(bn_team_policy policy) {
  if (!set_team_policy(enum_value(policy)))
    return fail(BN_ERR_VALUE, "team policy " + std::to_string(enum_value(policy)) +
                                  " is unknown; expected BN_TEAM_ADAPTIVE, BN_TEAM_FULL or "
                                  "BN_TEAM_CALLER_ONLY");
  return BN_OK;
}

const char *bn_last_error(void) { return last_error_message(); }

const char *bn_version(void) { return BN_CORE_VERSION; }

const char *bn_build_info(void) {
#if defined(__clang__)
#define BN_COMPILER "Clang " __clang_version__
#elif defined(__GNUC__)
#define BN_COMPILER "GCC " __VERSION__
#else
#define BN_COMPILER "unknown compiler"
#endif
#define BN_STR2(x) #x
#define BN_STR(x) BN_STR2(x)
#ifdef _OPENMP
  return BN_COMPILER "; OpenMP " BN_STR(_OPENMP);
#else
  return BN_COMPILER "; no OpenMP (serial build)";
#endif
}

}  // extern "C"
