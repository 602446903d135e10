// bnorm-bench's table and JSON rows (see report.hpp).
#include "report.hpp"

#include "data.hpp"

#include <bnorm/bnorm.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <string>

namespace bench {
namespace {

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) continue;
    o += ch;
  }
  return o;
}

std::string num(double v, int prec = 4) {
  if (!std::isfinite(v)) return "null";
  char b[64];
  std::snprintf(b, sizeof b, "%.*g", prec, v);
  return b;
}

void print_json(const Row& r, std::FILE* f) {
  // An error or unsupported row has no timing: null, not 0.
  const bool ok = r.error.empty();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::fprintf(f,
      "{\"shape\":\"%s\",\"layout\":\"%s\",\"op\":\"%s\",\"dtype\":\"%s\",\"threads\":%d,\"impl\":\"%s\","
      "\"median_ms\":%s,\"min_ms\":%s,\"reps\":%d,\"traffic_bytes\":%.0f,\"gbps\":%s,\"roofline_pct\":%s,"
      "\"ratio_to_best_peer\":%s,\"best_peer\":%s,\"check\":\"%s\",\"max_err\":%s,\"detail\":\"%s\","
      "\"others_cpus\":%s",
      r.shape.c_str(), r.layout.c_str(), r.op.c_str(), r.dtype.c_str(), r.threads, r.impl.c_str(),
      num(ok ? r.t.median_ms : nan, 6).c_str(), num(ok ? r.t.min_ms : nan, 6).c_str(), r.t.reps, r.traffic,
      num(ok ? r.gbps : nan).c_str(), num(ok ? r.roofline_pct : nan).c_str(), r.ratio ? num(*r.ratio).c_str() : "null",
      r.best_peer.empty() ? "null" : ("\"" + r.best_peer + "\"").c_str(), r.check.c_str(),
      r.max_err ? num(*r.max_err, 3).c_str() : "null", json_escape(r.detail).c_str(), num(r.t.others, 2).c_str());
  if (!r.error.empty()) std::fprintf(f, ",\"error\":\"%s\"", json_escape(r.error).c_str());
  std::fprintf(f, "}\n");
  std::fflush(f);
}

void print_table_header() {
  std::printf("%-14s %-7s %-9s %-5s %3s %-14s %10s %8s %7s %8s %6s  %s\n", "shape", "layout", "op", "dtype", "thr",
              "impl", "median ms", "GB/s", "%roof", "vs peer", "others", "check (max rel err)");
}

void print_table_row(const Row& r) {
  if (!r.error.empty()) {
    std::printf("%-14s %-7s %-9s %-5s %3d %-14s  %s: %s\n", r.shape.c_str(), r.layout.c_str(), r.op.c_str(),
                r.dtype.c_str(), r.threads, r.impl.c_str(), r.check == "unsupported" ? "unsupported" : "error",
                r.error.c_str());
    return;
  }
  char ratio[32] = "";
  if (r.ratio) std::snprintf(ratio, sizeof ratio, "%.2fx", *r.ratio);
  char check[48] = "";
  if (r.max_err) std::snprintf(check, sizeof check, "%s %.1e", r.check.c_str(), *r.max_err);
  else std::snprintf(check, sizeof check, "%s", r.check.c_str());
  std::printf("%-14s %-7s %-9s %-5s %3d %-14s %10.4f %8.1f %6.1f%% %8s %6.1f  %s\n", r.shape.c_str(),
              r.layout.c_str(), r.op.c_str(), r.dtype.c_str(), r.threads, r.impl.c_str(), r.t.median_ms, r.gbps,
              r.roofline_pct, ratio, r.t.others, check);
  std::fflush(stdout);
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// The OpenMP / TBB runtimes mapped into this process (two OpenMP runtimes would fight for cores).
std::string threading_runtimes() {
  std::ifstream f("/proc/self/maps");
  std::string line;
  std::set<std::string> libs;
  while (std::getline(f, line)) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    const std::string base = path.substr(path.rfind('/') + 1);
    if (base.rfind("libgomp", 0) == 0 || base.rfind("libiomp", 0) == 0 || base.rfind("libomp", 0) == 0 ||
        base.rfind("libtbb.", 0) == 0)
      libs.insert(path);
  }
  std::string s;
  for (const auto& l : libs) s += (s.empty() ? "" : ", ") + l;
  return s.empty() ? "none" : s;
}

