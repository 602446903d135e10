// bnorm-train: trains the seed 000 CNN, the seed 004 MLP and plain CNNs of --depth conv layers (no skip
// connections) on Fashion-MNIST with libtorch, with the normalization done by bnorm (bnorm::torch), by torch
// (the control) or absent, over a grid of depths x optimizers x learning rates x seeds, and writes a CSV of every
// logged step, a markdown table (per run, and per cell across seeds with a verdict per claim), a gnuplot script
// and its PNG plots. See docs/convergence.md.
//
// Every bad input (missing or corrupt data, unknown model or variant, lr <= 0, batch 1 with BN on the MLP,
// an output folder that cannot be written, ...) ends with ONE line "bnorm-train: error: ..." on stderr and
// exit status 2 (usage, data) or 1 (anything that fails later); tests: train_errors.sh.
#include "bnorm_torch.hpp"
#include "idx.hpp"
#include "sync_bn.hpp"

#include <bnorm/types.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// plain: a CNN of --depth 3x3 conv layers without skip connections (the depth experiment of issue 17).
const std::vector<std::string> kModels{"mlp", "cnn", "plain"};
const std::vector<std::string> kOptimizers{"momentum", "sgd"};
// bn_* = bnorm's BatchNorm; torch_bn (after ReLU) and torch_bn_before = torch's, the controls.
const std::vector<std::string> kVariants{"none", "bn_before", "bn_after", "torch_bn", "torch_bn_before"};

template <class... A>
std::string cat(const A&... a) {
  std::ostringstream o;
  (o << ... << a);
  return o.str();
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// An error that ends the program with one line on stderr and exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string one_line(std::string s) {
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

bool is_torch_bn(const std::string& v) { return v.rfind("torch_bn", 0) == 0; }
bool bn_first(const std::string& v) { return v == "bn_before" || v == "torch_bn_before"; }

struct Net : torch::nn::Module {
  torch::nn::Sequential body;
  explicit Net(torch::nn::Sequential s) : body(register_module("body", std::move(s))) {}
  torch::Tensor forward(torch::Tensor x) { return body->forward(x); }
};

// BN of the variant's kind, or nothing. `two_d` picks BatchNorm2d (CNN) or BatchNorm1d (MLP).
void add_bn(torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (variant == "none") return;
  if (is_torch_bn(variant)) {
    if (two_d)
      s->push_back(torch::nn::BatchNorm2d(c));
    else
      s->push_back(torch::nn::BatchNorm1d(c));
  } else if (two_d) {
    s->push_back(bnorm::torch::BatchNorm2d(c));
  } else {
    s->push_back(bnorm::torch::BatchNorm1d(c));
  }
}

// BN placement: *_before = Linear/Conv -> BN -> ReLU (seed 004's order); bn_after and torch_bn =
// -> ReLU -> BN (seed 000's order).
void add_act_bn(torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (bn_first(variant)) {
    add_bn(s, variant, c, two_d);
    s->push_back(torch::nn::ReLU());
  } else {
    s->push_back(torch::nn::ReLU());
    add_bn(s, variant, c, two_d);
  }
}

// The plain CNN: conv(1->w) at 28x28, MaxPool, then depth-1 convs (w->w, 3x3, padding 1), the first half at
// 14x14, the rest after a second MaxPool at 7x7; each conv followed by ReLU and the variant's BN; then
// Linear(w*7*7, 10). No skip connections. Depth 2: one conv at 28x28, one at 14x14.
void add_plain(torch::nn::Sequential& s, const std::string& variant, int depth, std::int64_t w) {
  const int at14 = depth == 2 ? 1 : depth / 2;  // convs at 14x14; the remaining depth - 1 - at14 at 7x7
  s->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, w, 3).padding(1)));
  add_act_bn(s, variant, w, true);
  s->push_back(torch::nn::MaxPool2d(2));
  for (int i = 1; i < depth; ++i) {
    if (i == at14 + 1) s->push_back(torch::nn::MaxPool2d(2));
    s->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(w, w, 3).padding(1)));
    add_act_bn(s, variant, w, true);
  }
  if (depth - 1 <= at14) s->push_back(torch::nn::MaxPool2d(2));
  s->push_back(torch::nn::Flatten());
  s->push_back(torch::nn::Linear(w * 7 * 7, 10));
}

std::shared_ptr<Net> make_net(const std::string& model, const std::string& variant, int depth, std::int64_t width) {
  torch::nn::Sequential s;
  if (model == "plain") {
    add_plain(s, variant, depth, width);
  } else if (model == "mlp") {  // seed 004: Linear(784,256) -> BN -> ReLU -> Linear(256,10)
    s->push_back(torch::nn::Flatten());
    s->push_back(torch::nn::Linear(784, 256));
    add_act_bn(s, variant, 256, false);
    s->push_back(torch::nn::Linear(256, 10));
  } else {  // seed 000: (Conv -> ReLU -> BN -> MaxPool) x 2, then a linear classifier
    s->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)));
    add_act_bn(s, variant, 16, true);
    s->push_back(torch::nn::MaxPool2d(2));
    s->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)));
    add_act_bn(s, variant, 32, true);
    s->push_back(torch::nn::MaxPool2d(2));
    s->push_back(torch::nn::Flatten());
    s->push_back(torch::nn::Linear(32 * 7 * 7, 10));
  }
  return std::make_shared<Net>(s);
}

struct Data {
  torch::Tensor x, y;
};
Data to_tensors(const bnorm::train::Split& s, std::int64_t limit) {
  const std::int64_t n = limit > 0 ? std::min(limit, s.size()) : s.size();
  auto x = torch::from_blob(const_cast<std::uint8_t*>(s.images.data.data()), {n, 1, 28, 28}, torch::kUInt8)
               .to(torch::kFloat)
               .div(255.0)
               .sub(0.2860)
               .div(0.3530);
  auto y = torch::from_blob(const_cast<std::uint8_t*>(s.labels.data.data()), {n}, torch::kUInt8).to(torch::kLong);
  return {x, y};
}

// Evaluation batch: small enough that a depth-16 net's activations (256 x 16 x 28 x 28 floats = 12.8 MB) stay
// under glibc's mmap threshold and mostly in cache; batches of 1000 (50 MB a layer) made each evaluated image
// cost 75% of a trained one instead of about a third.
constexpr std::int64_t kEvalBatch = 256;

// Accuracy in eval mode (running statistics) on the first `limit` examples of `d` (0 = all).
double accuracy(Net& net, const Data& d, std::int64_t limit = 0) {
  torch::NoGradGuard g;
  net.eval();
  std::int64_t correct = 0;
  const std::int64_t n = limit > 0 ? std::min(limit, d.x.size(0)) : d.x.size(0);
  for (std::int64_t i = 0; i < n; i += kEvalBatch) {
    auto xb = d.x.slice(0, i, std::min(n, i + kEvalBatch));
    auto yb = d.y.slice(0, i, std::min(n, i + kEvalBatch));
    correct += net.forward(xb).argmax(1).eq(yb).sum().item<std::int64_t>();
  }
  net.train();
  return static_cast<double>(correct) / static_cast<double>(n);
}

struct RunSpec {
  std::string model, variant;
  double lr = 0, init = 1;
  int depth = 0;  // plain only (0 = the model's fixed depth)
  std::string optimizer = "momentum";
  std::int64_t seed = 0;
  // The cell across seeds: everything but the seed.
  bool same_cell(const RunSpec& o) const {
    return model == o.model && variant == o.variant && lr == o.lr && init == o.init && depth == o.depth &&
           optimizer == o.optimizer;
  }
};

