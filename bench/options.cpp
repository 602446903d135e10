// bnorm-bench's command line (see options.hpp). The flags, their defaults and their meaning are
// those of BENCHMARKS.md; every list is comma separated, empty items ignored.
#include "options.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace bench {
namespace {

const char* const kDefaultShapes = "seed,resnet50,2d";
const std::vector<std::int64_t> kQuickBf16Shape{32, 256, 14, 14};
const std::vector<std::string> kImplNames{"bnorm", "torch-out", "torch-alloc", "onednn", "onednn-blocked"};

// A bad value: CLI11 says "FLAG: expected WHAT, got 'VALUE'" (and parse_options exits with 2).
[[noreturn]] void bad(const std::string& flag, const std::string& expected, const std::string& got) {
  throw CLI::ValidationError(flag, "expected " + expected + ", got '" + got + "'");
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

// Each word of a list as the value `table` gives it.
template <class T>
std::vector<T> parse_words(const std::string& flag, const std::string& list,
                           const std::vector<std::pair<std::string, T>>& table, const std::string& expected) {
  std::vector<T> out;
  for (const auto& w : split(list, ',')) {
    const auto it = std::find_if(table.begin(), table.end(), [&](const auto& e) { return e.first == w; });
    if (it == table.end()) bad(flag, expected, w);
    out.push_back(it->second);
  }
  return out;
}

int parse_positive(const std::string& flag, const std::string& s, const std::string& expected) {
  int v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 1) bad(flag, expected, s);
  return v;
}

double parse_seconds(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !std::isfinite(v) || v < 0) bad(flag, "seconds >= 0 (e.g. 0.3)", s);
  return v;
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
  const char* expected = "seed, resnet50, 2d or a shape NxC / NxCxHxW of positive whole numbers";
  std::vector<std::int64_t> dims;
  for (const auto& d : split(name, 'x')) {
    std::int64_t v = 0;
    const auto [end, ec] = std::from_chars(d.data(), d.data() + d.size(), v);
    if (ec != std::errc() || end != d.data() + d.size() || v < 1) bad("--shapes", expected, name);
    dims.push_back(v);
  }
  if (dims.size() != 2 && dims.size() != 4) bad("--shapes", expected, name);
  if (dims[0] * (dims.size() == 4 ? dims[2] * dims[3] : 1) < 2)
    bad("--shapes", "a shape with more than one value per channel (training needs N*H*W >= 2)", name);
  return {dims};
}

// What --quick changes where the flags it would change were not given; then the (shape, dtype) runs.
void finish(Options& o, const CLI::App& app, std::string shapes, const std::vector<DType>& dtypes) {
  bool quick_bf16_subset = false;
  if (o.quick) {
    if (shapes == kDefaultShapes) {
      shapes = "seed,32x256x14x14,2d";
      quick_bf16_subset = app.count("--dtypes") == 0;  // keeps CI's smoke test short and still covers bf16
    }
    if (app.count("--min-time") == 0) o.reps.min_time = 0.02;
    if (app.count("--max-reps") == 0) o.reps.max_reps = 5;
    o.reps.min_reps = 3;
    o.reps.warmup = 1;
  }
  o.reps.min_reps = std::min(o.reps.min_reps, o.reps.max_reps);
  std::vector<std::vector<std::int64_t>> all;
  for (const auto& s : split(shapes, ','))
    for (auto& d : named_shapes(s)) all.push_back(d);
  for (const auto& d : all)
    for (const DType dt : dtypes)
      if (!quick_bf16_subset || dt != DType::BF16 || d == kQuickBf16Shape) o.runs.emplace_back(d, dt);
}

// A flag with a value, handed to `set` after parsing; given twice, the last one counts.
template <class F>
void value_flag(CLI::App& app, const char* flag, const char* type, const char* help, F set) {
  app.add_option_function<std::string>(flag, set, help)->type_name(type)->take_last();
}

// --quick and where the rows go.
void add_output_flags(CLI::App& app, Options& o) {
  app.add_flag("--quick", o.quick,
               "a small subset (seed shape, 32x256x14x14, 256x1024; bf16 only on 32x256x14x14 unless --dtypes or "
               "--shapes is given), few repetitions");
  app.add_flag("--json", o.json, "one JSON object per row on stdout (the table goes away)");
  value_flag(app, "--json-out", "FILE", "the table on stdout and the JSON rows into FILE (for bench/plot.py)",
             [&](const std::string& v) { o.json_out = v; });
}

