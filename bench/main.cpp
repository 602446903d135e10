// bnorm-bench: BatchNorm side by side — bnorm, PyTorch (ATen), oneDNN — and a plain copy of the
// same bytes as the roofline, in one run. See BENCHMARKS.md for the method and the numbers.
//
//   bnorm-bench [--quick] [--json] [--threads 2,1] [--shapes LIST] [--ops LIST] [--layouts LIST]
//               [--dtypes LIST] [--impls LIST] [--min-time S] [--max-reps N] [--no-check]
//               [--json-out FILE]
//
// Dtypes: f32, and bf16 (bfloat16 x, dy, y, dx; float32 per-channel vectors, float32 arithmetic).
// For every (shape, dtype, threads, op, layout) group each implementation is prepared once (buffers are
// the harness's, allocated and first-touched once per shape), warmed up, checked once against the
// float64 reference (bnorm::reference, src/kernels/reference.hpp) and then timed: repetitions until
// max-reps, or until min-time has passed after at least 5 (3 with --quick); the median is reported.
// Minimal traffic, with B the tensor's bytes (numel * 4 for f32, numel * 2 for bf16): training
// forward 3B (x read twice, y written), inference forward 2B, backward 5B (x and dy read for the
// reductions, then x, dy read and dx written), copy 2B. GB/s = traffic / median; roofline % = GB/s
// / the GB/s of the faster of two copies of the same bytes, memcpy and a non-temporal streaming
// copy (same shape, dtype and threads: a bf16 case has its own copies, of half the f32 bytes);
// "vs peer" = median / the fastest peer's median (torch-out, torch-alloc, onednn in the same
// layout), so below 1 is faster than every peer. "others" is how many CPUs other processes
// kept busy while the row was timed (from /proc/stat): on a shared machine it tells which rows to
// distrust; such a row (> 0.5 CPU) is timed once more and the less disturbed attempt kept.
// The check: max |out - ref| / max(1, max |ref|) against the float64 reference computed on the
// inputs as stored (rounded to bf16 for bf16), <= 1e-4 for f32 and <= 2^-7 for bf16 (a bf16 output
// is one rounding, 2^-9 relative, away from the exact value). A row whose implementation has no
// kernel for the case (oneDNN without bf16 here) says "unsupported" and is not a failure.
// Exit status 1 when a bnorm row fails its check (the peers' failures only warn), 2 for a bad
// command line.
//
// The parts: options.cpp (the command line), data.cpp (the harness's buffers and inputs), check.cpp
// (the float64 reference and the errors), timing.cpp (repetitions, medians), roofline.cpp (the
// copies), report.cpp (the table and the JSON rows), impl_*.cpp (the implementations under test,
// bench.hpp); this file runs the groups and counts the failures.
#include "bench.hpp"
#include "data.hpp"
#include "options.hpp"
#include "report.hpp"
#include "roofline.hpp"
#include "timing.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace bench {

std::string Impl::layout_label(const Case& c) const {
  if (c.is_2d()) return "NC";
  return c.layout == Layout::NHWC ? "NHWC" : "NCHW";
}

#if !BNORM_BENCH_HAVE_TORCH
std::vector<std::unique_ptr<Impl>> make_torch() { return {}; }
std::string torch_version() { return ""; }
#endif
#if !BNORM_BENCH_HAVE_ONEDNN
std::vector<std::unique_ptr<Impl>> make_onednn() { return {}; }
std::string onednn_version() { return ""; }
#endif

