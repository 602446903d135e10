// bnorm-bench's command line (see options.hpp).
#include "options.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace bench {
namespace {

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
  std::vector<DType> dtypes{DType::F32, DType::BF16};
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
    else if (a == "--no-retry") o.reps.retry = false;
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
      dtypes.clear();
      dtypes_set = true;
      for (const auto& s : split(value(), ',')) {
        if (s == "f32" || s == "float32") dtypes.push_back(DType::F32);
        else if (s == "bf16" || s == "bfloat16") dtypes.push_back(DType::BF16);
        else throw std::invalid_argument("bad dtype '" + s + "'");
      }
    } else if (a == "--impls") {
      for (const auto& s : split(value(), ',')) o.impls.insert(s);
    } else if (a == "--min-time") {
      o.reps.min_time = std::atof(value().c_str());
      min_time_set = true;
    } else if (a == "--max-reps") {
      o.reps.max_reps = std::max(1, std::atoi(value().c_str()));
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
    if (!min_time_set) o.reps.min_time = 0.02;
    if (!max_reps_set) o.reps.max_reps = 5;
    o.reps.min_reps = 3;
    o.reps.warmup = 1;
  }
  o.reps.min_reps = std::min(o.reps.min_reps, o.reps.max_reps);
  std::vector<std::vector<std::int64_t>> all;
  for (const auto& s : split(shapes, ','))
    for (auto& d : named_shapes(s)) all.push_back(d);
  if (dtypes.empty()) throw std::invalid_argument("--dtypes: no dtype given");
  for (const auto& d : all)
    for (const DType dt : dtypes)
      if (!quick_bf16_subset || dt != DType::BF16 || d == std::vector<std::int64_t>{32, 256, 14, 14})
        o.runs.emplace_back(d, dt);
  return o;
}

}  // namespace

std::optional<int> parse_options(int argc, char** argv, Options& o) {
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bnorm-bench: %s\n%s", e.what(), kUsage);
    return 2;
  }
  return std::nullopt;
}

}  // namespace bench
