// The forward entry points: statistics (bn_moments, and the partial/finalize
// pair of a distributed call), normalization with given statistics, and the
// training forward (statistics, then normalization while x is still cached).
#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <new>
#include <vector>

#include "bn_core/bn_core.h"
#include "dispatch.hpp"
#include "planning.hpp"
#include "schedule.hpp"
#include "scratch.hpp"
#include "team.hpp"
#include "validate.hpp"

namespace bn_core {
namespace {

// The statistics of a planned call (count may be null).
bn_status moments_of(plan &p, double *mean, double *variance, double *count) {
  const int32_t threads = schedule(p);
  moments_state state;
  if (!state.allocate(p, threads)) return out_of_memory();
  const kernel_table &k = active_kernels();
  const auto moments = slot_items(p, threads, [&](int64_t begin, int64_t end, int32_t slot) {
    k.moments(p, begin, end, state.slot(slot));
  });
  if (!p.empty && !run_slots(threads, moments)) return out_of_memory();
  state.finish(p.empty ? 0 : threads, p, mean, variance, count);
  return BN_OK;
}


// What a training forward produces from what.
struct training {
  const double *gamma, *beta;
  double epsilon;
  double *mean, *variance;
};

// One team: statistics, merge, then each slot normalizes the range it just
// read (still warm in its thread's cache).
bn_status train_in_one_team(const plan &whole, int32_t threads, const training &t) {
  moments_state state;
  affine_state affine;
  if (!state.allocate(whole, threads) || !affine.allocate(whole)) return out_of_memory();
  if (whole.empty) {
    state.finish(0, whole, t.mean, t.variance, nullptr);
    return BN_OK;
  }
  const affine_params params = affine.params();
  const kernel_table &k = active_kernels();
  const auto moments = slot_items(whole, threads, [&](int64_t begin, int64_t end, int32_t slot) {
    k.moments(whole, begin, end, state.slot(slot));
  });
  const auto merge = [&] {
    state.finish(threads, whole, t.mean, t.variance, nullptr);
    affine.fill(t.mean, t.variance, t.gamma, t.beta, t.epsilon);
  };
  const auto walk = k.normalize_walk(whole);
  const auto normalize = slot_items(whole, threads, [&](int64_t begin, int64_t end, int32_t) {
    walk(whole, begin, end, params);
  });
  return run_two_phases(threads, moments, merge, normalize) ? BN_OK : out_of_memory();
}

// One team, each thread taking whole chunks (no barrier): statistics, then
// normalize from the caches. The result does not depend on the thread count.
bn_status train_in_chunks(std::vector<chunk> &chunks, int32_t threads, const training &t) {
  std::vector<moments_state> states(static_cast<size_t>(threads));
  std::vector<affine_state> affines(static_cast<size_t>(threads));
  for (int32_t i = 0; i < threads; ++i)
    if (!states[i].allocate(chunks[0].p, 1) || !affines[i].allocate(chunks[0].p)) return out_of_memory();
  const kernel_table &k = active_kernels();
  std::atomic<size_t> next_chunk{0};
  run_team(threads, [&](int32_t member, int32_t) {
    moments_state &state = states[member];
    affine_state &affine = affines[member];
    const affine_params params = affine.params();
    for (size_t i = next_chunk.fetch_add(1, std::memory_order_relaxed); i < chunks.size();) {
      plan &p = chunks[i].p;
      const int64_t c0 = chunks[i].first_channel, items = p.lines * p.segments;
      state.reset(p);
      k.moments(p, 0, items, state.slot(0));
      state.finish(1, p, t.mean + c0, t.variance + c0, nullptr);
      affine.fit(p);
      affine.fill(t.mean + c0, t.variance + c0, t.gamma ? t.gamma + c0 : nullptr,
                  t.beta ? t.beta + c0 : nullptr, t.epsilon);
      const size_t following = claim_and_prefetch_next(next_chunk, chunks, p, false);
      k.normalize_walk(p)(p, 0, items, params);
      i = following;
    }
  });
  return BN_OK;
}

}  // namespace
}  // namespace bn_core

using namespace bn_core;

extern "C" {

bn_status bn_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                     double *mean, double *variance, double *count) {
  const call_args call{x, {}, mask, axes, n_axes, {{mean, "mean"}, {variance, "variance"}}, nullptr};
  return planned_call(call, nullptr, nullptr, [&](plan &p) { return moments_of(p, mean, variance, count); });
}

bn_status bn_normalize(const bn_tensor *x, const bn_tensor *y, const int32_t *axes, int32_t n_axes,
                       const double *mean, const double *variance, const double *gamma,
                       const double *beta, double epsilon) {
  return bn_normalize_epilogue(x, y, axes, n_axes, mean, variance, gamma, beta, epsilon, nullptr);
}

