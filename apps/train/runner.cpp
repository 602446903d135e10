#include "runner.hpp"
#include "text.hpp"

#include "bnorm_torch.hpp"

#include <bnorm/population.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <set>
#include <sstream>

#include <unistd.h>

namespace bnorm::train {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

std::string short_num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.10g", v);
  return b;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Fashion-MNIST's training-set pixel mean and sd (of x / 255).
constexpr double kMean = 0.2860, kStd = 0.3530;

::torch::Tensor as_input(const ::torch::Tensor& u8, bool raw) {
  auto x = u8.to(::torch::kFloat);
  return raw ? x : x.div(255.0).sub(kMean).div(kStd);
}

// Evaluation batch: small enough that a depth-16 net's activations (256 x 16 x 28 x 28 floats = 12.8 MB) stay
// under glibc's mmap threshold and mostly in cache; batches of 1000 made each evaluated image cost 75% of a
// trained one instead of about a third.
constexpr std::int64_t kEvalBatch = 256;

struct Eval {
  double accuracy = 0, loss = 0;
};

// Accuracy and mean cross-entropy in eval mode (running statistics) on the first `limit` examples (0 = all).
Eval evaluate(Net& net, const Data& d, bool raw, std::int64_t limit = 0) {
  ::torch::NoGradGuard g;
  net.eval();
  std::int64_t correct = 0;
  double loss = 0;
  const std::int64_t n = limit > 0 ? std::min(limit, d.size()) : d.size();
  for (std::int64_t i = 0; i < n; i += kEvalBatch) {
    const std::int64_t e = std::min(n, i + kEvalBatch);
    auto out = net.forward(as_input(d.x.slice(0, i, e), raw));
    auto yb = d.y.slice(0, i, e);
    correct += out.argmax(1).eq(yb).sum().item<std::int64_t>();
    loss += ::torch::nn::functional::cross_entropy(
                out, yb, ::torch::nn::functional::CrossEntropyFuncOptions().reduction(::torch::kSum))
                .item<double>();
  }
  net.train();
  return {static_cast<double>(correct) / static_cast<double>(n), loss / static_cast<double>(n)};
}

// The BatchNorms of a net (bnorm's or torch's, 1d or 2d) in forward order: what precise BN reads and writes.
struct BnRef {
  std::size_t index;  // in net.body
  ::torch::Tensor weight, bias, running_mean, running_var;
  double eps;
};
template <class Impl>
bool add_bn_ref(std::vector<BnRef>& v, std::size_t i, ::torch::nn::Module& m) {
  auto* b = m.as<Impl>();
  if (b == nullptr) return false;
  v.push_back({i, b->weight, b->bias, b->running_mean, b->running_var, b->options.eps()});
  return true;
}
std::vector<BnRef> batch_norms(Net& net) {
  std::vector<BnRef> v;
  std::size_t i = 0;
  for (const auto& m : net.body->children()) {
    (void)(add_bn_ref<bnorm::torch::BatchNorm2dImpl>(v, i, *m) || add_bn_ref<bnorm::torch::BatchNorm1dImpl>(v, i, *m) ||
           add_bn_ref<::torch::nn::BatchNorm2dImpl>(v, i, *m) || add_bn_ref<::torch::nn::BatchNorm1dImpl>(v, i, *m));
    ++i;
  }
  return v;
}

// Precise BN (Wu & Johnson 2021; docs/running-statistics.md): one pass over the first `images` training images in
// batches of `batch`, every layer as in eval except the BatchNorms, which normalize with their batch's statistics
// (training-mode normalization under the final weights) and feed their input's per-batch float64 moments to a
// bnorm::PopulationStats each (merged exactly, Chan's formula); then each BN's running statistics are the
// population mean and unbiased variance. Returns the test accuracy with them, and puts the moving averages back.
double precise_test_accuracy(Net& net, const Datasets& data, const Settings& st, bool raw) {
  ::torch::NoGradGuard g;
  const auto bns = batch_norms(net);
  std::vector<bnorm::PopulationStats> pop;
  for (const auto& b : bns) pop.emplace_back(b.running_mean.size(0));
  net.eval();
  const std::int64_t n = std::min(st.precise_images, data.train.size());
  for (std::int64_t i = 0; i < n; i += st.batch) {
    auto x = as_input(data.train.x.slice(0, i, std::min(n, i + st.batch)), raw);
    std::size_t next = 0, layer = 0;
    for (auto& m : *net.body) {
      if (next < bns.size() && bns[next].index == layer) {
        const BnRef& b = bns[next];
        const auto x64 = x.to(::torch::kDouble);
        std::vector<std::int64_t> dims{0};
        for (std::int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
        const auto mean = x64.mean(dims, /*keepdim=*/true);
        const auto m2 = (x64 - mean).square().sum(dims).contiguous();
        const auto mean_c = mean.flatten().contiguous();
        const auto C = static_cast<std::size_t>(mean_c.numel());
        pop[next].merge(static_cast<double>(x.numel() / x.size(1)), {mean_c.data_ptr<double>(), C},
                        {m2.data_ptr<double>(), C});
        x = ::torch::batch_norm(x, b.weight, b.bias, {}, {}, /*training=*/true, 0.0, b.eps, false);
        ++next;
      } else {
        x = m.forward(x);
      }
      ++layer;
    }
  }
  std::vector<std::pair<::torch::Tensor, ::torch::Tensor>> moving;
  for (std::size_t k = 0; k < bns.size(); ++k) {
    moving.emplace_back(bns[k].running_mean.clone(), bns[k].running_var.clone());
    const auto mean = pop[k].mean();
    const auto m2 = pop[k].m2();
    auto var = ::torch::from_blob(const_cast<double*>(m2.data()), {static_cast<std::int64_t>(m2.size())}, ::torch::kDouble)
                   .div(pop[k].count() - 1);
    bns[k].running_mean.copy_(
        ::torch::from_blob(const_cast<double*>(mean.data()), {static_cast<std::int64_t>(mean.size())}, ::torch::kDouble));
    bns[k].running_var.copy_(var);
  }
  const double acc = evaluate(net, data.test, raw).accuracy;
  for (std::size_t k = 0; k < bns.size(); ++k) {
    bns[k].running_mean.copy_(moving[k].first);
    bns[k].running_var.copy_(moving[k].second);
  }
  net.train();
  return acc;
}

Data slice(const bnorm::train::Split& s, std::int64_t begin, std::int64_t end) {
  auto x = ::torch::from_blob(const_cast<std::uint8_t*>(s.images.data.data()), {s.size(), 1, 28, 28}, ::torch::kUInt8);
  auto y = ::torch::from_blob(const_cast<std::uint8_t*>(s.labels.data.data()), {s.size()}, ::torch::kUInt8);
  return {x.slice(0, begin, end).clone(), y.slice(0, begin, end).to(::torch::kLong)};
}

}  // namespace

std::string Settings::header() const {
  return cat("bnorm-train runs v2: batch ", batch, " width ", width, " eval-every ", eval_every, " epochs ", epochs,
             " train-subset ", train_images, " val ", val_images, " test-subset ", test_images, " train-eval-subset ",
             train_eval_images, " loss-threshold ", short_num(loss_threshold), " target ", short_num(val_target),
             // only when set, so that the header (and --resume) of a run without it is as it was
             precise_images > 0 ? cat(" precise-bn ", precise_images) : std::string());
}

std::string RunSpec::net_name() const { return model == "plain" ? cat(model, depth) : model; }

std::string RunSpec::key() const {
  return cat(net_name(), "/", variant, "/", optimizer, "/lr=", short_num(lr), "/init=", short_num(init), "/seed=", seed,
             "/bias=", bias ? 1 : 0, "/dropout=", short_num(dropout), "/input=", raw_input ? "raw" : "std", "/subset=",
             subset, "/epochs=", epochs, "/patience=", patience);
}

Datasets load_datasets(const std::string& dir, const Settings& s) {
  bnorm::train::Split train, test;
  try {
    train = bnorm::train::load_fashion_mnist(dir, true);
    test = bnorm::train::load_fashion_mnist(dir, false);
  } catch (const bnorm::train::DataError& e) {
    throw UsageError(e.what());
  }
  const std::int64_t n = train.size();
  if (s.val_images < 0 || s.val_images >= n)
    throw UsageError(cat("--val must be >= 0 and leave training images: the training set has ", n, " images, got ",
                         s.val_images));
  const std::int64_t left = n - s.val_images;
  const std::int64_t n_train = s.train_images > 0 ? std::min(s.train_images, left) : left;
  const std::int64_t n_test = s.test_images > 0 ? std::min(s.test_images, test.size()) : test.size();
  Datasets d{slice(train, 0, n_train), slice(train, left, n), slice(test, 0, n_test)};
  // Without a validation split the validation accuracy is taken on the test images (grids of tiny tests only).
  if (s.val_images == 0) d.val = d.test;
  return d;
}

RunResult train_one(const RunSpec& spec, const Settings& st, const Datasets& data, std::ostream& csv) {
  NetSpec ns;
  ns.model = spec.model;
  ns.variant = spec.variant;
  ns.depth = spec.depth;
  ns.width = st.width;
  ns.conv_bias = spec.bias;
  ns.dropout = spec.dropout;
  ns.init = spec.init;
  ns.seed = spec.seed;
  auto net = make_net(ns);
  RunResult r;
  r.spec = spec;
  r.init_checksum = weight_checksum(*net);
  r.bias_grad = spec.bias && spec.model == "plain" ? 0.0 : std::nan("");
  ::torch::optim::SGD opt(net->parameters(),
                        ::torch::optim::SGDOptions(spec.lr).momentum(spec.optimizer == "momentum" ? 0.9 : 0.0));
  // The batch order has its own generator, so that dropout's draws (from torch's global one) do not change it:
  // one seed gives every variant the same batches.
  auto order = at::make_generator<at::CPUGeneratorImpl>(static_cast<std::uint64_t>(spec.seed));
  const std::int64_t n = spec.subset > 0 ? std::min(spec.subset, data.train.size()) : data.train.size();
  const std::int64_t steps_per_epoch = n / st.batch;
  const int epochs = spec.epochs > 0 ? spec.epochs : st.epochs;
  const std::string tag = spec.key();
  const bool progress_tty = isatty(fileno(stderr)) != 0;
  const auto t0 = Clock::now();
  double train_seconds = 0;
  std::int64_t step = 0;
  double best_val = -1;
  int since_best = 0;
  std::vector<::torch::Tensor> best_state;
  std::deque<double> window;  // the last 20 step losses
  double window_sum = 0;
  csv << tag << ",0,0,," << evaluate(*net, data.val, spec.raw_input).accuracy << ",0\n";
  bool stop = false;
  for (int epoch = 1; epoch <= epochs && !stop; ++epoch) {
    auto perm = ::torch::randperm(n, order, ::torch::TensorOptions().dtype(::torch::kLong));
    const auto te = Clock::now();
    double eval_seconds = 0, loss_sum = 0;
    int loss_count = 0;
    for (std::int64_t b = 0; b < steps_per_epoch; ++b) {
      auto idx = perm.slice(0, b * st.batch, (b + 1) * st.batch);
      auto loss = ::torch::nn::functional::cross_entropy(
          net->forward(as_input(data.train.x.index_select(0, idx), spec.raw_input)), data.train.y.index_select(0, idx));
      opt.zero_grad();
      loss.backward();
      opt.step();
      ++step;
      const double l = loss.item<double>();
      if (!std::isfinite(l) || l > 1e3) {
        r.diverged_at = step;
        csv << tag << "," << step << "," << epoch << "," << l << ",," << seconds_since(t0) << "\n";
        stop = true;
        break;
      }
      window.push_back(l);
      window_sum += l;
      if (window.size() > 20) {
        window_sum -= window.front();
        window.pop_front();
      }
      if (!r.steps_to_loss && window.size() == 20 && window_sum / 20 <= st.loss_threshold) r.steps_to_loss = step;
      loss_sum += l;
      ++loss_count;
      if (step % st.eval_every == 0 || b + 1 == steps_per_epoch) {
        if (!std::isnan(r.bias_grad)) r.bias_grad = std::max(r.bias_grad, bias_grad_ratio(*net));
        const auto tv = Clock::now();
        const double acc = evaluate(*net, data.val, spec.raw_input).accuracy;
        eval_seconds += seconds_since(tv);
        if (acc >= st.val_target && !r.steps_to_val) r.steps_to_val = step;
        const double mean_loss = loss_sum / loss_count;
        r.loss_curve.emplace_back(step, mean_loss);
        r.val_curve.emplace_back(step, acc);
        r.final_loss = mean_loss;
        r.val_acc = acc;
        csv << tag << "," << step << "," << epoch << "," << mean_loss << "," << acc << "," << seconds_since(t0) << "\n";
        loss_sum = 0;
        loss_count = 0;
        if (spec.patience > 0) {
          if (acc > best_val) {
            best_val = acc;
            since_best = 0;
            best_state.clear();
            ::torch::NoGradGuard g;
            for (auto& p : net->parameters()) best_state.push_back(p.detach().clone());
            for (auto& p : net->buffers()) best_state.push_back(p.detach().clone());
          } else if (++since_best >= spec.patience) {
            stop = true;
            break;
          }
        }
      }
      // The bar is redrawn every 20 steps on a terminal; into a file or pipe only each run's last state goes.
      if (((b + 1) % 20 == 0 && progress_tty) || b + 1 == steps_per_epoch) {
        const double el = std::max(seconds_since(te) - eval_seconds, 1e-9);
        std::fprintf(stderr, "\r%-90s epoch %d/%d %lld/%lld steps, loss %.4f, %.0f steps/s ", tag.c_str(), epoch, epochs,
                     static_cast<long long>(b + 1), static_cast<long long>(steps_per_epoch), l,
                     static_cast<double>(b + 1) / el);
      }
    }
    train_seconds += seconds_since(te) - eval_seconds;
  }
  r.steps = step;
  r.sec_per_step = step > 0 ? train_seconds / static_cast<double>(step) : 0;
  if (r.diverged_at) {
    r.val_acc = 0;
    std::fprintf(stderr, "diverged at step %lld\n", static_cast<long long>(step));
    return r;
  }
  if (spec.patience > 0 && !best_state.empty()) {  // back to the best-validation weights
    ::torch::NoGradGuard g;
    std::size_t i = 0;
    for (auto& p : net->parameters()) p.copy_(best_state[i++]);
    for (auto& p : net->buffers()) p.copy_(best_state[i++]);
    r.val_acc = best_val;
  }
  const Eval test = evaluate(*net, data.test, spec.raw_input);
  r.test_acc = test.accuracy;
  r.test_loss = test.loss;
  if (st.precise_images > 0 && !batch_norms(*net).empty())
    r.precise_test_acc = precise_test_accuracy(*net, data, st, spec.raw_input);
  r.train_acc = evaluate(*net, data.train, spec.raw_input, std::min(n, st.train_eval_images)).accuracy;
  std::fprintf(stderr, "val %.4f test %.4f\n", r.val_acc, r.test_acc);
  return r;
}

// --- runs.txt ---

namespace {

std::string encode_run(const RunResult& r) {
  const RunSpec& s = r.spec;
  std::ostringstream l;
  l << s.model << ' ' << s.variant << ' ' << s.optimizer << ' ' << s.depth << ' ' << num(s.lr) << ' ' << num(s.init) << ' '
    << num(s.dropout) << ' ' << s.seed << ' ' << s.bias << ' ' << s.raw_input << ' ' << s.subset << ' ' << s.epochs << ' '
    << s.patience << " |";
  l << ' ' << r.steps;
  for (double v : {r.val_acc, r.test_acc, r.test_loss, r.train_acc, r.final_loss, r.bias_grad, r.sec_per_step, r.init_checksum})
    l << ' ' << num(v);
  for (const auto& o : {r.steps_to_loss, r.steps_to_val, r.diverged_at}) l << ' ' << (o ? *o : -1);
  for (const auto* curve : {&r.loss_curve, &r.val_curve}) {
    l << ' ' << curve->size();
    for (const auto& [step, v] : *curve) l << ' ' << step << ' ' << num(v);
  }
  if (r.precise_test_acc) l << " precise " << num(*r.precise_test_acc);  // only then: older lines stay as they were
  l << " end";
  return l.str();
}

// The run of a runs.txt line, or nothing for a line cut short by a kill.
std::optional<RunResult> decode_run(const std::string& line) {
  std::istringstream in(line);
  RunResult r;
  RunSpec& s = r.spec;
  std::string bar;
  in >> s.model >> s.variant >> s.optimizer >> s.depth >> s.lr >> s.init >> s.dropout >> s.seed >> s.bias >> s.raw_input >>
      s.subset >> s.epochs >> s.patience >> bar >> r.steps;
  for (double* v : {&r.val_acc, &r.test_acc, &r.test_loss, &r.train_acc, &r.final_loss, &r.bias_grad, &r.sec_per_step,
                    &r.init_checksum}) {
    std::string t;  // "nan" is not read by >> double
    in >> t;
    *v = std::strtod(t.c_str(), nullptr);
  }
  for (auto* o : {&r.steps_to_loss, &r.steps_to_val, &r.diverged_at}) {
    std::int64_t v = -1;
    in >> v;
    if (v >= 0) *o = v;
  }
  if (!in || bar != "|") return std::nullopt;
  for (auto* curve : {&r.loss_curve, &r.val_curve}) {
    std::size_t n = 0;
    if (!(in >> n) || n > 1000000) return std::nullopt;
    for (std::size_t i = 0; i < n; ++i) {
      std::int64_t step = 0;
      std::string v;
      in >> step >> v;
      curve->emplace_back(step, std::strtod(v.c_str(), nullptr));
    }
  }
  std::string end;
  if ((in >> end) && end == "precise") {
    std::string v;
    in >> v >> end;
    r.precise_test_acc = std::strtod(v.c_str(), nullptr);
  }
  if (!in || end != "end") return std::nullopt;
  return r;
}

const char* kStepsHeader = "run,step,epoch,train_loss,val_accuracy,wall_s\n";

}  // namespace

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

RunStore::RunStore(const fs::path& dir, const Settings& settings, bool resume) : dir_(dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  const fs::path runs_path = dir / "runs.txt", steps_path = dir / "steps.csv";
  const bool append = resume && fs::exists(runs_path) && fs::exists(steps_path);
  if (append) {
    std::ifstream in(runs_path);
    std::string header, line;
    std::getline(in, header);
    if (header != settings.header())
      throw UsageError(cat("--resume: ", runs_path.string(), " was made with other settings ('", header, "', now '",
                           settings.header(), "'); use another --out, or drop --resume to start over"));
    while (std::getline(in, line))
      if (auto r = decode_run(line)) {
        const std::string k = r->spec.key();
        if (!runs_.count(k)) order_.push_back(k);
        runs_[k] = std::move(*r);
      }
    in.close();
    resumed_ = runs_.size();
    // Both files rewritten to the finished runs (a killed run's steps and cut line go), then appended to.
    std::ifstream steps_in(steps_path);
    std::ostringstream kept;
    kept << kStepsHeader;
    std::getline(steps_in, line);
    while (std::getline(steps_in, line))
      if (runs_.count(line.substr(0, line.find(',')))) kept << line << '\n';
    steps_in.close();
    replace_file(steps_path, kept.str());
    std::ostringstream runs;
    runs << settings.header() << '\n';
    for (const auto& k : order_) runs << encode_run(runs_.at(k)) << '\n';
    replace_file(runs_path, runs.str());
  }
  csv_.open(steps_path, append ? std::ios::app : std::ios::trunc);
  runs_file_.open(runs_path, append ? std::ios::app : std::ios::trunc);
  if (!csv_ || !runs_file_)
    throw UsageError(cat("cannot write to the output folder '", dir.string(), "'", ec ? cat(" (", ec.message(), ")") : ""));
  if (!append) {
    csv_ << kStepsHeader;
    runs_file_ << settings.header() << '\n' << std::flush;
  }
}

const RunResult* RunStore::find(const RunSpec& spec) const {
  const auto it = runs_.find(spec.key());
  return it == runs_.end() ? nullptr : &it->second;
}

void RunStore::add(const RunResult& r) {
  csv_.flush();
  runs_file_ << encode_run(r) << '\n' << std::flush;
  if (!runs_file_ || !csv_) throw std::runtime_error(cat("writing ", (dir_ / "runs.txt").string(), " failed"));
  const std::string k = r.spec.key();
  if (!runs_.count(k)) order_.push_back(k);
  runs_[k] = r;
}

std::vector<RunResult> RunStore::all() const {
  std::vector<RunResult> v;
  for (const auto& k : order_) v.push_back(runs_.at(k));
  return v;
}

}  // namespace bnorm::train