struct RunResult {
  RunSpec spec;
  double acc1 = 0, accN = 0, train_accN = 0, final_loss = 0;
  std::optional<std::int64_t> steps_to_target;
  std::optional<std::int64_t> diverged_at;
  double sec_per_epoch = 0, sec_per_step = 0, init_checksum = 0;
  // Eval points for the plot: (step, mean train loss since the previous one) and (step, test accuracy).
  std::vector<std::pair<std::int64_t, double>> loss_curve, acc_curve;
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string outcome(const RunResult& r) {
  if (r.diverged_at) return cat("diverged (step ", *r.diverged_at, ")");
  if (r.accN < 0.2) return "did not learn";
  return "no";
}

// Seconds per forward+backward (training mode) of `step`, the least of 5 timings of 10 calls, interleaved
// with `other` so that both see the same load.
std::pair<double, double> time_pair(const std::function<void()>& a, const std::function<void()>& b) {
  double ta = 1e300, tb = 1e300;
  for (int rep = 0; rep < 6; ++rep) {
    auto t0 = Clock::now();
    for (int i = 0; i < 10; ++i) a();
    const double sa = seconds_since(t0) / 10;
    t0 = Clock::now();
    for (int i = 0; i < 10; ++i) b();
    const double sb = seconds_since(t0) / 10;
    if (rep > 0) {  // rep 0 warms up
      ta = std::min(ta, sa);
      tb = std::min(tb, sb);
    }
  }
  return {ta, tb};
}

template <class M>
std::function<void()> bn_step(M m, const torch::Tensor& x) {
  auto xg = x.detach().clone().requires_grad_(true);
  auto dy = torch::randn_like(x);
  m->train();
  return [m, xg, dy]() mutable { m->forward(xg).backward(dy); };
}

struct Options {
  std::string data_dir = bnorm::train::kDefaultDataDir, out_dir = "bnorm-train-out";
  std::vector<std::string> models{"mlp"};
  std::vector<std::string> variants{"none", "bn_before", "bn_after", "torch_bn"};
  std::vector<double> lrs{0.1}, inits{1.0}, init_lrs, curve_lrs;
  std::vector<int> depths{2, 8, 16};
  std::vector<std::string> optimizers{"momentum"};
  std::vector<std::int64_t> seeds{0};
  int epochs = 2, batch = 64, threads = 2, eval_every = 100, width = 16;
  std::int64_t train_limit = 0, test_limit = 2000, train_eval_limit = 10000;
  double target = 0.85, trainable = 0.5;
  bool bench = true, resume = false;
  std::string command;
};

void validate(const Options& o) {
  for (const auto& m : o.models)
    if (std::find(kModels.begin(), kModels.end(), m) == kModels.end())
      throw UsageError(cat("unknown model '", m, "' (expected mlp or cnn)"));
  bool any_bn = false;
  for (const auto& v : o.variants) {
    if (std::find(kVariants.begin(), kVariants.end(), v) == kVariants.end())
      throw UsageError(cat("unknown variant '", v, "' (expected none, bn_before, bn_after, torch_bn, torch_bn_before)"));
    any_bn = any_bn || v != "none";
  }
  for (const auto* list : {&o.lrs, &o.init_lrs})
    for (double lr : *list)
      if (!(lr > 0) || !std::isfinite(lr)) throw UsageError(cat("the learning rate must be > 0 and finite, got ", lr));
  for (double s : o.inits)
    if (!(s > 0) || !std::isfinite(s)) throw UsageError(cat("--init-scale must be > 0 and finite, got ", s));
  if (!(o.target > 0 && o.target <= 1)) throw UsageError(cat("--target must be in (0, 1], got ", o.target));
  if (!(o.trainable > 0 && o.trainable < 1)) throw UsageError(cat("--trainable must be in (0, 1), got ", o.trainable));
  for (int d : o.depths)
    if (d < 2 || d > 200) throw UsageError(cat("--depth must be between 2 and 200 conv layers, got ", d));
  for (const auto& opt : o.optimizers)
    if (std::find(kOptimizers.begin(), kOptimizers.end(), opt) == kOptimizers.end())
      throw UsageError(cat("unknown optimizer '", opt, "' (expected momentum or sgd)"));
  for (double lr : o.curve_lrs)
    if (std::find(o.lrs.begin(), o.lrs.end(), lr) == o.lrs.end())
      throw UsageError(cat("--curve-lr ", lr, " is not one of the --lr values"));
  if (o.train_limit < 0 || o.test_limit < 0 || o.train_eval_limit < 0)
    throw UsageError("--train-subset, --test-subset and --train-eval-subset must be >= 0");
  // The m == 1 rule: in training, BN normalizes each channel with the mean and variance of its m values in
  // the batch (m = N for BatchNorm1d on (N, C), N x H x W for BatchNorm2d). With m == 1 the variance is 0,
  // the output is identically beta and the gradient to the input is 0; torch refuses it too.
  if (any_bn && o.batch == 1 && std::find(o.models.begin(), o.models.end(), "mlp") != o.models.end())
    throw UsageError(
        "--batch 1 with BatchNorm on the MLP: in training BN normalizes each feature with the mean and variance "
        "of its m values in the batch, and here m = batch = 1, so the variance is 0 and the output is constant "
        "(m == 1 is refused, as in torch); use --batch 2 or more (the CNN's BatchNorm2d has m = batch x H x W)");
}

// How steps.csv names a run: its first four columns (model, variant, lr, init_scale) and its last three
// (depth, optimizer, seed). train_one writes them; --resume reads them back to keep a finished run's rows.
struct StepsColumns {
  std::string head, tail;
};
StepsColumns steps_columns(const RunSpec& s) {
  return {cat(s.model, ",", s.variant, ",", s.lr, ",", s.init), cat(s.depth, ",", s.optimizer, ",", s.seed)};
}

// Runs one configuration; appends its logged steps to `csv`.
RunResult train_one(const RunSpec& spec, const Options& o, const Data& train, const Data& test, std::ostream& csv) {
  // The same seed gives every variant the same conv/linear weights (BN layers draw no random numbers) and
  // the same batch order.
  torch::manual_seed(static_cast<std::uint64_t>(spec.seed));
  auto net = make_net(spec.model, spec.variant, spec.depth, o.width);
  if (spec.model == "plain") {  // He init (kaiming normal, fan_in, ReLU) for the convs, zero biases
    torch::NoGradGuard g;
    for (auto& m : net->modules(false))
      if (auto* c = m->as<torch::nn::Conv2d>()) {
        torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanIn, torch::kReLU);
        torch::nn::init::zeros_(c->bias);
      }
  }
  if (spec.init != 1.0) {
    torch::NoGradGuard g;
    for (auto& p : net->named_parameters())
      if (p.key().find("weight") != std::string::npos && p.value().dim() > 1) p.value().mul_(spec.init);
  }
  RunResult r;
  {  // A checksum of the initial conv/linear weights: equal across variants of one seed (train_errors.sh checks it).
    torch::NoGradGuard g;
    for (auto& p : net->parameters())
      if (p.dim() > 1) r.init_checksum += p.abs().sum().item<double>();
  }
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(spec.lr).momentum(spec.optimizer == "momentum" ? 0.9 : 0.0));
  r.spec = spec;
  const StepsColumns columns = steps_columns(spec);
  const std::string& tag = columns.head;
  // Columns added for the depth experiment go last, so the first nine keep their places.
  const std::string tail = cat(",", columns.tail, "\n");
  const std::int64_t n = train.x.size(0);
  const std::int64_t steps_per_epoch = n / o.batch;
  const bool progress_tty = isatty(fileno(stderr)) != 0;
  const auto t0 = Clock::now();
  double train_seconds = 0;
  std::int64_t step = 0;
  const double acc0 = accuracy(*net, test);
  r.acc_curve.emplace_back(0, acc0);
  csv << tag << ",0,0,," << acc0 << ",0" << tail;
  for (int epoch = 1; epoch <= o.epochs && !r.diverged_at; ++epoch) {
    auto perm = torch::randperm(n, torch::kLong);
    const auto te = Clock::now();
    double eval_seconds = 0, loss_sum = 0;
    int loss_count = 0;
    for (std::int64_t b = 0; b < steps_per_epoch; ++b) {
      auto idx = perm.slice(0, b * o.batch, (b + 1) * o.batch);
      auto loss = torch::nn::functional::cross_entropy(net->forward(train.x.index_select(0, idx)),
                                                       train.y.index_select(0, idx));
      opt.zero_grad();
      loss.backward();
      opt.step();
      ++step;
      const double l = loss.item<double>();
      if (!std::isfinite(l) || l > 1e3) {
        r.diverged_at = step;
        csv << tag << "," << step << "," << epoch << "," << l << ",," << seconds_since(t0) << tail;
        break;
      }
      loss_sum += l;
      ++loss_count;
      if (step % o.eval_every == 0 || b + 1 == steps_per_epoch) {
        const auto tv = Clock::now();
        const double acc = accuracy(*net, test);
        eval_seconds += seconds_since(tv);
        if (acc >= o.target && !r.steps_to_target) r.steps_to_target = step;
        const double mean_loss = loss_sum / loss_count;
        r.loss_curve.emplace_back(step, mean_loss);
        r.acc_curve.emplace_back(step, acc);
        r.final_loss = mean_loss;
        csv << tag << "," << step << "," << epoch << "," << mean_loss << "," << acc << "," << seconds_since(t0) << tail;
        loss_sum = 0;
        loss_count = 0;
      }
      // The bar is redrawn every 20 steps on a terminal; into a file or pipe only each epoch's last state goes.
      if (((b + 1) % 20 == 0 && progress_tty) || b + 1 == steps_per_epoch) {
        const double el = std::max(seconds_since(te) - eval_seconds, 1e-9);
        const int width = 30;
        const int done = static_cast<int>(width * (b + 1) / steps_per_epoch);
        std::fprintf(stderr, "\r%s%s %-15s %s lr %-5g init x%-4g seed %lld epoch %d/%d [%s%s] %lld/%lld steps, loss %.4f, %.0f steps/s, %.0f img/s ",
                     spec.model.c_str(), spec.depth ? std::to_string(spec.depth).c_str() : "", spec.variant.c_str(),
                     spec.optimizer.c_str(), spec.lr, spec.init, static_cast<long long>(spec.seed), epoch, o.epochs,
                     std::string(static_cast<std::size_t>(done), '#').c_str(),
                     std::string(static_cast<std::size_t>(width - done), '.').c_str(), static_cast<long long>(b + 1),
                     static_cast<long long>(steps_per_epoch), l, static_cast<double>(b + 1) / el,
                     static_cast<double>((b + 1) * o.batch) / el);
      }
    }
    train_seconds += seconds_since(te) - eval_seconds;
    // An epoch that did not diverge ended with a test evaluation (above), at this very step: its accuracy.
    const double acc = r.diverged_at ? 0.0 : r.acc_curve.back().second;
    if (epoch == 1) r.acc1 = acc;
    r.accN = acc;
    if (r.diverged_at)
      std::fprintf(stderr, "diverged at step %lld\n", static_cast<long long>(step));
    else
      std::fprintf(stderr, "test acc %.4f\n", acc);
  }
  r.sec_per_epoch = train_seconds / o.epochs;
  r.sec_per_step = step > 0 ? train_seconds / static_cast<double>(step) : 0;
  if (!r.diverged_at) r.train_accN = accuracy(*net, train, o.train_eval_limit);
  return r;
}