bn_status bn_normalize_epilogue(const bn_tensor *x, const bn_tensor *y, const int32_t *axes, int32_t n_axes,
                                const double *mean, const double *variance, const double *gamma,
                                const double *beta, double epsilon, const bn_epilogue *epilogue) {
  const call_args call{x, {{y, "y"}}, nullptr, axes, n_axes, {{mean, "mean"}, {variance, "variance"}}, &epsilon,
                       epilogue};
  return planned_forward(call, y, [&](plan &p) {
    if (p.empty) return BN_OK;
    const int32_t threads = schedule(p);
    const int32_t team = likely_team(threads);
    p.stream_y = stream_output(p, saturating_add(cache_bytes(3), saturating_mul(team - 1, cache_bytes(2))) / 2);
    affine_state affine;
    if (!affine.allocate(p)) return out_of_memory();
    affine.fill(mean, variance, gamma, beta, epsilon);
    const affine_params params = affine.params();
    const auto walk = active_kernels().normalize_walk(p);
    const auto normalize = slot_items(p, threads, [&](int64_t begin, int64_t end, int32_t) {
      walk(p, begin, end, params);
    });
    return run_slots(threads, normalize) ? BN_OK : out_of_memory();
  });
}

bn_status bn_train_forward(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                           int32_t n_axes, const bn_tensor *mask, const double *gamma,
                           const double *beta, double epsilon, double *mean, double *variance) {
  return bn_train_forward_epilogue(x, y, axes, n_axes, mask, gamma, beta, epsilon, mean, variance, nullptr);
}

bn_status bn_train_forward_epilogue(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                                    int32_t n_axes, const bn_tensor *mask, const double *gamma,
                                    const double *beta, double epsilon, double *mean, double *variance,
                                    const bn_epilogue *epilogue) {
  const call_args call{x, {{y, "y"}}, mask, axes, n_axes, {{mean, "mean"}, {variance, "variance"}}, &epsilon,
                       epilogue};
  return planned_forward(call, y, [&](plan &whole) {
    whole.stream_y = stream_output(whole, cache_bytes(3) / 2);
    const int32_t threads = schedule(whole);
    const training t{gamma, beta, epsilon, mean, variance};
    const int64_t per_chunk = whole.empty ? 0 : chunk_channels(*x, axes, n_axes, threads, 1);
    if (per_chunk == 0) return train_in_one_team(whole, threads, t);
    const int32_t axis = axes[0] < 0 ? axes[0] + x->rank : axes[0];
    const bn_tensor *residual = epilogue ? epilogue->residual : nullptr;
    std::vector<chunk> chunks = cut_into_chunks(*x, y, mask, residual, axis, whole, per_chunk);
    return train_in_chunks(chunks, threads, t);
  });
}

bn_status bn_moments_partial(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                             const bn_tensor *mask, const double *shift, double *partial) {
  const call_args call{x, {}, mask, axes, n_axes, {{partial, "partial"}}, nullptr};
  return planned_call(call, nullptr, nullptr, [&](plan &p) {
    const int64_t channels = p.channels;
    if (saturating_mul(3 * sizeof(double), channels) > std::numeric_limits<int64_t>::max() / 2)
      return fail(BN_ERR_OVERFLOW, "x has " + std::to_string(channels) +
                                       " channels; partial (3 of each) cannot be that large");
    double *count = partial, *s1 = partial + channels, *s2 = partial + 2 * channels;
    // s1/s2 hold mean and variance until they are turned into shifted sums.
    if (bn_status st = moments_of(p, s1, s2, count)) return st;
    for (int64_t c = 0; c < channels; ++c) {
      const double n = count[c], d = s1[c] - (shift ? shift[c] : 0.0);
      s1[c] = n * d;
      s2[c] = n * s2[c] + n * d * d;
    }
    return BN_OK;
  });
}

bn_status bn_moments_finalize(int64_t channels, const double *partial, const double *shift,
                              double *mean, double *variance) {
  if (bn_status st = check_arrays({{partial, "partial"}, {mean, "mean"}, {variance, "variance"}})) return st;
  if (channels < 0) return fail(BN_ERR_SHAPE, "channels is " + std::to_string(channels) + "; expected >= 0");
  const double *count = partial, *s1 = partial + channels, *s2 = partial + 2 * channels;
  for (int64_t c = 0; c < channels; ++c) {
    const double n = count[c];
    mean[c] = n > 0 ? (shift ? shift[c] : 0.0) + s1[c] / n : 0.0;
    variance[c] = n > 0 ? std::max(s2[c] - s1[c] * s1[c] / n, 0.0) / n : 0.0;
  }
  return BN_OK;
}

}  // extern "C"
