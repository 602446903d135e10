// What bnorm-train writes besides runs.txt and steps.csv: results.md (the verdict table first, then the
// pictures), verdicts.txt (the verdicts alone, to compare two machines or ISAs), runs.csv (every run) and the
// gnuplot pictures.
#pragma once

#include "claims.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace bnorm::train {

// One claim's row with the state of its runs.
struct Judged {
  const Claim* claim;
  Row row;
  enum { judged, not_run, pending } state = judged;
  std::size_t finished = 0, needed = 0;  // runs, for pending
};

struct ReportInfo {
  std::string command;
  double train_seconds = 0;  // training done by this invocation
  std::size_t trained = 0, resumed = 0;
  bool stopped = false;  // --max-minutes ran out
};

// The design's report: results.md, verdicts.txt, runs.csv, plot_lr.png, plot_curves.png.
void write_design_report(const std::filesystem::path& dir, const Plan& plan, const std::vector<Judged>& rows,
                         const Results& results, const ReportInfo& info);

// A grid's report (no verdicts): results.md with one row per run, runs.csv, and plot_<net>.png (train loss and
// validation accuracy against steps, the first seed).
void write_grid_report(const std::filesystem::path& dir, const Settings& settings, const Results& results,
                       const ReportInfo& info);

}  // namespace bnorm::train