// "plain16" for the plain CNN of depth 16; the model's name otherwise.
std::string net_name(const RunSpec& s) { return s.depth ? cat(s.model, s.depth) : s.model; }

struct Stat {
  double mean = 0, sd = 0;
  int n = 0;
};
// Mean and sample standard deviation (n - 1; 0 for one value).
Stat stat(const std::vector<double>& v) {
  Stat s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= s.n;
  for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
  s.sd = s.n > 1 ? std::sqrt(s.sd / (s.n - 1)) : 0.0;
  return s;
}
std::string pm(const Stat& s, const char* f = "%.4f") { return s.n ? fmt(f, s.mean) + " ± " + fmt(f, s.sd) : "-"; }

// One cell of the grid across its seeds.
struct Cell {
  RunSpec spec;
  std::vector<const RunResult*> runs;
  Stat acc, gap, steps;  // final test accuracy (0 if diverged), train - test accuracy, steps to target
  bool trains = false;   // every seed's final test accuracy >= --trainable
  bool reached = false;  // every seed reached --target
  int diverged = 0;
};

std::vector<Cell> make_cells(const std::vector<RunResult>& results, double trainable) {
  std::vector<Cell> cells;
  for (const auto& r : results) {
    auto it = std::find_if(cells.begin(), cells.end(), [&](const Cell& c) { return c.spec.same_cell(r.spec); });
    if (it == cells.end()) {
      cells.push_back({r.spec, {}, {}, {}, {}, false, false, 0});
      it = cells.end() - 1;
    }
    it->runs.push_back(&r);
  }
  for (auto& c : cells) {
    std::vector<double> acc, gap, steps;
    c.trains = c.reached = true;
    for (const auto* r : c.runs) {
      acc.push_back(r->accN);
      if (!r->diverged_at) gap.push_back(r->train_accN - r->accN);
      if (r->steps_to_target) steps.push_back(static_cast<double>(*r->steps_to_target));
      c.trains = c.trains && !r->diverged_at && r->accN >= trainable;
      c.reached = c.reached && r->steps_to_target.has_value();
      c.diverged += r->diverged_at ? 1 : 0;
    }
    c.acc = stat(acc);
    c.gap = stat(gap);
    c.steps = stat(steps);
  }
  return cells;
}

// Per (model, depth, optimizer, variant), default init: the learning rates that train, the best cell (highest
// mean final test accuracy) and the fastest (fewest mean steps to target where every seed reached it).
struct Summary {
  RunSpec key;
  std::vector<double> trained;
  const Cell* best = nullptr;
  const Cell* fastest = nullptr;
};

bool same_group(const RunSpec& a, const RunSpec& b) {
  return a.model == b.model && a.depth == b.depth && a.optimizer == b.optimizer;
}

std::vector<Summary> summarize(const std::vector<Cell>& cells) {
  std::vector<Summary> out;
  for (const auto& c : cells) {
    if (c.spec.init != 1.0) continue;
    auto it = std::find_if(out.begin(), out.end(),
                           [&](const Summary& s) { return same_group(s.key, c.spec) && s.key.variant == c.spec.variant; });
    if (it == out.end()) {
      out.push_back({c.spec, {}, nullptr, nullptr});
      it = out.end() - 1;
    }
    if (c.trains) it->trained.push_back(c.spec.lr);
    if (!it->best || c.acc.mean > it->best->acc.mean) it->best = &c;
    if (c.reached && (!it->fastest || c.steps.mean < it->fastest->steps.mean)) it->fastest = &c;
  }
  for (auto& s : out) std::sort(s.trained.begin(), s.trained.end());
  return out;
}