// A library's version for the header: "(not built)", "(not used)" when --impls left it out.
std::string version_label(const std::string& version, const char* prefix,
                          const std::vector<std::unique_ptr<Impl>>& impls) {
  if (version.empty()) return "(not built)";
  const bool used =
      std::any_of(impls.begin(), impls.end(), [&](const auto& i) { return i->name().rfind(prefix, 0) == 0; });
  return used ? version : "(not used)";
}

}  // namespace

std::string shape_str(const std::vector<std::int64_t>& d) {
  std::string s;
  for (std::size_t i = 0; i < d.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(d[i]);
  }
  return s;
}

Report::~Report() {
  if (json_file_) std::fclose(json_file_);
}

void Report::header(const Options& o, const std::vector<std::unique_ptr<Impl>>& impls) const {
  std::FILE* f = info();
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  std::fprintf(f, "bnorm-bench: %s, %d CPUs online; bnorm %s", cpu_model().c_str(), omp_get_num_procs(),
               BNORM_BENCH_VERSION);
  std::fprintf(f, "; torch %s; oneDNN %s\n", version_label(torch_version(), "torch", impls).c_str(),
               version_label(onednn_version(), "onednn", impls).c_str());
  std::fprintf(f, "GLIBC_TUNABLES=%s; %s; threading runtimes loaded: %s\n", tunables ? tunables : "(unset)",
               o.quick ? "quick" : "full", threading_runtimes().c_str());
  std::fprintf(f,
               "median of up to %d reps (>= %d, stop after %.2f s) after %d warm-up; traffic (B = numel * 4 f32, "
               "* 2 bf16): train_fwd 3B, infer_fwd 2B, backward 5B, copy 2B; %%roof = GB/s / GB/s of the faster copy "
               "(memcpy or copy-nt) of the same dtype's bytes; vs peer = median / fastest peer's; check: max rel err "
               "vs float64 reference, ok <= %.0e f32, <= 2^-7 bf16; others = CPUs busy with other processes while the "
               "row ran\n",
               o.reps.max_reps, o.reps.min_reps, o.reps.min_time, o.reps.warmup, tolerance(DType::F32));
  if (!json_) print_table_header();
}

bool Report::also_json_to(const std::string& path) {
  json_file_ = std::fopen(path.c_str(), "w");
  return json_file_ != nullptr;
}

void Report::emit(const Row& r) const {
  if (json_) print_json(r, stdout);
  else print_table_row(r);
  if (json_file_) print_json(r, json_file_);
}

void Report::footer(double seconds, double ref_seconds, const CpuSample& run_cpu) const {
  std::fprintf(info(), "done in %.1f s (float64 reference: %.1f s); threading runtimes loaded: %s\n", seconds,
               ref_seconds, threading_runtimes().c_str());
  const double others = others_since(run_cpu);
  std::fprintf(info(), "other processes kept %.2f of %d CPUs busy on average during the run%s\n", others,
               omp_get_num_procs(), others > 0.25 ? ": the machine was shared, timings are disturbed" : "");
  // The stream threshold that bnorm's rows ran with (measured on this machine at the run's first large
  // output, unless BNORM_STREAM_BYTES set it), and the probe's copies behind it: `bnorm info`'s lines.
  std::istringstream lines(bnorm::runtime_info());
  for (std::string line; std::getline(lines, line);)
    if (line.rfind("non-temporal output stores", 0) == 0 || line.rfind("  copies timed", 0) == 0)
      std::fprintf(info(), "bnorm %s\n", line.c_str());
}

}  // namespace bench
