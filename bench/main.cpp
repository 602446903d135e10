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
// Exit status 1 when a bnorm row fails its check (the peers' failures only warn).
#include "bench.hpp"

#include <bnorm/bnorm.hpp>

#include "kernels/reference.hpp"

#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
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

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
  bool quick = false, json = false, check = true, retry = true;
  std::string json_out;  // also write the JSON rows to this file (the table stays on stdout)
  std::vector<int> threads{2, 1};
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<std::pair<std::vector<std::int64_t>, DType>> runs;  // (shape, dtype), in order
  std::vector<Op> ops{Op::TrainFwd, Op::InferFwd, Op::Backward};
  std::vector<Layout> layouts{Layout::NCHW, Layout::NHWC};
  std::vector<DType> dtypes{DType::F32, DType::BF16};
  std::set<std::string> impls;  // empty: all
  double min_time = 0.3;
  int max_reps = 20, min_reps = 5, warmup = 2;
};

const char* kUsage =
    "usage: bnorm-bench [options]\n"
    "  --quick            a small subset (seed shape, 32x256x14x14, 256x1024; bf16 only on 32x256x14x14\n"
    "                     unless --dtypes or --shapes is given), few repetitions\n"
    "  --json             one JSON object per row on stdout (the table goes away)\n"
    "  --json-out FILE    the table on stdout and the JSON rows into FILE (for bench/plot.py)\n"
    "  --threads LIST     thread counts, e.g. 2,1 (default 2,1)\n"
    "  --shapes LIST      'seed', 'resnet50', '2d', or shapes like 32x64x68x68 / 256x1024, comma separated\n"
    "                     (default seed,resnet50,2d)\n"
    "  --ops LIST         train_fwd,infer_fwd,backward (default all)\n"
    "  --layouts LIST     NCHW,NHWC (default both; a 2-D shape runs once, labelled NC)\n"
    "  --dtypes LIST      f32,bf16 (default both; bf16: bfloat16 tensors, float32 per-channel vectors)\n"
    "  --impls LIST       bnorm,torch-out,torch-alloc,onednn,onednn-blocked (default all built; copy always)\n"
    "  --min-time S       seconds of repetitions per row (default 0.3; --quick 0.02)\n"
    "  --max-reps N       at most N timed repetitions per row (default 20; --quick 5)\n"
    "  --no-check         skip the comparison with the float64 reference\n"
    "  --no-retry         do not time a row again when other processes disturbed it (> 0.5 CPU)\n";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

std::vector<std::vector<std::int64_t>> named_shapes(const std::string& name) {
  if (name == "seed") return {{32, 64, 68, 68}};
  if (name == "2d") return {{256, 1024}};
  if (name == "resnet50") {
    // The BatchNorm layers of ResNet-50 at batch 32: (channels, h, w).
    const std::int64_t r50[][3] = {{64, 112, 112}, {256, 56, 56}, {64, 56, 56},  {512, 28, 28}, {128, 28, 28},
                                   {1024, 14, 14}, {256, 14, 14}, {2048, 7, 7}, {512, 7, 7}};
    std::vector<std::vector<std::int64_t>> v;
    for (const auto& s : r50) v.push_back({32, s[0], s[1], s[2]});
    return v;
  }
  std::vector<std::int64_t> dims;
  for (const auto& d : split(name, 'x')) {
    char* end = nullptr;
    const long long v = std::strtoll(d.c_str(), &end, 10);
    if (*end != '\0' || v < 1) throw std::invalid_argument("bad shape '" + name + "'");
    dims.push_back(v);
  }
  if (dims.size() != 2 && dims.size() != 4) throw std::invalid_argument("shape '" + name + "': want NxC or NxCxHxW");
  if (dims[0] * (dims.size() == 4 ? dims[2] * dims[3] : 1) < 2)
    throw std::invalid_argument("shape '" + name + "': training needs more than one value per channel");
  return {dims};
}

