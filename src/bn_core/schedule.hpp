// Scheduling: how many threads a call uses, whether it streams its output past
// the caches, how a training forward or a backward is cut into cache-sized
// chunks, and which items of the plan each slot of the team walks.
#ifndef BN_CORE_SCHEDULE_HPP
#define BN_CORE_SCHEDULE_HPP

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "plan.hpp"

namespace bn_core {

// The thread count calls may use: set_max_threads(n > 0), else OpenMP's default.
int32_t max_threads();
void set_max_threads(int32_t n);  // n <= 0: OpenMP's default again

// Per-core L2 and shared L3 in bytes (level 2 or 3): detected once, overridable
// (a value <= 0 restores the detected size).
int64_t cache_bytes(int level);
void override_cache_bytes(int64_t l2, int64_t l3);
// Where the sizes cache_bytes reports come from, for people.
std::string cache_origin();

// Threads for p (1 below the parallel grain), cutting long lines into segments
// when there are too few lines to share out, and noting where x will be read
// from (p.x_from).
int32_t schedule(plan &p);

// Whether to write p's output with streaming stores: out of place (y neither x
// nor the residual read back from it) and at least min_bytes, x and y together then overflowing what the caches would keep.
bool stream_output(const plan &p, int64_t min_bytes);

// Channels per cache-sized chunk of a call that reads `tensors` tensors of x's
// size twice (a training forward: x; a backward: x and dy), or 0 to run it in
// one piece.
int64_t chunk_channels(const bn_tensor &x, const int32_t *axes, int32_t n_axes, int32_t threads,
                       int32_t tensors);

// x (or y, a mask) restricted to channels [first, first + count) of `axis`.
struct tensor_slice {
  int64_t shape[BN_MAX_RANK];
  bn_tensor t;

  tensor_slice(const bn_tensor &whole, int32_t axis, int64_t first, int64_t count) : t(whole) {
    std::copy(whole.shape, whole.shape + whole.rank, shape);
    t.shape = shape;
    if (whole.shape[axis] == 1) return;  // a mask broadcast over the channels
    shape[axis] = count;
    t.data = static_cast<char *>(whole.data) + first * whole.strides[axis];
  }
};

// A chunk of whole channels: its plan and its first channel's index.
struct chunk {
  plan p;
  int64_t first_channel;
};

// The plans of chunks of `per_chunk` channels along x's one channel axis, of x
// with y (dx of a backward call), the mask and dy (a forward call's residual)
// (each may be null); the epilogue, streaming
// and where x is read from are the whole call's decisions (whole's).
std::vector<chunk> cut_into_chunks(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask,
                                   const bn_tensor *dy, int32_t axis, const plan &whole, int64_t per_chunk);

// Claims a team member's next chunk from next_chunk (chunks.size() or more:
// none) between the two passes of p's chunk, and has p's second pass, which
// runs from the caches, prefetch it (x, and dy with and_dy where it lies at
// the same distance: the kernels take one): memory stays busy, and the next
// chunk's first pass reads it from the caches.
size_t claim_and_prefetch_next(std::atomic<size_t> &next_chunk, const std::vector<chunk> &chunks, plan &p,
                               bool and_dy);

// Slot `slot`'s share [begin, end) of p's items among `team` slots.
void item_range(const plan &p, int32_t slot, int32_t team, int64_t &begin, int64_t &end);

// The work of one slot: walk(begin, end, slot) over that slot's items.
template <class Walk>
auto slot_items(const plan &p, int32_t team, Walk &&walk) {
  return [&p, team, walk = std::forward<Walk>(walk)](int32_t slot) {
    int64_t begin, end;
    item_range(p, slot, team, begin, end);
    walk(begin, end, slot);
  };
}

}  // namespace bn_core

#endif
