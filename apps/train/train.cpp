// bnorm-train: trains CNNs on Fashion-MNIST with libtorch, the normalization done by bnorm (bnorm::torch), by
// torch (the control) or absent. With --design (quick, demo, full) it runs the designs of claims.cpp, one per
// seed claim about BatchNorm, and writes a verdict table (report.cpp); without, the grid its options name
// (models x depths x optimizers x inits x lrs x seeds x variants) and a table of the runs. See
// docs/convergence.md. The pieces: model.cpp (the nets), runner.cpp (one run, runs.txt for --resume),
// stats.cpp (bootstrap, Clopper-Pearson, verdict rules), claims.cpp (the designs), report.cpp.
//
// Every bad input (missing or corrupt data, unknown model or variant, lr <= 0, batch 1 with BN on the MLP,
// an output folder that cannot be written, ...) ends with ONE line "bnorm-train: error: ..." on stderr and
// exit status 2 (usage, data) or 1 (anything that fails later); tests: train_errors.sh.
#include "claims.hpp"
#include "report.hpp"
#include "runner.hpp"
#include "sync_bn.hpp"
#include "text.hpp"

#include <bnorm/types.hpp>

#include "bnorm_torch.hpp"

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace bnorm::train;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// --precise-bn's training images (Wu & Johnson: 10^3 to 10^4 samples are enough).
constexpr std::int64_t kPreciseImages = 4096;

const std::vector<std::string> kOptimizers{"momentum", "sgd"};

