// Which outputs are written with non-temporal ("streaming") stores: those of at least
// stream_threshold() bytes. Streaming skips the read-for-ownership of every destination line, so it
// pays once a call's input and output no longer fit in the last-level cache; below that, ordinary
// stores leave the output in cache for its consumer and are faster. The crossover therefore follows
// the last-level cache, but the size the OS reports cannot be trusted for it: a VM sees its host's
// whole L3 (this project's Sapphire Rapids VM reports 480 MiB for 2 vCPUs, far above its measured
// crossover), and a core may own only a slice of what is reported. So the threshold is measured: on the first call whose output is large
// enough to need the answer, the library's threads time a streamed and a cached copy of doubling sizes
// and keep the first size at which streaming wins (twice). They are as many threads as the kernels
// take: one core cannot draw the bandwidth of two, so a single-thread copy answers for another load
// than the kernels'. BNORM_STREAM_BYTES=<bytes> sets it instead (no measurement).
//
// On a shared host the answer is the host's state at that moment, not a constant of the CPU: on this
// project's Sapphire Rapids VM, sweeps of these copies minutes apart moved streaming's first clear win
// by a factor of two, and the picks of the quiet and the loaded machine differed as much
// (BENCHMARKS.md, "Non-temporal stores").
#include "kernels/kernels.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace bnorm::kernels {
namespace {

// The first size probed: twice the L2 of a core (at least 1 MiB). Below it, in+out of a call fit in
// the L2s of two cores, and ordinary stores win on every CPU: no call that small needs the answer.
std::int64_t probe_floor() { return std::max<std::int64_t>(std::int64_t{1} << 20, 2 * l2_cache_bytes()); }

// The last size probed: 32 MiB, so that the measurement holds at most 96 MiB, once (docs/reliability.md).
// When streaming does not win even there, outputs from twice that size on are streamed anyway: on the
// copies of this project's Sapphire Rapids VM, wrongly not streaming a large output cost several times
// what wrongly streaming a smaller one did.
constexpr std::int64_t kProbeCeiling = std::int64_t{32} << 20;

#if defined(__SSE2__)
// y = x + 1 over n floats (n a multiple of 4, both 16-byte aligned), with ordinary or streaming
// stores: the shape of an inference pass, bandwidth-bound at these sizes whatever the vector width.
void add_one(const float* x, float* y, std::int64_t n, bool stream) {
  const __m128 one = _mm_set1_ps(1.0f);
  if (stream) {
    for (std::int64_t i = 0; i < n; i += 4) _mm_stream_ps(y + i, _mm_add_ps(_mm_load_ps(x + i), one));
    _mm_sfence();
  } else {
    for (std::int64_t i = 0; i < n; i += 4) _mm_store_ps(y + i, _mm_add_ps(_mm_load_ps(x + i), one));
  }
}

// The copy split into `threads` contiguous parts of whole 64-byte lines, one a thread, as the kernels
// split a pass.
double seconds_of(const float* x, float* y, std::int64_t n, bool stream, int threads) {
  const auto t0 = std::chrono::steady_clock::now();
  detail::parallel_ranges(n, 16, threads, [&](int, std::int64_t b, std::int64_t e) { add_one(x + b, y + b, e - b, stream); });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
#endif

// BNORM_STREAM_BYTES, when set to a whole number of bytes; -1 when unset. A value that is not one is
// reported once on stderr and ignored (a kernel call cannot fail over an environment variable).
std::int64_t env_threshold() {
  static const std::int64_t value = [] {
    const char* env = std::getenv("BNORM_STREAM_BYTES");
    if (env == nullptr) return std::int64_t{-1};
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (*env == '\0' || end == nullptr || *end != '\0' || v < 0) {
      std::fprintf(stderr,
                   "bnorm: BNORM_STREAM_BYTES: expected a whole number of bytes >= 0 (outputs at least this large are "
                   "written with non-temporal stores), got '%s'; ignored, the threshold is measured instead\n",
                   env);
      return std::int64_t{-1};
    }
    return static_cast<std::int64_t>(v);
  }();
  return value;
}

std::atomic<std::int64_t> g_test_threshold{-1};

#if defined(__SSE2__)
// Best of 5 alternated timings of each kind of store, on a copy of `bytes` into as many; nothing
// when its buffers cannot be had (a kernel call must not throw).
std::optional<StreamProbe> probe(std::int64_t bytes, int threads) {
  const std::int64_t n = bytes / static_cast<std::int64_t>(sizeof(float));
  // One input and an output for each kind of store: a streamed store evicts its lines, and the
  // ordinary stores would then pay for that on a shared output. 64-byte aligned, and touched
  // before timing so that no page fault is timed.
  std::unique_ptr<float[]> buf(new (std::nothrow) float[static_cast<std::size_t>(3 * (n + 16))]);
  if (!buf) return std::nullopt;
  const auto a = reinterpret_cast<std::uintptr_t>(buf.get());
  float* x = buf.get() + ((64 - a % 64) % 64) / sizeof(float);
  float* y_cached = x + n + 16;
  float* y_streamed = y_cached + n + 16;
  for (float* p : {x, y_cached, y_streamed}) std::memset(p, 0, static_cast<std::size_t>(bytes));
  // Alternated: both see the same load, and the best of each is the least disturbed.
  StreamProbe p{bytes, 1e300, 1e300};
  for (int rep = 0; rep < 5; ++rep) {
    p.cached_s = std::min(p.cached_s, seconds_of(x, y_cached, n, false, threads));
    p.streamed_s = std::min(p.streamed_s, seconds_of(x, y_streamed, n, true, threads));
  }
  return p;
}

#endif

}  // namespace

StreamThreshold calibrate_stream_threshold(std::int64_t first, std::int64_t last) {
  StreamThreshold t;
#if !defined(__SSE2__)
  (void)first;
  (void)last;
  t.bytes = std::numeric_limits<std::int64_t>::max();
  t.source = "never: this target has no non-temporal stores (a streamed store is an ordinary one)";
  return t;
#else
  // A size counts once streaming wins there twice in a row: one win can be another process's burst
  // of traffic during the ordinary stores' timing.
  t.threads = num_threads();
  for (std::int64_t bytes = first; bytes <= last; bytes *= 2) {
    for (int round = 0; round < 2; ++round) {
      const std::optional<StreamProbe> p = probe(bytes, t.threads);
      if (!p) {  // no memory for the buffers: stream from here (it also keeps the caches for others)
        t.bytes = bytes;
        t.source = "measured on first use, up to the size whose buffers could not be allocated";
        return t;
      }
      t.probes.push_back(*p);
      if (!stream_wins(*p)) break;
      if (round == 1) {
        t.bytes = bytes;
        t.source = "measured on first use";
        return t;
      }
    }
  }
  t.bytes = 2 * last;
  t.source = "measured on first use (streaming won at no probed size: streamed from twice the largest)";
  return t;
#endif
}

bool stream_wins(const StreamProbe& p) { return p.streamed_s <= 0.97 * p.cached_s; }

const StreamThreshold& stream_threshold() {
  static const StreamThreshold t = [] {
    if (const std::int64_t env = env_threshold(); env >= 0) {
      StreamThreshold s;
      s.bytes = env;
      s.source = "BNORM_STREAM_BYTES";
      return s;
    }
    return calibrate_stream_threshold(probe_floor(), kProbeCeiling);
  }();
  return t;
}

bool stream_output_bytes(std::int64_t bytes) {
  if (const std::int64_t test = g_test_threshold.load(std::memory_order_relaxed); test >= 0) return bytes >= test;
  if (const std::int64_t env = env_threshold(); env >= 0) return bytes >= env;
  // Below the first probed size nothing is streamed, and nothing needs measuring.
  return bytes >= probe_floor() && bytes >= stream_threshold().bytes;
}

void set_stream_threshold_for_testing(std::int64_t bytes) { g_test_threshold.store(bytes, std::memory_order_relaxed); }

}  // namespace bnorm::kernels