Options parse(int argc, char** argv) {
  Options o;
  std::string shapes = "seed,resnet50,2d";
  bool min_time_set = false, max_reps_set = false, dtypes_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--quick") o.quick = true;
    else if (a == "--json") o.json = true;
    else if (a == "--no-check") o.check = false;
    else if (a == "--no-retry") o.retry = false;
    else if (a == "--json-out") o.json_out = value();
    else if (a == "--threads") {
      o.threads.clear();
      for (const auto& t : split(value(), ',')) {
        const int n = std::atoi(t.c_str());
        if (n < 1) throw std::invalid_argument("bad thread count '" + t + "'");
        o.threads.push_back(n);
      }
    } else if (a == "--shapes") shapes = value();
    else if (a == "--ops") {
      o.ops.clear();
      for (const auto& s : split(value(), ',')) {
        if (s == "train_fwd") o.ops.push_back(Op::TrainFwd);
        else if (s == "infer_fwd") o.ops.push_back(Op::InferFwd);
        else if (s == "backward") o.ops.push_back(Op::Backward);
        else throw std::invalid_argument("bad op '" + s + "'");
      }
    } else if (a == "--layouts") {
      o.layouts.clear();
      for (const auto& s : split(value(), ',')) {
        if (s == "NCHW" || s == "nchw") o.layouts.push_back(Layout::NCHW);
        else if (s == "NHWC" || s == "nhwc") o.layouts.push_back(Layout::NHWC);
        else throw std::invalid_argument("bad layout '" + s + "'");
      }
    } else if (a == "--dtypes") {
      o.dtypes.clear();
      dtypes_set = true;
      for (const auto& s : split(value(), ',')) {
        if (s == "f32" || s == "float32") o.dtypes.push_back(DType::F32);
        else if (s == "bf16" || s == "bfloat16") o.dtypes.push_back(DType::BF16);
        else throw std::invalid_argument("bad dtype '" + s + "'");
      }
    } else if (a == "--impls") {
      for (const auto& s : split(value(), ',')) o.impls.insert(s);
    } else if (a == "--min-time") {
      o.min_time = std::atof(value().c_str());
      min_time_set = true;
    } else if (a == "--max-reps") {
      o.max_reps = std::max(1, std::atoi(value().c_str()));
      max_reps_set = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else throw std::invalid_argument("unknown option '" + a + "'");
  }
  bool quick_bf16_subset = false;
  if (o.quick) {
    if (shapes == "seed,resnet50,2d") {
      shapes = "seed,32x256x14x14,2d";
      quick_bf16_subset = !dtypes_set;  // keeps CI's smoke test short and still covers bf16
    }
    if (!min_time_set) o.min_time = 0.02;
    if (!max_reps_set) o.max_reps = 5;
    o.min_reps = 3;
    o.warmup = 1;
  }
  o.min_reps = std::min(o.min_reps, o.max_reps);
  for (const auto& s : split(shapes, ','))
    for (auto& d : named_shapes(s)) o.shapes.push_back(d);
  if (o.dtypes.empty()) throw std::invalid_argument("--dtypes: no dtype given");
  for (const auto& d : o.shapes)
    for (const DType dt : o.dtypes)
      if (!quick_bf16_subset || dt != DType::BF16 || d == std::vector<std::int64_t>{32, 256, 14, 14})
        o.runs.emplace_back(d, dt);
  return o;
}

// ---------------------------------------------------------------------------------------------
// Memory: 64-byte aligned, first-touched by the thread split used for filling.