std::string one_line(std::string s) {
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

struct Options {
  std::string data_dir = bnorm::train::kDefaultDataDir, out_dir = "bnorm-train-out", design, command;
  Settings settings;
  std::vector<std::string> models{"mlp"};
  std::vector<std::string> variants{"none", "bn_before", "bn_after", "torch_bn"};
  std::vector<double> lrs{0.1}, inits{1.0}, init_lrs;
  std::vector<int> depths{2, 8, 16};
  std::vector<std::string> optimizers{"momentum"};
  std::vector<std::int64_t> seeds{0};
  bool resume = false;
  double max_minutes = 0;  // 0 = no limit
};

void validate(const Options& o) {
  for (const auto& m : o.models)
    if (std::find(kModels.begin(), kModels.end(), m) == kModels.end())
      throw UsageError(cat("unknown model '", m, "' (expected mlp, cnn or plain)"));
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
  const Settings& st = o.settings;
  if (!(st.val_target > 0 && st.val_target <= 1)) throw UsageError(cat("--target must be in (0, 1], got ", st.val_target));
  if (!(st.loss_threshold > 0)) throw UsageError(cat("--loss-threshold must be > 0, got ", st.loss_threshold));
  for (int d : o.depths)
    if (d < 2 || d > 200) throw UsageError(cat("--depth must be between 2 and 200 conv layers, got ", d));
  for (const auto& opt : o.optimizers)
    if (std::find(kOptimizers.begin(), kOptimizers.end(), opt) == kOptimizers.end())
      throw UsageError(cat("unknown optimizer '", opt, "' (expected momentum or sgd)"));
  if (st.train_images < 0 || st.test_images < 0 || st.train_eval_images < 0 || st.val_images < 0)
    throw UsageError("--train-subset, --val, --test-subset and --train-eval-subset must be >= 0");
  if (!(o.max_minutes >= 0)) throw UsageError(cat("--max-minutes must be >= 0, got ", o.max_minutes));
  // The m == 1 rule: in training, BN normalizes each channel with the mean and variance of its m values in
  // the batch (m = N for BatchNorm1d on (N, C), N x H x W for BatchNorm2d). With m == 1 the variance is 0,
  // the output is identically beta and the gradient to the input is 0; torch refuses it too.
  if (any_bn && st.batch == 1 && std::find(o.models.begin(), o.models.end(), "mlp") != o.models.end())
    throw UsageError(
        "--batch 1 with BatchNorm on the MLP: in training BN normalizes each feature with the mean and variance "
        "of its m values in the batch, and here m = batch = 1, so the variance is 0 and the output is constant "
        "(m == 1 is refused, as in torch); use --batch 2 or more (the CNN's BatchNorm2d has m = batch x H x W)");
}

// Trains what `store` lacks of `specs`, until the deadline; false where it ran out.
struct Trainer {
  const Settings& settings;
  const Datasets& data;
  RunStore& store;
  Clock::time_point deadline;
  bool limited;
  ReportInfo& info;
  bool train(const std::vector<RunSpec>& specs) {
    for (const auto& s : specs) {
      if (store.find(s)) continue;
      if (limited && Clock::now() >= deadline) return false;
      const auto t0 = Clock::now();
      store.add(train_one(s, settings, data, store.steps_csv()));
      info.train_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      ++info.trained;
    }
    return true;
  }
};

std::size_t count_missing(const RunStore& store, const std::vector<RunSpec>& specs, std::size_t& total) {
  std::set<std::string> keys, missing;
  for (const auto& s : specs) {
    keys.insert(s.key());
    if (!store.find(s)) missing.insert(s.key());
  }
  total = keys.size();
  return missing.size();
}

int run(Options& o, bool design) {
  Plan plan;
  if (design) {
    plan = make_plan(o.design);
    plan.settings.threads = o.settings.threads;
    o.settings = plan.settings;
  }
  torch::set_num_threads(o.settings.threads);
  bnorm::set_num_threads(o.settings.threads);
  RunStore store(o.out_dir, o.settings, o.resume);  // first: an output folder that cannot be written is refused at once
  const Datasets data = load_datasets(o.data_dir, o.settings);
  const std::int64_t n = data.train.size();
  if (n / o.settings.batch < 1)
    throw UsageError(cat("--batch ", o.settings.batch, " is larger than the training set (", n, " images)"));
  std::cerr << "bnorm-train: " << n << " training images" << (n + o.settings.val_images < 60000 ? " (subsampled)" : "")
            << ", " << data.val.size() << (o.settings.val_images ? " validation images (held out from the training set), "
                                                                 : " validation images (the test images: --val 0), ")
            << data.test.size() << " test images, batch " << o.settings.batch << ", " << o.settings.threads << " threads"
            << (store.resumed() ? cat(", ", store.resumed(), " runs finished already (--resume)") : std::string()) << "\n";
  ReportInfo info;
  info.command = o.command;
  info.resumed = store.resumed();
  Trainer trainer{o.settings, data, store,
                  Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.max_minutes * 60)),
                  o.max_minutes > 0, info};
  if (!design) {
    std::vector<RunSpec> specs;
    for (const auto& model : o.models)
      for (int depth : model == "plain" ? o.depths : std::vector<int>{0})
        for (const auto& opt : o.optimizers)
          for (double init : o.inits)
            for (double lr : (init == 1.0 || o.init_lrs.empty()) ? o.lrs : o.init_lrs)
              for (auto seed : o.seeds)
                for (const auto& variant : o.variants) {
                  RunSpec s;
                  s.model = model;
                  s.variant = variant;
                  s.optimizer = opt;
                  s.depth = depth;
                  s.lr = lr;
                  s.init = init;
                  s.seed = seed;
                  specs.push_back(s);
                }
    info.stopped = !trainer.train(specs);
    if (o.resume)
      std::cerr << "bnorm-train: --resume: " << store.resumed() << " of " << specs.size() << " runs were finished in "
                << o.out_dir << " already and were not trained again\n";
    std::vector<RunResult> runs;
    for (const auto& s : specs)
      if (const RunResult* r = store.find(s)) runs.push_back(*r);
    write_grid_report(o.out_dir, o.settings, Results(runs), info);
    std::cerr << "bnorm-train: outputs in " << o.out_dir << " (results.md, runs.csv, steps.csv, plot_<net>.png)\n";
    return info.stopped ? 3 : 0;
  }
  std::vector<Judged> rows;
  for (const auto& claim : claims()) {
    Judged j{&claim, {}, Judged::judged, 0, 0};
    if (std::find(plan.claims.begin(), plan.claims.end(), claim.id) == plan.claims.end()) {
      if (claim.own_plan) continue;
      j.state = Judged::not_run;
      rows.push_back(j);
      continue;
    }
    // A design may ask for more runs once its first ones are done (the lr the core grid chose): until none is missing.
    for (;;) {
      const auto specs = claim.runs(plan, Results(store.all()));
      std::size_t total = 0;
      const std::size_t missing = count_missing(store, specs, total);
      if (missing == 0) {
        j.row = claim.judge(plan, Results(store.all()));
        break;
      }
      if (info.stopped || !trainer.train(specs)) {
        info.stopped = true;
        j.state = Judged::pending;
        j.finished = total - count_missing(store, specs, total);
        j.needed = total;
        break;
      }
    }
    rows.push_back(j);
  }
  write_design_report(o.out_dir, plan, rows, Results(store.all()), info);
  std::cout << "\n";
  std::ifstream v(fs::path(o.out_dir) / "verdicts.txt");
  std::cout << v.rdbuf();
  std::cerr << "bnorm-train: " << info.trained << " runs trained in " << static_cast<long>(info.train_seconds)
            << " s; outputs in " << o.out_dir
            << " (results.md: the verdict table first; verdicts.txt, runs.csv, steps.csv, plot_lr.png, plot_curves.png)"
            << (info.stopped ? "; stopped at --max-minutes: run it again with --resume to continue" : "") << "\n";
  return info.stopped ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // --sync-bn: data-parallel training under mpirun, its own options (apps/train/sync_bn.cpp).
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--sync-bn") return bnorm::train::sync_bn_main(argc, argv);
  Options o;
  o.settings.val_images = 0;  // a grid validates on its test images unless --val says otherwise
  Settings& st = o.settings;
  CLI::App app{"bnorm-train: BatchNorm (bnorm's, torch's, none) on Fashion-MNIST with libtorch"};
  app.add_option("--design", o.design,
                 "run the claims' designs: quick (about a minute), demo (scripts/demo), full (scripts/demo --full), "
                 "precise-bn (precise BN statistics against the moving averages; precise-bn-quick: its smoke run); "
                 "they fix every grid option");
  app.add_option("--data", o.data_dir, "folder with the Fashion-MNIST IDX files (.gz or plain)");
  app.add_option("--out", o.out_dir, "output folder (results.md, runs.csv, steps.csv, runs.txt, plots)");
  app.add_option("--threads", st.threads, "intra-op threads (torch and bnorm)")->check(CLI::Range(1, 1024));
  app.add_flag("--resume", o.resume, "keep the runs already finished in --out (its runs.txt, same settings) and train only the rest");
  app.add_option("--max-minutes", o.max_minutes,
                 "start no run after this many minutes (0 = no limit); exit status 3 when runs are left: --resume continues");
  std::vector<CLI::Option*> grid{
      app.add_option("--model", o.models, "mlp (seed 004), cnn (seed 000), plain (--depth conv layers, no skips)")->delimiter(','),
      app.add_option("--depth", o.depths, "conv layers of the plain CNN (a list: 2,8,16)")->delimiter(','),
      app.add_option("--width", st.width, "channels of the plain CNN's convs")->check(CLI::Range(1, 1024)),
      app.add_option("--optimizer", o.optimizers, "momentum (SGD, momentum 0.9), sgd (plain SGD), or both")->delimiter(','),
      app.add_option("--variants", o.variants,
                     "none, bn_before, bn_after (bnorm's BN before/after ReLU), torch_bn (torch's, after), torch_bn_before")
          ->delimiter(','),
      app.add_option("--lr", o.lrs, "learning rates; several make a sweep")->delimiter(','),
      app.add_option("--init-scale", o.inits, "scales of the initial weights (1 = the default init)")->delimiter(','),
      app.add_option("--init-lr", o.init_lrs, "learning rates for the --init-scale values other than 1 (default: every --lr)")
          ->delimiter(','),
      app.add_option("--epochs", st.epochs, "epochs per run")->check(CLI::Range(1, 100000)),
      app.add_option("--batch", st.batch,
                     "batch size (1 is refused with BN on the MLP: m == 1 value per feature; the CNN's BN has m = batch x H x W)")
          ->check(CLI::Range(1, 1000000)),
      app.add_option("--train-subset", st.train_images, "train on the first N training images (0 = all not held out)"),
      app.add_option("--val", st.val_images, "hold out the last N training images for validation (0: validate on the test images)"),
      app.add_option("--test-subset", st.test_images, "test on the first N test images (0 = all 10000)"),
      app.add_option("--train-eval-subset", st.train_eval_images, "the final train accuracy on the first N training images"),
      app.add_option("--eval-every", st.eval_every, "steps between validation evaluations")->check(CLI::Range(1, 100000000)),
      app.add_option("--target", st.val_target, "validation accuracy for 'steps to target'"),
      app.add_option("--loss-threshold", st.loss_threshold, "train loss (mean of the last 20 steps) for 'steps to loss'"),
      app.add_flag_function(
          "--precise-bn", [&st](std::int64_t) { st.precise_images = kPreciseImages; },
          "also report each run's test accuracy with precise BN statistics (recomputed with bnorm::PopulationStats "
          "over the first 4096 training images, the final weights) beside the moving averages'"),
      app.add_option("--seed,--seeds", o.seeds, "random seeds, a list (per seed: same initial weights and batches for every variant)")
          ->delimiter(','),
  };
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
    const bool design = !o.design.empty();
    if (design) {
      for (const auto* opt : grid)
        if (opt->count() > 0)
          throw UsageError(cat("--design ", o.design, " fixes the grid; ", opt->get_name(), " is for a grid without --design"));
      (void)make_plan(o.design);
    }
    validate(o);
    return run(o, design);
  } catch (const UsageError& e) {
    std::cerr << "bnorm-train: error: " << one_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "\nbnorm-train: error: " << one_line(e.what()) << "\n";
    return 1;
  }
}
