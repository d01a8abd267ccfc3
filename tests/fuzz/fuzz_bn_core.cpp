// libFuzzer harness of the bn_core C API (tests/fuzz/README.md). Each input
// sets the configuration (threads, cache sizes, SIMD level, team policy),
// then runs one scenario: a tensor entry point on random arguments (checked
// against the float64 reference, or broken in one argument and checked for
// the right error status, a message and untouched buffers), or a sequence of
// configuration calls.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "bn_core/bn_core.h"
#include "call.hpp"
#include "checks.hpp"
#include "drivers.hpp"
#include "invalid.hpp"
#include "raw_enums.h"

namespace fuzz {
namespace {

constexpr int32_t kInt32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

bool isa_supported(int32_t isa) { return isa >= BN_ISA_SCALAR && isa <= static_cast<int32_t>(bn_best_isa()); }

// What a configuration call must do, then does it.
void set_threads(int32_t n) {
  expect_status("bn_set_num_threads", bn_set_num_threads(n), BN_OK);
  const int32_t got = bn_get_num_threads();
  if (n > 0 ? got != n : got < 1) finding("bn_get_num_threads() = " + std::to_string(got) + " after setting " + std::to_string(n));
}

void set_cache(int64_t l2, int64_t l3) {
  expect_status("bn_set_cache_bytes", bn_set_cache_bytes(l2, l3), BN_OK);
  int64_t got2 = 0, got3 = 0;
  bn_get_cache_bytes(&got2, &got3);
  if ((l2 > 0 ? got2 != l2 : got2 < 1) || (l3 > 0 ? got3 != l3 : got3 < 1))
    finding("bn_get_cache_bytes after bn_set_cache_bytes(" + std::to_string(l2) + ", " + std::to_string(l3) + ")");
}

void set_isa(int32_t isa) {
  const bool known = isa >= BN_ISA_SCALAR && isa <= BN_ISA_AVX512;
  expect_status("bn_set_isa", fuzz_set_isa(isa), !known ? BN_ERR_VALUE : isa_supported(isa) ? BN_OK : BN_ERR_UNSUPPORTED);
  if (isa_supported(isa) && static_cast<int32_t>(bn_get_isa()) != isa) finding("bn_get_isa after bn_set_isa");
}

void set_isa_by_name(const std::string &bytes, bool null_name) {
  const std::string name = bytes.c_str();  // what the C string says: up to the first NUL
  int32_t isa = null_name || name.empty() ? static_cast<int32_t>(bn_best_isa()) : -1;
  for (int32_t i = BN_ISA_SCALAR; i <= BN_ISA_AVX512; ++i)
    if (name == fuzz_isa_name(i)) isa = i;
  const bn_status expected = isa < 0 ? BN_ERR_VALUE : isa_supported(isa) ? BN_OK : BN_ERR_UNSUPPORTED;
  expect_status("bn_set_isa_by_name", bn_set_isa_by_name(null_name ? nullptr : name.c_str()), expected);
}

void set_policy(int32_t policy) {
  const bool known = policy >= BN_TEAM_ADAPTIVE && policy <= BN_TEAM_CALLER_ONLY;
  expect_status("bn_set_team_policy", fuzz_set_team_policy(policy), known ? BN_OK : BN_ERR_VALUE);
  bn_team_state state;
  bn_get_team_state(&state);
  if (known && static_cast<int32_t>(state.policy) != policy) finding("bn_get_team_state policy after bn_set_team_policy");
}

// Every input starts from a configuration of its own, so that it replays alone.
// Returns it in words.
std::string configure(generator &g) {
  const int32_t threads = g.pick<int32_t>({1, 1, 2, 3, 4, 0, -3});
  const int64_t l2 = g.pick<int64_t>({0, 1, 64, 4096, 1 << 20, -5, kInt64Max});
  const int64_t l3 = g.pick<int64_t>({0, 1, 256, 16384, 1 << 15, -5, kInt64Max});
  const int32_t isa = g.in().ConsumeIntegralInRange<int32_t>(BN_ISA_SCALAR, BN_ISA_AVX512);
  const int32_t policy = g.in().ConsumeIntegralInRange<int32_t>(BN_TEAM_ADAPTIVE, BN_TEAM_CALLER_ONLY);
  set_finding_context("configuring");
  set_threads(threads);
  set_cache(l2, l3);
  set_isa(isa);
  set_policy(policy);
  return "threads " + std::to_string(threads) + " cache " + std::to_string(l2) + "/" + std::to_string(l3) +
         " isa " + std::to_string(isa) + " policy " + std::to_string(policy);
}

// A sequence of configuration calls with any argument.
void run_configuration_calls(generator &g) {
  for (int i = g.in().ConsumeIntegralInRange<int>(1, 8); i > 0; --i) {
    switch (g.in().ConsumeIntegralInRange<int>(0, 5)) {
      case 0: set_threads(g.in().ConsumeIntegral<int32_t>()); break;
      case 1: set_cache(g.in().ConsumeIntegral<int64_t>(), g.in().ConsumeIntegral<int64_t>()); break;
      case 2: set_isa(g.chance(2) ? g.in().ConsumeIntegral<int32_t>() : g.pick<int32_t>({-1, 3, kInt32Min})); break;
      case 3: set_isa_by_name(g.in().ConsumeRandomLengthString(16), g.chance(4)); break;
      case 4: set_policy(g.chance(2) ? g.in().ConsumeIntegral<int32_t>() : g.pick<int32_t>({-1, 3, kInt32Min})); break;
      default:
        if (!*bn_version() || !*bn_build_info() || !fuzz_isa_name(g.in().ConsumeIntegral<int32_t>()))
          finding("empty version, build information or ISA name");
    }
  }
  set_finding_context("configuration calls");
  configure(g);  // back to a valid state (the threads at most 4)
}

// Every byte of the call's buffers: a failing call writes none of them.
untouched watch_everything(const call &c) {
  untouched u;
  for (const tensor_buffer *t : {&c.x, &c.out, &c.dy, &c.mask}) u.watch(t->block.get(), t->bytes);
  for (const double_array *a : {&c.mean, &c.variance, &c.gamma, &c.beta, &c.count, &c.sum_dy, &c.sum_dy_xhat,
                                &c.shift, &c.partial})
    u.watch(a->get(), 8 * a->size());
  return u;
}

void run_tensor_call(generator &g, entry scenario, const std::string &configuration) {
  call c;
  build_call(g, scenario, c);
  set_finding_context(configuration + "; " + describe(c));
  args a;
  pass_arguments(c, a);
  if (g.chance(3)) {
    // One argument broken, in one of the scenario's entry points.
    entry op = scenario;
    if (scenario == entry::moments_partial && g.chance(2)) op = entry::moments_finalize;
    if (scenario == entry::backward_sums && g.chance(2)) op = entry::backward_apply;
    const bn_status expected = break_one_argument(g, op, a);
    if (expected != BN_OK) {
      const untouched before = watch_everything(c);
      expect_status(entry_name(op), invoke(op, a), expected);
      before.verify(entry_name(op));
      return;
    }
  }
  run_and_check(c, a);
}

}  // namespace
}  // namespace fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  using namespace fuzz;
  FuzzedDataProvider in(data, size);
  const int scenario = in.ConsumeIntegralInRange<int>(0, 6);
  generator g(in);
  const std::string configuration = configure(g);
  static const entry scenarios[] = {entry::moments, entry::normalize, entry::train_forward, entry::backward,
                                    entry::moments_partial, entry::backward_sums};
  if (scenario == 6) run_configuration_calls(g);
  else run_tensor_call(g, scenarios[scenario], configuration);
  return 0;
}
