// bnorm-bench's command line (parsed with CLI11; `bnorm-bench --help` lists the flags): what to run
// (shapes, dtypes, threads, ops, layouts, implementations), how long to time each row, where the
// rows go. A bad value ends the program with exit status 2 and one line on stderr naming the flag,
// what it expects and what it got.
#pragma once

#include "bench.hpp"
#include "timing.hpp"

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace bench {

struct Options {
  bool quick = false, json = false, check = true;
  std::string json_out;  // also write the JSON rows to this file (the table stays on stdout)
  std::vector<int> threads{2, 1};
  std::vector<std::pair<std::vector<std::int64_t>, DType>> runs;  // (shape, dtype), in order
  std::vector<Op> ops{Op::TrainFwd, Op::InferFwd, Op::Backward};
  std::vector<Layout> layouts{Layout::NCHW, Layout::NHWC};
  std::set<std::string> impls;  // empty: all
  Repetitions reps;
};

// Fills `o` from the command line. Returns the exit status to end with at once: 0 after --help (on
// stdout), 2 after a bad command line (the error on stderr); nothing when the bench is to run.
std::optional<int> parse_options(int argc, char** argv, Options& o);

}  // namespace bench
