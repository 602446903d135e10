// The copies of the roofline (see roofline.hpp).
#include "roofline.hpp"

#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace bench {
namespace {

void copy_part(void* dst, const void* src, std::size_t bytes, bool streaming) {
#if defined(__x86_64__)
  if (streaming) {
    // 64-byte aligned parts (the buffers are 64-byte aligned); SSE2 is in every x86-64.
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    std::size_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    _mm_sfence();
    if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#else
  (void)streaming;
#endif
  std::memcpy(dst, src, bytes);
}

void parallel_copy(void* dst, const void* src, std::size_t bytes, int threads, bool streaming) {
#pragma omp parallel num_threads(threads)
  {
    const auto nt = static_cast<std::size_t>(omp_get_num_threads()), t = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t lines = (bytes + 63) / 64;
    const std::size_t b = std::min(bytes, lines * t / nt * 64), e = std::min(bytes, lines * (t + 1) / nt * 64);
    if (e > b) copy_part(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, e - b, streaming);
  }
}

}  // namespace

Roofline::Roofline(ShapeData& sd, const std::string& shape, int threads, const Repetitions& reps)
    : sd_(sd), shape_(shape), threads_(threads), reps_(reps) {}

void Roofline::time() {
  for (const bool streaming : {false, true}) {
    Row r(shape_, "-", "copy", sd_.shape.dtype, streaming ? "copy-nt" : "copy", threads_,
          2.0 * static_cast<double>(sd_.bytes));
    r.detail = streaming ? "non-temporal stores" : "memcpy";
    r.t = time_row([&] { parallel_copy(sd_.y.p, sd_.x[0].p, sd_.bytes, threads_, streaming); }, reps_);
    r.gbps = r.traffic / (r.t.median_ms * 1e-3) / 1e9;
    Row& keep = rows_[streaming ? 1 : 0];
    if (!timed_ || r.t.median_ms < keep.t.median_ms) keep = r;
  }
  timed_ = true;
}

double Roofline::finish() {
  const double roof_gbps = std::max(rows_[0].gbps, rows_[1].gbps);
  for (Row& r : rows_) r.roofline_pct = 100 * r.gbps / roof_gbps;
  return roof_gbps;
}

}  // namespace bench
