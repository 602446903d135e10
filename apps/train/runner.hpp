// One training run, and the store of finished runs (runs.txt, steps.csv) that lets a stopped grid continue
// (--resume). A run is named by its RunSpec; the settings every run shares are runs.txt's header.
#pragma once

#include "idx.hpp"
#include "model.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace bnorm::train {

// An error that ends the program with one line on stderr and exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What every run of one invocation shares.
struct Settings {
  int batch = 64, width = 16, eval_every = 100, epochs = 2, threads = 2;
  std::int64_t train_images = 0;        // the first N of the training images left after the validation split (0 = all)
  std::int64_t val_images = 5000;       // held out from the END of the 60,000 training images: lr choice, early stop
  std::int64_t test_images = 0;         // the first N of the 10,000 test images (0 = all): the reported accuracy
  std::int64_t train_eval_images = 2000;  // the final train accuracy, on the first N training images
  double loss_threshold = 0.5;          // "steps to train loss": the mean of the last 20 step losses <= this
  double val_target = 0.85;             // "steps to validation accuracy", counted at the evaluations
  std::int64_t precise_images = 0;      // > 0 (--precise-bn): also the test accuracy with precise BN statistics,
                                        // recomputed on the first N training images (precise_test_acc)
  std::string header() const;           // runs.txt's first line
};

// One run. Everything but `seed` names its cell; the defaults are the core grid's.
struct RunSpec {
  std::string model = "plain", variant = "none", optimizer = "momentum";
  int depth = 2;
  double lr = 0.1, init = 1, dropout = 0;
  std::int64_t seed = 0;
  bool bias = true;        // the convs' bias
  bool raw_input = false;  // pixels 0..255 as they are stored, not standardized
  std::int64_t subset = 0; // training images for this run (0 = Settings::train_images)
  int epochs = 0;          // 0 = Settings::epochs
  int patience = 0;        // > 0: stop after this many evaluations without a better validation accuracy, and
                           // report the test accuracy of the best-validation weights
  std::string key() const; // one token, no spaces or commas: runs.txt's and steps.csv's name of the run
  std::string net_name() const;  // "plain16", "mlp"
};

struct RunResult {
  RunSpec spec;
  std::int64_t steps = 0;  // trained
  double val_acc = 0;      // final (best, with patience), eval mode; 0 if diverged
  double test_acc = 0, test_loss = 0, train_acc = 0, final_loss = 0;
  std::optional<std::int64_t> steps_to_loss, steps_to_val, diverged_at;
  double bias_grad = 0;    // the largest bias_grad_ratio seen at the evaluations (NaN without conv biases)
  // With Settings::precise_images and BN in the net: the test accuracy with every BN's running statistics
  // replaced by the population statistics of its input over those training images (test_acc: the moving averages).
  std::optional<double> precise_test_acc;
  double sec_per_step = 0, init_checksum = 0;
  // At each evaluation: (step, mean train loss since the previous one) and (step, validation accuracy).
  std::vector<std::pair<std::int64_t, double>> loss_curve, val_curve;
  // Failed to train: diverged, or a final validation accuracy under 0.5 (chance is 0.1).
  bool failed() const { return diverged_at.has_value() || val_acc < 0.5; }
};

// The images as stored (uint8) and labels; converted to float a batch at a time.
struct Data {
  ::torch::Tensor x, y;
  std::int64_t size() const { return x.size(0); }
};
struct Datasets {
  Data train, val, test;
};
Datasets load_datasets(const std::string& dir, const Settings& s);

// Trains one run; appends its evaluations to `csv` (steps.csv).
RunResult train_one(const RunSpec& spec, const Settings& settings, const Datasets& data, std::ostream& csv);

// The finished runs of an output folder: runs.txt (a header with the settings, then one line per finished
// run, written and flushed when the run ends) and steps.csv. With `resume` the runs already there are kept
// (a line cut by a kill is dropped, with that run's steps) and a header with other settings is refused.
class RunStore {
 public:
  RunStore(const std::filesystem::path& dir, const Settings& settings, bool resume);
  const RunResult* find(const RunSpec& spec) const;
  void add(const RunResult& r);  // appends to runs.txt, flushed
  std::ostream& steps_csv() { return csv_; }
  std::vector<RunResult> all() const;
  std::size_t resumed() const { return resumed_; }

 private:
  std::filesystem::path dir_;
  std::map<std::string, RunResult> runs_;
  std::vector<std::string> order_;
  std::ofstream runs_file_, csv_;
  std::size_t resumed_ = 0;
};

// `path` replaced by `contents` through a temporary file renamed over it once written in full: a failed write
// (a full disk) leaves the old file as it was.
void replace_file(const std::filesystem::path& path, const std::string& contents);

}  // namespace bnorm::train
