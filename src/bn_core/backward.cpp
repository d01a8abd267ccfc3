// The backward entry points: the local sums (Σdy, Σdy·x̂, the used count) and
// dx from their totals, in one team when both run (as the training forward
// does; in chunks of channels when x and dy would not stay cached between the
// two), or one pass each for a distributed call that reduces the sums between.
#include <atomic>
#include <memory>
#include <vector>

#include "backward.hpp"
#include "bn_core/bn_core.h"
#include "dispatch.hpp"
#include "planning.hpp"
#include "schedule.hpp"
#include "scratch.hpp"
#include "team.hpp"
#include "validate.hpp"

namespace bn_core {
namespace {

// A planned backward call (planned_call has checked it; p's y is dx).
struct backward_call {
  plan &p;
  const double *mean, *variance, *gamma;
  double epsilon;
  bool training;
  bool sums, apply;                       // which passes run
  double *count, *sum_dy, *sum_dy_xhat;   // out of the sums pass, else into apply

  bn_status run() const {
    const int32_t threads = schedule(p);
    backward_state state;
    if (!state.allocate(p, sums ? threads : 0)) return out_of_memory();
    if (sums && p.empty) state.finish(0, p, count, sum_dy, sum_dy_xhat);
    if (p.empty) return BN_OK;
    // Fixed statistics: no term through them (fill_dx without totals).
    const double *totals = training ? count : nullptr;
    if (sums) state.fill_xhat(mean, variance, epsilon);
    else state.fill_dx(mean, variance, gamma, epsilon, totals, sum_dy, sum_dy_xhat);
    return passes(threads, state, totals) ? BN_OK : out_of_memory();
  }

  // The passes on a team; false: out of memory.
  bool passes(int32_t threads, backward_state &state, const double *totals) const {
    const backward_params params = state.params();
    const kernel_table &k = active_kernels();
    const auto sums_of = slot_items(p, threads, [&](int64_t begin, int64_t end, int32_t slot) {
      k.backward_sums(p, begin, end, params, state.slot(slot));
    });
    const auto apply_to = slot_items(p, threads, [&](int64_t begin, int64_t end, int32_t) {
      k.backward_apply(p, begin, end, params);
    });
    const auto merge = [&] {
      state.finish(threads, p, count, sum_dy, sum_dy_xhat);
      if (apply) state.fill_dx(mean, variance, gamma, epsilon, totals, sum_dy, sum_dy_xhat);
    };
    if (sums && apply) return run_two_phases(threads, sums_of, merge, apply_to);
    if (!apply) {
      if (!run_slots(threads, sums_of)) return false;
      merge();
      return true;
    }
    return run_slots(threads, apply_to);
  }
};

// Both passes of a backward over chunks of whole channels, each by one thread:
// the chunk's sums, then its dx while its x and dy are still cached (one read
// of each from memory instead of two). The result does not depend on the thread
// count. count, sum_dy and sum_dy_xhat receive every channel's totals.
bn_status backward_in_chunks(std::vector<chunk> &chunks, int32_t threads, const backward_call &c) {
  std::vector<backward_state> states(static_cast<size_t>(threads));
  for (backward_state &state : states)
    if (!state.allocate(chunks[0].p, 1)) return out_of_memory();
  const kernel_table &k = active_kernels();
  std::atomic<size_t> next_chunk{0};
  run_team(threads, [&](int32_t member, int32_t) {
    backward_state &state = states[member];
    for (size_t i = next_chunk.fetch_add(1, std::memory_order_relaxed); i < chunks.size();) {
      plan &p = chunks[i].p;
      const int64_t c0 = chunks[i].first_channel, items = p.lines * p.segments;
      double *count = c.count + c0, *sum_dy = c.sum_dy + c0, *sum_dy_xhat = c.sum_dy_xhat + c0;
      state.fit(p);
      state.fill_xhat(c.mean + c0, c.variance + c0, c.epsilon);
      k.backward_sums(p, 0, items, state.params(), state.slot(0));
      state.finish(1, p, count, sum_dy, sum_dy_xhat);
      state.fill_dx(c.mean + c0, c.variance + c0, c.gamma ? c.gamma + c0 : nullptr, c.epsilon,
                    c.training ? count : nullptr, sum_dy, sum_dy_xhat);
      const size_t following = claim_and_prefetch_next(next_chunk, chunks, p, true);
      k.backward_apply(p, 0, items, state.params());
      i = following;
    }
  });
  return BN_OK;
}

}  // namespace

bn_status backward_checked(const backward_request &r, const bool is_channel[]) {
  plan p;
  make_plan(*r.x, r.dx, r.mask, r.dy, is_channel, p);
  // The sums are needed for dx in training; scratch when the caller skips them.
  const int64_t channels = p.channels;
  const std::unique_ptr<double[]> scratch = new_doubles(saturating_add(saturating_mul(3, channels), 1), true);
  if (!scratch) return out_of_memory();
  double *count = scratch.get();
  double *sum_dy = r.sum_dy ? r.sum_dy : count + channels;
  double *sum_dy_xhat = r.sum_dy_xhat ? r.sum_dy_xhat : count + 2 * channels;
  const backward_call c{p, r.mean, r.variance, r.gamma, r.epsilon, r.training, true, true,
                        count, sum_dy, sum_dy_xhat};
  const int32_t threads = schedule(p);
  // One thread reads x and dy twice from memory instead: its chunks gained only
  // on tensors several times the L3 and lost on those just above half of it
  // (bench/DESIGN.md, 'A chunked backward fetches the next chunk').
  const int64_t per_chunk =
      p.empty || threads == 1 ? 0 : chunk_channels(*r.x, r.axes, r.n_axes, threads, 2);
  if (per_chunk == 0) return c.run();
  // A chunk's dx is written around the caches: nothing reads it again, and its
  // old lines would come from memory only to be overwritten, while the caches
  // hold this chunk's x and dy and the next chunk's, fetched meanwhile.
  p.stream_y = stream_output(p, 0);
  const int32_t axis = r.axes[0] < 0 ? r.axes[0] + r.x->rank : r.axes[0];
  std::vector<chunk> chunks = cut_into_chunks(*r.x, r.dx, r.mask, r.dy, axis, p, per_chunk);
  return backward_in_chunks(chunks, threads, c);
}

}  // namespace bn_core