// What runs: threads, shapes, ops, layouts, dtypes, implementations.
void add_run_flags(CLI::App& app, Options& o, std::string& shapes, std::vector<DType>& dtypes) {
  value_flag(app, "--threads", "LIST", "thread counts, e.g. 2,1 (default 2,1)", [&](const std::string& v) {
    o.threads.clear();
    for (const auto& t : split(v, ',')) o.threads.push_back(parse_positive("--threads", t, "a thread count >= 1"));
  });
  value_flag(app, "--shapes", "LIST",
             "'seed', 'resnet50', '2d', or shapes like 32x64x68x68 / 256x1024, comma separated (default "
             "seed,resnet50,2d)",
             [&](const std::string& v) { shapes = v; });
  value_flag(app, "--ops", "LIST", "train_fwd,infer_fwd,backward (default all)", [&](const std::string& v) {
    o.ops = parse_words<Op>("--ops", v, {{"train_fwd", Op::TrainFwd}, {"infer_fwd", Op::InferFwd}, {"backward", Op::Backward}},
                            "train_fwd, infer_fwd or backward");
  });
  value_flag(app, "--layouts", "LIST", "NCHW,NHWC (default both; a 2-D shape runs once, labelled NC)",
             [&](const std::string& v) {
               o.layouts = parse_words<Layout>(
                   "--layouts", v,
                   {{"NCHW", Layout::NCHW}, {"nchw", Layout::NCHW}, {"NHWC", Layout::NHWC}, {"nhwc", Layout::NHWC}},
                   "NCHW or NHWC");
             });
  value_flag(app, "--dtypes", "LIST", "f32,bf16 (default both; bf16: bfloat16 tensors, float32 per-channel vectors)",
             [&](const std::string& v) {
               dtypes = parse_words<DType>(
                   "--dtypes", v,
                   {{"f32", DType::F32}, {"float32", DType::F32}, {"bf16", DType::BF16}, {"bfloat16", DType::BF16}},
                   "f32 or bf16");
               if (dtypes.empty()) bad("--dtypes", "at least one of f32, bf16", v);
             });
  // Given twice, both lists count.
  app.add_option_function<std::string>(
         "--impls",
         [&](const std::string& v) {
           for (const auto& s : split(v, ',')) {
             if (std::find(kImplNames.begin(), kImplNames.end(), s) == kImplNames.end())
               bad("--impls", "bnorm, torch-out, torch-alloc, onednn or onednn-blocked", s);
             o.impls.insert(s);
           }
         },
         "bnorm,torch-out,torch-alloc,onednn,onednn-blocked (default all built; copy always)")
      ->type_name("LIST")
      ->delimiter(',')
      ->multi_option_policy(CLI::MultiOptionPolicy::Join);
}

// How each row is timed and checked.
void add_timing_flags(CLI::App& app, Options& o) {
  value_flag(app, "--min-time", "S", "seconds of repetitions per row (default 0.3; --quick 0.02)",
             [&](const std::string& v) { o.reps.min_time = parse_seconds("--min-time", v); });
  value_flag(app, "--max-reps", "N", "at most N timed repetitions per row (default 20; --quick 5)",
             [&](const std::string& v) { o.reps.max_reps = parse_positive("--max-reps", v, "a whole number >= 1"); });
  app.add_flag_callback("--no-check", [&] { o.check = false; }, "skip the comparison with the float64 reference");
  app.add_flag_callback("--no-retry", [&] { o.reps.retry = false; },
                        "do not time a row again when other processes disturbed it (> 0.5 CPU)");
}

std::string first_line(std::string s) {
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

}  // namespace

std::optional<int> parse_options(int argc, char** argv, Options& o) {
  CLI::App app{"BatchNorm side by side: bnorm, PyTorch (ATen), oneDNN, and a copy of the same bytes as the "
               "roofline (see BENCHMARKS.md)",
               "bnorm-bench"};
  app.get_formatter()->column_width(22);
  std::string shapes = kDefaultShapes;
  std::vector<DType> dtypes{DType::F32, DType::BF16};
  // In the order of --help.
  add_output_flags(app, o);
  add_run_flags(app, o, shapes, dtypes);
  add_timing_flags(app, o);
  try {
    app.parse(argc, argv);
    finish(o, app, shapes, dtypes);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "bnorm-bench: error: %s (see --help)\n", first_line(e.what()).c_str());
    return 2;
  }
  return std::nullopt;
}

}  // namespace bench
