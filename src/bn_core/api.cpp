// The C API: argument validation, canonicalization into a loop plan, and the
// parallel schedule around the per-ISA kernels.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bn_core/bn_core.h"
#include "chan_merge.hpp"
#include "dispatch.hpp"
#include "plan.hpp"
#include "team.hpp"

#ifndef BN_CORE_VERSION
#define BN_CORE_VERSION "0.0.0"
#endif

namespace bn_core {
namespace {

thread_local std::string last_error;
std::atomic<int32_t> thread_override{0};  // 0: OpenMP's default
std::atomic<int32_t> isa_choice{-1};      // -1: not chosen yet

#if defined(__unix__) || defined(__APPLE__)
// A forked child inherits the parent's OpenMP pool bookkeeping but none of its
// threads: GNU OpenMP then waits forever in the child's first parallel region.
// The child therefore runs on one thread (serially, no OpenMP region) until it
// sets a thread count itself.
void run_serially_after_fork() { thread_override.store(1, std::memory_order_relaxed); }
[[maybe_unused]] const int fork_guard_registered = pthread_atfork(nullptr, nullptr, run_serially_after_fork);
#endif

// Below this many elements a call runs on the calling thread: waking the pool
// costs microseconds, more than the work.
constexpr int64_t kParallelGrain = 32768;

// An enum argument's value read as the int32 a C caller passed: loading an
// out-of-range value through the enum type is undefined behaviour in C++.
template <class Enum>
int32_t enum_value(const Enum &e) {
  static_assert(sizeof(Enum) == sizeof(int32_t), "C enums are int-sized here");
  int32_t v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

bn_status fail(bn_status status, const std::string &message) {
  last_error = message;
  return status;
}

const kernel_table &kernels() {
  int32_t isa = isa_choice.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    isa_choice.store(isa, std::memory_order_relaxed);
  }
  return kernels_for(static_cast<bn_isa>(isa));
}

int32_t max_threads() {
  const int32_t n = thread_override.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---- validation ----------------------------------------------------------------

const char *dtype_name(bn_dtype dt) {
  switch (dt) {
    case BN_FLOAT32: return "float32";
    case BN_FLOAT64: return "float64";
    case BN_FLOAT16: return "float16";
    case BN_BFLOAT16: return "bfloat16";
    case BN_UINT8: return "uint8";
  }
  return "unknown";
}

std::string shape_str(const bn_tensor &t) {
  std::string s = "(";
  for (int32_t i = 0; i < t.rank; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.rank == 1 ? ",)" : ")");
}

bn_status check_tensor(const bn_tensor *t, const char *name, bool is_mask) {
  const std::string who = name;
  if (!t) return fail(BN_ERR_NULL, who + " is NULL");
  if (t->rank < 1 || t->rank > BN_MAX_RANK)
    return fail(BN_ERR_RANK, who + " has rank " + std::to_string(t->rank) + "; expected 1 to " +
                                 std::to_string(BN_MAX_RANK));
  if (!t->shape || !t->strides) return fail(BN_ERR_NULL, who + " has a NULL shape or strides");
  const int32_t dt = enum_value(t->dtype);
  if (dt < BN_FLOAT32 || dt > BN_UINT8 || is_mask != (dt == BN_UINT8))
    return fail(BN_ERR_DTYPE, who + " has dtype " + (dt >= 0 && dt <= BN_UINT8 ? dtype_name(t->dtype) : std::to_string(dt)) +
                                  (is_mask ? "; expected uint8" : "; expected float32, float64, float16 or bfloat16"));
  // Sizes multiply without overflow even when one is 0 (a channel count is a
  // product of some of them).
  int64_t count = 1, nonzero_count = 1, span = 0;
  bool overflow = false;
  for (int32_t i = 0; i < t->rank; ++i) {
    const int64_t n = t->shape[i];
    if (n < 0)
      return fail(BN_ERR_SHAPE, who + " has negative size " + std::to_string(n) + " at axis " + std::to_string(i));
    overflow |= __builtin_mul_overflow(count, n, &count);
    overflow |= __builtin_mul_overflow(nonzero_count, n ? n : 1, &nonzero_count);
    const int64_t stride = t->strides[i];
    if (n > 1) {
      int64_t reach;
      if (stride == std::numeric_limits<int64_t>::min()) overflow = true;
      else overflow |= __builtin_mul_overflow(n - 1, stride < 0 ? -stride : stride, &reach) ||
                       __builtin_add_overflow(span, reach, &span);
    }
  }
  if (overflow) return fail(BN_ERR_OVERFLOW, who + " " + shape_str(*t) + ": sizes or byte offsets overflow int64");
  if (count > 0 && !t->data) return fail(BN_ERR_NULL, who + " has NULL data");
  return BN_OK;
}

bn_status check_axes(const int32_t *axes, int32_t n_axes, int32_t rank, bool is_channel[]) {
  if (!axes) return fail(BN_ERR_NULL, "axes is NULL");
  if (n_axes < 1 || n_axes > rank)
    return fail(BN_ERR_AXIS, "n_axes is " + std::to_string(n_axes) + "; expected 1 to the rank " + std::to_string(rank));
  std::fill(is_channel, is_channel + rank, false);
  for (int32_t k = 0; k < n_axes; ++k) {
    const int32_t a = axes[k];
    if (a < -rank || a >= rank)
      return fail(BN_ERR_AXIS, "axis " + std::to_string(a) + " is out of range for rank " + std::to_string(rank));
    const int32_t axis = a < 0 ? a + rank : a;
    if (is_channel[axis]) return fail(BN_ERR_AXIS, "axis " + std::to_string(a) + " is given twice");
    is_channel[axis] = true;
  }
  return BN_OK;
}

bn_status check_like_x(const bn_tensor &x, const bn_tensor *t, const char *name, bool is_mask) {
  if (bn_status st = check_tensor(t, name, is_mask)) return st;
  const std::string who = name;
  if (t->rank != x.rank)
    return fail(BN_ERR_SHAPE, who + " has rank " + std::to_string(t->rank) + "; expected x's rank " + std::to_string(x.rank));
  for (int32_t i = 0; i < x.rank; ++i) {
    const bool ok = t->shape[i] == x.shape[i] || (is_mask && t->shape[i] == 1);
    if (!ok)
      return fail(BN_ERR_SHAPE, who + " has shape " + shape_str(*t) + "; expected " +
                                    (is_mask ? "a shape broadcastable to " : "") + "x's shape " + shape_str(x));
  }
  if (!is_mask && t->dtype != x.dtype)
    return fail(BN_ERR_DTYPE, who + " has dtype " + dtype_name(t->dtype) + "; expected x's dtype " + dtype_name(x.dtype));
  return BN_OK;
}

bn_status check_epsilon(double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    return fail(BN_ERR_VALUE, "epsilon is " + std::to_string(eps) + "; expected a finite value >= 0");
  return BN_OK;
}

// C for x and the channel axes (checked).
bn_status channel_count(const bn_tensor *x, const int32_t *axes, int32_t n_axes, int64_t &channels) {
  bool is_channel[BN_MAX_RANK];
  if (bn_status st = check_tensor(x, "x", false)) return st;
  if (bn_status st = check_axes(axes, n_axes, x->rank, is_channel)) return st;
  channels = 1;
  for (int32_t i = 0; i < x->rank; ++i)
    if (is_channel[i]) channels *= x->shape[i];
  return BN_OK;
}

// ---- canonicalization ----------------------------------------------------------

int64_t element_size(bn_dtype dt) {
  return dt == BN_FLOAT64 ? 8 : dt == BN_FLOAT32 ? 4 : 2;
}

// Rows of C contiguous channels shorter than this many bytes are folded into
// one periodic run: walking them one short line at a time costs more than the
// data (C = 3 ran at a tenth of the memory bandwidth).
constexpr int64_t kFoldRowBytes = 128;
constexpr int64_t kFoldMinElements = 128;
constexpr int64_t kFoldLanes = 16;  // the widest vector: 16 floats

int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

void fold_short_rows(plan &p, int64_t es) {
  p.period = 0;
  p.fold_len = 0;
  if (!p.inner_is_channel || p.n_outer == 0 || p.empty) return;
  const loop_dim &in = p.inner, &row = p.outer[p.n_outer - 1];
  const int64_t c = in.n;
  const bool one_channel_dim = p.channels == c && in.p_stride == 1 && p.p_base == 0;
  const bool rows_contiguous = in.x_stride == es && row.x_stride == c * es && row.p_stride == 0;
  const bool y_contiguous = !p.y || (in.y_stride == es && row.y_stride == c * es);
  const bool dy_contiguous = !p.dy || (in.d_stride == es && row.d_stride == c * es);
  // A mask must be per element and laid out like x (a row-wide mask is not folded).
  const bool mask_contiguous = !p.mask || (in.m_stride != 0 && row.m_stride == c * in.m_stride);
  if (!one_channel_dim || !rows_contiguous || !y_contiguous || !dy_contiguous || !mask_contiguous ||
      c * es > kFoldRowBytes)
    return;
  int64_t len = c * kFoldLanes / gcd(c, kFoldLanes);
  while (len < kFoldMinElements) len *= 2;
  if (row.n * c < 4 * len) return;  // too few rows to repay the replicated parameters
  p.inner = loop_dim{row.n * c, es, p.y ? es : 0, in.m_stride, 1, p.dy ? es : 0};
  p.lines /= row.n;
  --p.n_outer;
  p.period = c;
  p.fold_len = len;
}

// Drops size-1 dims, turns negative x strides positive, orders dims by x stride
// (memory order) and merges dims that walk memory as one. The innermost
// remaining dim becomes the inner run. dy is given for backward calls only.
void make_plan(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask, const bn_tensor *dy,
               const bool is_channel[], plan &p) {
  p.dtype = x.dtype;
  p.x = static_cast<const char *>(x.data);
  p.y = y ? static_cast<char *>(y->data) : nullptr;
  p.dy = dy ? static_cast<const char *>(dy->data) : nullptr;
  p.mask = mask ? static_cast<const uint8_t *>(mask->data) : nullptr;
  p.p_base = 0;
  p.empty = false;
  p.stream_y = false;
  p.x_from = x_source::memory;
  p.prefetch_ahead = 0;

  loop_dim dims[BN_MAX_RANK];
  int32_t n = 0;
  int64_t channel_stride = 1;
  int64_t p_stride[BN_MAX_RANK];
  for (int32_t i = x.rank - 1; i >= 0; --i) {
    p_stride[i] = is_channel[i] ? channel_stride : 0;
    if (is_channel[i]) channel_stride *= x.shape[i];
  }
  p.channels = channel_stride;
  for (int32_t i = 0; i < x.rank; ++i) {
    if (x.shape[i] == 0) p.empty = true;
    if (x.shape[i] == 1) continue;
    loop_dim d{x.shape[i], x.strides[i], y ? y->strides[i] : 0,
               mask && mask->shape[i] != 1 ? mask->strides[i] : 0, p_stride[i],
               dy ? dy->strides[i] : 0};
    if (d.x_stride < 0) {
      const int64_t last = d.n - 1;
      p.x += last * d.x_stride;
      if (p.y) p.y += last * d.y_stride;
      if (p.mask) p.mask += last * d.m_stride;
      if (p.dy) p.dy += last * d.d_stride;
      p.p_base += last * d.p_stride;
      d.x_stride = -d.x_stride; d.y_stride = -d.y_stride; d.m_stride = -d.m_stride;
      d.p_stride = -d.p_stride; d.d_stride = -d.d_stride;
    }
    dims[n++] = d;
  }
  std::stable_sort(dims, dims + n, [](const loop_dim &a, const loop_dim &b) {
    if (a.x_stride != b.x_stride) return a.x_stride > b.x_stride;
    return std::abs(a.y_stride) > std::abs(b.y_stride);
  });
  int32_t merged = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (merged) {
      loop_dim &o = dims[merged - 1];
      const loop_dim &d = dims[i];
      if (o.x_stride == d.n * d.x_stride && o.y_stride == d.n * d.y_stride &&
          o.m_stride == d.n * d.m_stride && o.p_stride == d.n * d.p_stride &&
          o.d_stride == d.n * d.d_stride) {
        o = loop_dim{o.n * d.n, d.x_stride, d.y_stride, d.m_stride, d.p_stride, d.d_stride};
        continue;
      }
    }
    dims[merged++] = dims[i];
  }
  if (merged == 0) dims[merged++] = loop_dim{1, 0, 0, 0, 0, 0};
  p.inner = dims[merged - 1];
  p.n_outer = merged - 1;
  p.lines = 1;
  for (int32_t i = 0; i < p.n_outer; ++i) {
    p.outer[i] = dims[i];
    p.lines *= dims[i].n;
  }
  p.inner_is_channel = p.inner.p_stride != 0;
  p.segments = 1;
  fold_short_rows(p, element_size(x.dtype));
}

// ---- cache sizes ----------------------------------------------------------------

// Per-core L2 and shared L3 in bytes: read once from sysfs (sysconf as the
// fallback; it reports a VM's L3 wrongly here), overridable.
std::atomic<int64_t> l2_override{0}, l3_override{0};

int64_t sysfs_cache_bytes(int index) {
  const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
  FILE *f = std::fopen(path.c_str(), "r");
  if (!f) return 0;
  long long value = 0;
  char unit = 0;
  const int read = std::fscanf(f, "%lld%c", &value, &unit);
  std::fclose(f);
  if (read < 1 || value <= 0) return 0;
  return value * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
}

int64_t detected_cache_bytes(int level) {
  static const int64_t l2 = [] {
    int64_t v = sysfs_cache_bytes(2);
#ifdef _SC_LEVEL2_CACHE_SIZE
    if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? v : int64_t(1) << 20;
  }();
  static const int64_t l3 = [] {
    int64_t v = sysfs_cache_bytes(3);
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (v <= 0) v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return v > 0 ? v : int64_t(8) << 20;
  }();
  return level == 2 ? l2 : l3;
}

int64_t cache_bytes(int level) {
  const int64_t o = (level == 2 ? l2_override : l3_override).load(std::memory_order_relaxed);
  return o > 0 ? o : detected_cache_bytes(level);
}

// Whether to write p's output with streaming stores: out of place and at least
// min_bytes. Inference streams once x and y together fill the L3 and the other
// working threads' L2s (AMD's L3 holds what the L2s evict), where plain stores
// would read every line of y from memory before writing it: 32x64x56x56 NCHW
// out of place, 1 thread, 2.4 -> 1.5 ms. Measured at the edge, (2048,2048)
// (x + y = the L3) ran 1.4x faster streamed with 1 thread and 10% slower with 2.
// A training forward streams once x and y together overflow the L3, so that x
// stays cached for the normalize.
bool stream_output(const plan &p, int64_t min_bytes) {
  return p.y && p.y != p.x && !p.empty &&
         p.lines * p.inner.n * element_size(p.dtype) >= min_bytes;
}

// Lines cut into segments when there are too few to share out among threads
// (e.g. one huge channel, or one row of many channels).
void cut_segments(plan &p, int32_t threads) {
  p.segments = 1;
  if (threads > 1 && p.lines < 4 * threads) {
    const int64_t wanted = (4 * threads + p.lines - 1) / p.lines;
    p.segments = std::max<int64_t>(1, std::min<int64_t>(wanted, p.inner.n / 256));
  }
}

int32_t schedule(plan &p) {
  if (p.empty) return 1;
  const int64_t elements = p.lines * p.inner.n;
  const int64_t by_size = std::max<int64_t>(1, elements / kParallelGrain);
  const int32_t threads = static_cast<int32_t>(std::min<int64_t>(max_threads(), by_size));
  cut_segments(p, threads);
  const int64_t bytes = elements * element_size(p.dtype);
  p.x_from = bytes <= threads * cache_bytes(2) ? x_source::l2
             : bytes <= cache_bytes(3)        ? x_source::l3
                                              : x_source::memory;
  return threads;
}

// ---- cache blocking for the training forward ------------------------------------

// Channels per chunk of a training forward, or 0 to run it in one piece. A
// tensor larger than half the L3 would come back from memory for the second
// read (normalize after statistics). Cut into chunks of whole channels, each
// handled by one thread — statistics, then normalize while the chunk is still
// cached — x is read from memory once. Only for channels-first layouts: a
// channels-last chunk is a narrow strided column of every row. A chunk takes an
// eighth of the L3 (less with more than 2 threads), so that each thread's chunk
// and the next one it fetches fit together: at 64x256x56x56 in place, training
// took 1.40x (2 threads) and 1.96x (1 thread) the inference time with chunks of
// half the L2, 1.17x and 1.59x with these; a quarter of the L3 was slower again.
int64_t chunk_channels(const bn_tensor &x, const int32_t *axes, int32_t n_axes, int32_t threads) {
  if (n_axes != 1) return 0;
  const int32_t axis = axes[0] < 0 ? axes[0] + x.rank : axes[0];
  const int64_t channels = x.shape[axis], es = element_size(x.dtype);
  if (std::abs(x.strides[axis]) == es) return 0;
  int64_t elements = 1;
  for (int32_t i = 0; i < x.rank; ++i) elements *= x.shape[i];
  const int64_t bytes = elements * es, l3 = cache_bytes(3);
  if (channels < 2 * threads || bytes <= l3 / 2) return 0;
  const int64_t per_channel = bytes / channels;
  if (per_channel > l3 / (2 * threads)) return 0;  // one channel would not stay cached
  const int64_t chunk = std::max<int64_t>(1, l3 / (4 * std::max(threads, 2)) / per_channel);
  return std::min(chunk, channels / (2 * threads));  // enough chunks to share out
}

// x (and y, mask) restricted to channels [first, first + count) of `axis`.
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

void item_range(const plan &p, int32_t t, int32_t team, int64_t &begin, int64_t &end) {
  const int64_t items = p.lines * p.segments;
  const int64_t base = items / team, extra = items % team;
  begin = base * t + std::min<int64_t>(t, extra);
  end = begin + base + (t < extra ? 1 : 0);
}

// Per-thread moments state laid out for the kernels.
class moments_state {
 public:
  // Room for `threads` partials of plans up to p's size; laid out for p.
  bool allocate(const plan &p, int32_t threads) {
    threads_ = threads;
    buffer_.reset(new (std::nothrow) double[static_cast<size_t>(layout(p) * threads)]);
    if (!buffer_) return false;
    try {
      shifts_missing_.resize(static_cast<size_t>(threads));
    } catch (const std::bad_alloc &) {
      return false;
    }
    reset(p);
    return true;
  }