// The stated rule: a claim "A beats B" is shown where the difference of the means exceeds the sum of the two
// standard deviations across seeds; "opposite shown" where it does so the other way; else "not shown here".
std::string verdict(double a, double sd_a, double b, double sd_b, bool higher_is_better) {
  const double d = higher_is_better ? a - b : b - a;
  if (d > sd_a + sd_b) return "**shown**";
  if (-d > sd_a + sd_b) return "**opposite shown**";
  return "not shown here";
}

// "0.01 - 0.3 (4 values)" where every grid value between the two trains, else the list.
std::string lr_range(const std::vector<double>& lrs, const std::vector<double>& grid) {
  if (lrs.empty()) return "none";
  if (lrs.size() == 1) return cat(lrs.front());
  const auto between = std::count_if(grid.begin(), grid.end(), [&](double g) { return g >= lrs.front() && g <= lrs.back(); });
  if (static_cast<std::size_t>(between) == lrs.size()) return cat(lrs.front(), " - ", lrs.back(), " (", lrs.size(), " values)");
  std::string l;
  for (double lr : lrs) l += cat(l.empty() ? "" : ", ", lr);
  return l;
}

// The experiment's summary and a row per claim (for grids of several seeds or learning rates).
std::string report_summary(const Options& o, const std::vector<Cell>& cells) {
  const auto sums = summarize(cells);
  std::ostringstream md;
  md << "\n## Summary across seeds (mean ± sd over " << o.seeds.size() << " seed" << (o.seeds.size() > 1 ? "s" : "")
     << ", default init)\n\n"
     << "A learning rate *trains* where every seed's final test accuracy is >= " << o.trainable
     << " (chance is 0.1). Steps to " << o.target * 100 << "% are counted at the test evaluations, every "
     << o.eval_every << " steps.\n\n"
     << "| net | optimizer | variant | lrs that train | best lr | best test acc | train - test gap there | fastest lr | steps to "
     << o.target * 100 << "% there |\n|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& s : sums)
    md << "| " << net_name(s.key) << " | " << s.key.optimizer << " | " << s.key.variant << " | " << lr_range(s.trained, o.lrs)
       << " | " << s.best->spec.lr << " | " << pm(s.best->acc) << " | " << pm(s.best->gap) << " | "
       << (s.fastest ? cat(s.fastest->spec.lr) : std::string("-")) << " | "
       << (s.fastest ? pm(s.fastest->steps, "%.0f") : std::string("not reached")) << " |\n";

  std::ostringstream rows;
  auto row = [&](const std::string& claim, const Summary& n, const Summary& v, const std::string& a,
                 const std::string& b, const std::string& verdict_) {
    rows << "| " << claim << " | " << net_name(n.key) << " | " << n.key.optimizer << " | " << v.key.variant << " | " << a
         << " | " << b << " | " << (o.seeds.size() > 1 ? verdict_ : "not shown here (one seed: no spread)") << " |\n";
  };
  for (const auto& n : sums) {
    if (n.key.variant != "none") continue;
    for (const auto& v : sums) {
      if (v.key.variant == "none" || !same_group(v.key, n.key)) continue;
      // Convergence speed: steps to target at each one's fastest learning rate.
      if (v.fastest && n.fastest)
        row("faster convergence", n, v, pm(n.fastest->steps, "%.0f"), pm(v.fastest->steps, "%.0f"),
            verdict(v.fastest->steps.mean, v.fastest->steps.sd, n.fastest->steps.mean, n.fastest->steps.sd, false));
      else
        row("faster convergence", n, v, n.fastest ? pm(n.fastest->steps, "%.0f") : "not reached",
            v.fastest ? pm(v.fastest->steps, "%.0f") : "not reached",
            v.fastest ? "**shown** (none never reached it)" : n.fastest ? "**opposite shown**" : "not shown here");
      // Higher learning rates: the largest that trains (every seed above the threshold).
      const double ln = n.trained.empty() ? 0 : n.trained.back(), lv = v.trained.empty() ? 0 : v.trained.back();
      row("higher learning rate", n, v, n.trained.empty() ? "none trains" : cat("up to ", ln),
          v.trained.empty() ? "none trains" : cat("up to ", lv),
          lv > ln ? "**shown**" : lv < ln ? "**opposite shown**" : "not shown here");
      // Regularisation: the train - test gap at each one's best learning rate.
      row("regularisation (smaller train-test gap)", n, v, pm(n.best->gap), pm(v.best->gap),
          n.best->gap.n && v.best->gap.n ? verdict(v.best->gap.mean, v.best->gap.sd, n.best->gap.mean, n.best->gap.sd, false)
                                         : "not shown here");
      // Init sensitivity: the best accuracy at each scaled init.
      bool any_init = false;
      for (double s : o.inits) {
        if (s == 1.0) continue;
        const Cell *cn = nullptr, *cv = nullptr;
        for (const auto& c : cells) {
          if (c.spec.init != s || !same_group(c.spec, n.key)) continue;
          if (c.spec.variant == "none" && (!cn || c.acc.mean > cn->acc.mean)) cn = &c;
          if (c.spec.variant == v.key.variant && (!cv || c.acc.mean > cv->acc.mean)) cv = &c;
        }
        if (!cn || !cv) continue;
        any_init = true;
        row(cat("less init sensitivity (weights x", s, ", best test acc)"), n, v, pm(cn->acc), pm(cv->acc),
            verdict(cv->acc.mean, cv->acc.sd, cn->acc.mean, cn->acc.sd, true));
      }
      if (!any_init)
        row("less init sensitivity", n, v, "-", "-", "not shown here (no --init-scale other than 1 in this run)");
    }
  }
  // Seed 002: BN matters more as nets get deeper. The gain, a BN variant's best test accuracy minus no-BN's, at
  // the shallowest and the deepest plain net of the run; its spread is the sum of the two sds.
  auto find_sum = [&](const RunSpec& like, int depth, const std::string& variant) -> const Summary* {
    for (const auto& s : sums)
      if (s.key.model == like.model && s.key.optimizer == like.optimizer && s.key.depth == depth && s.key.variant == variant)
        return &s;
    return nullptr;
  };
  if (o.depths.size() > 1 && std::find(o.models.begin(), o.models.end(), "plain") != o.models.end()) {
    const int d0 = *std::min_element(o.depths.begin(), o.depths.end()), d1 = *std::max_element(o.depths.begin(), o.depths.end());
    for (const auto& v : sums) {
      if (v.key.model != "plain" || v.key.depth != d1 || v.key.variant == "none") continue;
      const Summary *n1 = find_sum(v.key, d1, "none"), *n0 = find_sum(v.key, d0, "none"), *v0 = find_sum(v.key, d0, v.key.variant);
      if (!n1 || !n0 || !v0) continue;
      const double g0 = v0->best->acc.mean - n0->best->acc.mean, s0 = v0->best->acc.sd + n0->best->acc.sd;
      const double g1 = v.best->acc.mean - n1->best->acc.mean, s1 = v.best->acc.sd + n1->best->acc.sd;
      rows << "| BN gains more at depth " << d1 << " than at " << d0 << " (best test acc, BN - none) | plain" << d0
           << " / plain" << d1 << " | " << v.key.optimizer << " | " << v.key.variant << " | " << fmt("%+.4f", g0) << " ± "
           << fmt("%.4f", s0) << " | " << fmt("%+.4f", g1) << " ± " << fmt("%.4f", s1) << " | "
           << (o.seeds.size() > 1 ? verdict(g1, s1, g0, s0, true) : "not shown here (one seed: no spread)") << " |\n";
    }
  }
  // Before vs after the ReLU: bnorm's BN, best test accuracy.
  for (const auto& a : sums) {
    if (a.key.variant != "bn_after") continue;
    for (const auto& b : sums)
      if (b.key.variant == "bn_before" && same_group(a.key, b.key))
        row("after better than before (CaffeNet)", b, a, pm(b.best->acc), pm(a.best->acc),
            verdict(a.best->acc.mean, a.best->acc.sd, b.best->acc.mean, b.best->acc.sd, true));
  }
  if (!rows.str().empty())
    md << "\n## The claims, one row each\n\n"
       << "Rule: a claim is **shown** where the difference of the means exceeds the sum of the two standard deviations "
          "across seeds (for the learning rate: where the largest rate at which every seed trains is larger on the grid); "
          "**opposite shown** where that holds the other way; otherwise not shown here. Speed compares each variant's "
          "fastest learning rate, the gap and before/after each one's best. Depth: the gain (the variant's best test "
          "accuracy minus no-BN's) at the deepest net against the shallowest, each with the sum of its two sds.\n\n"
       << "| claim | net | optimizer | variant | none (or before) | variant | verdict |\n|---|---|---|---|---|---|---|\n"
       << rows.str();
  return md.str();
}

