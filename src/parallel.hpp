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

// Values of a tensor below which each further thread is not worth its cost: waking a thread and
// joining it costs about what one thread spends on this many values (measured on a 2-core VM:
// BENCHMARKS.md, "Per-call costs").
// torch's CPU kernels have a rule of the same kind (at::internal::GRAIN_SIZE: 32768 values before a
// second thread; here two threads start at 2 x 16384).
inline constexpr std::int64_t kValuesPerThread = 16384;

// Threads worth using for `items` independent pieces of work over a tensor of `values` values.
inline int threads_for(std::int64_t items, std::int64_t values) {
  std::int64_t n = num_threads();
  if (items < n) n = items;
  if (values / kValuesPerThread < n) n = values / kValuesPerThread;
  return static_cast<int>(n < 1 ? 1 : n);
}

// f(i) for i in [0, n), statically split over the library's threads; `values`: the tensor's size.
template <class F>
void parallel_for(std::int64_t n, std::int64_t values, F&& f) {
  const int nt = threads_for(n, values);
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
void parallel_for_then(std::int64_t n, std::int64_t values, F&& f, G&& done) {
  parallel_ranges(n, 1, threads_for(n, values), [&](int, std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) f(i);
    done();
  });
}

}  // namespace
}  // namespace bnorm::detail
