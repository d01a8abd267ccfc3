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
// whether a helper was late: the caller had to run a slot that was a helper's
// own (the helper had not even claimed it when the caller ran out of work), or
// entering and leaving the region took longer than the caller's own work and
// over 100 us (the start waits for every helper of the previous region to be
// back in the pool). A member merely finishing its phase a little after
// another is not late: uneven memory bandwidth does that on an idle machine.
// After a late call the following calls run on the caller alone for a while
// (10 ms, doubling while probes find helpers late again, up to 1 s). A process
// runs one team at a time: a call that finds another call's team running runs
// on its caller alone, as calls from several threads at once would otherwise
// wake more threads than there are cores.
// Between phases members wait for each other with a short spin, then sleep,
// so a waiting member never keeps a preempted one off the core for long.
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
// recently been late, while another call of this process runs a team (or as
// the policy forces). `claimed` is set when the call holds the process's team,
// which release_team() gives back.
int32_t team_for(int32_t slots, bool &claimed);
void release_team();
// What a parallel call saw: `late` as defined above.
void record_team_call(bool late);
int64_t now_ns();  // a monotonic clock
// Slots the calling thread ran that were another member's own (slot_claims::run).
extern thread_local int32_t slots_run_for_others;
constexpr int64_t kLateStartEndNs = 100'000;
void record_serial_call();
// False for a value that is no bn_team_policy.
bool set_team_policy(int32_t policy);

// A flag members wait for: spin briefly (a phase is usually a few microseconds
// from done), then sleep until it is set.
class phase_flag {
 public:
  void set();
  bool is_set() const { return done_.load(std::memory_order_acquire); }
  void wait();

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
    for (int32_t s = next_free_hint_.load(std::memory_order_relaxed); s < slots_; ++s) {
      if (!claim(s)) continue;
      if (s % team != t) ++slots_run_for_others;
      fn(s);
    }
    next_free_hint_.store(slots_, std::memory_order_release);
  }

 private:
  bool claim(int32_t s) { return !claimed_[s].exchange(true, std::memory_order_acq_rel); }

  int32_t slots_ = 0;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  std::atomic<int32_t> next_free_hint_{0};  // every slot below it is claimed
};

// Runs body(member, team) on up to `slots` threads (team_for decides how many);
// body must share out its work through slot_claims.
template <class F>
void run_team(int32_t slots, F &&body) {
#ifdef _OPENMP
  bool claimed = false;
  const int32_t threads = team_for(slots, claimed);
  if (threads > 1) {
    std::atomic<int32_t> started{1};
    bool late = false;
    int64_t caller_work_ns = 0;
    slots_run_for_others = 0;
    const int64_t region_start_ns = now_ns();
#pragma omp parallel num_threads(threads)
    {
      const int32_t t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t work_start_ns = t ? 0 : now_ns();
      if (t) started.fetch_add(1, std::memory_order_relaxed);
      body(t, team);
      if (t == 0) {
        late = started.load(std::memory_order_relaxed) < team || slots_run_for_others > 0;
        caller_work_ns = now_ns() - work_start_ns;
      }
    }
    const int64_t overhead_ns = now_ns() - region_start_ns - caller_work_ns;
    if (claimed) release_team();
    record_team_call(late || overhead_ns > std::max(kLateStartEndNs, caller_work_ns));
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
    first_.run(t, team, [&](int32_t s) {
      first(s);
      if (first_done_.fetch_add(1, std::memory_order_acq_rel) + 1 == first_.slots()) {
        merge();
        merged_.set();
      }
    });
    if (second_.all_claimed()) return;
    merged_.wait();
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