  // Partials laid out for p (no larger than the allocated plan), with what the
  // kernels accumulate into zeroed: the per-channel arrays and shift_ok. The
  // kernels set their block arrays before use; zeroing those as well (6 arrays
  // of up to 2048 channels per thread, and all of it twice) took a third of a
  // one-row 1024-channel call (12.3 -> 8.3 µs without).
  void reset(const plan &p) {
    per_thread_ = layout(p);
    for (int32_t t = 0; t < threads_; ++t) {
      const moments_scratch s = thread(t);
      std::fill(s.count, s.count + kChannelArrays * channels_, 0.0);
      std::fill(s.shift_ok, s.shift_ok + channels_, uint8_t{0});
    }
    std::fill(shifts_missing_.begin(), shifts_missing_.end(), channels_);
  }

  moments_scratch thread(int32_t t) {
    double *base = buffer_.get() + per_thread_ * t;
    const int64_t C = channels_, L = block_;
    double *block = base + kChannelArrays * C;
    return moments_scratch{base, base + C, base + 2 * C, base + 3 * C, base + 4 * C, base + 5 * C, base + 6 * C,
                           reinterpret_cast<uint8_t *>(block + 6 * L),
                           &shifts_missing_[static_cast<size_t>(t)], block, block + L,
                           block + 2 * L, block + 3 * L, block + 4 * L, block + 5 * L};
  }

