#include "schedule.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <unistd.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "planning.hpp"
#include "validate.hpp"

namespace bn_core {
namespace {

std::atomic<int32_t> thread_override{0};  // 0: OpenMP's default
std::atomic<int64_t> l2_override{0}, l3_override{0};

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

// Read from sysfs; sysconf is the fallback (it reports a VM's L3 wrongly here).
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

int64_t sysconf_cache_bytes(int level) {
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  return sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#else
  (void)level;
  return 0;
#endif
}

// An L3 bigger than this per CPU sharing it is no cache one process can keep: no
// x86-64 part has more than 12 MiB of L3 per core (the stacked-cache ones), so
// a larger figure is a VM reporting its host socket's cache (300 MiB for 2
// vCPUs), shared with neighbours the VM cannot see. Planning with it would keep
// a 200 MB tensor "cached" and skip the chunks and streaming stores it needs.
constexpr int64_t kMostL3PerCpu = int64_t(16) << 20;

// CPUs listed in sysfs as sharing cache `index` (e.g. "0-1,4"), or 0.
int64_t sysfs_sharing_cpus(int index) {
  const std::string path =
      "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/shared_cpu_list";
  FILE *f = std::fopen(path.c_str(), "r");
  if (!f) return 0;
  int64_t cpus = 0;
  long first = 0, last = 0;
  while (std::fscanf(f, "%ld", &first) == 1) {
    last = first;
    const int next = std::fgetc(f);
    if (next == '-' && std::fscanf(f, "%ld", &last) == 1) (void)std::fgetc(f);
    if (last >= first) cpus += last - first + 1;
  }
  std::fclose(f);
  return cpus;
}

struct detected_caches {
  int64_t l2, l3;
  std::string origin;
};

std::string mib(int64_t bytes) {
  return bytes % (1 << 20) == 0 ? std::to_string(bytes >> 20) + " MiB" : std::to_string(bytes >> 10) + " KiB";
}

int64_t detect_level(int level, int64_t fallback, std::string &origin) {
  int64_t v = sysfs_cache_bytes(level);  // sysfs index 2 is the L2, 3 the L3
  const char *from = "sysfs";
  if (v <= 0) {
    v = sysconf_cache_bytes(level);
    from = "sysconf";
  }
  if (v <= 0) {
    v = fallback;
    from = "assumed";
  }
  origin += std::string(origin.empty() ? "" : ", ") + "L" + std::to_string(level) + " " + mib(v) + " (" + from + ")";
  return v;
}

detected_caches detect_caches() {
  detected_caches d;
  d.l2 = detect_level(2, int64_t(1) << 20, d.origin);
  d.l3 = detect_level(3, int64_t(8) << 20, d.origin);
  int64_t sharing = sysfs_sharing_cpus(3);
  if (sharing <= 0) sharing = std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN));
  const int64_t most = saturating_mul(kMostL3PerCpu, sharing);
  if (d.l3 > most) {
    d.l3 = most;
    d.origin += ", used as " + mib(most) + " (at most " + mib(kMostL3PerCpu) + " per CPU sharing it, " +
                std::to_string(sharing) + " CPUs)";
  }
  return d;
}

const detected_caches &detected() {
  static const detected_caches d = detect_caches();
  return d;
}

int64_t detected_cache_bytes(int level) { return level == 2 ? detected().l2 : detected().l3; }

// Lines cut into segments when there are too few to share out among threads
// (e.g. one huge channel, or one row of many channels).
void cut_segments(plan &p, int32_t threads) {
  p.segments = 1;
  if (threads > 1 && p.lines < 4 * threads) {
    const int64_t wanted = (4 * threads + p.lines - 1) / p.lines;
    p.segments = std::max<int64_t>(1, std::min<int64_t>(wanted, p.inner.n / 256));
  }
}

}  // namespace

