// bnorm-bench's measurement: repetitions of one call and their median, and how much of the machine
// other processes took meanwhile (the machine may be shared).
#pragma once

#include <chrono>
#include <functional>

namespace bench {

// How a row is timed: `warmup` calls, then repetitions until max_reps, or until min_time seconds have
// passed after at least min_reps; the median is reported.
struct Repetitions {
  int warmup = 2, min_reps = 5, max_reps = 20;
  double min_time = 0.3;
  bool retry = true;  // time a row once more when other processes disturbed it (> 0.5 CPU)
};

struct Timing {
  double median_ms = 0, min_ms = 0;
  int reps = 0;
  double others = 0;  // CPUs used by other processes meanwhile (the machine may be shared)
};

// CPU seconds spent by the whole machine (not idle) and by this process, to tell how much of the
// machine other processes took while a row was timed: /proc/stat's busy time minus our own.
struct CpuSample {
  double machine = 0, self = 0;
  std::chrono::steady_clock::time_point when;
};
CpuSample cpu_sample();
// CPUs that other processes kept busy on average since `a`, within [0, CPUs].
double others_since(const CpuSample& a);

double seconds_since(std::chrono::steady_clock::time_point t0);

// Times f() as `reps` says; a row timed while other processes took more than half a CPU is timed
// once more (when reps.retry), and the attempt that was less disturbed is kept.
Timing time_row(const std::function<void()>& f, const Repetitions& reps);

}  // namespace bench