std::string variant_style(const std::string& v) {
  if (v == "none") return "lc rgb 'black' dt 1";
  if (v == "bn_before") return "lc rgb '#1f77b4' dt 1";
  if (v == "bn_after") return "lc rgb '#d62728' dt 1";
  if (v == "torch_bn") return "lc rgb '#ff7f0e' dt 2";
  return "lc rgb '#17becf' dt 2";
}

// The "trainable range" picture, per model with several learning rates: final test accuracy (mean ± sd over the
// seeds) against the learning rate, one panel per depth (columns) and optimizer (rows), one line per variant.
void write_lr_plot(const Options& o, const std::vector<Cell>& cells, std::ostream& gp, std::vector<std::string>& pngs) {
  if (o.lrs.size() < 2) return;
  const fs::path out(o.out_dir);
  std::ofstream dat(out / "plot_lr.dat");
  std::size_t block = 0;
  for (const auto& model : o.models) {
    const auto depths = model == "plain" ? o.depths : std::vector<int>{0};
    const std::string png = (out / cat("plot_", model, "_lr.png")).string();
    pngs.push_back(png);
    gp << "set terminal pngcairo size " << 80 + 420 * depths.size() << "," << 60 + 340 * o.optimizers.size()
       << " font ',10' noenhanced\nset output '" << png << "'\nset multiplot layout " << o.optimizers.size() << ","
       << depths.size() << " title '" << model
       << ": final test accuracy (mean and sd over " << o.seeds.size() << " seeds) against the learning rate'\n"
       << "unset logscale y\nset logscale x\nset xrange [" << *std::min_element(o.lrs.begin(), o.lrs.end()) / 1.5 << ":"
       << *std::max_element(o.lrs.begin(), o.lrs.end()) * 1.5 << "]\nset yrange [0:1]\nset grid\nset key left bottom font ',9'\n"
       << "set xlabel 'learning rate'\nset ylabel 'test accuracy'\n";
    for (const auto& opt : o.optimizers)
      for (int depth : depths) {
        gp << "set title '" << (depth ? cat(model, " depth ", depth) : model) << ", " << opt << "'\nplot ";
        bool first = true;
        for (const auto& variant : o.variants) {
          dat << "# " << model << " " << depth << " " << opt << " " << variant << "\n";
          for (double lr : o.lrs)
            for (const auto& c : cells)
              if (c.spec.model == model && c.spec.depth == depth && c.spec.optimizer == opt && c.spec.variant == variant &&
                  c.spec.lr == lr && c.spec.init == 1.0)
                dat << lr << " " << c.acc.mean << " " << c.acc.sd << "\n";
          dat << "\n\n";
          gp << (first ? "" : ", ") << "'" << (out / "plot_lr.dat").string() << "' index " << block++
             << " using 1:2:3 with yerrorlines lw 2 pt 7 ps 0.6 " << variant_style(variant) << " title '" << variant << "'";
          first = false;
        }
        gp << ", " << o.trainable << " with lines lc rgb 'gray' dt 3 title 'trains above " << o.trainable << "'\n";
      }
    gp << "unset multiplot\nunset logscale x\nset xrange [*:*]\n";
  }
}

// One PNG per net (plot_<model>.png, plot_plain<depth>.png): a row per (optimizer, lr, init) configuration of the
// first seed (only the --curve-lr values where given), train loss (left) and test accuracy (right) against steps,
// one line per variant. Then the trainable-range picture (write_lr_plot).
void write_plots(const Options& o, const std::vector<RunResult>& results, const std::vector<Cell>& cells) {
  const fs::path out(o.out_dir);
  std::ofstream dat(out / "plot.dat");
  std::ofstream gp(out / "plot.gp");
  std::size_t block = 0;
  std::vector<std::size_t> first_block(results.size());
  auto shown = [&](const RunSpec& s) {
    return s.seed == o.seeds.front() &&
           (o.curve_lrs.empty() || std::find(o.curve_lrs.begin(), o.curve_lrs.end(), s.lr) != o.curve_lrs.end());
  };
  for (std::size_t i = 0; i < results.size(); ++i) {
    first_block[i] = block;
    for (const auto* curve : {&results[i].loss_curve, &results[i].acc_curve}) {
      dat << "# " << net_name(results[i].spec) << " " << results[i].spec.variant << " " << results[i].spec.optimizer
          << " lr " << results[i].spec.lr << " init " << results[i].spec.init << " seed " << results[i].spec.seed
          << (curve == &results[i].loss_curve ? " loss" : " accuracy") << "\n";
      for (const auto& [s, v] : *curve) dat << s << " " << v << "\n";
      if (curve->empty()) dat << "0 NaN\n";
      dat << "\n\n";
      ++block;
    }
  }
  gp << "# Written by bnorm-train; run from anywhere: gnuplot " << (out / "plot.gp").string() << "\n";
  std::vector<std::string> names, pngs;
  for (const auto& r : results)
    if (std::find(names.begin(), names.end(), net_name(r.spec)) == names.end()) names.push_back(net_name(r.spec));
  for (const auto& name : names) {
    std::vector<std::tuple<std::string, double, double>> configs;
    for (const auto& r : results)
      if (net_name(r.spec) == name && shown(r.spec) &&
          std::find(configs.begin(), configs.end(), std::tuple{r.spec.optimizer, r.spec.lr, r.spec.init}) == configs.end())
        configs.emplace_back(r.spec.optimizer, r.spec.lr, r.spec.init);
    if (configs.empty()) continue;
    pngs.push_back((out / cat("plot_", name, ".png")).string());
    gp << "set terminal pngcairo size 1300," << 60 + 300 * configs.size() << " font ',10' noenhanced\n"
       << "set output '" << pngs.back() << "'\n"
       << "set multiplot layout " << configs.size() << ",2 title '" << name
       << " on Fashion-MNIST: train loss and test accuracy against SGD steps, one line per variant, seed "
       << o.seeds.front() << "'\n"
       << "set key right center font ',9'\nset grid\nset xlabel 'step'\n";
    for (const auto& [opt, lr, init] : configs) {
      for (int panel = 0; panel < 2; ++panel) {
        gp << (panel == 0 ? "set logscale y\nset ylabel 'train loss'\nset yrange [*:*]\n"
                          : "unset logscale y\nset ylabel 'test accuracy'\nset yrange [0:1]\n")
           << "set title '" << name << ", " << opt << ", lr " << lr << ", init x" << init << "'\nplot ";
        bool first = true;
        for (std::size_t i = 0; i < results.size(); ++i) {
          const auto& s = results[i].spec;
          if (net_name(s) != name || !shown(s) || s.optimizer != opt || s.lr != lr || s.init != init) continue;
          gp << (first ? "" : ", ") << "'" << (out / "plot.dat").string() << "' index " << first_block[i] + static_cast<std::size_t>(panel)
             << " using 1:2 with lines lw 2 " << variant_style(s.variant) << " title '" << s.variant << "'";
          first = false;
        }
        if (panel == 1) gp << ", " << o.target << " with lines lc rgb 'gray' dt 3 title 'target " << o.target << "'";
        gp << "\n";
      }
    }
    gp << "unset multiplot\n";
  }
  write_lr_plot(o, cells, gp, pngs);
  gp.close();
  dat.close();
  const std::string log = (out / "gnuplot.log").string();
  const std::string cmd = cat("command -v gnuplot >/dev/null 2>&1 && gnuplot '", (out / "plot.gp").string(), "' >'", log, "' 2>&1");
  if (std::system(cmd.c_str()) != 0) {
    std::cerr << "bnorm-train: warning: gnuplot failed or is missing (install gnuplot-nox; see " << log
              << "); the plot script is " << (out / "plot.gp").string() << "\n";
    return;
  }
  for (const auto& png : pngs) {
    std::error_code ec;
    if (!fs::exists(png, ec) || fs::file_size(png, ec) == 0)
      std::cerr << "bnorm-train: warning: gnuplot did not write " << png << " (see " << log << ")\n";
  }
}