int32_t max_threads() {
  const int32_t n = thread_override.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_max_threads(int32_t n) { thread_override.store(n > 0 ? n : 0, std::memory_order_relaxed); }

std::string cache_origin() {
  const bool l2_set = l2_override.load(std::memory_order_relaxed) > 0;
  const bool l3_set = l3_override.load(std::memory_order_relaxed) > 0;
  if (l2_set && l3_set) return "set by bn_set_cache_bytes";
  if (l2_set || l3_set)
    return std::string(l2_set ? "L2" : "L3") + " set by bn_set_cache_bytes; detected " + detected().origin;
  return "detected " + detected().origin;
}

int64_t cache_bytes(int level) {
  const int64_t o = (level == 2 ? l2_override : l3_override).load(std::memory_order_relaxed);
  return o > 0 ? o : detected_cache_bytes(level);
}

void override_cache_bytes(int64_t l2, int64_t l3) {
  l2_override.store(l2 > 0 ? l2 : 0, std::memory_order_relaxed);
  l3_override.store(l3 > 0 ? l3 : 0, std::memory_order_relaxed);
}

int32_t schedule(plan &p) {
  if (p.empty) return 1;
  const int64_t elements = p.lines * p.inner.n;
  const int64_t by_size = std::max<int64_t>(1, elements / kParallelGrain);
  const int32_t threads = static_cast<int32_t>(std::min<int64_t>(max_threads(), by_size));
  cut_segments(p, threads);
  const int64_t bytes = saturating_mul(elements, element_bytes(p.dtype));
  p.x_from = bytes <= saturating_mul(threads, cache_bytes(2)) ? x_source::l2  // any override: no overflow
             : bytes <= cache_bytes(3)        ? x_source::l3
                                              : x_source::memory;
  return threads;
}

// Inference streams once x and y together fill the L3 and the other working
// threads' L2s (AMD's L3 holds what the L2s evict; the threads the team will
// have, not the slots: a caller left alone has no other L2), where plain stores would
// read every line of y from memory before writing it. A training forward
// streams once x and y together overflow the L3, so that x stays cached for
// the normalize. The callers pass those sizes as min_bytes.
bool stream_output(const plan &p, int64_t min_bytes) {
  return p.y && p.y != p.x && p.y != p.residual && !p.empty &&
         saturating_mul(p.lines * p.inner.n, element_bytes(p.dtype)) >= min_bytes;
}

// Tensors larger than half the L3 would come back from memory for the second
// read (normalize after statistics, dx after the backward's sums). Cut into
// chunks of whole channels, each handled by one thread — the first pass, then
// the second while the chunk is still cached — they are read from memory once.
// Only for channels-first layouts: a channels-last chunk is a narrow strided
// column of every row. A chunk takes an eighth of the L3 (less with more than
// 2 threads), so that each thread's chunk and the next one it fetches fit
// together with room to spare: larger chunks are partly evicted before the
// second pass reads them again, smaller ones repeat a chunk's fixed costs
// (planning, merge, parameters) more often (bench/DESIGN.md, 'Chunks of an
// eighth of the L3').
int64_t chunk_channels(const bn_tensor &x, const int32_t *axes, int32_t n_axes, int32_t threads,
                       int32_t tensors) {
  if (n_axes != 1) return 0;
  const int32_t axis = axes[0] < 0 ? axes[0] + x.rank : axes[0];
  const int64_t channels = x.shape[axis], es = element_bytes(x.dtype);
  if (std::abs(x.strides[axis]) == es) return 0;
  int64_t elements = 1;
  for (int32_t i = 0; i < x.rank; ++i) {
    // A broadcast (stride-0) x is not that large in memory: nothing to keep cached.
    if (x.shape[i] > 1 && x.strides[i] == 0) return 0;
    elements *= x.shape[i];  // checked: no overflow
  }
  const int64_t bytes = saturating_mul(saturating_mul(elements, es), tensors), l3 = cache_bytes(3);
  if (channels < 2 * threads || bytes <= l3 / 2) return 0;
  const int64_t per_channel = bytes / channels;
  if (per_channel > l3 / (2 * threads)) return 0;  // one channel would not stay cached
  int64_t chunk = std::min(std::max<int64_t>(1, l3 / (4 * std::max(threads, 2)) / per_channel),
                           channels / (2 * threads));  // enough chunks to share out
  // A chunk count that the team shares out evenly: in a last round with fewer
  // chunks than threads, the others wait (13 chunks on 2 threads: 1/13 of the
  // call on one thread alone).
  while (chunk > 1 && (channels + chunk - 1) / chunk % threads != 0) --chunk;
  return chunk;
}

std::vector<chunk> cut_into_chunks(const bn_tensor &x, const bn_tensor *y, const bn_tensor *mask,
                                   const bn_tensor *dy, int32_t axis, const plan &whole, int64_t per_chunk) {
  bool is_channel[BN_MAX_RANK] = {};
  is_channel[axis] = true;
  std::vector<chunk> chunks;
  for (int64_t c0 = 0; c0 < x.shape[axis]; c0 += per_chunk) {
    const int64_t count = std::min(per_chunk, x.shape[axis] - c0);
    const tensor_slice xs(x, axis, c0, count), ys(y ? *y : x, axis, c0, count);
    const tensor_slice ms(mask ? *mask : x, axis, c0, count), ds(dy ? *dy : x, axis, c0, count);
    chunks.push_back(chunk{plan{}, c0});
    plan &p = chunks.back().p;
    make_plan(xs.t, y ? &ys.t : nullptr, mask ? &ms.t : nullptr, dy ? &ds.t : nullptr, is_channel, p);
    p.stream_y = whole.stream_y;
    p.x_from = whole.x_from;
    p.epilogue = whole.epilogue;
  }
  return chunks;
}

size_t claim_and_prefetch_next(std::atomic<size_t> &next_chunk, const std::vector<chunk> &chunks, plan &p,
                               bool and_dy) {
  const size_t following = next_chunk.fetch_add(1, std::memory_order_relaxed);
  if (following < chunks.size()) {
    const plan &q = chunks[following].p;
    if (!and_dy || q.dy - p.dy == q.x - p.x) p.prefetch_ahead = q.x - p.x;
  }
  return following;
}

void item_range(const plan &p, int32_t slot, int32_t team, int64_t &begin, int64_t &end) {
  const int64_t items = p.lines * p.segments;
  const int64_t base = items / team, extra = items % team;
  begin = base * slot + std::min<int64_t>(slot, extra);
  end = begin + base + (slot < extra ? 1 : 0);
}

}  // namespace bn_core
