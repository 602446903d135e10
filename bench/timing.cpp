// bnorm-bench's measurement loop (see timing.hpp).
#include "timing.hpp"

#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace bench {

CpuSample cpu_sample() {
  CpuSample s;
  s.when = std::chrono::steady_clock::now();
  if (std::FILE* f = std::fopen("/proc/stat", "r")) {
    unsigned long long v[8] = {};
    if (std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                    &v[7]) == 8) {
      const unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];  // not idle, not iowait
      s.machine = static_cast<double>(busy) / static_cast<double>(sysconf(_SC_CLK_TCK));
    }
    std::fclose(f);
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  s.self = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  return s;
}

double others_since(const CpuSample& a) {
  const CpuSample b = cpu_sample();
  const double wall = std::chrono::duration<double>(b.when - a.when).count();
  if (wall <= 0 || a.machine == 0) return 0;
  // /proc/stat counts in clock ticks (10 ms): short rows get a coarse figure, kept within [0, CPUs].
  return std::clamp(((b.machine - a.machine) - (b.self - a.self)) / wall, 0.0, static_cast<double>(omp_get_num_procs()));
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

namespace {

Timing time_it(const std::function<void()>& f, const Repetitions& reps) {
  for (int i = 0; i < reps.warmup; ++i) f();
  std::vector<double> t;
  const CpuSample cpu0 = cpu_sample();
  const auto start = std::chrono::steady_clock::now();
  while (static_cast<int>(t.size()) < reps.max_reps) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(seconds_since(t0));
    if (static_cast<int>(t.size()) >= reps.min_reps && seconds_since(start) >= reps.min_time) break;
  }
  std::sort(t.begin(), t.end());
  const std::size_t n = t.size();
  Timing r;
  r.median_ms = 1e3 * (n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]));
  r.min_ms = 1e3 * t.front();
  r.reps = static_cast<int>(n);
  r.others = others_since(cpu0);
  return r;
}

}  // namespace

// A shared machine's bursts of work are often short: a second attempt is often undisturbed.
Timing time_row(const std::function<void()>& f, const Repetitions& reps) {
  Timing t = time_it(f, reps);
  if (reps.retry && t.others > 0.5) {
    const Timing again = time_it(f, reps);
    if (again.others < t.others) t = again;
  }
  return t;
}

}  // namespace bench