  // Merges the team's partials in thread order (deterministic for a given team).
  void finish(int32_t team, double *mean, double *variance, double *count) {
    for (int64_t c = 0; c < channels_; ++c) {
      double n = 0, mu = 0, m2 = 0;
      for (int32_t t = 0; t < team; ++t) {
        const moments_scratch s = thread(t);
        chan_merge(n, mu, m2, s.count[c], s.mean[c], s.m2[c]);
      }
      mean[c] = n > 0 ? mu : 0.0;
      variance[c] = n > 0 ? std::max(m2 / n, 0.0) : 0.0;
      if (count) count[c] = n;
    }
  }

 private:
  static constexpr int64_t kChannelArrays = 7;  // count, mean, m2, shift, run_s1, run_s2, run_n
  static constexpr int64_t kBlockArrays = 6;

  int64_t layout(const plan &p) {
    channels_ = p.channels;
    block_ = p.inner_is_channel ? spaced_block_length(std::min(p.inner.n, kRowsChannelChunk)) : 0;
    return kChannelArrays * channels_ + kBlockArrays * block_ + (channels_ + 7) / 8;
  }

  // A block array length of at least n doubles at which no two block arrays
  // start within 256 bytes of a nonzero multiple of 4 KB apart. The rows walk
  // from memory stores two of them and loads a third per vector, and a load
  // whose low 12 address bits match a pending store's waits for it (4K
  // aliasing): at 256 channels the arrays were 4 KB apart, and that walk was
  // no faster than the tiles it replaces.
  static int64_t spaced_block_length(int64_t n) {
    constexpr int64_t page = 4096 / sizeof(double), near = 256 / sizeof(double);
    for (int64_t len = n;; len += 8) {
      bool apart = true;
      for (int64_t i = 1; i < kBlockArrays; ++i) {
        const int64_t o = i * len;
        apart &= o < page - near || (o + near) % page >= 2 * near;
      }
      if (apart) return len;
    }
  }