using namespace bn_core;

extern "C" {

bn_status bn_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                      const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                      const double *mean, const double *variance, const double *gamma,
                      double epsilon, int32_t training, double *sum_dy, double *sum_dy_xhat) {
  const call_args call{x, {{dy, "dy"}, {dx, "dx"}}, mask, axes, n_axes, {{mean, "mean"}, {variance, "variance"}},
                       &epsilon};
  return guarded([&] {
    bool is_channel[BN_MAX_RANK];
    if (bn_status st = check_call(call, is_channel)) return st;
    return backward_checked({dy, x, dx, axes, n_axes, mask, mean, variance, gamma, epsilon, training != 0,
                             sum_dy, sum_dy_xhat}, is_channel);
  });
}

bn_status bn_backward_sums(const bn_tensor *dy, const bn_tensor *x, const int32_t *axes,
                           int32_t n_axes, const bn_tensor *mask, const double *mean,
                           const double *variance, double epsilon, double *count, double *sum_dy,
                           double *sum_dy_xhat) {
  const call_args call{x, {{dy, "dy"}}, mask, axes, n_axes,
                       {{mean, "mean"}, {variance, "variance"}, {count, "count"}, {sum_dy, "sum_dy"},
                        {sum_dy_xhat, "sum_dy_xhat"}},
                       &epsilon};
  return planned_call(call, nullptr, dy, [&](plan &p) {
    return backward_call{p, mean, variance, nullptr, epsilon, true, true, false,
                         count, sum_dy, sum_dy_xhat}.run();
  });
}

bn_status bn_backward_apply(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                            const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                            const double *mean, const double *variance, const double *gamma,
                            double epsilon, const double *count, const double *sum_dy,
                            const double *sum_dy_xhat) {
  const call_args call{x, {{dy, "dy"}, {dx, "dx"}}, mask, axes, n_axes,
                       {{mean, "mean"}, {variance, "variance"}, {count, "count"}, {sum_dy, "sum_dy"},
                        {sum_dy_xhat, "sum_dy_xhat"}},
                       &epsilon};
  return planned_call(call, dx, dy, [&](plan &p) {
    return backward_call{p, mean, variance, gamma, epsilon, true, false, true,
                         const_cast<double *>(count), const_cast<double *>(sum_dy),
                         const_cast<double *>(sum_dy_xhat)}.run();
  });
}

}  // extern "C"