std::string report(const Options& o, const std::vector<RunResult>& results, std::int64_t n_train, std::int64_t n_test) {
  std::ostringstream md;
  std::string seeds;
  for (auto s : o.seeds) seeds += cat(seeds.empty() ? "" : ",", s);
  md << "Command: `" << o.command << "`\n\n"
     << "Data: " << n_train << " of the 60000 training images" << (n_train < 60000 ? " (subsampled: the first ones)" : "")
     << ", " << n_test << " of the 10000 test images" << (n_test < 10000 ? " (subsampled: the first ones)" : "")
     << "; batch " << o.batch << ", " << n_train / o.batch
     << " steps per epoch, SGD (momentum = with momentum 0.9, sgd = plain), seed" << (o.seeds.size() > 1 ? "s " : " ")
     << seeds << ", " << o.threads << " threads" << (std::find(o.models.begin(), o.models.end(), "plain") != o.models.end()
                                                       ? cat("; plain CNNs of width ", o.width, ", He init")
                                                       : std::string())
     << ".\n\n";
  md << "| net | variant | optimizer | lr | init x | seed | test acc after 1 epoch | test acc after " << o.epochs
     << " | train acc after " << o.epochs << " | steps to " << o.target * 100 << "% | diverged | s / epoch | ms / step | initial sum of abs(w) |\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : results)
    md << "| " << net_name(r.spec) << " | " << r.spec.variant << " | " << r.spec.optimizer << " | " << r.spec.lr << " | "
       << r.spec.init << " | " << r.spec.seed << " | " << fmt("%.4f", r.acc1) << " | " << fmt("%.4f", r.accN) << " | "
       << (r.diverged_at ? std::string("-") : fmt("%.4f", r.train_accN)) << " | "
       << (r.steps_to_target ? std::to_string(*r.steps_to_target) : std::string("not reached")) << " | " << outcome(r)
       << " | " << fmt("%.2f", r.sec_per_epoch) << " | " << fmt("%.1f", r.sec_per_step * 1e3) << " | "
       << fmt("%.6f", r.init_checksum) << " |\n";

  // bnorm's BN and torch's, same placement, side by side.
  std::ostringstream pairs;
  for (const auto& a : results) {
    const std::string twin = a.spec.variant == "bn_after" ? "torch_bn" : a.spec.variant == "bn_before" ? "torch_bn_before" : "";
    if (twin.empty()) continue;
    for (const auto& b : results)
      if (b.spec.variant == twin && b.spec.model == a.spec.model && b.spec.lr == a.spec.lr && b.spec.init == a.spec.init &&
          b.spec.depth == a.spec.depth && b.spec.optimizer == a.spec.optimizer && b.spec.seed == a.spec.seed)
        pairs << "| " << net_name(a.spec) << " | " << a.spec.variant << " / " << twin << " | " << a.spec.optimizer << " | "
              << a.spec.lr << " | " << a.spec.init << " | " << a.spec.seed << " | " << fmt("%.4f", a.accN) << " | "
              << fmt("%.4f", b.accN) << " | " << fmt("%+.4f", a.accN - b.accN) << " | " << fmt("%.2f", a.sec_per_epoch)
              << " | " << fmt("%.2f", b.sec_per_epoch) << " |\n";
  }
  if (!pairs.str().empty())
    md << "\nbnorm's BN against torch's (same placement, same initial weights and batches):\n\n"
       << "| net | bnorm / torch | optimizer | lr | init x | seed | bnorm test acc | torch test acc | difference | bnorm s / epoch | torch s / epoch |\n"
       << "|---|---|---|---|---|---|---|---|---|---|---|\n"
       << pairs.str();
  return md.str();
}
// The BN layers alone, at the shapes the models use: forward + backward in training mode, bnorm's and torch's.
std::string bench_bn(const Options& o) {
  std::ostringstream md;
  md << "\nThe BN layers alone at the models' shapes, forward + backward in training mode, float32, " << o.threads
     << " threads (least of 5 timings of 10 calls, bnorm's and torch's interleaved):\n\n"
     << "| layer | input | bnorm µs | torch µs | torch / bnorm |\n|---|---|---|---|---|\n";
  torch::manual_seed(0);
  const std::int64_t b = o.batch;
  auto row = [&](const std::string& layer, const std::string& shape, std::pair<double, double> t) {
    md << "| " << layer << " | " << shape << " | " << fmt("%.1f", t.first * 1e6) << " | " << fmt("%.1f", t.second * 1e6)
       << " | " << fmt("%.2f", t.second / t.first) << " |\n";
  };
  for (const auto& model : o.models) {
    if (model == "plain") {
      for (std::int64_t hw : {28, 14, 7}) {
        auto x = torch::randn({b, o.width, hw, hw});
        row("BatchNorm2d", cat("(", b, ", ", o.width, ", ", hw, ", ", hw, ")"),
            time_pair(bn_step(bnorm::torch::BatchNorm2d(o.width), x), bn_step(torch::nn::BatchNorm2d(o.width), x)));
      }
    } else if (model == "cnn") {
      for (const auto& [c, hw] : {std::pair<std::int64_t, std::int64_t>{16, 28}, {32, 14}}) {
        auto x = torch::randn({b, c, hw, hw});
        row("BatchNorm2d", cat("(", b, ", ", c, ", ", hw, ", ", hw, ")"),
            time_pair(bn_step(bnorm::torch::BatchNorm2d(c), x), bn_step(torch::nn::BatchNorm2d(c), x)));
      }
    } else {
      auto x = torch::randn({b, 256});
      row("BatchNorm1d", cat("(", b, ", 256)"),
          time_pair(bn_step(bnorm::torch::BatchNorm1d(256), x), bn_step(torch::nn::BatchNorm1d(256), x)));
    }
  }
  return md.str();
}

