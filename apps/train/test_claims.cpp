// The judges of bnorm-train's designs (claims.cpp) on made-up runs whose effects are known by construction:
// every claim of the full budget is given its runs (asked for again as the core grid's learning rates get
// chosen, as bnorm-train does), then judged, and its verdict and effect must be the ones built in. The
// training itself is tested elsewhere (train_smoke.sh, the torch adapter's tests); here no net is trained, except
// the eval-vs-batch claim's one BatchNorm2d.
#include "claims.hpp"
#include "text.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

using namespace bnorm::train;
using bnorm::train::stats::Verdict;

namespace {

// The made-up world: what each kind of run gives. The defaults make every claim true by a clear margin.
struct World {
  double none_acc_at_2 = 0.83, none_acc_per_depth = 0.006;  // no-BN loses accuracy with depth; BN does not
  double bn_acc = 0.85, after_gain = 0.01;                   // BN after the ReLU 1 point better than before
  double none_diverges_from_lr = 0.3;                        // no-BN diverges at lr >= this; BN never
  std::int64_t none_steps = 400, bn_steps = 200;             // steps to the loss threshold
  double init_loss_none = 0.2, init_loss_bn = 0.01;          // accuracy lost at init x4 (a quarter at x0.25)
  double bias_off_change = 0.0;                              // accuracy change without the conv bias (BN)
  double raw_steps_factor = 1.5;                             // BN's steps with raw input
  std::int64_t reached_then_diverged_seed = -1;              // no-BN at lr 0.03: this seed diverges after reaching
};

double best_lr(const std::string& variant) { return variant == "none" ? 0.03 : 0.1; }

// A small spread over the seeds, another for no-BN than for the BN variants, so that the paired differences
// of BN against no-BN are not all equal while those between BN variants are.
double jitter(const RunSpec& s) {
  return 0.001 * static_cast<double>((s.seed + (s.variant == "none" ? 1 : 0)) % 3);
}

RunResult fake(const RunSpec& s, const World& w) {
  RunResult r;
  r.spec = s;
  const bool bn = s.variant != "none";
  const bool after = s.variant == "bn_after" || s.variant == "torch_bn";
  r.steps = s.subset > 0 ? 300 : 906;
  r.bias_grad = s.bias ? (bn && !after ? 1e-7 : 0.05) : std::nan("");
  double acc = bn ? w.bn_acc + (after ? w.after_gain : 0) : w.none_acc_at_2 - w.none_acc_per_depth * (s.depth - 2);
  acc += jitter(s);
  // The validation accuracy peaks at the variant's best lr, so that the lr chosen on it is known.
  acc -= 0.02 * std::abs(std::log10(s.lr / best_lr(s.variant)));
  if (s.init != 1) acc -= (bn ? w.init_loss_bn : w.init_loss_none) * (s.init > 1 ? 1 : 0.25);
  if (!s.bias && bn) acc += w.bias_off_change;
  if (s.subset > 0) acc = bn ? 0.79 : 0.75 + 0.05 * s.dropout;  // dropout helps no-BN, BN without it helps more
  r.val_acc = r.test_acc = acc;
  r.test_loss = 1 - acc;
  std::int64_t steps = bn ? w.bn_steps + 2 * s.seed : w.none_steps + s.seed;
  if (s.raw_input) steps = static_cast<std::int64_t>(static_cast<double>(steps) * w.raw_steps_factor);
  r.steps_to_loss = steps;
  const bool diverges = !bn && (s.lr >= w.none_diverges_from_lr * 0.999 || s.raw_input || s.init > 1);
  if (diverges) {
    r.diverged_at = 50;
    r.steps = 50;
    r.steps_to_loss.reset();
    r.val_acc = r.test_acc = 0;
  }
  if (!diverges && !bn && s.seed == w.reached_then_diverged_seed && s.init == 1 && !s.raw_input && s.subset == 0) {
    r.diverged_at = 800;  // reached the threshold at `steps`, diverged later (at every lr: the lr chosen stays)
    r.steps = 800;
    r.val_acc = r.test_acc = 0;
  }
  return r;
}

struct Judgement {
  std::map<std::string, Row> rows;
  std::size_t runs = 0;
};

// Every claim of `plan` judged on made-up runs, asked for the way bnorm-train asks (train.cpp's loop).
Judgement judge_all(const Plan& plan, const World& w) {
  std::map<std::string, RunResult> store;
  Judgement j;
  for (const auto& claim : claims()) {
    if (std::find(plan.claims.begin(), plan.claims.end(), claim.id) == plan.claims.end()) continue;
    for (int round = 0;; ++round) {
      std::vector<RunResult> all;
      for (const auto& [k, r] : store) all.push_back(r);
      bool added = false;
      for (const auto& s : claim.runs(plan, Results(all)))
        if (!store.count(s.key())) store[s.key()] = fake(s, w), added = true;
      if (!added) break;
      EXPECT_LT(round, 3) << claim.id << " keeps asking for runs";
    }
    std::vector<RunResult> all;
    for (const auto& [k, r] : store) all.push_back(r);
    j.rows[claim.id] = claim.judge(plan, Results(all));
  }
  j.runs = store.size();
  return j;
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The convergence effect the world builds in at no-BN's lr 0.03: the geometric mean of (400 + s) / (200 + 2 s).
std::string convergence_at_8() {
  double logs = 0;
  for (int s = 1; s <= 8; ++s) logs += std::log((400.0 + s) / (200.0 + 2 * s));
  return cat("depth 8, lr 0.03: ", fmt("%.2f", std::exp(logs / 8)), "x [");
}

TEST(Claims, FullDesignOnAWorldWhereEveryClaimHolds) {
  const Plan plan = make_plan("full");
  const Judgement j = judge_all(plan, World{});
  // 288 core runs (3 depths x 3 variants x 4 lrs x 8 seeds), 16 torch controls, 48 init runs (the x1 runs are core
  // runs), 36 dropout runs, 16 bias runs, 16 input runs.
  EXPECT_EQ(j.runs, 420u);
  ASSERT_EQ(j.rows.size(), 9u);
  for (const auto& [id, row] : j.rows) {
    EXPECT_EQ(row.verdict, Verdict::supported) << id << ": " << row.effect;
    EXPECT_FALSE(row.design.empty()) << id;
    EXPECT_TRUE(row.note.empty()) << id << ": " << row.note;
  }
  EXPECT_FALSE(has(j.rows.at("convergence").effect, "not reached")) << j.rows.at("convergence").effect;
  const std::vector<std::pair<std::string, std::string>> effects{
      {"convergence", convergence_at_8()},
      // lr 0.3: no-BN 8/8 fail, BN 0/8; Clopper-Pearson for 8/8: [0.025^(1/8), 1] = [0.63, 1].
      {"lr", "lr 0.3: no-BN 8/8 [0.63, 1.00], BN 0/8 [0.00, 0.37]"},
      {"lr", "no-BN trains at 0.01, 0.03, 0.1; BN at 0.01, 0.03, 0.1, 0.3"},
      // BN's gain grows by 0.6 points per conv layer: 14 x 0.6 = 8.4 points from depth 2 to 16.
      {"depth", "trend +8.4 points [+8.4, +8.4]"},
      {"placement", "bnorm +1.0 points [+1.0, +1.0]; torch +1.0 points [+1.0, +1.0] (supported)"},
      // No-BN diverges at x4 (loses all its accuracy); BN loses 1 point there.
      {"init", "BN +1.0 points [+1.0, +1.0]"},
      // BN without dropout 0.79 against no-BN with its best p = 0.5: 0.775.
      {"regularisation", "+1.5 points [+1.5, +1.5] (no-BN's p = 0.5"},
      {"bias", "BN: with - without bias +0.0 points [+0.0, +0.0], largest |grad b| / |grad W| 1e-07"},
      {"bias", "128 parameters saved"},
      {"input", "BN: raw input fails 0/8 [0.00, 0.37], steps raw / standardized 1.5"},
      {"input", "no-BN: raw input fails 8/8"},
  };
  for (const auto& [id, part] : effects) EXPECT_TRUE(has(j.rows.at(id).effect, part)) << id << ": " << j.rows.at(id).effect;
}

TEST(Claims, ContradictedOrInconclusiveWhereTheWorldSaysSo) {
  World w;
  w.after_gain = -0.02;      // before beats after
  w.bn_steps = 600;          // BN converges more slowly
  w.bias_off_change = 0.05;  // removing the bias changes accuracy by 5 points
  w.raw_steps_factor = 0.5;  // raw input faster
  w.init_loss_bn = 0.9;      // BN loses more at x4 than no-BN, whose x4 runs diverge (a loss of about 0.79)
  const Judgement j = judge_all(make_plan("full"), w);
  for (const std::string id : {"placement", "convergence", "bias", "input", "init"})
    EXPECT_EQ(j.rows.at(id).verdict, Verdict::contradicted) << id << ": " << j.rows.at(id).effect;
  // No difference at all between the placements: an interval of [0, 0] excludes nothing.
  World same;
  same.after_gain = 0;
  const Row p = judge_all(make_plan("full"), same).rows.at("placement");
  EXPECT_EQ(p.verdict, Verdict::inconclusive) << p.effect;
}

TEST(Claims, ARunThatReachedTheLossAndDivergedLaterCountsItsStep) {
  // Seed 3 of no-BN reaches the threshold at step 403 and diverges at 800: it reached it, so it is not a
  // censored count at the last step (which would be an overestimate, not the lower bound censoring assumes).
  World w;
  w.reached_then_diverged_seed = 3;
  const Row c = judge_all(make_plan("full"), w).rows.at("convergence");
  EXPECT_TRUE(has(c.effect, convergence_at_8())) << c.effect;
  EXPECT_FALSE(has(c.effect, "not reached")) << c.effect;
  EXPECT_EQ(c.verdict, Verdict::supported);
}

TEST(Claims, DemoBudgetJudgesItsThreeClaims) {
  const Plan plan = make_plan("demo");
  const Judgement j = judge_all(plan, World{});
  EXPECT_EQ(j.rows.size(), 3u);
  EXPECT_EQ(j.runs, 24u);  // depth 16 x 2 variants x 2 lrs x 6 seeds
  EXPECT_EQ(j.rows.at("convergence").verdict, Verdict::supported);
  // Neither lr of the demo (0.01, 0.1) makes no-BN diverge in this world: nothing tells the two apart.
  EXPECT_EQ(j.rows.at("lr").verdict, Verdict::inconclusive) << j.rows.at("lr").effect;
  EXPECT_EQ(j.rows.at("eval").verdict, Verdict::supported);
}

}  // namespace
