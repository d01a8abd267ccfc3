// The parallel team of a call, made to survive a busy machine.
//
// A call's work is cut into a fixed number of slots (the thread count the
// schedule picks); whichever team member gets to a slot first does it, each
// member taking its own slot first (what it reads stays in its cache). Partial
// results live per slot and merge in slot order, so a result depends on the
// slot count only, never on which thread ran what, nor on how many threads
// actually ran: the caller alone does every slot a late helper has not started.
//
// The end of an OpenMP parallel region still waits for every member, even one
// the OS has not run yet (another process has its core). So a call notes
// whether a helper was late: it entered the region more than kLateArrivalNs
// after the call opened it (it was runnable, but another process had its core
// for a scheduler slice), or the region ended more than max(100 us, the
// caller's own work) after both the caller's work and the last helper's entry
// (a helper lost its core in a slot). Helpers waking from sleep after a pause between
// calls are not late: they arrive within tens of microseconds, and the caller
// meanwhile does the slots they have not started. (Counting those slots as
// lateness made the first call after a pause, the probe that ends a
// caller-alone period, always find its helper late, and kept small calls off
// the team for good.) A member merely finishing its phase a little after
// another is not late either: uneven memory bandwidth does that on an idle
// machine.
// After a late call the following calls run on the caller alone for a while
// (10 ms, doubling while probes find helpers late again, up to 1 s). A call
// that finds another call of this process under way (on a team or not) runs on
// its caller alone, as do all calls for 20 ms after: the callers then already
// keep the cores busy, and a team's helpers would only take a core from one of
// them (and arrive late).
// Between phases members wait for each other with a spin about as long as their
// own part of the phase, then sleep, so a waiting member never keeps a
// preempted one off the core for long.
#ifndef BN_CORE_TEAM_HPP
#define BN_CORE_TEAM_HPP

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bn_core/bn_core.h"

namespace bn_core {

// Threads to run a call of `slots` slots on: `slots`, or 1 while helpers have
// recently been late, while another call of this process is under way (or as
// the policy forces); the caller holds a call_under_way.
int32_t team_for(int32_t slots);
// The team a call of `slots` slots about to start would get now (a hint for
// choices that change speed only, such as streaming stores).
int32_t likely_team(int32_t slots);
// Marks a multi-slot call as under way for its lifetime (team_for counts them).
class call_under_way {
 public:
  call_under_way();
  ~call_under_way();
  call_under_way(const call_under_way &) = delete;
  call_under_way &operator=(const call_under_way &) = delete;
};
// What a parallel call saw: `late` as defined above.
void record_team_call(bool late);
int64_t now_ns();  // a monotonic clock
// A helper entering the region this long after the caller opened it had no core
// to run on: far above a wake-up from sleep (tens of microseconds, up to about
// 0.2 ms on a VM whose idle vCPU the hypervisor parked), below the scheduler
// slice (3 ms and more) a busy neighbour process holds the core for.
constexpr int64_t kLateArrivalNs = 1'000'000;
// The end of the region waiting this long (or the caller's own work, if longer)
// after the caller's work: a helper lost its core.
constexpr int64_t kLateEndNs = 100'000;
void record_serial_call();
// False for a value that is no bn_team_policy.
bool set_team_policy(int32_t policy);

// A flag members wait for: spin a while (team.cpp says how long), then sleep
// until it is set.
class phase_flag {
 public:
  void set();
  bool is_set() const { return done_.load(std::memory_order_acquire); }
  // Spins for about own_part_ns (the waiter's own share of the phase), then sleeps.
  void wait(int64_t own_part_ns);

 private:
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  std::condition_variable woken_;
};

// Slots of one phase, each claimed by exactly one member.
class slot_claims {
 public:
  bool allocate(int32_t slots);  // false: out of memory
  int32_t slots() const { return slots_; }
  bool all_claimed() const { return next_free_hint_.load(std::memory_order_acquire) >= slots_; }