// --- runs.txt: every finished run, so that a long grid can be stopped and continued (--resume) ---
//
// A header line fixes the settings every run depends on; then one line per finished run, written and flushed
// when the run ends: its spec, its results and its two curves, each number printed to round trip. A run
// killed midway leaves no line (or a cut one, which --resume drops), and is trained again.
std::string run_settings(const Options& o) {
  return cat("bnorm-train runs v1: epochs ", o.epochs, " batch ", o.batch, " width ", o.width, " train-subset ",
             o.train_limit, " test-subset ", o.test_limit, " train-eval-subset ", o.train_eval_limit, " eval-every ",
             o.eval_every, " target ", o.target);
}

std::string spec_key(const RunSpec& s) {
  return cat(s.model, " ", s.variant, " ", fmt("%.17g", s.lr), " ", fmt("%.17g", s.init), " ", s.depth, " ", s.optimizer,
             " ", s.seed);
}

std::string encode_run(const RunResult& r) {
  std::ostringstream l;
  auto num = [&](double v) { l << ' ' << fmt("%.17g", v); };
  l << spec_key(r.spec);
  for (double v : {r.acc1, r.accN, r.train_accN, r.final_loss, r.sec_per_epoch, r.sec_per_step, r.init_checksum}) num(v);
  l << ' ' << (r.steps_to_target ? *r.steps_to_target : -1) << ' ' << (r.diverged_at ? *r.diverged_at : -1);
  for (const auto* curve : {&r.loss_curve, &r.acc_curve}) {
    l << ' ' << curve->size();
    for (const auto& [step, v] : *curve) {
      l << ' ' << step;
      num(v);
    }
  }
  l << " end";
  return l.str();
}

// The run of a runs.txt line, or nothing for a line cut short by a kill.
std::optional<RunResult> decode_run(const std::string& line) {
  std::istringstream in(line);
  RunResult r;
  std::int64_t target = 0, diverged = 0;
  in >> r.spec.model >> r.spec.variant >> r.spec.lr >> r.spec.init >> r.spec.depth >> r.spec.optimizer >> r.spec.seed >>
      r.acc1 >> r.accN >> r.train_accN >> r.final_loss >> r.sec_per_epoch >> r.sec_per_step >> r.init_checksum >>
      target >> diverged;
  if (!in) return std::nullopt;
  if (target >= 0) r.steps_to_target = target;
  if (diverged >= 0) r.diverged_at = diverged;
  for (auto* curve : {&r.loss_curve, &r.acc_curve}) {
    std::size_t n = 0;
    if (!(in >> n) || n > 1000000) return std::nullopt;
    for (std::size_t i = 0; i < n; ++i) {
      std::int64_t step = 0;
      double v = 0;
      in >> step >> v;
      curve->emplace_back(step, v);
    }
  }
  std::string end;
  if (!(in >> end) || end != "end") return std::nullopt;
  return r;
}

// The finished runs in `dir`/runs.txt (none if there is no such file). Refuses a file made with other settings:
// its runs would not be comparable with the new ones.
std::vector<RunResult> load_runs(const Options& o) {
  const fs::path path = fs::path(o.out_dir) / "runs.txt";
  std::ifstream in(path);
  std::vector<RunResult> runs;
  if (!in) return runs;
  std::string header, line;
  std::getline(in, header);
  if (header != run_settings(o))
    throw UsageError(cat("--resume: ", path.string(), " was made with other settings ('", header, "', now '",
                         run_settings(o), "'); use another --out, or drop --resume to start over"));
  while (std::getline(in, line))
    if (auto r = decode_run(line)) runs.push_back(std::move(*r));
  return runs;
}

// `path` replaced by `contents` through a temporary file, renamed over it only once written in full: a
// failed write (a full disk) leaves the old file as it was, never a half-written one.
void replace_file(const fs::path& path, const std::string& contents) {
  const fs::path tmp = path.string() + ".tmp";
  std::ofstream out(tmp, std::ios::trunc);
  out << contents;
  out.close();
  if (!out) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw std::runtime_error(cat("writing ", tmp.string(), " failed; ", path.string(), " is unchanged"));
  }
  fs::rename(tmp, path);
}

// steps.csv keeps only the rows of the runs in `done` (a killed run's rows go; it is trained again).
void keep_steps_of(const fs::path& path, const std::vector<RunResult>& done) {
  std::set<std::string> keys;
  for (const auto& r : done) {
    const StepsColumns c = steps_columns(r.spec);
    keys.insert(c.head + "|" + c.tail);
  }
  std::ifstream in(path);
  std::ostringstream kept;
  std::string line;
  bool first = true;
  while (std::getline(in, line)) {
    if (first) {  // the header
      kept << line << '\n';
      first = false;
      continue;
    }
    // model,variant,lr,init_scale,step,epoch,train_loss,test_accuracy,wall_s,depth,optimizer,seed
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string c; std::getline(ls, c, ',');) f.push_back(c);
    if (f.size() == 12 && keys.count(cat(f[0], ",", f[1], ",", f[2], ",", f[3], "|", f[9], ",", f[10], ",", f[11])))
      kept << line << '\n';
  }
  in.close();
  replace_file(path, kept.str());
}