struct Buffer {
  void* p = nullptr;
  std::size_t bytes = 0;
  Buffer() = default;
  explicit Buffer(std::size_t n) : bytes(n) {
    p = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Buffer() { std::free(p); }
  template <class T>
  T* as() const { return static_cast<T*>(p); }
};

// bf16: rounded to nearest even by bnorm::bfloat16 (through float32: a value between two bf16
// values may round twice, which only moves an input by one bf16 step; the reference reads back
// what was stored, so it sees exactly what the libraries see).
void store(DType dt, void* p, std::size_t i, double v) {
  if (dt == DType::BF16) static_cast<bnorm::bfloat16*>(p)[i] = bnorm::bfloat16::from_float(static_cast<float>(v));
  else static_cast<float*>(p)[i] = static_cast<float>(v);
}
double load(DType dt, const void* p, std::size_t i) {
  if (dt == DType::BF16) return static_cast<const bnorm::bfloat16*>(p)[i].to_float();
  return static_cast<const float*>(p)[i];
}

// Deterministic values in [-1, 1) from an index (a hash, so that filling is parallel).
double noise(std::uint64_t i, std::uint64_t seed) {
  std::uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
}

// Offset of logical (n, c, s) in a layout.
inline std::size_t offset(const Case& c, Layout layout, std::int64_t n, std::int64_t ch, std::int64_t s) {
  return static_cast<std::size_t>(layout == Layout::NHWC ? (n * c.S() + s) * c.C() + ch : (n * c.C() + ch) * c.S() + s);
}

// Per-shape state: the harness's buffers and the float64 reference results.
struct ShapeData {
  Case shape;  // dims and dtype only
  std::size_t numel = 0, bytes = 0;
  Buffer x[2], dy[2];  // indexed by Layout
  Buffer y, dx;
  std::vector<float> weight, bias, running_mean, running_var, train_rm, train_rv, save_mean, save_invstd, batch_mean,
      batch_var, dweight, dbias;
  // Reference, on logical channels-first data.
  std::vector<double> xd, dyd, wd, bd, rmd, rvd;
  std::optional<bnorm::reference::Forward> ref_train, ref_eval;
  std::optional<bnorm::reference::Backward> ref_bwd;
  double ref_seconds = 0;
};

ShapeData make_shape_data(const std::vector<std::int64_t>& dims, DType dtype) {
  ShapeData sd;
  sd.shape.dims = dims;
  sd.shape.dtype = dtype;
  const Case& c = sd.shape;
  sd.numel = static_cast<std::size_t>(c.numel());
  sd.bytes = sd.numel * size_of(dtype);
  const auto C = static_cast<std::size_t>(c.C());
  const std::int64_t N = c.N(), S = c.S(), Cn = c.C();
  for (int l = 0; l < 2; ++l) {
    sd.x[l] = Buffer(sd.bytes);
    sd.dy[l] = Buffer(sd.bytes);
  }
  sd.y = Buffer(sd.bytes);
  sd.dx = Buffer(sd.bytes);
  sd.xd.resize(sd.numel);
  sd.dyd.resize(sd.numel);
  // x: per-channel offset and scale, so that the statistics differ between channels.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t ch = 0; ch < Cn; ++ch)
      for (std::int64_t s = 0; s < S; ++s) {
        const std::size_t i = static_cast<std::size_t>((n * Cn + ch) * S + s);
        const double xv = 0.25 * static_cast<double>(ch % 7 - 3) + (1.0 + 0.5 * static_cast<double>(ch % 3)) * noise(i, 1);
        const double dv = noise(i, 2);
        // Round to the storage type so that the reference sees exactly what the libraries see.
        store(dtype, sd.x[0].p, i, xv);
        store(dtype, sd.dy[0].p, i, dv);
        sd.xd[i] = load(dtype, sd.x[0].p, i);
        sd.dyd[i] = load(dtype, sd.dy[0].p, i);
      }
  // The channels-last copies, first-touched by the threads that write them.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t ch = 0; ch < Cn; ++ch) {
        const std::size_t i = static_cast<std::size_t>((n * Cn + ch) * S + s);
        const std::size_t j = static_cast<std::size_t>((n * S + s) * Cn + ch);
        store(dtype, sd.x[1].p, j, sd.xd[i]);
        store(dtype, sd.dy[1].p, j, sd.dyd[i]);
      }
  const std::size_t chunk = 1 << 16;
  const auto nchunks = static_cast<std::int64_t>((sd.bytes + chunk - 1) / chunk);
#pragma omp parallel for schedule(static)
  for (std::int64_t k = 0; k < nchunks; ++k) {
    const std::size_t b = static_cast<std::size_t>(k) * chunk, e = std::min(sd.bytes, b + chunk);
    std::memset(static_cast<char*>(sd.y.p) + b, 0, e - b);
    std::memset(static_cast<char*>(sd.dx.p) + b, 0, e - b);
  }
  auto vec = [&](std::uint64_t seed, double lo, double hi) {
    std::vector<float> v(C);
    for (std::size_t i = 0; i < C; ++i)
      v[i] = static_cast<float>(lo + (hi - lo) * 0.5 * (noise(i, seed) + 1.0));
    return v;
  };
  sd.weight = vec(3, 0.5, 1.5);
  sd.bias = vec(4, -0.5, 0.5);
  sd.running_mean = vec(5, -0.5, 0.5);
  sd.running_var = vec(6, 0.5, 2.0);
  sd.train_rm = sd.running_mean;
  sd.train_rv = sd.running_var;
  sd.save_mean.assign(C, 0.f);
  sd.save_invstd.assign(C, 1.f);
  sd.batch_mean.assign(C, 0.f);
  sd.batch_var.assign(C, 1.f);
  sd.dweight.assign(C, 0.f);
  sd.dbias.assign(C, 0.f);
  auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  sd.wd = widen(sd.weight);
  sd.bd = widen(sd.bias);
  sd.rmd = widen(sd.running_mean);
  sd.rvd = widen(sd.running_var);
  return sd;
}

