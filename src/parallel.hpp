// Internal: the one threading layer of the library. Every kernel that runs threads goes through
// these helpers, so the thread count is set in one place (bnorm::set_num_threads).
#pragma once

#include <bnorm/types.hpp>

#include <cstdint>

namespace bnorm::detail {
// Internal linkage on purpose: the kernels are compiled once per instruction set (see
// src/kernels/dispatch.cpp), and an inline function with external linkage compiled with AVX-512
// enabled could be the copy the linker keeps for the generic build too.
namespace {

// Threads worth using for `items` independent pieces of work.
inline int threads_for(std::int64_t items) {
  return static_cast<int>(items < 1 ? 1 : (items < num_threads() ? items : num_threads()));
}

// f(i) for i in [0, n), statically split over the library's threads.
template <class F>
void parallel_for(std::int64_t n, F&& f) {
  const int nt = threads_for(n);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

// Splits [0, n) into `parts` contiguous ranges, boundaries on multiples of `grain`, and runs
// f(part, begin, end) for each, one thread a part. A part may be empty.
struct Range {
  std::int64_t begin, end;
};
inline Range range_of(std::int64_t n, std::int64_t grain, int parts, int p) {
  const std::int64_t grains = (n + grain - 1) / grain;
  const std::int64_t g0 = grains * p / parts, g1 = grains * (p + 1) / parts;
  return {g0 * grain < n ? g0 * grain : n, g1 * grain < n ? g1 * grain : n};
}
template <class F>
void parallel_ranges(std::int64_t n, std::int64_t grain, int parts, F&& f) {
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    const Range r = range_of(n, grain, parts, p);
    f(p, r.begin, r.end);
  }
}

// f(i) for i in [0, n), each thread a contiguous range (as parallel_for), then done() once on
// each thread: for per-thread epilogues such as the fence after non-temporal stores.
template <class F, class G>
void parallel_for_then(std::int64_t n, F&& f, G&& done) {
  parallel_ranges(n, 1, threads_for(n), [&](int, std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) f(i);
    done();
  });
}

}  // namespace
}  // namespace bnorm::detail
