#include "claims.hpp"
#include "text.hpp"

#include "bnorm_torch.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>

namespace bnorm::train {

using stats::Interval;
using stats::Verdict;

namespace {

// "+1.2 points [+0.4, +2.0]" for accuracy differences (fractions shown as percentage points).
std::string points(const Interval& i) {
  return cat(fmt("%+.1f", 100 * i.estimate), " points [", fmt("%+.1f", 100 * i.lo), ", ", fmt("%+.1f", 100 * i.hi), "]");
}
std::string times(const Interval& i) {
  return cat(fmt("%.2f", i.estimate), "x [", fmt("%.2f", i.lo), ", ", fmt("%.2f", i.hi), "]");
}
std::string rate(int k, int n) {
  const Interval i = stats::clopper_pearson(k, n);
  return cat(k, "/", n, " [", fmt("%.2f", i.lo), ", ", fmt("%.2f", i.hi), "]");
}

std::vector<std::int64_t> seq(std::int64_t a, std::int64_t b) {
  std::vector<std::int64_t> v;
  for (auto i = a; i <= b; ++i) v.push_back(i);
  return v;
}

// Trains: the Clopper-Pearson interval of the failure rate lies below 1/2; fails: above.
bool trains(int k, int n) { return stats::clopper_pearson(k, n).hi < 0.5; }
bool fails(int k, int n) { return stats::clopper_pearson(k, n).lo > 0.5; }

// The runs of `like` over `seeds` (all of them, or none while one is missing).
std::vector<const RunResult*> runs_of(const Results& r, RunSpec like, const std::vector<std::int64_t>& seeds) {
  std::vector<const RunResult*> v;
  for (auto s : seeds) {
    like.seed = s;
    const RunResult* x = r.find(like);
    if (!x) return {};
    v.push_back(x);
  }
  return v;
}

int failures(const std::vector<const RunResult*>& runs) {
  return static_cast<int>(std::count_if(runs.begin(), runs.end(), [](const RunResult* x) { return x->failed(); }));
}

// Paired test-accuracy differences a - b over the seeds.
std::vector<double> acc_diff(const std::vector<const RunResult*>& a, const std::vector<const RunResult*>& b) {
  std::vector<double> d;
  for (std::size_t i = 0; i < a.size(); ++i) d.push_back(a[i]->test_acc - b[i]->test_acc);
  return d;
}

// Steps to the train-loss threshold, with runs that never reached it censored at `cap` (their count is at least
// that). A run that reached it and diverged later counts the step where it reached it: censoring it at `cap` would
// overstate it, not bound it from below.
struct Steps {
  std::vector<double> v;
  int censored = 0;
};
Steps steps_to_loss(const std::vector<const RunResult*>& runs, std::int64_t cap) {
  Steps s;
  for (const auto* r : runs) {
    const bool reached = r->steps_to_loss.has_value();
    s.v.push_back(static_cast<double>(reached ? *r->steps_to_loss : cap));
    s.censored += reached ? 0 : 1;
  }
  return s;
}
std::int64_t most_steps(const std::vector<const RunResult*>& a, const std::vector<const RunResult*>& b) {
  std::int64_t m = 1;
  for (const auto* v : {&a, &b})
    for (const auto* r : *v) m = std::max(m, r->steps);
  return m;
}

// The ratio num/den of steps, claimed > 1. A censored count is a lower bound: censored numerators only make the
// ratio smaller (safe for "supported"), censored denominators only larger (safe for "contradicted"); a verdict
// that leans on the unsafe side is inconclusive.
Verdict censored_ratio_verdict(const Interval& i, const Steps& num, const Steps& den) {
  const Verdict v = stats::by_ratio(i, +1);
  if (v == Verdict::supported && den.censored) return Verdict::inconclusive;
  if (v == Verdict::contradicted && num.censored) return Verdict::inconclusive;
  return v;
}

std::string censored_note(const Steps& num, const Steps& den, std::size_t n) {
  if (!num.censored && !den.censored) return "";
  return cat(" (not reached: ", num.censored, "/", n, " and ", den.censored, "/", n, ", counted at the last step)");
}

RunSpec with_lr(RunSpec s, double lr) {
  s.lr = lr;
  return s;
}

// The core runs of `variant` at `depth` over every lr, and, once they are finished, the chosen lr.
struct Tuned {
  std::vector<RunSpec> runs;
  std::optional<double> lr;
};
Tuned tuned(const Plan& p, const Results& r, int depth, const std::string& variant) {
  Tuned t;
  for (double lr : p.lrs)
    for (auto s : p.seeds) t.runs.push_back(core_spec(p, depth, variant, lr, s));
  t.lr = chosen_lr(r, core_spec(p, depth, variant, 0, 0), p.lrs, p.seeds);
  return t;
}

void append(std::vector<RunSpec>& a, const std::vector<RunSpec>& b) { a.insert(a.end(), b.begin(), b.end()); }

// --- the claims ---

std::vector<RunSpec> core_runs(const Plan& p, const Results&) {
  std::vector<RunSpec> v;
  for (int d : p.depths)
    for (double lr : p.lrs)
      for (auto s : p.seeds)
        for (const auto& var : p.variants) v.push_back(core_spec(p, d, var, lr, s));
  return v;
}

// Convergence (Ioffe & Szegedy; seeds 000, 001, 004): at no-BN's chosen lr, the steps each needs to the
// train-loss threshold, paired by seed; the ratio none / BN, claimed > 1.
Row convergence(const Plan& p, const Results& r) {
  Row row;
  std::ostringstream effect;
  for (int d : p.depths) {
    const auto lr = chosen_lr(r, core_spec(p, d, "none", 0, 0), p.lrs, p.seeds);
    const auto none = runs_of(r, core_spec(p, d, "none", *lr, 0), p.seeds);
    const auto bn = runs_of(r, core_spec(p, d, "bn_before", *lr, 0), p.seeds);
    const std::int64_t cap = most_steps(none, bn);
    const Steps sn = steps_to_loss(none, cap), sb = steps_to_loss(bn, cap);
    const Interval i = stats::bootstrap_ratio(sn.v, sb.v);
    effect << (effect.tellp() ? "; " : "") << "depth " << d << ", lr " << *lr << ": " << times(i)
           << censored_note(sn, sb, none.size());
    if (d == p.side_depth) row.verdict = censored_ratio_verdict(i, sn, sb);
  }
  row.design = cat("steps to a mean train loss of ", p.settings.loss_threshold,
                   " (last 20 steps), no-BN / bnorm BN before ReLU, both at no-BN's chosen lr, paired by seed (",
                   p.seeds.size(), " seeds); verdict at depth ", p.side_depth);
  row.effect = effect.str();
  row.picture = "plot_curves.png";
  return row;
}

// Higher learning rates (seeds 003, 004): failures k of n per lr with Clopper-Pearson intervals; an lr trains
// where the interval lies below 1/2 and fails where it lies above.
Row learning_rate(const Plan& p, const Results& r) {
  Row row;
  std::ostringstream effect;
  bool for_bn = false, against = false;
  std::vector<double> range_none, range_bn;
  for (double lr : p.lrs) {
    const auto none = runs_of(r, core_spec(p, p.side_depth, "none", lr, 0), p.seeds);
    const auto bn = runs_of(r, core_spec(p, p.side_depth, "bn_before", lr, 0), p.seeds);
    const int kn = failures(none), kb = failures(bn), n = static_cast<int>(none.size());
    effect << (effect.tellp() ? "; " : "") << "lr " << lr << ": no-BN " << rate(kn, n) << ", BN " << rate(kb, n);
    for_bn = for_bn || (trains(kb, n) && fails(kn, n));
    against = against || (trains(kn, n) && fails(kb, n));
    if (trains(kn, n)) range_none.push_back(lr);
    if (trains(kb, n)) range_bn.push_back(lr);
  }
  auto list = [](const std::vector<double>& v) {
    std::string s;
    for (double x : v) s += cat(s.empty() ? "" : ", ", x);
    return s.empty() ? std::string("none of the grid") : s;
  };
  row.verdict = for_bn && !against ? Verdict::supported : against && !for_bn ? Verdict::contradicted : Verdict::inconclusive;
  row.design = cat("failures (diverged or validation accuracy < 0.5) of ", p.seeds.size(), " seeds per lr at depth ",
                   p.side_depth, ", no-BN against bnorm BN before ReLU; supported where some lr trains with BN and fails "
                   "without, and none the other way");
  row.effect = cat("failures k/n [Clopper-Pearson 95%]: ", effect.str(), ". no-BN trains at ", list(range_none),
                   "; BN at ", list(range_bn));
  row.picture = "plot_lr.png";
  return row;
}

std::vector<RunSpec> init_runs(const Plan& p, const Results& r) {
  std::vector<RunSpec> v;
  for (const std::string var : {"none", "bn_before"})
    for (double lr : p.init_lrs)
      for (auto s : p.init_seeds) {
        v.push_back(core_spec(p, p.side_depth, var, lr, s));
        for (double scale : p.init_scales) {
          RunSpec x = core_spec(p, p.side_depth, var, lr, s);
          x.init = scale;
          v.push_back(x);
        }
      }
  (void)r;
  return v;
}

// Less dependence on the initialisation (seed 003): the test accuracy lost at the worst init scale, each scale
// with its lr re-tuned on validation, no-BN's loss minus BN's, paired by seed.
Row init_sensitivity(const Plan& p, const Results& r) {
  Row row;
  std::vector<double> diff, drop_none, drop_bn;
  std::ostringstream lrs;
  for (std::size_t i = 0; i < p.init_seeds.size(); ++i) diff.push_back(0);
  for (const std::string var : {"none", "bn_before"}) {
    RunSpec base = core_spec(p, p.side_depth, var, 0, 0);
    const auto lr1 = chosen_lr(r, base, p.init_lrs, p.init_seeds);
    const auto at1 = runs_of(r, with_lr(base, *lr1), p.init_seeds);
    std::vector<double> worst(p.init_seeds.size(), -1.0);
    lrs << (lrs.tellp() ? "; " : "") << var << ": x1 at " << *lr1;
    for (double scale : p.init_scales) {
      RunSpec x = base;
      x.init = scale;
      const auto lr = chosen_lr(r, x, p.init_lrs, p.init_seeds);
      const auto at = runs_of(r, with_lr(x, *lr), p.init_seeds);
      lrs << ", x" << scale << " at " << *lr;
      for (std::size_t i = 0; i < at.size(); ++i) worst[i] = std::max(worst[i], at1[i]->test_acc - at[i]->test_acc);
    }
    for (std::size_t i = 0; i < worst.size(); ++i) diff[i] += var == "none" ? worst[i] : -worst[i];
    (var == "none" ? drop_none : drop_bn) = worst;
  }
  const Interval d = stats::bootstrap_mean(diff);
  row.verdict = stats::by_difference(d, +1);
  row.design = cat("depth ", p.side_depth, ", initial weights x", p.init_scales.front(), " .. x", p.init_scales.back(),
                   ", the lr re-tuned per scale on validation from {", [&] {
                     std::string s;
                     for (double x : p.init_lrs) s += cat(s.empty() ? "" : ", ", x);
                     return s;
                   }(), "}; the worst scale's test-accuracy loss against x1, no-BN's minus BN's, paired by seed (",
                   p.init_seeds.size(), " seeds)");
  row.effect = cat(points(d), " (worst loss: none ", points(stats::bootstrap_mean(drop_none)), ", BN ",
                   points(stats::bootstrap_mean(drop_bn)), "; lrs chosen: ", lrs.str(), ")");
  return row;
}

std::vector<RunSpec> reg_runs(const Plan& p, const Results& r) {
  std::vector<RunSpec> v;
  for (const std::string var : {"none", "bn_before"}) {
    const Tuned t = tuned(p, r, p.side_depth, var);
    if (!t.lr) {
      append(v, t.runs);
      continue;
    }
    for (double drop : p.dropouts)
      for (auto s : p.reg_seeds) {
        RunSpec x = core_spec(p, p.side_depth, var, *t.lr, s);
        x.dropout = drop;
        x.subset = p.reg_subset;
        x.epochs = p.reg_epochs;
        x.patience = p.reg_patience;
        v.push_back(x);
      }
  }
  return v;
}

// Regularisation (seeds 000, 003, 004: BN regularizes, so dropout can be dropped or reduced): on a training
// subset small enough to overfit, trained until validation stops improving, BN without dropout against no-BN
// with its best dropout (chosen on validation); test accuracy, paired by seed, claimed >= 0.
Row regularisation(const Plan& p, const Results& r) {
  Row row;
  std::vector<std::vector<const RunResult*>> none, bn;
  for (double drop : p.dropouts)
    for (const std::string var : {"none", "bn_before"}) {
      RunSpec x = core_spec(p, p.side_depth, var, *chosen_lr(r, core_spec(p, p.side_depth, var, 0, 0), p.lrs, p.seeds), 0);
      x.dropout = drop;
      x.subset = p.reg_subset;
      x.epochs = p.reg_epochs;
      x.patience = p.reg_patience;
      (var == "none" ? none : bn).push_back(runs_of(r, x, p.reg_seeds));
    }
  auto best = [](const std::vector<std::vector<const RunResult*>>& cells) {
    std::size_t b = 0;
    double bv = -1;
    for (std::size_t i = 0; i < cells.size(); ++i) {
      double m = 0;
      for (const auto* x : cells[i]) m += x->val_acc;
      if (m > bv) bv = m, b = i;
    }
    return b;
  };
  const std::size_t bn_ = best(none), bb = best(bn);
  const Interval d = stats::bootstrap_mean(acc_diff(bn[0], none[bn_]));
  std::vector<double> loss;
  for (std::size_t i = 0; i < bn[0].size(); ++i) loss.push_back(bn[0][i]->test_loss - none[bn_][i]->test_loss);
  const Interval dl = stats::bootstrap_mean(loss);
  const Interval db = stats::bootstrap_mean(acc_diff(bn[bb], bn[0]));
  row.verdict = stats::by_difference(d, +1);
  row.design = cat(p.reg_subset, " training images, depth ", p.side_depth, ", up to ", p.reg_epochs,
                   " epochs, stopped after ", p.reg_patience, " evaluations without a better validation accuracy; BN "
                   "without dropout against no-BN with its best dropout p (of ", [&] {
                     std::string s;
                     for (double x : p.dropouts) s += cat(s.empty() ? "" : ", ", x);
                     return s;
                   }(), ", chosen on validation), test accuracy, paired by seed (", p.reg_seeds.size(), " seeds)");
  row.effect = cat(points(d), " (no-BN's p = ", p.dropouts[bn_], "; test loss ", fmt("%+.3f", dl.estimate), " [",
                   fmt("%+.3f", dl.lo), ", ", fmt("%+.3f", dl.hi), "]; BN's own best p = ", p.dropouts[bb],
                   ", against p = 0: ", points(db), ")");
  return row;
}

std::vector<RunSpec> depth_runs(const Plan& p, const Results& r) { return core_runs(p, r); }

// Seed 002: BN matters more as nets get deeper. The gain (BN's test accuracy minus no-BN's, each at its chosen
// lr) per depth, and the trend: the gain at the deepest minus at the shallowest, paired by seed.
Row depth(const Plan& p, const Results& r) {
  Row row;
  std::vector<std::vector<double>> gains;
  std::ostringstream effect;
  for (int d : p.depths) {
    const auto ln = chosen_lr(r, core_spec(p, d, "none", 0, 0), p.lrs, p.seeds);
    const auto lb = chosen_lr(r, core_spec(p, d, "bn_before", 0, 0), p.lrs, p.seeds);
    gains.push_back(acc_diff(runs_of(r, core_spec(p, d, "bn_before", *lb, 0), p.seeds),
                             runs_of(r, core_spec(p, d, "none", *ln, 0), p.seeds)));
    effect << (effect.tellp() ? "; " : "") << "gain at depth " << d << " " << points(stats::bootstrap_mean(gains.back()));
  }
  if (p.depths.size() < 2) {
    row.design = "BN's test-accuracy gain over no-BN per depth; a trend needs two depths";
    row.effect = effect.str();
    row.note = "at this budget (one depth)";
    return row;
  }
  std::vector<double> trend;
  for (std::size_t i = 0; i < p.seeds.size(); ++i) trend.push_back(gains.back()[i] - gains.front()[i]);
  const Interval t = stats::bootstrap_mean(trend);
  row.verdict = stats::by_difference(t, +1);
  row.design = cat("test accuracy of bnorm BN before ReLU minus no-BN, each at its chosen lr, at depths ", [&] {
    std::string s;
    for (int d : p.depths) s += cat(s.empty() ? "" : ", ", d);
    return s;
  }(), "; the trend is the gain at ", p.depths.back(), " minus at ", p.depths.front(), ", paired by seed (", p.seeds.size(),
                   " seeds)");
  row.effect = cat("trend ", points(t), "; ", effect.str());
  row.picture = "plot_lr.png";
  return row;
}

std::vector<RunSpec> placement_runs(const Plan& p, const Results& r) {
  std::vector<RunSpec> v;
  for (const auto& [ours, control] : {std::pair<std::string, std::string>{"bn_before", "torch_bn_before"}, {"bn_after", "torch_bn"}}) {
    const Tuned t = tuned(p, r, p.side_depth, ours);
    append(v, t.runs);
    if (t.lr)
      for (auto s : p.seeds) v.push_back(core_spec(p, p.side_depth, control, *t.lr, s));
  }
  return v;
}

// Seed 000 (citing the CaffeNet benchmark): BN after the ReLU beats BN before it. bnorm's placements, each at its
// chosen lr, with torch's BN at the same lrs as the control.
Row placement(const Plan& p, const Results& r) {
  Row row;
  const double lb = *chosen_lr(r, core_spec(p, p.side_depth, "bn_before", 0, 0), p.lrs, p.seeds);
  const double la = *chosen_lr(r, core_spec(p, p.side_depth, "bn_after", 0, 0), p.lrs, p.seeds);
  auto at = [&](const std::string& v, double lr) { return runs_of(r, core_spec(p, p.side_depth, v, lr, 0), p.seeds); };
  const Interval d = stats::bootstrap_mean(acc_diff(at("bn_after", la), at("bn_before", lb)));
  const Interval c = stats::bootstrap_mean(acc_diff(at("torch_bn", la), at("torch_bn_before", lb)));
  row.verdict = stats::by_difference(d, +1);
  const Verdict control = stats::by_difference(c, +1);
  row.design = cat("depth ", p.side_depth, ", test accuracy of BN after ReLU minus before, each at its chosen lr (",
                   la, ", ", lb, "), paired by seed (", p.seeds.size(), " seeds); torch's BN at the same lrs as the control");
  row.effect = cat("bnorm ", points(d), "; torch ", points(c), " (", stats::to_string(control), ")");
  if (control != row.verdict) row.note = "bnorm and torch's control disagree";
  return row;
}

// The core runs of no-BN and BN before ReLU at the side depth, and once their lrs are chosen, a changed copy of
// each variant's run at its lr (bias off, raw input, ...) for every seed.
template <class Change>
std::vector<RunSpec> changed_runs(const Plan& p, const Results& r, Change change) {
  std::vector<RunSpec> v;
  for (const std::string var : {"none", "bn_before"}) {
    const Tuned t = tuned(p, r, p.side_depth, var);
    append(v, t.runs);
    if (t.lr)
      for (auto s : p.seeds) {
        RunSpec x = core_spec(p, p.side_depth, var, *t.lr, s);
        change(x);
        v.push_back(x);
      }
  }
  return v;
}

std::vector<RunSpec> bias_runs(const Plan& p, const Results& r) {
  return changed_runs(p, r, [](RunSpec& x) { x.bias = false; });
}

// Seeds 001, 004: a conv bias right before BN is redundant (the batch mean subtracts it). Measured: the bias
// gradient against the weight gradient, and the test accuracy with the bias against without, paired by seed,
// within +-1 point (equivalence).
Row bias(const Plan& p, const Results& r) {
  Row row;
  constexpr double kMargin = 0.01;
  std::ostringstream effect;
  Verdict v = Verdict::inconclusive;
  for (const std::string var : {"bn_before", "none"}) {
    RunSpec on = core_spec(p, p.side_depth, var, *chosen_lr(r, core_spec(p, p.side_depth, var, 0, 0), p.lrs, p.seeds), 0);
    RunSpec off = on;
    off.bias = false;
    const auto a = runs_of(r, on, p.seeds), b = runs_of(r, off, p.seeds);
    const Interval d = stats::bootstrap_mean(acc_diff(a, b));
    double grad = 0;
    for (const auto* x : a) grad = std::max(grad, x->bias_grad);
    effect << (var == "none" ? "; no-BN: " : "BN: ") << "with - without bias " << points(d) << ", largest |grad b| / |grad W| "
           << fmt("%.2g", grad);
    if (var == "bn_before") {
      v = stats::by_equivalence(d, kMargin);
      if (v == Verdict::supported && !(grad < 1e-4)) v = Verdict::inconclusive;
    }
  }
  // The biases: one per conv channel.
  const int params = p.side_depth * p.settings.width;
  const double total = 1 * 9 * p.settings.width + (p.side_depth - 1) * (p.settings.width * p.settings.width * 9.0) +
                       p.side_depth * p.settings.width + p.settings.width * 49.0 * 10 + 10 + 2.0 * p.side_depth * p.settings.width;
  row.verdict = v;
  row.design = cat("depth ", p.side_depth, ", conv bias on and off before bnorm BN (and without BN), each at its chosen "
                   "lr, test accuracy paired by seed (", p.seeds.size(), " seeds); supported where the interval lies "
                   "within +-1 point and the bias gradient is < 1e-4 of the weight gradient");
  row.effect = cat(effect.str(), "; ", params, " parameters saved (", fmt("%.1f", 100 * params / total), "% of the net)");
  return row;
}

std::vector<RunSpec> input_runs(const Plan& p, const Results& r) {
  return changed_runs(p, r, [](RunSpec& x) { x.raw_input = true; });
}

// Seed 002: without input normalization BN still trains, but more slowly. Pixels 0..255 as stored against
// standardized ones, each variant at the lr chosen with standardized inputs: BN's failures with raw input, and
// its steps to the loss threshold raw / standardized, paired by seed.
Row input_norm(const Plan& p, const Results& r) {
  Row row;
  std::ostringstream effect;
  for (const std::string var : {"bn_before", "none"}) {
    RunSpec std_in = core_spec(p, p.side_depth, var, *chosen_lr(r, core_spec(p, p.side_depth, var, 0, 0), p.lrs, p.seeds), 0);
    RunSpec raw = std_in;
    raw.raw_input = true;
    const auto a = runs_of(r, raw, p.seeds), b = runs_of(r, std_in, p.seeds);
    const int k = failures(a), n = static_cast<int>(a.size());
    const std::int64_t cap = most_steps(a, b);
    const Steps sa = steps_to_loss(a, cap), sb = steps_to_loss(b, cap);
    const Interval ratio = stats::bootstrap_ratio(sa.v, sb.v);
    effect << (var == "none" ? "; no-BN: " : "BN: ") << "raw input fails " << rate(k, n) << ", steps raw / standardized "
           << times(ratio) << censored_note(sa, sb, a.size());
    if (var == "bn_before") {
      const Verdict slower = censored_ratio_verdict(ratio, sa, sb);
      row.verdict = fails(k, n) || slower == Verdict::contradicted ? Verdict::contradicted
                    : trains(k, n) && slower == Verdict::supported ? Verdict::supported
                                                                     : Verdict::inconclusive;
    }
  }
  row.design = cat("depth ", p.side_depth, ", pixels 0..255 as stored against standardized, each variant at its lr "
                   "chosen with standardized input (", p.seeds.size(), " seeds); supported where BN trains with raw "
                   "input (failure interval below 1/2) and its steps ratio excludes 1 upward");
  row.effect = effect.str();
  return row;
}

// Seeds 000, 001, 004: in eval mode BN uses its running statistics, so an image's output does not depend on the
// batch it is in; in training mode it does. The image alone, and inside two different batches, compared bitwise.
Row eval_batch(const Plan&, const Results&) {
  Row row;
  ::torch::NoGradGuard g;
  ::torch::manual_seed(5);
  bool eval_equal = true;
  double train_diff = 0;
  int shapes = 0;
  for (std::int64_t hw : {14, 7}) {
    bnorm::torch::BatchNorm2d bn(16);
    bn->train();
    for (int i = 0; i < 5; ++i) bn->forward(::torch::randn({32, 16, hw, hw}) * 3 + 1);  // running statistics != 0, 1
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.uniform_(-1, 1);
    auto image = ::torch::randn({1, 16, hw, hw}) * 2 + 0.5;
    auto a = ::torch::cat({::torch::randn({5, 16, hw, hw}), image, ::torch::randn({58, 16, hw, hw})});
    auto b = ::torch::cat({::torch::randn({30, 16, hw, hw}) * 4, image, ::torch::randn({3, 16, hw, hw})});
    bn->eval();
    auto alone = bn->forward(image);
    eval_equal = eval_equal && ::torch::equal(alone, bn->forward(a).slice(0, 5, 6)) && ::torch::equal(alone, bn->forward(b).slice(0, 30, 31));
    bn->train();
    train_diff = std::max(train_diff, (bn->forward(a).slice(0, 5, 6) - bn->forward(b).slice(0, 30, 31)).abs().max().item<double>());
    ++shapes;
  }
  row.verdict = !eval_equal ? Verdict::contradicted : train_diff > 0 ? Verdict::supported : Verdict::inconclusive;
  row.design = "bnorm BatchNorm2d(16) with running statistics and affine parameters away from 0 and 1: one image alone "
               "and at two places in two different batches, at 14x14 and 7x7";
  row.effect = cat("eval mode: ", eval_equal ? "bitwise equal" : "DIFFERENT", " in ", shapes,
                   " of 2 shapes; training mode: outputs differ by up to ", fmt("%.3g", train_diff));
  return row;
}

}  // namespace

const std::vector<std::string> kPlans{"quick", "demo", "full"};

Plan make_plan(const std::string& name) {
  Plan p;
  p.name = name;
  Settings& s = p.settings;
  s.batch = 64;
  s.width = 16;
  s.epochs = 1;
  p.variants = {"none", "bn_before"};
  if (name == "full") {
    s.eval_every = 100;
    s.train_images = 0;
    s.val_images = 2000;
    s.test_images = 0;
    s.train_eval_images = 5000;
    s.loss_threshold = 0.5;
    s.val_target = 0.85;
    p.claims = {"convergence", "lr", "depth", "placement", "init", "regularisation", "bias", "input", "eval"};
    p.seeds = seq(1, 8);
    p.depths = {2, 8, 16};
    p.lrs = {0.01, 0.03, 0.1, 0.3};
    p.variants = {"none", "bn_before", "bn_after"};
    p.side_depth = 8;
    p.init_seeds = seq(1, 4);
    p.init_scales = {0.25, 4};
    p.init_lrs = {0.01, 0.03, 0.1};
    p.reg_seeds = seq(1, 6);
    p.dropouts = {0, 0.1, 0.5};
    p.reg_subset = 2000;
    p.reg_epochs = 30;
    p.reg_patience = 5;
    p.what = "the full run: plain CNNs of depth 2, 8 and 16 (width 16), 58,000 training images (1 epoch), 2,000 held "
             "out for validation, all 10,000 test images, 4 learning rates, 8 seeds; the side designs at depth 8";
  } else if (name == "demo" || name == "quick") {
    const bool quick = name == "quick";
    s.eval_every = quick ? 16 : 32;
    s.train_images = quick ? 4096 : 8192;
    s.val_images = quick ? 500 : 1000;
    s.test_images = quick ? 500 : 2000;
    s.train_eval_images = 1000;
    s.loss_threshold = quick ? 1.5 : 1.0;
    s.val_target = quick ? 0.5 : 0.65;
    p.claims = {"convergence", "lr", "eval"};
    p.seeds = quick ? seq(1, 2) : seq(1, 6);
    p.depths = {16};
    p.lrs = {0.01, 0.1};
    p.side_depth = 16;
    p.what = cat(quick ? "the QUICK run" : "the demo", ": plain CNNs of depth 16 only (width 16), ", s.train_images,
                 " of the 60,000 training images (1 epoch, ", s.train_images / 64, " steps), ", s.val_images,
                 " held out for validation, ", s.test_images, " of the 10,000 test images, learning rates 0.01 and 0.1, ",
                 p.seeds.size(), " seeds, no-BN against bnorm's BN before the ReLU");
  } else if (name == "precise-bn" || name == "precise-bn-quick") {
    // Its own design (the issue of running statistics, item 5): BN before ReLU at depth 8, every lr of the full
    // grid, the test accuracy with the moving averages against precise statistics of the same weights.
    const bool quick = name == "precise-bn-quick";
    s.eval_every = quick ? 32 : 64;
    s.train_images = quick ? 4096 : 16384;
    s.val_images = 1000;
    s.test_images = quick ? 1000 : 0;
    s.train_eval_images = 1000;
    s.loss_threshold = 1.0;
    s.val_target = 0.65;
    s.precise_images = quick ? 1024 : 4096;
    p.claims = {"precise"};
    p.seeds = quick ? seq(1, 2) : seq(1, 8);
    p.depths = {8};
    p.lrs = quick ? std::vector<double>{0.01, 0.3} : std::vector<double>{0.01, 0.03, 0.1, 0.3};
    p.variants = {"bn_before"};
    p.side_depth = 8;
    p.what = cat(quick ? "the QUICK precise-BN design" : "the precise-BN design", ": plain CNNs of depth 8 (width 16) with ",
                 "bnorm's BN before the ReLU, ", s.train_images, " training images (1 epoch), learning rates ",
                 quick ? "0.01 and 0.3" : "0.01, 0.03, 0.1 and 0.3", ", ", p.seeds.size(), " seeds; each run's ",
                 s.test_images ? cat(s.test_images, " test images") : std::string("10,000 test images"),
                 " evaluated with the moving averages and with precise statistics over ", s.precise_images,
                 " training images");
  } else {
    throw UsageError(cat("unknown --design '", name, "' (expected quick, demo, full, precise-bn or precise-bn-quick)"));
  }
  return p;
}

Results::Results(std::vector<RunResult> runs) : runs_(std::move(runs)) {
  for (std::size_t i = 0; i < runs_.size(); ++i) by_key_[runs_[i].spec.key()] = i;
}

const RunResult* Results::find(const RunSpec& s) const {
  const auto it = by_key_.find(s.key());
  return it == by_key_.end() ? nullptr : &runs_[it->second];
}

std::optional<double> chosen_lr(const Results& r, RunSpec like, const std::vector<double>& lrs,
                                const std::vector<std::int64_t>& seeds) {
  std::optional<double> best;
  double best_acc = -1;
  for (double lr : lrs) {
    const auto runs = runs_of(r, with_lr(like, lr), seeds);
    if (runs.empty()) return std::nullopt;
    double m = 0;
    for (const auto* x : runs) m += x->val_acc;
    if (m > best_acc) best_acc = m, best = lr;
  }
  return best;
}

RunSpec core_spec(const Plan&, int depth, const std::string& variant, double lr, std::int64_t seed) {
  RunSpec s;
  s.model = "plain";
  s.variant = variant;
  s.depth = depth;
  s.lr = lr;
  s.seed = seed;
  return s;
}

// Precise BN (Wu & Johnson 2021; the running-statistics issue): at each lr, the test accuracy with precise
// statistics minus with the moving averages, paired by seed (the same trained weights); the claim that they are
// better, judged at the highest lr, where the moving averages lag the weights most.
std::vector<RunSpec> precise_runs(const Plan& p, const Results&) {
  std::vector<RunSpec> v;
  for (double lr : p.lrs)
    for (auto s : p.seeds) v.push_back(core_spec(p, p.side_depth, "bn_before", lr, s));
  return v;
}

Row precise_bn(const Plan& p, const Results& r) {
  Row row;
  std::ostringstream effect;
  for (double lr : p.lrs) {
    std::vector<double> d;
    int diverged = 0;
    for (const auto* x : runs_of(r, core_spec(p, p.side_depth, "bn_before", lr, 0), p.seeds)) {
      if (!x->precise_test_acc) {  // diverged: no weights to evaluate
        ++diverged;
        continue;
      }
      d.push_back(*x->precise_test_acc - x->test_acc);
    }
    effect << (effect.tellp() ? "; " : "") << "lr " << lr << ": ";
    if (d.size() < 2) {
      effect << "too few runs (" << diverged << " of " << p.seeds.size() << " diverged)";
      if (lr == p.lrs.back()) row.note = "too few runs at the highest lr";
      continue;
    }
    const Interval i = stats::bootstrap_mean(d);
    effect << points(i) << (diverged ? cat(" (", diverged, " diverged runs left out)") : std::string());
    if (lr == p.lrs.back()) row.verdict = stats::by_difference(i, +1);
  }
  row.design = cat("depth ", p.side_depth, ", bnorm BN before ReLU, test accuracy with precise statistics (bnorm::",
                   "PopulationStats over ", p.settings.precise_images, " training images, the final weights) minus with the ",
                   "moving averages, paired by seed (", p.seeds.size(), " seeds) at each lr; verdict at lr ", p.lrs.back());
  row.effect = effect.str();
  return row;
}

const std::vector<Claim>& claims() {
  static const std::vector<Claim> c{
      {"convergence", "BN accelerates convergence (seeds 000, 001, 004; Ioffe & Szegedy 2015)", core_runs, convergence},
      {"lr", "BN allows higher learning rates (seeds 003, 004)", core_runs, learning_rate},
      {"depth", "BN matters more in deeper nets (seed 002)", depth_runs, depth},
      {"placement", "BN after the ReLU beats BN before it (seed 000, citing CaffeNet)", placement_runs, placement},
      {"init", "BN reduces the dependence on initialisation (seed 003)", init_runs, init_sensitivity},
      {"regularisation", "BN regularizes, so dropout can be reduced (seeds 000, 003, 004)", reg_runs, regularisation},
      {"bias", "a conv bias before BN is redundant (seeds 001, 004)", bias_runs, bias},
      {"input", "without input normalization BN still trains, but more slowly (seed 002)", input_runs, input_norm},
      {"eval", "in eval mode an image's output does not depend on its batch (seeds 000, 001, 004)",
       [](const Plan&, const Results&) { return std::vector<RunSpec>{}; }, eval_batch},
      {"precise", "precise BN statistics beat the moving averages at eval, most at high learning rates (Wu & Johnson 2021)",
       precise_runs, precise_bn, /*own_plan=*/true},
  };
  return c;
}

}  // namespace bnorm::train