namespace {

std::vector<std::unique_ptr<Impl>> make_impls(const std::set<std::string>& only) {
  std::vector<std::unique_ptr<Impl>> impls;
  impls.push_back(make_bnorm());
  for (auto& i : make_torch()) impls.push_back(std::move(i));
  for (auto& i : make_onednn()) impls.push_back(std::move(i));
  if (!only.empty()) std::erase_if(impls, [&](const auto& i) { return !only.count(i->name()); });
  return impls;
}

// Rows that failed their check or errored: bnorm's own (the exit status), the peers' (a warning).
struct Failures {
  int bnorm = 0, peers = 0;
  void count(const Impl& impl) { ++(impl.name() == "bnorm" ? bnorm : peers); }
};

// Minimal traffic, with B the tensor's bytes (see the top of this file).
double traffic_of(Op op, std::size_t bytes) {
  const double B = static_cast<double>(bytes);
  return op == Op::TrainFwd ? 3 * B : op == Op::InferFwd ? 2 * B : 5 * B;
}

// One call on NaN-filled outputs, compared with the reference.
void check_row(Impl& impl, ShapeData& sd, const Case& c, Row& r, Failures& failures) {
  fill_nan(sd);
  impl.run();
  impl.publish();
  const double err = check_error(sd, c.layout, c.op);
  r.max_err = err;
  r.check = err <= tolerance(c.dtype) ? "ok" : "FAIL";
  if (!(err <= tolerance(c.dtype))) failures.count(impl);
  reset_state(sd);
}

// One implementation's row of a group: prepared, checked (when `check`), timed, released.
Row run_impl(Impl& impl, ShapeData& sd, const Case& c, int threads, bool check, const Repetitions& reps,
             Failures& failures) {
  Row r(shape_str(c.dims), impl.layout_label(c), name_of(c.op), c.dtype, impl.name(), threads,
        traffic_of(c.op, sd.bytes));
  reset_state(sd);
  Data d = data_for(sd, c.layout);
  try {
    impl.set_threads(threads);
    impl.prepare(c, d);
    r.detail = impl.detail();
    if (check) check_row(impl, sd, c, r, failures);
    r.t = time_row([&] { impl.run(); }, reps);
    r.gbps = r.traffic / (r.t.median_ms * 1e-3) / 1e9;
  } catch (const Unsupported& e) {
    // No kernel for this case in that library here: said, not counted as a failure.
    r.error = e.what();
    r.check = "unsupported";
    r.max_err.reset();
  } catch (const std::exception& e) {
    r.error = e.what();
    r.check = "error";
    failures.count(impl);
  }
  impl.release();
  return r;
}

// Each row's ratio to the fastest of the group's peers (rows[i] is a peer where peer[i]).
void set_ratios(std::vector<Row>& rows, const std::vector<bool>& peer) {
  double best = std::numeric_limits<double>::infinity();
  std::string best_name;
  for (std::size_t i = 0; i < rows.size(); ++i)
    if (peer[i] && rows[i].t.median_ms < best) {
      best = rows[i].t.median_ms;
      best_name = rows[i].impl;
    }
  for (auto& r : rows)
    if (std::isfinite(best) && r.error.empty()) {
      r.ratio = r.t.median_ms / best;
      r.best_peer = best_name;
    }
}

// The rows of one (shape, dtype, threads, op, layout) group, every implementation that supports it.
std::vector<Row> run_group(const std::vector<std::unique_ptr<Impl>>& impls, ShapeData& sd, const Case& c, int threads,
                           bool check, const Repetitions& reps, Failures& failures) {
  std::vector<Row> rows;
  std::vector<bool> peer;
  for (auto& impl : impls) {
    if (!impl->supports(c)) continue;
    rows.push_back(run_impl(*impl, sd, c, threads, check, reps, failures));
    peer.push_back(impl->is_peer() && impl->name() != "bnorm" && rows.back().error.empty());
  }
  set_ratios(rows, peer);
  return rows;
}

// One (shape, dtype, threads) block: the copies, every (op, layout) group, the copies again; the
// rows are printed when the block is done, the copies first.
void run_block(const std::vector<std::unique_ptr<Impl>>& impls, ShapeData& sd, int threads, bool check,
               const Options& o, const Report& report, Failures& failures) {
  Roofline roofline(sd, shape_str(sd.shape.dims), threads, o.reps);
  roofline.time();
  std::vector<Row> block;
  for (Op op : o.ops) {
    ensure_reference(sd, op, check);
    for (Layout layout : o.layouts) {
      Case c = sd.shape;
      c.op = op;
      c.layout = layout;
      if (c.is_2d() && layout != o.layouts.front()) continue;  // the same memory as the other layout
      if (c.is_2d()) c.layout = Layout::NCHW;
      for (Row& r : run_group(impls, sd, c, threads, check, o.reps, failures)) block.push_back(std::move(r));
    }
  }
  roofline.time();
  const double roof_gbps = roofline.finish();
  for (const Row& r : roofline.rows()) report.emit(r);
  for (Row& r : block) {
    if (r.error.empty()) r.roofline_pct = 100 * r.gbps / roof_gbps;
    report.emit(r);
  }
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
  using namespace bench;
#ifdef BNORM_BENCH_OCL_ICD
  // oneDNN's PyPI build runs its CPU engine on a SYCL CPU device: the OpenCL CPU runtime from the
  // intel-opencl-rt wheel, whose ICD file names a path that pip does not rewrite. Point the ICD
  // loader at the library itself unless the caller did.
  setenv("OCL_ICD_FILENAMES", BNORM_BENCH_OCL_ICD, 0);
#endif
  Options o;
  if (const auto status = parse_options(argc, argv, o)) return *status;
  const std::vector<std::unique_ptr<Impl>> impls = make_impls(o.impls);

  Report report(o.json);
  report.header(o, impls);
  if (!o.json_out.empty() && !report.also_json_to(o.json_out)) {
    std::fprintf(stderr, "bnorm-bench: cannot write %s\n", o.json_out.c_str());
    return 2;
  }

  const auto run_start = std::chrono::steady_clock::now();
  const CpuSample run_cpu = cpu_sample();
  Failures failures;
  double ref_seconds = 0;
  for (const auto& [dims, dtype] : o.runs) {
    ShapeData sd = make_shape_data(dims, dtype);
    // The check runs at the first thread count only.
    for (std::size_t t = 0; t < o.threads.size(); ++t)
      run_block(impls, sd, o.threads[t], o.check && t == 0, o, report, failures);
    ref_seconds += sd.ref_seconds;
  }
  report.footer(seconds_since(run_start), ref_seconds, run_cpu);
  if (failures.peers)
    std::fprintf(stderr, "bnorm-bench: warning: %d row(s) of the peers failed the check or errored\n", failures.peers);
  if (failures.bnorm) {
    std::fprintf(stderr, "bnorm-bench: %d bnorm row(s) failed the check against the float64 reference or errored\n",
                 failures.bnorm);
    return 1;
  }
  return 0;
}