  int32_t threads_ = 0;
  int64_t channels_ = 0, block_ = 0, per_thread_ = 0;
  std::unique_ptr<double[]> buffer_;
  std::vector<int64_t> shifts_missing_;
};

// Per-channel parameter arrays in the compute type (float for <=32-bit data,
// double for float64): array 0 is the mean rounded to that type (hi), the
// others are formed in float64 from the remainder lo = mean − hi (which keeps
// x − mean exact at mean/std = 1e5) and rounded once. A folded plan reads them
// replicated over one super row. Arrays is a constant so that the fill loop
// vectorizes, and the storage is not zeroed: fill writes every value a kernel
// reads (one row of 16384 channels: 74 µs a call with a zeroed buffer and a
// scalar loop, 36 µs now).
template <int32_t Arrays>
class channel_params {
 public:
  bool allocate(const plan &p) {
    wide_ = p.dtype == BN_FLOAT64;
    fit(p);
    stride_ = length_;
    buffer_.reset(new (std::nothrow) double[static_cast<size_t>(Arrays * stride_)]);
    return buffer_ != nullptr;
  }

  // Lays the arrays out for p (no larger than the allocated plan).
  void fit(const plan &p) {
    channels_ = p.channels;
    length_ = p.period ? std::max(p.fold_len, channels_) : channels_;
  }

