// Adaptation of the team size to how late helpers arrive, and the waits
// between phases (see team.hpp).
#include "team.hpp"

#include <algorithm>
#include <chrono>
#include <new>
#include <thread>

namespace bn_core {
namespace {

using clock_type = std::chrono::steady_clock;

constexpr int64_t kFirstBackoffNs = 10'000'000;   // caller alone for 10 ms after a late helper
// Calls of several threads overlapped: every call stays on its caller for this
// long. Callers in a loop leave short gaps (their own code between calls, the
// GIL of a Python caller: a 5 ms switch interval) in which one call finds
// itself alone; a team it formed then would wait for a helper the other
// callers keep off the cores.
constexpr int64_t kConcurrentHoldNs = 20'000'000;
constexpr int64_t kLongestBackoffNs = 1'000'000'000;
// A member that finished its part of a phase spins about as long as that part
// took (the others, given as much work, should be about as far from done), at
// least kShortestSpinNs and at most kLongestSpinNs; past that, the one still
// working has likely lost its core, and sleeping frees this one's. A shorter
// spin would sleep through ordinary imbalance, and the futex wake-up (tens of
// microseconds on a VM) would then cost more than the wait.
constexpr int64_t kShortestSpinNs = 20'000;
constexpr int64_t kLongestSpinNs = 500'000;

std::atomic<int32_t> policy{BN_TEAM_ADAPTIVE};
std::atomic<int64_t> serial_until_ns{0}, backoff_ns{kFirstBackoffNs};
std::atomic<int64_t> parallel_calls{0}, late_calls{0}, serial_calls{0};
// Multi-slot calls in run_team, on any thread (adaptive policy: a team only for
// a call alone, see team.hpp). Of two calls that overlap, the later one to
// count itself sees both: at most one runs a team.
std::atomic<int32_t> calls_under_way{0};
std::atomic<int64_t> concurrent_until_ns{0};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch())
      .count();
}

namespace {

// The team for `slots` slots while `other_calls` other calls are under way;
// `counted`: the call asking is one of them (it notes the overlap).
int32_t team_given(int32_t slots, int32_t other_calls, bool counted) {
  if (slots <= 1) return 1;
  switch (policy.load(std::memory_order_relaxed)) {
    case BN_TEAM_FULL: return slots;
    case BN_TEAM_CALLER_ONLY: return 1;
    default: break;
  }
  const int64_t now = now_ns();
  if (other_calls > 0) {
    // Extended in steps of a tenth of the hold: overlapping callers would
    // otherwise write the shared line on every call.
    const int64_t until = now + kConcurrentHoldNs;
    if (counted && until - concurrent_until_ns.load(std::memory_order_relaxed) > kConcurrentHoldNs / 10)
      concurrent_until_ns.store(until, std::memory_order_relaxed);
    return 1;
  }
  const bool held = now < std::max(serial_until_ns.load(std::memory_order_relaxed),
                                   concurrent_until_ns.load(std::memory_order_relaxed));
  return held ? 1 : slots;
}

}  // namespace

int32_t team_for(int32_t slots) {
  return team_given(slots, calls_under_way.load(std::memory_order_relaxed) - 1, true);
}

int32_t likely_team(int32_t slots) {
  return team_given(slots, calls_under_way.load(std::memory_order_relaxed), false);
}

call_under_way::call_under_way() { calls_under_way.fetch_add(1, std::memory_order_relaxed); }
call_under_way::~call_under_way() { calls_under_way.fetch_sub(1, std::memory_order_relaxed); }

void record_team_call(bool late) {
  parallel_calls.fetch_add(1, std::memory_order_relaxed);
  if (!late) {
    backoff_ns.store(kFirstBackoffNs, std::memory_order_relaxed);
    return;
  }
  late_calls.fetch_add(1, std::memory_order_relaxed);
  if (policy.load(std::memory_order_relaxed) != BN_TEAM_ADAPTIVE) return;
  // Concurrent callers may both double it: harmless, it is capped.
  const int64_t backoff = backoff_ns.load(std::memory_order_relaxed);
  serial_until_ns.store(now_ns() + backoff, std::memory_order_relaxed);
  backoff_ns.store(std::min(2 * backoff, kLongestBackoffNs), std::memory_order_relaxed);
}

void record_serial_call() { serial_calls.fetch_add(1, std::memory_order_relaxed); }

bool set_team_policy(int32_t p) {
  if (p < BN_TEAM_ADAPTIVE || p > BN_TEAM_CALLER_ONLY) return false;
  policy.store(p, std::memory_order_relaxed);
  serial_until_ns.store(0, std::memory_order_relaxed);
  backoff_ns.store(kFirstBackoffNs, std::memory_order_relaxed);
  return true;
}

void phase_flag::set() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_.store(true, std::memory_order_release);
  }
  woken_.notify_all();
}

void phase_flag::wait(int64_t own_part_ns) {
  if (is_set()) return;
  const int64_t give_up = now_ns() + std::clamp(own_part_ns, kShortestSpinNs, kLongestSpinNs);
  do {
    for (int i = 0; i < 64; ++i) {
      if (is_set()) return;
      cpu_relax();
    }
  } while (now_ns() < give_up);
  std::unique_lock<std::mutex> lock(mutex_);
  woken_.wait(lock, [this] { return is_set(); });
}

bool slot_claims::allocate(int32_t slots) {
  claimed_.reset(new (std::nothrow) std::atomic<bool>[static_cast<size_t>(slots)]);
  if (!claimed_) return false;
  for (int32_t s = 0; s < slots; ++s) claimed_[s].store(false, std::memory_order_relaxed);
  slots_ = slots;
  next_free_hint_.store(0, std::memory_order_relaxed);
  return true;
}

}  // namespace bn_core

using namespace bn_core;

extern "C" void bn_get_team_state(bn_team_state *state) {
  if (!state) return;
  state->policy = static_cast<bn_team_policy>(policy.load(std::memory_order_relaxed));
  const int64_t left = serial_until_ns.load(std::memory_order_relaxed) - now_ns();
  state->caller_only_ms = left > 0 ? static_cast<double>(left) / 1e6 : 0.0;
  state->parallel_calls = parallel_calls.load(std::memory_order_relaxed);
  state->late_calls = late_calls.load(std::memory_order_relaxed);
  state->caller_only_calls = serial_calls.load(std::memory_order_relaxed);
}