bnorm::reference::Problem problem(const Case& c, bool training) {
  bnorm::reference::Problem p;
  p.N = c.N();
  p.C = c.C();
  p.S = c.S();
  p.training = training;
  p.momentum = c.momentum;
  p.eps = c.eps;
  return p;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The training statistics every backward starts from: the reference's (rounded to float32).
void ensure_reference(ShapeData& sd, Op op, bool check) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!sd.ref_train) {
    sd.ref_train = bnorm::reference::forward(problem(sd.shape, true), sd.xd, sd.wd, sd.bd, sd.rmd, sd.rvd);
    for (std::size_t c = 0; c < sd.save_mean.size(); ++c) {
      sd.batch_mean[c] = static_cast<float>(sd.ref_train->mean[c]);
      sd.batch_var[c] = static_cast<float>(sd.ref_train->var[c]);
    }
  }
  if (check && op == Op::InferFwd && !sd.ref_eval)
    sd.ref_eval = bnorm::reference::forward(problem(sd.shape, false), sd.xd, sd.wd, sd.bd, sd.rmd, sd.rvd);
  if (check && op == Op::Backward && !sd.ref_bwd)
    sd.ref_bwd = bnorm::reference::backward(problem(sd.shape, true), sd.xd, sd.wd, *sd.ref_train, sd.dyd);
  sd.ref_seconds += seconds_since(t0);
}

// Before each group: inputs of the op set to the same state for every implementation.
void reset_state(ShapeData& sd) {
  for (std::size_t c = 0; c < sd.save_mean.size(); ++c) {
    sd.save_mean[c] = static_cast<float>(sd.ref_train->mean[c]);
    sd.save_invstd[c] = static_cast<float>(sd.ref_train->invstd[c]);
  }
  sd.train_rm = sd.running_mean;
  sd.train_rv = sd.running_var;
}

Data data_for(ShapeData& sd, Layout layout) {
  Data d;
  d.x = sd.x[static_cast<int>(layout)].p;
  d.dy = sd.dy[static_cast<int>(layout)].p;
  d.y = sd.y.p;
  d.dx = sd.dx.p;
  d.weight = sd.weight.data();
  d.bias = sd.bias.data();
  d.running_mean = sd.running_mean.data();
  d.running_var = sd.running_var.data();
  d.train_running_mean = sd.train_rm.data();
  d.train_running_var = sd.train_rv.data();
  d.save_mean = sd.save_mean.data();
  d.save_invstd = sd.save_invstd.data();
  d.batch_mean = sd.batch_mean.data();
  d.batch_var = sd.batch_var.data();
  d.dweight = sd.dweight.data();
  d.dbias = sd.dbias.data();
  return d;
}

void fill_nan(ShapeData& sd) {
  const auto n = static_cast<std::int64_t>(sd.numel);
  const double nan = std::numeric_limits<double>::quiet_NaN();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    store(sd.shape.dtype, sd.y.p, static_cast<std::size_t>(i), nan);
    store(sd.shape.dtype, sd.dx.p, static_cast<std::size_t>(i), nan);
  }
  std::fill(sd.dweight.begin(), sd.dweight.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(sd.dbias.begin(), sd.dbias.end(), std::numeric_limits<float>::quiet_NaN());
}