  // Runs fn(slot) for member t's own slots (t, t + team, ...), then for every
  // slot nobody has claimed yet.
  template <class F>
  void run(int32_t t, int32_t team, F &&fn) {
    for (int32_t s = t; s < slots_; s += team)
      if (claim(s)) fn(s);
    for (int32_t s = next_free_hint_.load(std::memory_order_relaxed); s < slots_; ++s)
      if (claim(s)) fn(s);
    next_free_hint_.store(slots_, std::memory_order_release);
  }

 private:
  bool claim(int32_t s) { return !claimed_[s].exchange(true, std::memory_order_acq_rel); }

  int32_t slots_ = 0;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  std::atomic<int32_t> next_free_hint_{0};  // every slot below it is claimed
};

// latest = max(latest, value), from any thread.
inline void note_latest(std::atomic<int64_t> &latest, int64_t value) {
  int64_t seen = latest.load(std::memory_order_relaxed);
  while (value > seen && !latest.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

// Runs body(member, team) on up to `slots` threads (team_for decides how many);
// body must share out its work through slot_claims.
template <class F>
void run_team(int32_t slots, F &&body) {
#ifdef _OPENMP
  const call_under_way counted;
  const int32_t threads = team_for(slots);
  if (threads > 1) {
    const int64_t region_start_ns = now_ns();
    std::atomic<int64_t> last_arrival_ns{region_start_ns};
    int64_t caller_end_ns = 0;
#pragma omp parallel num_threads(threads)
    {
      const int32_t t = omp_get_thread_num(), team = omp_get_num_threads();
      if (t) note_latest(last_arrival_ns, now_ns());
      body(t, team);
      if (t == 0) caller_end_ns = now_ns();
    }
    const int64_t end_ns = now_ns(), arrival_ns = last_arrival_ns.load(std::memory_order_relaxed);
    const int64_t caller_work_ns = caller_end_ns - region_start_ns;
    // The end is late from the caller's work or the last helper's arrival,
    // whichever came later: a wake-up's delay counts only past kLateArrivalNs.
    record_team_call(arrival_ns - region_start_ns > kLateArrivalNs ||
                     end_ns - std::max(caller_end_ns, arrival_ns) > std::max(kLateEndNs, caller_work_ns));
    return;
  }
#endif
  if (slots > 1) record_serial_call();  // also every multi-slot call of a build without OpenMP
  body(0, 1);
}

// Two phases over the same slots with one merge between them (statistics, then
// what uses their totals). The member that finishes the last first-phase slot
// merges; members wait for the merge only when second-phase slots are left.
class two_phase_work {
 public:
  bool allocate(int32_t slots) { return first_.allocate(slots) && second_.allocate(slots); }

  template <class First, class Merge, class Second>
  void run(int32_t t, int32_t team, First &&first, Merge &&merge, Second &&second) {
    const int64_t start_ns = now_ns();
    first_.run(t, team, [&](int32_t s) {
      first(s);
      if (first_done_.fetch_add(1, std::memory_order_acq_rel) + 1 == first_.slots()) {
        merge();
        merged_.set();
      }
    });
    if (second_.all_claimed()) return;
    merged_.wait(now_ns() - start_ns);
    second_.run(t, team, second);
  }

 private:
  slot_claims first_, second_;
  std::atomic<int32_t> first_done_{0};
  phase_flag merged_;
};

// fn(slot) for every slot, on a team; false: out of memory.
template <class F>
bool run_slots(int32_t slots, F &&fn) {
  if (slots <= 1) {  // one slot: the caller runs it, with no claims to allocate
    fn(0);
    return true;
  }
  slot_claims claims;
  if (!claims.allocate(slots)) return false;
  run_team(slots, [&](int32_t t, int32_t team) { claims.run(t, team, fn); });
  return true;
}

// first(slot) for every slot, merge() once, then second(slot) for every slot,
// on one team; false: out of memory.
template <class First, class Merge, class Second>
bool run_two_phases(int32_t slots, First &&first, Merge &&merge, Second &&second) {
  if (slots <= 1) {
    first(0);
    merge();
    second(0);
    return true;
  }
  two_phase_work work;
  if (!work.allocate(slots)) return false;
  run_team(slots, [&](int32_t t, int32_t team) { work.run(t, team, first, merge, second); });
  return true;
}

}  // namespace bn_core

#endif  // BN_CORE_TEAM_HPP