  // values(c, lo, out) writes arrays 1.. of channel c as float64.
  template <class F>
  void fill(const double *mean, F &&values) {
    if (wide_) fill_as<double>(mean, values);
    else fill_as<float>(mean, values);
  }

  const void *array(int32_t i) const {
    const size_t unit = wide_ ? sizeof(double) : sizeof(float);
    return reinterpret_cast<const char *>(buffer_.get()) + unit * static_cast<size_t>(i * stride_);
  }

  int64_t length() const { return length_; }

 private:
  template <class acc, class F>
  void fill_as(const double *mean, F &&values) {
    acc *a = reinterpret_cast<acc *>(buffer_.get());
    const int64_t stride = stride_;
    for (int64_t c = 0; c < channels_; ++c) {
      double v[Arrays];
      const acc hi = static_cast<acc>(mean[c]);
      v[0] = hi;
      values(c, mean[c] - static_cast<double>(hi), v);
      for (int32_t i = 0; i < Arrays; ++i) a[i * stride + c] = static_cast<acc>(v[i]);
    }
    for (int32_t i = 0; i < Arrays; ++i)
      for (int64_t k = channels_; k < length_; ++k) a[i * stride + k] = a[i * stride + k - channels_];
  }

  bool wide_ = false;
  int64_t channels_ = 0, length_ = 0, stride_ = 0;  // stride_: the allocated length
  std::unique_ptr<double[]> buffer_;
};

// y = (x - mean_hi) * scale + bias; scale = gamma / sqrt(var + eps) and
// bias = beta - (mean - mean_hi) * scale (see affine_params).
class affine_state {
 public:
  bool allocate(const plan &p) { return params_.allocate(p); }
  void fit(const plan &p) { params_.fit(p); }

  void fill(const double *mean, const double *variance, const double *gamma, const double *beta,
            double eps) {
    // One loop per presence of gamma and beta, so that none branches inside (and vectorizes).
    auto fill_with = [&](auto has_gamma, auto has_beta) {
      params_.fill(mean, [&](int64_t c, double lo, double *v) {
        const double scale = (has_gamma ? gamma[c] : 1.0) / std::sqrt(variance[c] + eps);
        const double b = has_beta ? beta[c] : 0.0;
        const double corrected = b - lo * scale;  // unconditional: a select vectorizes, a branch does not
        v[1] = scale;
        v[2] = lo == 0 ? b : corrected;  // lo = 0 (float64 data) keeps beta exact even at scale = inf
      });
    };
    if (gamma && beta) fill_with(std::true_type{}, std::true_type{});
    else if (gamma) fill_with(std::true_type{}, std::false_type{});
    else if (beta) fill_with(std::false_type{}, std::true_type{});
    else fill_with(std::false_type{}, std::false_type{});
  }

  affine_params params() const {
    return affine_params{params_.array(0), params_.array(1), params_.array(2)};
  }

 private:
  channel_params<3> params_;
};

// Backward through y = x̂·gamma + beta, x̂ = (x − mean)·s, s = 1/sqrt(var + eps),
// with used positions w (the mask) and N = Σw per channel. Through the batch
// statistics (training):
//   dx = gamma·s·(dy − (w/N)·(Σdy + x̂·Σdy·x̂))     (sums over every position)
// and dx = gamma·s·dy with fixed statistics (inference).
class backward_state {
 public:
  bool allocate(const plan &p, int32_t threads) {
    channels_ = p.channels;
    if (!params_.allocate(p)) return false;
    length_ = params_.length();
    try {
      sums_.assign(static_cast<size_t>(3 * length_ * threads), 0.0);
    } catch (const std::bad_alloc &) {
      return false;
    }
    return true;
  }

  void fill_xhat(const double *mean, const double *variance, double eps) {
    params_.fill(mean, [&](int64_t c, double lo, double *v) {
      v[1] = lo;
      v[2] = 1.0 / std::sqrt(variance[c] + eps);
      v[3] = v[4] = v[5] = 0.0;
    });
  }

  // count/sum_dy/sum_dy_xhat are the statistics' totals (null: fixed statistics).
  void fill_dx(const double *mean, const double *variance, const double *gamma, double eps,
               const double *count, const double *sum_dy, const double *sum_dy_xhat) {
    params_.fill(mean, [&](int64_t c, double lo, double *v) {
      const double s = 1.0 / std::sqrt(variance[c] + eps), gs = (gamma ? gamma[c] : 1.0) * s;
      v[1] = lo;
      const bool through_stats = count && count[c] > 0;
      v[2] = s;
      v[3] = gs;
      v[4] = through_stats ? -gs * s * sum_dy_xhat[c] / count[c] : 0.0;
      v[5] = through_stats ? -gs * sum_dy[c] / count[c] : 0.0;
    });
  }

  backward_params params() const {
    return backward_params{params_.array(0), params_.array(1), params_.array(2),
                           params_.array(3), params_.array(4), params_.array(5)};
  }

  backward_scratch thread(int32_t t) {
    double *base = sums_.data() + 3 * length_ * t;
    return backward_scratch{base, base + length_, base + 2 * length_};
  }