// max |got - ref| / max(1, max |ref|) over a tensor in `layout` (NaN counts as infinite error).
double tensor_error(const ShapeData& sd, Layout layout, const void* got, const std::vector<double>& ref) {
  const Case& c = sd.shape;
  const std::int64_t N = c.N(), Cn = c.C(), S = c.S();
  double err = 0, scale = 1;
#pragma omp parallel for collapse(2) reduction(max : err, scale) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t ch = 0; ch < Cn; ++ch)
      for (std::int64_t s = 0; s < S; ++s) {
        const double r = ref[static_cast<std::size_t>((n * Cn + ch) * S + s)];
        const double g = load(c.dtype, got, offset(c, layout, n, ch, s));
        const double e = std::abs(g - r);
        err = std::max(err, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
        scale = std::max(scale, std::abs(r));
      }
  return err / scale;
}

double vector_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = std::abs(static_cast<double>(got[i]) - ref[i]);
    err = std::max(err, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
    scale = std::max(scale, std::abs(ref[i]));
  }
  return err / scale;
}

double check_error(const ShapeData& sd, Layout layout, Op op) {
  switch (op) {
    case Op::TrainFwd: return tensor_error(sd, layout, sd.y.p, sd.ref_train->y);
    case Op::InferFwd: return tensor_error(sd, layout, sd.y.p, sd.ref_eval->y);
    case Op::Backward:
      return std::max({tensor_error(sd, layout, sd.dx.p, sd.ref_bwd->dx), vector_error(sd.dweight, sd.ref_bwd->dweight),
                       vector_error(sd.dbias, sd.ref_bwd->dbias)});
  }
  return 0;
}

// Relative to the largest reference value; float32 rounding of a BatchNorm output is ~1e-7, and
// float32 accumulation over 400k values per channel costs a few 1e-6 at most. A bf16 output is
// rounded once to 8 significant bits (2^-9 relative); 2^-7 (~1/128) leaves room for float32
// arithmetic and for an implementation that rounds an intermediate to bf16. The reference runs on
// the bf16-rounded inputs, so input rounding is not counted as error.
double tolerance(DType dt) { return dt == DType::BF16 ? 0x1.0p-7 : 1e-4; }

// ---------------------------------------------------------------------------------------------
// Timing

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

