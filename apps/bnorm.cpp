// The bnorm command. `bnorm demo` reproduces seed 001's example: BatchNorm2d(64) in training mode
// on uniform random input of shape (32, 64, 68, 68); it prints the output's shape, mean and standard
// deviation, and how the library's path compares with the float64 reference in time and error.
#include <bnorm/bnorm.hpp>

#include "kernels/reference.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run_demo(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, bool channels_last, int threads) {
  using namespace bnorm;
  if (threads > 0) set_num_threads(threads);
  const Layout layout = channels_last ? Layout::ChannelsLast : Layout::ChannelsFirst;
  const Shape shape{n, c, h, w};
  const auto numel = static_cast<std::size_t>(n * c * h * w);
  std::printf("BatchNorm2d(%lld) in training mode on uniform random input %s (%s, float32, %.1f MB), %d thread(s)\n",
              static_cast<long long>(c), shape.str().c_str(), to_string(layout).c_str(), 4.0 * static_cast<double>(numel) / 1e6,
              num_threads());
  std::vector<float> x(numel), y(numel);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  for (float& v : x) v = uni(rng);

  BatchNorm2d bn(c);
  bn.forward(ConstTensorView(x.data(), shape, layout), TensorView(y.data(), shape, layout));  // warm-up
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    bn.forward(ConstTensorView(x.data(), shape, layout), TensorView(y.data(), shape, layout));
    times.push_back(seconds_since(t0));
  }
  std::sort(times.begin(), times.end());
  const double t_lib = times[times.size() / 2];

  double sum = 0, sq = 0;
  for (float v : y) sum += v;
  const double mean = sum / static_cast<double>(numel);
  for (float v : y) sq += (v - mean) * (v - mean);
  std::printf("output shape %s: mean %.3g, SD %.6f (expected ~0 and ~1)\n", shape.str().c_str(), mean,
              std::sqrt(sq / static_cast<double>(numel)));
  // After k steps from (0, 1) with momentum 0.1 the running estimates of U(0, 1)'s mean 0.5 and
  // variance 1/12 stand at (1 - 0.9^k) * 0.5 and 0.9^k + (1 - 0.9^k) / 12.
  const double decay = std::pow(0.9, static_cast<double>(bn.num_batches_tracked()));
  std::printf("after %lld training steps: running_mean[0] %.4f (expected ~%.4f), running_var[0] %.4f (expected ~%.4f)\n",
              static_cast<long long>(bn.num_batches_tracked()), static_cast<double>(bn.running_mean()[0]),
              (1 - decay) * 0.5, static_cast<double>(bn.running_var()[0]), decay + (1 - decay) / 12);

  // The float64 reference, on logical channels-first data.
  std::vector<double> xd(numel);
  const std::int64_t S = h * w;
  for (std::int64_t in = 0; in < n; ++in)
    for (std::int64_t ic = 0; ic < c; ++ic)
      for (std::int64_t s = 0; s < S; ++s)
        xd[static_cast<std::size_t>((in * c + ic) * S + s)] =
            x[static_cast<std::size_t>(channels_last ? (in * S + s) * c + ic : (in * c + ic) * S + s)];
  const auto t0 = std::chrono::steady_clock::now();
  const bnorm::reference::Forward ref = bnorm::reference::forward({n, c, S, true, 0.1, 1e-5, false}, xd, {}, {}, {}, {});
  const double t_ref = seconds_since(t0);
  double max_err = 0;
  for (std::int64_t in = 0; in < n; ++in)
    for (std::int64_t ic = 0; ic < c; ++ic)
      for (std::int64_t s = 0; s < S; ++s) {
        const double got = y[static_cast<std::size_t>(channels_last ? (in * S + s) * c + ic : (in * c + ic) * S + s)];
        max_err = std::max(max_err, std::abs(got - ref.y[static_cast<std::size_t>((in * c + ic) * S + s)]));
      }
  std::printf("bnorm forward: %.2f ms (median of 5); float64 scalar reference: %.2f ms (%.1fx slower)\n", 1e3 * t_lib,
              1e3 * t_ref, t_ref / t_lib);
  std::printf("max |bnorm - reference| over all %zu outputs: %.3g (float32 output)\n", numel, max_err);
  return max_err < 1e-5 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bnorm: Batch Normalization for the CPU"};
  app.require_subcommand(1);
  auto* demo = app.add_subcommand("demo", "seed 001's example: BatchNorm2d(64) on uniform random (32,64,68,68)");
  std::int64_t n = 32, c = 64, h = 68, w = 68;
  bool channels_last = false;
  int threads = 0;
  demo->add_option("--n", n, "batch size")->check(CLI::PositiveNumber);
  demo->add_option("--c", c, "channels")->check(CLI::PositiveNumber);
  demo->add_option("--h", h, "height")->check(CLI::PositiveNumber);
  demo->add_option("--w", w, "width")->check(CLI::PositiveNumber);
  demo->add_flag("--channels-last", channels_last, "NHWC memory layout");
  demo->add_option("--threads", threads, "threads (default: all)")->check(CLI::PositiveNumber);
  auto* info = app.add_subcommand("info", "what bnorm detected here (CPU, instruction sets, caches) and the variant each op takes");
  int info_threads = 0;
  info->add_option("--threads", info_threads, "threads to report the choices for (default: all)")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    if (*demo) return run_demo(n, c, h, w, channels_last, threads);
    if (*info) {
      if (info_threads > 0) bnorm::set_num_threads(info_threads);
      std::fputs(bnorm::runtime_info().c_str(), stdout);
      return 0;
    }
  } catch (const bnorm::Error& e) {
    std::fprintf(stderr, "bnorm: %s\n", e.what());
    return 2;
  }
  return 0;
}