  // Totals over the team in thread order; entries k and k + C of a folded plan
  // are the same channel. An unmasked call counts elements / C per channel.
  void finish(int32_t team, const plan &p, double *count, double *sum_dy, double *sum_dy_xhat) {
    std::fill(sum_dy, sum_dy + channels_, 0.0);
    std::fill(sum_dy_xhat, sum_dy_xhat + channels_, 0.0);
    std::fill(count, count + channels_, 0.0);
    for (int32_t t = 0; t < team; ++t) {
      const backward_scratch s = thread(t);
      for (int64_t k = 0; k < length_; ++k) {
        sum_dy[k % channels_] += s.sum_dy[k];
        sum_dy_xhat[k % channels_] += s.sum_dy_xhat[k];
        count[k % channels_] += s.count[k];
      }
    }
    if (!p.mask && !p.empty) {
      const double per_channel = static_cast<double>(p.lines * p.inner.n / channels_);
      std::fill(count, count + channels_, per_channel);
    }
  }

 private:
  int64_t channels_ = 0, length_ = 0;
  channel_params<6> params_;
  std::vector<double> sums_;
};

bn_status out_of_memory() { return fail(BN_ERR_ALLOC, "out of memory for per-thread scratch"); }

// The backward passes: the local sums (Σdy, Σdy·x̂, used count), then dx from
// the totals — in one team when both run, like the training forward.
struct backward_call {
  const bn_tensor *dy, *x, *dx, *mask;
  const int32_t *axes;
  int32_t n_axes;
  const double *mean, *variance, *gamma;
  double epsilon;
  bool training;
  bool sums, apply;                       // which passes run
  double *count, *sum_dy, *sum_dy_xhat;   // out of the sums pass, else into apply

  bn_status run() const {
    if (bn_status st = check_tensor(x, "x", false)) return st;
    if (bn_status st = check_like_x(*x, dy, "dy", false)) return st;
    if (apply)
      if (bn_status st = check_like_x(*x, dx, "dx", false)) return st;
    bool is_channel[BN_MAX_RANK];
    if (bn_status st = check_axes(axes, n_axes, x->rank, is_channel)) return st;
    if (mask)
      if (bn_status st = check_like_x(*x, mask, "mask", true)) return st;
    if (!mean || !variance) return fail(BN_ERR_NULL, "mean or variance is NULL");
    if (bn_status st = check_epsilon(epsilon)) return st;
    if (!count || !sum_dy || !sum_dy_xhat)
      return fail(BN_ERR_NULL, "count, sum_dy or sum_dy_xhat is NULL");
    plan p;
    make_plan(*x, apply ? dx : nullptr, mask, dy, is_channel, p);
    const int32_t threads = schedule(p);
    backward_state state;
    if (!state.allocate(p, sums ? threads : 0)) return out_of_memory();
    if (sums && p.empty) state.finish(0, p, count, sum_dy, sum_dy_xhat);
    if (p.empty) return BN_OK;
    // Fixed statistics: no term through them (fill_dx without totals).
    const double *totals = training ? count : nullptr;
    if (sums) state.fill_xhat(mean, variance, epsilon);
    else state.fill_dx(mean, variance, gamma, epsilon, totals, sum_dy, sum_dy_xhat);
    return passes(p, threads, state, totals) ? BN_OK : out_of_memory();
  }