Timing time_it(const std::function<void()>& f, const Options& o) {
  for (int i = 0; i < o.warmup; ++i) f();
  std::vector<double> t;
  const CpuSample cpu0 = cpu_sample();
  const auto start = std::chrono::steady_clock::now();
  while (static_cast<int>(t.size()) < o.max_reps) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(seconds_since(t0));
    if (static_cast<int>(t.size()) >= o.min_reps && seconds_since(start) >= o.min_time) break;
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

// A row timed while other processes took more than half a CPU is timed once more, and the attempt
// that was less disturbed is kept (a shared machine's bursts of work are often short).
Timing time_row(const std::function<void()>& f, const Options& o) {
  Timing t = time_it(f, o);
  if (o.retry && t.others > 0.5) {
    const Timing again = time_it(f, o);
    if (again.others < t.others) t = again;
  }
  return t;
}

// The roofline: a copy of the tensor's bytes (x -> y) by `threads` threads, each a contiguous part.
// Two kinds, both timed, the faster one is the roofline: memcpy (glibc's: ordinary stores, so the
// destination is read for ownership first, 3B of real traffic for 2B counted) and a streaming copy
// with non-temporal stores (2B of real traffic, what a kernel that streams its output achieves).
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

// ---------------------------------------------------------------------------------------------
// Output

struct Row {
  std::string shape, layout, op, dtype, impl, detail;
  int threads = 0;
  Timing t;
  double traffic = 0;  // bytes
  double gbps = 0, roofline_pct = 0;
  std::optional<double> ratio;  // to the fastest peer
  std::string best_peer;
  std::string check = "-";  // "ok", "FAIL", "-", or "error"
  std::optional<double> max_err;
  std::string error;
};

std::string shape_str(const std::vector<std::int64_t>& d) {
  std::string s;
  for (std::size_t i = 0; i < d.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(d[i]);
  }
  return s;
}

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

void print_json(const Row& r, FILE* f = stdout) {
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
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bnorm-bench: %s\n%s", e.what(), kUsage);
    return 2;
  }

  std::vector<std::unique_ptr<Impl>> impls;
  impls.push_back(make_bnorm());
  for (auto& i : make_torch()) impls.push_back(std::move(i));
  for (auto& i : make_onednn()) impls.push_back(std::move(i));
  if (!o.impls.empty()) {
    std::erase_if(impls, [&](const auto& i) { return !o.impls.count(i->name()); });
  }

  // Header: on stdout for the table, on stderr with --json (stdout then holds only rows).
  FILE* info = o.json ? stderr : stdout;
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  std::fprintf(info, "bnorm-bench: %s, %d CPUs online; bnorm %s", cpu_model().c_str(), omp_get_num_procs(),
               BNORM_BENCH_VERSION);
  auto used = [&](const char* prefix) {
    return std::any_of(impls.begin(), impls.end(), [&](const auto& i) { return i->name().rfind(prefix, 0) == 0; });
  };
  const std::string tv = torch_version(), dv = onednn_version();
  std::fprintf(info, "; torch %s; oneDNN %s\n", tv.empty() ? "(not built)" : used("torch") ? tv.c_str() : "(not used)",
               dv.empty() ? "(not built)" : used("onednn") ? dv.c_str() : "(not used)");
  std::fprintf(info, "GLIBC_TUNABLES=%s; %s; threading runtimes loaded: %s\n", tunables ? tunables : "(unset)",
               o.quick ? "quick" : "full", threading_runtimes().c_str());
  std::fprintf(info,
               "median of up to %d reps (>= %d, stop after %.2f s) after %d warm-up; traffic (B = numel * 4 f32, "
               "* 2 bf16): train_fwd 3B, infer_fwd 2B, backward 5B, copy 2B; %%roof = GB/s / GB/s of the faster copy "
               "(memcpy or copy-nt) of the same dtype's bytes; vs peer = median / fastest peer's; check: max rel err "
               "vs float64 reference, ok <= %.0e f32, <= 2^-7 bf16; others = CPUs busy with other processes while the "
               "row ran\n",
               o.max_reps, o.min_reps, o.min_time, o.warmup, tolerance(DType::F32));
  if (!o.json) print_table_header();
  FILE* json_file = nullptr;
  if (!o.json_out.empty()) {
    json_file = std::fopen(o.json_out.c_str(), "w");
    if (!json_file) {
      std::fprintf(stderr, "bnorm-bench: cannot write %s\n", o.json_out.c_str());
      return 2;
    }
  }
  auto emit = [&](const Row& r) {
    if (o.json) print_json(r);
    else print_table_row(r);
    if (json_file) print_json(r, json_file);
  };

  const auto run_start = std::chrono::steady_clock::now();
  const CpuSample run_cpu = cpu_sample();
  int failures = 0, peer_failures = 0;  // bnorm's own (the exit status), the peers' (a warning)
  double ref_seconds = 0;
  for (const auto& run : o.runs) {
    const std::vector<std::int64_t>& dims = run.first;
    const DType dtype = run.second;
    ShapeData sd = make_shape_data(dims, dtype);
    const std::string shape = shape_str(dims);
    bool first_threads = true;
    for (int threads : o.threads) {
      // The roofline: copies of the same bytes (x -> y) at the same threads, memcpy and streaming,
      // each timed before and after the block (the machine may be shared: the better median of the
      // two counts); the faster kind is the roofline. Rows are printed when the block is done.
      std::vector<Row> block;
      Row copy_rows[2];
      auto time_copies = [&](bool first) {
        for (const bool streaming : {false, true}) {
          Row r;
          r.shape = shape;
          r.layout = "-";
          r.op = "copy";
          r.dtype = name_of(dtype);
          r.impl = streaming ? "copy-nt" : "copy";
          r.detail = streaming ? "non-temporal stores" : "memcpy";
          r.threads = threads;
          r.traffic = 2.0 * static_cast<double>(sd.bytes);
          r.t = time_row([&] { parallel_copy(sd.y.p, sd.x[0].p, sd.bytes, threads, streaming); }, o);
          r.gbps = r.traffic / (r.t.median_ms * 1e-3) / 1e9;
          Row& keep = copy_rows[streaming ? 1 : 0];
          if (first || r.t.median_ms < keep.t.median_ms) keep = r;
        }
      };
      time_copies(true);

      for (Op op : o.ops) {
        ensure_reference(sd, op, o.check && first_threads);
        for (Layout layout : o.layouts) {
          Case c = sd.shape;
          c.op = op;
          c.layout = layout;
          if (c.is_2d() && layout != o.layouts.front()) continue;  // the same memory as the other layout
          if (c.is_2d()) c.layout = Layout::NCHW;
          const double B = static_cast<double>(sd.bytes);
          const double traffic = op == Op::TrainFwd ? 3 * B : op == Op::InferFwd ? 2 * B : 5 * B;
          std::vector<Row> rows;
          std::vector<bool> peer;
          for (auto& impl : impls) {
            if (!impl->supports(c)) continue;
            Row r;
            r.shape = shape;
            r.layout = impl->layout_label(c);
            r.op = name_of(op);
            r.dtype = name_of(dtype);
            r.impl = impl->name();
            r.threads = threads;
            r.traffic = traffic;
            reset_state(sd);
            Data d = data_for(sd, c.layout);
            try {
              impl->set_threads(threads);
              impl->prepare(c, d);
              r.detail = impl->detail();
              if (o.check && first_threads) {
                fill_nan(sd);
                impl->run();
                impl->publish();
                const double err = check_error(sd, c.layout, op);
                r.max_err = err;
                r.check = err <= tolerance(dtype) ? "ok" : "FAIL";
                if (!(err <= tolerance(dtype))) ++(impl->name() == "bnorm" ? failures : peer_failures);
                reset_state(sd);
              }
              r.t = time_row([&] { impl->run(); }, o);
              r.gbps = traffic / (r.t.median_ms * 1e-3) / 1e9;
            } catch (const Unsupported& e) {
              // No kernel for this case in that library here: said, not counted as a failure.
              r.error = e.what();
              r.check = "unsupported";
              r.max_err.reset();
            } catch (const std::exception& e) {
              r.error = e.what();
              r.check = "error";
              ++(impl->name() == "bnorm" ? failures : peer_failures);
            }
            impl->release();
            rows.push_back(r);
            peer.push_back(impl->is_peer() && impl->name() != "bnorm" && r.error.empty());
          }
          // Ratios to the fastest peer of the group.
          double best = std::numeric_limits<double>::infinity();
          std::string best_name;
          for (std::size_t i = 0; i < rows.size(); ++i)
            if (peer[i] && rows[i].t.median_ms < best) {
              best = rows[i].t.median_ms;
              best_name = rows[i].impl;
            }
          for (auto& r : rows) {
            if (std::isfinite(best) && r.error.empty()) {
              r.ratio = r.t.median_ms / best;
              r.best_peer = best_name;
            }
            block.push_back(r);
          }
        }
      }
      time_copies(false);
      const double roof_gbps = std::max(copy_rows[0].gbps, copy_rows[1].gbps);
      for (Row& r : copy_rows) {
        r.roofline_pct = 100 * r.gbps / roof_gbps;
        emit(r);
      }
      for (Row& r : block) {
        if (r.error.empty()) r.roofline_pct = 100 * r.gbps / roof_gbps;
        emit(r);
      }
      first_threads = false;
    }
    ref_seconds += sd.ref_seconds;
  }
  std::fprintf(info, "done in %.1f s (float64 reference: %.1f s); threading runtimes loaded: %s\n",
               seconds_since(run_start), ref_seconds, threading_runtimes().c_str());
  const double others = others_since(run_cpu);
  std::fprintf(info, "other processes kept %.2f of %d CPUs busy on average during the run%s\n", others,
               omp_get_num_procs(), others > 0.25 ? ": the machine was shared, timings are disturbed" : "");
  if (json_file) std::fclose(json_file);
  if (peer_failures)
    std::fprintf(stderr, "bnorm-bench: warning: %d row(s) of the peers failed the check or errored\n", peer_failures);
  if (failures) {
    std::fprintf(stderr, "bnorm-bench: %d bnorm row(s) failed the check against the float64 reference or errored\n",
                 failures);
    return 1;
  }
  return 0;
}
