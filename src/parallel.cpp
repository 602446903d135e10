#include "parallel.hpp"

#include <omp.h>

#include <atomic>
#include <string>

namespace bnorm {
namespace {
std::atomic<int> g_threads{0};  // 0: not set, use OpenMP's default
}

void set_num_threads(int n) {
  if (n < 1) throw Error("bnorm::set_num_threads: n: expected >= 1, got " + std::to_string(n));
  g_threads.store(n, std::memory_order_relaxed);
}

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace bnorm
