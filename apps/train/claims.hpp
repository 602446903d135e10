// The seeds' claims about BatchNorm, each a design that can refute it: the runs it needs and the rule that
// turns them into one row of the verdict table. A new claim is one Claim in claims.cpp.
#pragma once

#include "runner.hpp"
#include "stats.hpp"

#include <functional>
#include <string>
#include <vector>

namespace bnorm::train {

// A budget: which claims run, on which grid. scripts/demo's default is "demo", --full is "full".
struct Plan {
  std::string name, what;  // what: one sentence for the page
  Settings settings;
  std::vector<std::string> claims;  // the ids that run at this budget; the others are "inconclusive at this budget"
  std::vector<std::int64_t> seeds;  // the core grid's (and the side designs' unless they say otherwise)
  std::vector<int> depths;          // the core grid's
  std::vector<double> lrs;          // the core grid's
  std::vector<std::string> variants;  // the core grid's
  int side_depth = 8;               // the depth of the side designs (init, dropout, bias, input, before/after)
  std::vector<std::int64_t> init_seeds;
  std::vector<double> init_scales, init_lrs;
  std::vector<std::int64_t> reg_seeds;
  std::vector<double> dropouts;
  std::int64_t reg_subset = 2000;
  int reg_epochs = 40, reg_patience = 5;
};

Plan make_plan(const std::string& name);  // throws UsageError for an unknown name
extern const std::vector<std::string> kPlans;

// The finished runs, looked up by spec.
class Results {
 public:
  explicit Results(std::vector<RunResult> runs);
  const RunResult* find(const RunSpec& s) const;
  const std::vector<RunResult>& all() const { return runs_; }

 private:
  std::vector<RunResult> runs_;
  std::map<std::string, std::size_t> by_key_;
};

struct Row {
  std::string claim;    // the claim and the seed documents that make it
  std::string design;   // what was compared
  std::string effect;   // the effect with its 95% interval
  stats::Verdict verdict = stats::Verdict::inconclusive;
  std::string note;     // why inconclusive ("at this budget", "pending"), or "" where the verdict is the design's
  std::string picture;  // the file that shows it, or ""
};

struct Claim {
  std::string id;
  std::string claim;  // as the table's first column says it
  // The runs the design needs, given the runs finished so far (a design may pick the lr the core grid chose).
  std::function<std::vector<RunSpec>(const Plan&, const Results&)> runs;
  // Its row; called only when every run it asks for is finished.
  std::function<Row(const Plan&, const Results&)> judge;
  // A design of its own (--design precise-bn): its row appears only in the plans that run it, so the other
  // plans' reports are as they were without it.
  bool own_plan = false;
};
const std::vector<Claim>& claims();

// The learning rate with the highest mean final validation accuracy over `seeds` (diverged runs count 0) among
// `lrs` for the cell `like` (its lr and seed ignored); nullopt while a run is missing.
std::optional<double> chosen_lr(const Results& r, RunSpec like, const std::vector<double>& lrs,
                                const std::vector<std::int64_t>& seeds);

// The core grid's run.
RunSpec core_spec(const Plan& p, int depth, const std::string& variant, double lr, std::int64_t seed);

}  // namespace bnorm::train