int run(const Options& o) {
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  const fs::path steps_path = fs::path(o.out_dir) / "steps.csv", runs_path = fs::path(o.out_dir) / "runs.txt";
  // --resume: the runs already finished in this folder are kept, and only the others are trained.
  std::vector<RunResult> done = o.resume ? load_runs(o) : std::vector<RunResult>{};
  const bool append = o.resume && fs::exists(runs_path) && fs::exists(steps_path);
  if (append) {  // both files rewritten to the finished runs (a cut last line of runs.txt goes too), then appended to
    keep_steps_of(steps_path, done);
    std::ostringstream kept;
    kept << run_settings(o) << '\n';
    for (const auto& r : done) kept << encode_run(r) << '\n';
    replace_file(runs_path, kept.str());
  }
  std::ofstream csv(steps_path, append ? std::ios::app : std::ios::trunc);
  if (!csv) throw UsageError(cat("cannot write to the output folder '", o.out_dir, "'", ec ? cat(" (", ec.message(), ")") : ""));
  if (!append) csv << "model,variant,lr,init_scale,step,epoch,train_loss,test_accuracy,wall_s,depth,optimizer,seed\n";
  std::ofstream runs_file(runs_path, append ? std::ios::app : std::ios::trunc);
  if (!append) runs_file << run_settings(o) << '\n';

  torch::set_num_threads(o.threads);
  bnorm::set_num_threads(o.threads);

  bnorm::train::Split train_split, test_split;
  try {
    train_split = bnorm::train::load_fashion_mnist(o.data_dir, true);
    test_split = bnorm::train::load_fashion_mnist(o.data_dir, false);
  } catch (const bnorm::train::DataError& e) {
    throw UsageError(e.what());
  }
  const Data train = to_tensors(train_split, o.train_limit);
  const Data test = to_tensors(test_split, o.test_limit);
  const std::int64_t n = train.x.size(0);
  const std::int64_t steps_per_epoch = n / o.batch;
  if (steps_per_epoch < 1) throw UsageError(cat("--batch ", o.batch, " is larger than the training set (", n, " images)"));
  std::cerr << "bnorm-train: " << n << " training images" << (n < 60000 ? " (subsampled)" : "") << ", "
            << test.x.size(0) << " test images" << (test.x.size(0) < 10000 ? " (subsampled)" : "") << ", batch "
            << o.batch << ", " << steps_per_epoch << " steps per epoch, " << o.threads << " threads\n";

  // The grid: models x depths (plain only) x optimizers x inits x lrs x seeds x variants, the variants
  // innermost so that those of one cell run side by side.
  std::vector<RunSpec> specs;
  for (const auto& model : o.models)
    for (int depth : model == "plain" ? o.depths : std::vector<int>{0})
      for (const auto& opt : o.optimizers)
        for (double init : o.inits)
          for (double lr : (init == 1.0 || o.init_lrs.empty()) ? o.lrs : o.init_lrs)
            for (auto seed : o.seeds)
              for (const auto& variant : o.variants) specs.push_back({model, variant, lr, init, depth, opt, seed});

  const auto t_all = Clock::now();
  std::vector<RunResult> results;
  std::size_t resumed = 0;
  double resumed_seconds = 0;
  std::unordered_map<std::string, const RunResult*> done_by_key;  // one lookup per grid run, not a scan of `done`
  for (const auto& r : done) done_by_key.emplace(spec_key(r.spec), &r);
  for (const auto& spec : specs) {
    const auto found = done_by_key.find(spec_key(spec));
    if (found != done_by_key.end()) {
      const RunResult* earlier = found->second;
      results.push_back(*earlier);
      ++resumed;
      resumed_seconds += earlier->sec_per_epoch * o.epochs;
      continue;
    }
    results.push_back(train_one(spec, o, train, test, csv));
    csv.flush();
    runs_file << encode_run(results.back()) << '\n' << std::flush;
  }
  if (!runs_file) throw std::runtime_error(cat("writing ", runs_path.string(), " failed"));
  if (o.resume)
    std::cerr << "bnorm-train: --resume: " << resumed << " of " << specs.size() << " runs were finished in " << o.out_dir
              << " already and were not trained again\n";
  if (!csv) throw std::runtime_error(cat("writing ", (fs::path(o.out_dir) / "steps.csv").string(), " failed"));
  csv.close();

  std::string md = report(o, results, n, test.x.size(0));
  const auto cells = make_cells(results, o.trainable);
  if (o.seeds.size() > 1 || o.lrs.size() > 1 || o.optimizers.size() > 1 ||
      std::find(o.models.begin(), o.models.end(), "plain") != o.models.end())
    md += report_summary(o, cells);
  bool any_bn = false;
  for (const auto& v : o.variants) any_bn = any_bn || v != "none";
  if (o.bench && any_bn) md += bench_bn(o);
  md += cat("\nTotal wall time ", fmt("%.0f", seconds_since(t_all)), " s for ", specs.size(), " runs",
            resumed ? cat(" (", resumed, " of them finished by an earlier invocation, --resume; their training took ",
                          fmt("%.0f", resumed_seconds), " s)")
                    : std::string(),
            ".\n");
  std::cout << md;
  std::ofstream(fs::path(o.out_dir) / "results.md") << md;
  write_plots(o, results, cells);
  std::cerr << "bnorm-train: outputs in " << o.out_dir
            << " (steps.csv, results.md, plot.gp, plot_<net>.png, plot_<model>_lr.png)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // --sync-bn: data-parallel training under mpirun, its own options (apps/train/sync_bn.cpp).
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--sync-bn") return bnorm::train::sync_bn_main(argc, argv);
  Options o;
  CLI::App app{"bnorm-train: BatchNorm (bnorm's, torch's, none) on Fashion-MNIST with libtorch"};
  app.add_option("--data", o.data_dir, "folder with the Fashion-MNIST IDX files (.gz or plain)");
  app.add_option("--model", o.models, "mlp (seed 004), cnn (seed 000), plain (--depth conv layers, no skips); several allowed")
      ->delimiter(',');
  app.add_option("--depth", o.depths, "conv layers of the plain CNN (a list: 2,8,16)")->delimiter(',');
  app.add_option("--width", o.width, "channels of the plain CNN's convs")->check(CLI::Range(1, 1024));
  app.add_option("--optimizer", o.optimizers, "momentum (SGD, momentum 0.9), sgd (plain SGD), or both")->delimiter(',');
  app.add_option("--variants", o.variants,
                 "none, bn_before, bn_after (bnorm's BN before/after ReLU), torch_bn (torch's, after), torch_bn_before")
      ->delimiter(',');
  app.add_option("--lr", o.lrs, "learning rates; several make a sweep")->delimiter(',');
  app.add_option("--curve-lr", o.curve_lrs, "learning rates whose loss curves are plotted (default: every --lr)")
      ->delimiter(',');
  app.add_option("--trainable", o.trainable, "a learning rate trains where every seed's final test accuracy is >= this");
  app.add_option("--init-scale", o.inits, "scales of the initial weights (1 = torch's default; 10 or 0.1 = bad init)")
      ->delimiter(',');
  app.add_option("--init-lr", o.init_lrs, "learning rates for the --init-scale values other than 1 (default: every --lr)")
      ->delimiter(',');
  app.add_option("--epochs", o.epochs, "epochs per run")->check(CLI::Range(1, 100000));
  app.add_option("--batch", o.batch,
                 "batch size (1 is refused with BN on the MLP: m == 1 value per feature; the CNN's BN has m = batch x H x W)")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--train-subset", o.train_limit, "use the first N training images (0 = all 60000)");
  app.add_option("--test-subset", o.test_limit, "evaluate on the first N test images (0 = all 10000)");
  app.add_option("--train-eval-subset", o.train_eval_limit,
                 "the final train accuracy (for the train-test gap) on the first N training images (0 = all)");
  app.add_option("--eval-every", o.eval_every, "steps between logged test accuracies")->check(CLI::Range(1, 100000000));
  app.add_option("--target", o.target, "target test accuracy for 'steps to target'");
  app.add_option("--threads", o.threads, "intra-op threads (torch and bnorm)")->check(CLI::Range(1, 1024));
  app.add_option("--seed,--seeds", o.seeds, "random seeds, a list (per seed: same initial weights and batches for every variant)")
      ->delimiter(',');
  app.add_option("--out", o.out_dir, "output folder (steps.csv, results.md, plot.gp, plot_<model>.png)");
  app.add_flag("--resume", o.resume,
               "keep the runs already finished in --out (its runs.txt, same settings) and train only the rest");
  app.add_flag("--bench,!--no-bench", o.bench, "time the BN layers alone at the end (default; --no-bench skips it)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::cerr << "bnorm-train: error: " << one_line(e.what()) << " (see --help)\n";
    return 2;
  }
  for (int i = 0; i < argc; ++i) {
    if (i > 0) o.command += ' ';
    o.command += i == 0 ? std::string("bnorm-train") : std::string(argv[i]);
  }
  try {
    validate(o);
    return run(o);
  } catch (const UsageError& e) {
    std::cerr << "bnorm-train: error: " << one_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "\nbnorm-train: error: " << one_line(e.what()) << "\n";
    return 1;
  }
}
