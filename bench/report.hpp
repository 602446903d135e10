// bnorm-bench's output: one Row per (shape, dtype, threads, op, layout, implementation) and per copy,
// printed as a text table on stdout or one JSON object a line (--json; --json-out FILE writes the
// JSON rows to FILE beside the table, for bench/plot.py), and the run's header and closing lines
// (the machine, the libraries, the method).
#pragma once

#include "bench.hpp"
#include "options.hpp"
#include "timing.hpp"

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace bench {

struct Row {
  Row() = default;
  // What names the row (the rest is filled as it is timed and checked).
  Row(std::string shape_, std::string layout_, std::string op_, DType dtype_, std::string impl_, int threads_,
      double traffic_)
      : shape(std::move(shape_)), layout(std::move(layout_)), op(std::move(op_)), dtype(name_of(dtype_)),
        impl(std::move(impl_)), threads(threads_), traffic(traffic_) {}

  std::string shape, layout, op, dtype, impl, detail;
  int threads = 0;
  Timing t;
  double traffic = 0;  // bytes
  double gbps = 0, roofline_pct = 0;
  std::optional<double> ratio;  // to the fastest peer
  std::string best_peer;
  std::string check = "-";  // "ok", "FAIL", "-", "error" or "unsupported"
  std::optional<double> max_err;
  std::string error;
};

std::string shape_str(const std::vector<std::int64_t>& d);

class Report {
 public:
  explicit Report(bool json) : json_(json) {}
  Report(const Report&) = delete;
  Report& operator=(const Report&) = delete;
  ~Report();
  // The header and closing lines: on stdout for the table, on stderr with --json (stdout then holds
  // only rows).
  std::FILE* info() const { return json_ ? stderr : stdout; }
  // The run's header: the machine, the libraries used, the method; then the table's header.
  void header(const Options& o, const std::vector<std::unique_ptr<Impl>>& impls) const;
  // --json-out: the JSON rows also go to `path`; false when it cannot be written.
  bool also_json_to(const std::string& path);
  void emit(const Row& r) const;
  // The closing lines: the run's time and how much of the machine other processes took.
  void footer(double seconds, double ref_seconds, const CpuSample& run_cpu) const;

 private:
  bool json_;
  std::FILE* json_file_ = nullptr;
};

}  // namespace bench