  // The passes on a team; false: out of memory.
  bool passes(const plan &p, int32_t threads, backward_state &state, const double *totals) const {
    const backward_params params = state.params();
    const kernel_table &k = kernels();
    const auto sums_of = [&](int32_t slot) {
      int64_t b, e;
      item_range(p, slot, threads, b, e);
      k.backward_sums(p, b, e, params, state.thread(slot));
    };
    const auto apply_to = [&](int32_t slot) {
      int64_t b, e;
      item_range(p, slot, threads, b, e);
      k.backward_apply(p, b, e, params);
    };
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

}  // namespace
}  // namespace bn_core

using namespace bn_core;

extern "C" {

bn_status bn_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                     double *mean, double *variance, double *count) {
  if (bn_status st = check_tensor(x, "x", false)) return st;
  bool is_channel[BN_MAX_RANK];
  if (bn_status st = check_axes(axes, n_axes, x->rank, is_channel)) return st;
  if (mask)
    if (bn_status st = check_like_x(*x, mask, "mask", true)) return st;
  if (!mean || !variance) return fail(BN_ERR_NULL, "mean or variance output is NULL");
  plan p;
  make_plan(*x, nullptr, mask, nullptr, is_channel, p);
  const int32_t threads = schedule(p);
  moments_state state;
  if (!state.allocate(p, threads)) return out_of_memory();
  const kernel_table &k = kernels();
  const auto moments_of = [&](int32_t slot) {
    int64_t b, e;
    item_range(p, slot, threads, b, e);
    k.moments(p, b, e, state.thread(slot));
  };
  if (!p.empty && !run_slots(threads, moments_of)) return out_of_memory();
  state.finish(p.empty ? 0 : threads, mean, variance, count);
  return BN_OK;
}

bn_status bn_normalize(const bn_tensor *x, const bn_tensor *y, const int32_t *axes, int32_t n_axes,
                       const double *mean, const double *variance, const double *gamma,
                       const double *beta, double epsilon) {
  if (bn_status st = check_tensor(x, "x", false)) return st;
  if (bn_status st = check_like_x(*x, y, "y", false)) return st;
  bool is_channel[BN_MAX_RANK];
  if (bn_status st = check_axes(axes, n_axes, x->rank, is_channel)) return st;
  if (!mean || !variance) return fail(BN_ERR_NULL, "mean or variance is NULL");
  if (bn_status st = check_epsilon(epsilon)) return st;
  plan p;
  make_plan(*x, y, nullptr, nullptr, is_channel, p);
  if (p.empty) return BN_OK;
  const int32_t threads = schedule(p);
  p.stream_y = stream_output(p, (cache_bytes(3) + (threads - 1) * cache_bytes(2)) / 2);
  affine_state affine;
  if (!affine.allocate(p)) return out_of_memory();
  affine.fill(mean, variance, gamma, beta, epsilon);
  const affine_params params = affine.params();
  const kernel_table &k = kernels();
  const auto normalize_of = [&](int32_t slot) {
    int64_t b, e;
    item_range(p, slot, threads, b, e);
    k.normalize(p, b, e, params);
  };
  return run_slots(threads, normalize_of) ? BN_OK : out_of_memory();
}

bn_status bn_train_forward(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                           int32_t n_axes, const bn_tensor *mask, const double *gamma,
                           const double *beta, double epsilon, double *mean, double *variance) {
  if (bn_status st = check_tensor(x, "x", false)) return st;
  if (bn_status st = check_like_x(*x, y, "y", false)) return st;
  bool is_channel[BN_MAX_RANK];
  if (bn_status st = check_axes(axes, n_axes, x->rank, is_channel)) return st;
  if (mask)
    if (bn_status st = check_like_x(*x, mask, "mask", true)) return st;
  if (!mean || !variance) return fail(BN_ERR_NULL, "mean or variance output is NULL");
  if (bn_status st = check_epsilon(epsilon)) return st;
  plan whole;
  make_plan(*x, y, mask, nullptr, is_channel, whole);
  whole.stream_y = stream_output(whole, cache_bytes(3) / 2);
  const int32_t threads = schedule(whole);
  // Cache-sized chunks of the channels, each with its first channel index.
  std::vector<plan> pieces;
  std::vector<int64_t> first_channel;
  const int64_t chunk = whole.empty ? 0 : chunk_channels(*x, axes, n_axes, threads);
  try {
    if (chunk > 0) {
      const int32_t axis = axes[0] < 0 ? axes[0] + x->rank : axes[0];
      for (int64_t c0 = 0; c0 < x->shape[axis]; c0 += chunk) {
        const int64_t count = std::min(chunk, x->shape[axis] - c0);
        const tensor_slice xs(*x, axis, c0, count), ys(*y, axis, c0, count);
        const tensor_slice ms(mask ? *mask : *x, axis, c0, count);
        pieces.emplace_back();
        make_plan(xs.t, &ys.t, mask ? &ms.t : nullptr, nullptr, is_channel, pieces.back());
        pieces.back().stream_y = whole.stream_y;  // decided by the whole tensor's size
        pieces.back().x_from = whole.x_from;
        first_channel.push_back(c0);
      }
    }
  } catch (const std::bad_alloc &) {
    return out_of_memory();
  }
  const kernel_table &k = kernels();
  if (chunk == 0) {
    moments_state state;
    affine_state affine;
    if (!state.allocate(whole, threads) || !affine.allocate(whole)) return out_of_memory();
    if (whole.empty) {
      state.finish(0, mean, variance, nullptr);
      return BN_OK;
    }
    const affine_params params = affine.params();
    // One team: statistics, merge, then each thread normalizes the range it
    // just read (still warm in its cache).
    const auto moments_of = [&](int32_t slot) {
      int64_t b, e;
      item_range(whole, slot, threads, b, e);
      k.moments(whole, b, e, state.thread(slot));
    };
    const auto merge = [&] {
      state.finish(threads, mean, variance, nullptr);
      affine.fill(mean, variance, gamma, beta, epsilon);
    };
    const auto normalize_of = [&](int32_t slot) {
      int64_t b, e;
      item_range(whole, slot, threads, b, e);
      k.normalize(whole, b, e, params);
    };
    return run_two_phases(threads, moments_of, merge, normalize_of) ? BN_OK : out_of_memory();
  }
  // Chunks: one team, each thread takes whole chunks (no barrier), so the result
  // does not depend on the thread count at all.
  std::vector<moments_state> states;
  std::vector<affine_state> affines;
  try {
    states.resize(static_cast<size_t>(threads));
    affines.resize(static_cast<size_t>(threads));
  } catch (const std::bad_alloc &) {
    return out_of_memory();
  }
  for (int32_t t = 0; t < threads; ++t)
    if (!states[t].allocate(pieces[0], 1) || !affines[t].allocate(pieces[0])) return out_of_memory();
  std::atomic<size_t> next_piece{0};
  run_team(threads, [&](int32_t t, int32_t) {
    moments_state &state = states[t];
    affine_state &affine = affines[t];
    const affine_params params = affine.params();
    for (size_t i = next_piece.fetch_add(1, std::memory_order_relaxed); i < pieces.size();) {
      plan &piece = pieces[i];
      const int64_t c0 = first_channel[i], items = piece.lines * piece.segments;
      state.reset(piece);
      k.moments(piece, 0, items, state.thread(0));
      state.finish(1, mean + c0, variance + c0, nullptr);
      affine.fit(piece);
      affine.fill(mean + c0, variance + c0, gamma ? gamma + c0 : nullptr,
                  beta ? beta + c0 : nullptr, epsilon);
      // Claim the next chunk now and fetch it while this one is normalized from
      // the caches: memory stays busy, and its statistics read it from there.
      const size_t following = next_piece.fetch_add(1, std::memory_order_relaxed);
      if (following < pieces.size()) piece.prefetch_ahead = pieces[following].x - piece.x;
      k.normalize(piece, 0, items, params);
      i = following;
    }
  });
  return BN_OK;
}

bn_status bn_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                      const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                      const double *mean, const double *variance, const double *gamma,
                      double epsilon, int32_t training, double *sum_dy, double *sum_dy_xhat) {
  // The sums are needed for dx in training; scratch when the caller skips them.
  std::vector<double> scratch;
  int64_t channels = 0;
  if (bn_status st = channel_count(x, axes, n_axes, channels)) return st;
  try {
    scratch.assign(static_cast<size_t>(3 * channels + 1), 0.0);  // + 1: never a null data()
  } catch (const std::bad_alloc &) {
    return out_of_memory();
  }
  double *count = scratch.data();
  if (!sum_dy) sum_dy = count + channels;
  if (!sum_dy_xhat) sum_dy_xhat = count + 2 * channels;
  return backward_call{dy, x, dx, mask, axes, n_axes, mean, variance, gamma, epsilon,
                       training != 0, true, true, count, sum_dy, sum_dy_xhat}.run();
}

bn_status bn_backward_sums(const bn_tensor *dy, const bn_tensor *x, const int32_t *axes,
                           int32_t n_axes, const bn_tensor *mask, const double *mean,
                           const double *variance, double epsilon, double *count, double *sum_dy,
                           double *sum_dy_xhat) {
  return backward_call{dy, x, nullptr, mask, axes, n_axes, mean, variance, nullptr, epsilon,
                       true, true, false, count, sum_dy, sum_dy_xhat}.run();
}

bn_status bn_backward_apply(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                            const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                            const double *mean, const double *variance, const double *gamma,
                            double epsilon, const double *count, const double *sum_dy,
                            const double *sum_dy_xhat) {
  return backward_call{dy, x, dx, mask, axes, n_axes, mean, variance, gamma, epsilon, true,
                       false, true, const_cast<double *>(count), const_cast<double *>(sum_dy),
                       const_cast<double *>(sum_dy_xhat)}.run();
}

bn_status bn_moments_partial(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                             const bn_tensor *mask, const double *shift, double *partial) {
  int64_t channels = 0;
  if (bn_status st = channel_count(x, axes, n_axes, channels)) return st;
  if (!partial) return fail(BN_ERR_NULL, "partial is NULL");
  double *count = partial, *s1 = partial + channels, *s2 = partial + 2 * channels;
  // s1/s2 hold mean and variance until they are turned into shifted sums.
  if (bn_status st = bn_moments(x, axes, n_axes, mask, s1, s2, count)) return st;
  for (int64_t c = 0; c < channels; ++c) {
    const double n = count[c], d = s1[c] - (shift ? shift[c] : 0.0);
    s1[c] = n * d;
    s2[c] = n * s2[c] + n * d * d;
  }
  return BN_OK;
}

bn_status bn_moments_finalize(int64_t channels, const double *partial, const double *shift,
                              double *mean, double *variance) {
  if (!partial || !mean || !variance) return fail(BN_ERR_NULL, "partial, mean or variance is NULL");
  if (channels < 0) return fail(BN_ERR_SHAPE, "channels is " + std::to_string(channels) + "; expected >= 0");
  const double *count = partial, *s1 = partial + channels, *s2 = partial + 2 * channels;
  for (int64_t c = 0; c < channels; ++c) {
    const double n = count[c];
    mean[c] = n > 0 ? (shift ? shift[c] : 0.0) + s1[c] / n : 0.0;
    variance[c] = n > 0 ? std::max(s2[c] - s1[c] * s1[c] / n, 0.0) / n : 0.0;
  }
  return BN_OK;
}

bn_status bn_set_cache_bytes(int64_t l2, int64_t l3) {
  l2_override.store(l2 > 0 ? l2 : 0, std::memory_order_relaxed);
  l3_override.store(l3 > 0 ? l3 : 0, std::memory_order_relaxed);
  return BN_OK;
}

void bn_get_cache_bytes(int64_t *l2, int64_t *l3) {
  if (l2) *l2 = cache_bytes(2);
  if (l3) *l3 = cache_bytes(3);
}

bn_status bn_set_num_threads(int32_t n) {
  thread_override.store(n > 0 ? n : 0, std::memory_order_relaxed);
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

bn_isa bn_get_isa(void) {
  (void)kernels();
  return static_cast<bn_isa>(isa_choice.load(std::memory_order_relaxed));
}

bn_isa bn_best_isa(void) { return best_isa(); }

const char *bn_isa_name(bn_isa isa) {
  switch (enum_value(isa)) {
    case BN_ISA_SCALAR: return "scalar";
    case BN_ISA_AVX2: return "avx2";
    case BN_ISA_AVX512: return "avx512";
  }
  return "unknown";
}

bn_status bn_set_isa(bn_isa isa) {
  const int32_t value = enum_value(isa);
  if (value != BN_ISA_SCALAR && value != BN_ISA_AVX2 && value != BN_ISA_AVX512)
    return fail(BN_ERR_VALUE, "unknown SIMD level " + std::to_string(value));
  if (!isa_supported(isa)) {
    std::string have;
    for (bn_isa i : {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512})
      if (isa_supported(i)) have += std::string(have.empty() ? "" : ", ") + bn_isa_name(i);
    return fail(BN_ERR_UNSUPPORTED, std::string("this CPU lacks SIMD level ") + bn_isa_name(isa) +
                                        " (available: " + have + ")");
  }
  isa_choice.store(isa, std::memory_order_relaxed);
  return BN_OK;
}

bn_status bn_set_isa_by_name(const char *name) {
  if (!name || !*name) return bn_set_isa(best_isa());
  for (bn_isa i : {BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512})
    if (std::strcmp(name, bn_isa_name(i)) == 0) return bn_set_isa(i);
  return fail(BN_ERR_VALUE, std::string("unknown SIMD level '") + name + "'; expected scalar, avx2 or avx512");
}

const char *bn_last_error(void) { return last_error.c_str(); }

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
