// bnorm-train: trains the seed 000 CNN and the seed 004 MLP on Fashion-MNIST with libtorch, with the
// normalization done by bnorm (bnorm::torch), by torch (control) or absent, and writes a CSV of every
// logged step, a markdown table and a gnuplot plot. See docs/convergence.md.
#include "bnorm_torch.hpp"
#include "idx.hpp"

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
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

const std::vector<std::string> kVariants{"none", "bn_before", "bn_after", "torch_bn"};

struct Net : torch::nn::Module {
  torch::nn::Sequential body;
  explicit Net(torch::nn::Sequential s) : body(register_module("body", std::move(s))) {}
  torch::Tensor forward(torch::Tensor x) { return body->forward(x); }
};

// BN of the variant's kind, or nothing. `two_d` picks BatchNorm2d (CNN) or BatchNorm1d (MLP).
void add_bn(torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (variant == "none") return;
  if (variant == "torch_bn") {
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

// BN placement: bn_before = Linear/Conv -> BN -> ReLU; bn_after and torch_bn = -> ReLU -> BN (seed 000's order).
void add_act_bn(torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (variant == "bn_before") {
    add_bn(s, variant, c, two_d);
    s->push_back(torch::nn::ReLU());
  } else {
    s->push_back(torch::nn::ReLU());
    add_bn(s, variant, c, two_d);
  }
}

std::shared_ptr<Net> make_net(const std::string& model, const std::string& variant) {
  torch::nn::Sequential s;
  if (model == "mlp") {  // seed 004: Linear(784,256) -> BN -> ReLU -> Linear(256,10)
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

double accuracy(Net& net, const Data& test) {
  torch::NoGradGuard g;
  net.eval();
  std::int64_t correct = 0;
  const std::int64_t n = test.x.size(0);
  for (std::int64_t i = 0; i < n; i += 1000) {
    auto xb = test.x.slice(0, i, std::min(n, i + 1000));
    auto yb = test.y.slice(0, i, std::min(n, i + 1000));
    correct += net.forward(xb).argmax(1).eq(yb).sum().item<std::int64_t>();
  }
  net.train();
  return static_cast<double>(correct) / static_cast<double>(n);
}

struct RunResult {
  std::string variant;
  double lr = 0, init = 1;
  double acc1 = 0, accN = 0;
  std::optional<std::int64_t> steps_to_target;
  bool diverged = false;
  double sec_per_epoch = 0;
};

[[noreturn]] void die(const std::string& msg) {
  std::cerr << "bnorm-train: error: " << msg << "\n";
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bnorm-train: BatchNorm (bnorm's, torch's, none) on Fashion-MNIST with libtorch"};
  std::string data_dir = bnorm::train::kDefaultDataDir, model = "mlp", out_dir = "bnorm-train-out";
  std::vector<std::string> variants{"none", "bn_before", "bn_after", "torch_bn"};
  std::vector<double> lrs{0.1};
  std::vector<double> inits{1.0};
  int epochs = 2, batch = 64, threads = 2, eval_every = 100;
  std::int64_t train_limit = 0, test_limit = 2000, seed = 0;
  double target = 0.85;
  app.add_option("--data", data_dir, "folder with the Fashion-MNIST IDX files (.gz or plain)");
  app.add_option("--model", model, "mlp (seed 004) or cnn (seed 000)");
  app.add_option("--variants", variants, "none, bn_before, bn_after, torch_bn");
  app.add_option("--lr", lrs, "learning rates (SGD, momentum 0.9); several make a sweep");
  app.add_option("--init-scale", inits, "scale of the initial weights (1 = torch's default; 10 or 0.1 = bad init)");
  app.add_option("--epochs", epochs, "epochs per run")->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "batch size")->check(CLI::PositiveNumber);
  app.add_option("--train-subset", train_limit, "use the first N training images (0 = all 60000)");
  app.add_option("--test-subset", test_limit, "evaluate on the first N test images (0 = all 10000)");
  app.add_option("--eval-every", eval_every, "steps between logged test accuracies")->check(CLI::PositiveNumber);
  app.add_option("--target", target, "target test accuracy for 'steps to target'");
  app.add_option("--threads", threads, "intra-op threads (torch and bnorm)")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "random seed (same initial weights for every variant)");
  app.add_option("--out", out_dir, "output folder (CSV, markdown table, plot)");
  CLI11_PARSE(app, argc, argv);

  if (model != "mlp" && model != "cnn") die("unknown model '" + model + "' (expected mlp or cnn)");
  bool any_bn = false;
  for (const auto& v : variants) {
    if (std::find(kVariants.begin(), kVariants.end(), v) == kVariants.end())
      die("unknown variant '" + v + "' (expected none, bn_before, bn_after, torch_bn)");
    any_bn = any_bn || v != "none";
  }
  for (double lr : lrs)
    if (!(lr > 0) || !std::isfinite(lr)) die("--lr must be > 0, got " + std::to_string(lr));
  for (double s : inits)
    if (!(s > 0) || !std::isfinite(s)) die("--init-scale must be > 0, got " + std::to_string(s));
  if (any_bn && batch == 1)
    die("--batch 1 with BatchNorm in training: each channel's statistics come from m = batch x H x W values; "
        "for the MLP m = 1, the batch variance is 0 (and the unbiased running variance divides by m - 1 = 0), "
        "so training BN needs m > 1; use --batch 2 or more");

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  std::ofstream csv(out_dir + "/steps.csv");
  if (ec || !csv) die("cannot write to the output folder '" + out_dir + "'");
  csv << "model,variant,lr,init_scale,step,epoch,train_loss,test_accuracy,wall_s\n";

  torch::set_num_threads(threads);
  bnorm::set_num_threads(threads);

  bnorm::train::Split train_split, test_split;
  try {
    train_split = bnorm::train::load_fashion_mnist(data_dir, true);
    test_split = bnorm::train::load_fashion_mnist(data_dir, false);
  } catch (const bnorm::train::DataError& e) {
    die(e.what());
  }
  const Data train = to_tensors(train_split, train_limit);
  const Data test = to_tensors(test_split, test_limit);
  const std::int64_t n = train.x.size(0);
  const std::int64_t steps_per_epoch = n / batch;
  if (steps_per_epoch < 1) die("--batch " + std::to_string(batch) + " is larger than the training set");
  std::cerr << "bnorm-train: " << model << ", " << n << " training images, " << test.x.size(0)
            << " test images, batch " << batch << ", " << steps_per_epoch << " steps per epoch, " << threads
            << " threads\n";

  std::vector<RunResult> results;
  for (double init : inits)
    for (double lr : lrs)
      for (const auto& variant : variants) {
        torch::manual_seed(static_cast<std::uint64_t>(seed));
        auto net = make_net(model, variant);
        if (init != 1.0) {
          torch::NoGradGuard g;
          for (auto& p : net->named_parameters())
            if (p.key().find("weight") != std::string::npos && p.value().dim() > 1) p.value().mul_(init);
        }
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(lr).momentum(0.9));
        RunResult r;
        r.variant = variant;
        r.lr = lr;
        r.init = init;
        const std::string tag = model + "," + variant + "," + std::to_string(lr) + "," + std::to_string(init);
        auto t0 = Clock::now();
        double train_seconds = 0;
        std::int64_t step = 0;
        double acc0 = accuracy(*net, test);
        csv << tag << ",0,0,," << acc0 << ",0\n";
        for (int epoch = 1; epoch <= epochs && !r.diverged; ++epoch) {
          auto perm = torch::randperm(n, torch::kLong);
          auto te = Clock::now();
          double loss_sum = 0;
          int loss_count = 0;
          for (std::int64_t b = 0; b < steps_per_epoch; ++b) {
            auto idx = perm.slice(0, b * batch, (b + 1) * batch);
            auto loss = torch::nn::functional::cross_entropy(net->forward(train.x.index_select(0, idx)),
                                                             train.y.index_select(0, idx));
            opt.zero_grad();
            loss.backward();
            opt.step();
            ++step;
            const double l = loss.item<double>();
            if (!std::isfinite(l) || l > 1e3) {
              r.diverged = true;
              csv << tag << "," << step << "," << epoch << "," << l << ",,"
                  << std::chrono::duration<double>(Clock::now() - t0).count() << "\n";
              break;
            }
            loss_sum += l;
            ++loss_count;
            if (step % eval_every == 0 || b + 1 == steps_per_epoch) {
              const double acc = accuracy(*net, test);
              if (acc >= target && !r.steps_to_target) r.steps_to_target = step;
              csv << tag << "," << step << "," << epoch << "," << loss_sum / loss_count << "," << acc << ","
                  << std::chrono::duration<double>(Clock::now() - t0).count() << "\n";
              loss_sum = 0;
              loss_count = 0;
            }
            if ((b + 1) % 20 == 0 || b + 1 == steps_per_epoch) {
              const double el = std::chrono::duration<double>(Clock::now() - te).count();
              const int width = 30;
              const int done = static_cast<int>(width * (b + 1) / steps_per_epoch);
              std::fprintf(stderr, "\r%-9s lr %-5g epoch %d [%s%s] %lld/%lld loss %.4f %.0f img/s ", variant.c_str(), lr,
                           epoch, std::string(static_cast<std::size_t>(done), '#').c_str(),
                           std::string(static_cast<std::size_t>(width - done), '.').c_str(),
                           static_cast<long long>(b + 1), static_cast<long long>(steps_per_epoch), l,
                           static_cast<double>((b + 1) * batch) / std::max(el, 1e-9));
            }
          }
          train_seconds += std::chrono::duration<double>(Clock::now() - te).count();
          const double acc = r.diverged ? 0.0 : accuracy(*net, test);
          if (epoch == 1) r.acc1 = acc;
          r.accN = acc;
          std::fprintf(stderr, "test acc %.4f\n", acc);
        }
        r.sec_per_epoch = train_seconds / epochs;
        results.push_back(r);
      }

  std::ostringstream md;
  md << "| model | variant | lr | init x | acc after 1 epoch | acc after " << epochs << " | steps to "
     << target * 100 << "% | diverged | s / epoch |\n|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : results) {
    char line[512];
    std::snprintf(line, sizeof line, "| %s | %s | %g | %g | %.4f | %.4f | %s | %s | %.2f |\n", model.c_str(),
                  r.variant.c_str(), r.lr, r.init, r.acc1, r.accN,
                  r.steps_to_target ? std::to_string(*r.steps_to_target).c_str() : "not reached",
                  r.diverged ? "yes" : "no", r.sec_per_epoch);
    md << line;
  }
  std::cout << md.str();
  std::ofstream(out_dir + "/results.md") << md.str();
  std::ofstream gp(out_dir + "/plot.gp");
  gp << "set datafile separator ','\nset terminal pngcairo size 1400,600\nset output '" << out_dir
     << "/plot.png'\nset multiplot layout 1,2\nset xlabel 'step'\nset key outside bottom\n";
  for (int panel = 0; panel < 2; ++panel) {
    gp << (panel == 0 ? "set ylabel 'train loss'\nset logscale y\nplot " : "unset logscale y\nset ylabel 'test accuracy'\nplot ");
    bool first = true;
    for (const auto& r : results) {
      const std::string tag = model + "," + r.variant + "," + std::to_string(r.lr) + "," + std::to_string(r.init);
      gp << (first ? "" : ", ") << "'< grep \"^" << tag << ",\" " << out_dir << "/steps.csv' using 5:"
         << (panel == 0 ? 7 : 8) << " with lines title '" << r.variant << " lr " << r.lr << " init x" << r.init << "'";
      first = false;
    }
    gp << "\n";
  }
  gp << "unset multiplot\n";
  gp.close();
  csv.close();
  if (std::system(("command -v gnuplot >/dev/null && gnuplot '" + out_dir + "/plot.gp' 2>/dev/null").c_str()) != 0)
    std::cerr << "bnorm-train: gnuplot not run (install gnuplot-nox); the script is " << out_dir << "/plot.gp\n";
  std::cerr << "bnorm-train: outputs in " << out_dir << " (steps.csv, results.md, plot.gp, plot.png)\n";
  return 0;
}
