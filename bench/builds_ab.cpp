// bnorm-builds-ab: an A/B of two or more builds of the library in one process, call by call.
//
//   bnorm-builds-ab SHAPE ROUNDS liba.so libb.so [more.so ...]      (bench/builds_ab.sh makes the .so files)
//   env OPS=stats,infer,train,backward (default all), LAYOUTS=nchw,nhwc, DTYPES=f32,bf16
//
// Why in one process: on the shared 2-core machines the host's memory bandwidth drifts by 10-30% over
// minutes, so that two builds timed in alternating processes disagree more than the change being
// measured. Here every round calls each build once, in an order that rotates, so that the drift hits
// every build alike; the ratio of each round (build / first build) is paired, and its median comes with
// a 95% interval from order statistics (the ranks n/2 -+ 0.98 sqrt(n), distribution-free).
// Each build is loaded with RTLD_LOCAL and must be linked with -Bsymbolic, so that it calls its own
// kernels. Before timing, each op's outputs are compared bit for bit with the first build's: "same bits"
// or "DIFFERENT" (a refactor that should not change results says so).
#include <bnorm/bnorm.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using StatsFn = void (*)(bnorm::ConstTensorView, bnorm::VectorView, bnorm::VectorView);
using InferFn = void (*)(bnorm::ConstTensorView, bnorm::TensorView, bnorm::FrozenStats, bnorm::Affine, double,
                         bnorm::Activation);
using TrainFn = void (*)(bnorm::ConstTensorView, bnorm::TensorView, bnorm::RunningStats, bnorm::Affine, bnorm::Options,
                         bnorm::SavedStats, bnorm::ConstTensorView);
using BackwardFn = void (*)(bnorm::ConstTensorView, const bnorm::ForwardState&, bnorm::Options, bnorm::TensorView,
                            bnorm::ParamGrads);

struct Build {
  std::string name;
  StatsFn stats;
  InferFn infer;
  TrainFn train;
  BackwardFn backward;
};

template <class F>
F symbol(void* lib, const char* mangled, const char* path) {
  void* p = dlsym(lib, mangled);
  if (!p) {
    std::fprintf(stderr, "bnorm-builds-ab: %s has no %s\n", path, mangled);
    std::exit(2);
  }
  return reinterpret_cast<F>(p);
}

Build load_build(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::fprintf(stderr, "bnorm-builds-ab: %s\n", dlerror());
    std::exit(2);
  }
  return {path, symbol<StatsFn>(lib, "_ZN5bnorm11batch_statsENS_15ConstTensorViewENS_10VectorViewES1_", path),
          symbol<InferFn>(lib, "_ZN5bnorm20batch_norm_inferenceENS_15ConstTensorViewENS_10TensorViewENS_11FrozenStatsENS_6AffineEdNS_10ActivationE", path),
          symbol<TrainFn>(lib, "_ZN5bnorm10batch_normENS_15ConstTensorViewENS_10TensorViewENS_12RunningStatsENS_6AffineENS_7OptionsENS_10SavedStatsES0_", path),
          symbol<BackwardFn>(lib, "_ZN5bnorm19batch_norm_backwardENS_15ConstTensorViewERKNS_12ForwardStateENS_7OptionsENS_10TensorViewENS_10ParamGradsE", path)};
}

bool selected(const char* env, const char* name) {
  const char* list = std::getenv(env);
  return !list || std::strstr(list, name) != nullptr;
}

// 64-byte aligned, first-touched buffer.
template <class T>
T* buffer(std::int64_t n) {
  T* p = static_cast<T*>(std::aligned_alloc(64, static_cast<std::size_t>((n * static_cast<std::int64_t>(sizeof(T)) + 63) / 64 * 64)));
  std::memset(p, 0, static_cast<std::size_t>(n) * sizeof(T));
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t N = 0, C = 0, H = 0, W = 0;
  if (argc < 4 || std::sscanf(argv[1], "%ldx%ldx%ldx%ld", &N, &C, &H, &W) != 4 || std::atoi(argv[2]) < 3) {
    std::fprintf(stderr, "usage: bnorm-builds-ab NxCxHxW ROUNDS(>=3) a.so b.so [...]  (env OPS, LAYOUTS, DTYPES)\n");
    return 2;
  }
  const int rounds = std::atoi(argv[2]);
  std::vector<Build> builds;
  for (int i = 3; i < argc; ++i) builds.push_back(load_build(argv[i]));
  const std::int64_t n = N * C * H * W;
  float* x = buffer<float>(n);
  float* dy = buffer<float>(n);
  float* y = buffer<float>(n);
  float* y_first = buffer<float>(n);
  for (std::int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>((i * 7919) % 1000) * 1e-3f + 2.0f;
    dy[i] = static_cast<float>((i * 104729) % 997) * 1e-3f - 0.5f;
  }
  std::uint16_t* xb = buffer<std::uint16_t>(n);
  std::uint16_t* dyb = buffer<std::uint16_t>(n);
  for (std::int64_t i = 0; i < n; ++i) {
    xb[i] = bnorm::bfloat16::from_float(x[i]).bits;
    dyb[i] = bnorm::bfloat16::from_float(dy[i]).bits;
  }
  const auto Cs = static_cast<std::size_t>(C);
  std::vector<float> running_mean(Cs, 0.f), running_var(Cs, 1.f), weight(Cs, 1.25f), bias(Cs, 0.5f), dweight(Cs),
      dbias(Cs);
  std::vector<double> saved_mean(Cs), saved_invstd(Cs), stats_mean(Cs), stats_var(Cs);

  std::printf("bnorm-builds-ab: %s, %d rounds; ms medians, then each build's median per-round ratio to the first "
              "build [95%% interval]\n%-22s", argv[1], rounds, "op");
  for (const Build& b : builds) std::printf(" %14s", b.name.substr(b.name.rfind('/') + 1).c_str());
  std::printf("\n");
  const char* op_names[] = {"stats", "infer", "train", "backward"};
  for (bnorm::Layout layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
    const bool cf = layout == bnorm::Layout::ChannelsFirst;
    if (!selected("LAYOUTS", cf ? "nchw" : "nhwc")) continue;
    for (int bf16 = 0; bf16 < 2; ++bf16) {
      if (!selected("DTYPES", bf16 ? "bf16" : "f32")) continue;
      const bnorm::DType dt = bf16 ? bnorm::DType::BFloat16 : bnorm::DType::Float32;
      const bnorm::Shape shape{N, C, H, W};
      const bnorm::ConstTensorView X(bf16 ? static_cast<const void*>(xb) : x, dt, shape, layout);
      const bnorm::ConstTensorView DY(bf16 ? static_cast<const void*>(dyb) : dy, dt, shape, layout);
      const bnorm::TensorView Y(y, dt, shape, layout);  // a bf16 output takes the first half of y
      const bnorm::Options options{.training = true, .momentum = 0.1, .eps = 1e-5};
      for (int op = 0; op < 4; ++op) {
        if (!selected("OPS", op_names[op])) continue;
        auto call = [&](const Build& b) {
          switch (op) {
            case 0: b.stats(X, stats_mean, stats_var); break;
            case 1:
              b.infer(X, Y, {.mean = running_mean, .var = running_var}, {.weight = weight, .bias = bias}, 1e-5,
                      bnorm::Activation::None);
              break;
            case 2:
              b.train(X, Y, {.mean = running_mean, .var = running_var}, {.weight = weight, .bias = bias}, options,
                      {.mean = saved_mean, .invstd = saved_invstd}, {});
              break;
            default:
              b.backward(DY, {.input = X, .weight = weight, .saved = {saved_mean, saved_invstd}}, options, Y,
                         {.weight = dweight, .bias = dbias});
          }
        };
        // The saved statistics the backward reads, from the first build.
        builds[0].train(X, Y, {.mean = running_mean, .var = running_var}, {.weight = weight, .bias = bias}, options,
                        {.mean = saved_mean, .invstd = saved_invstd}, {});
        // Bits: each build's output (y, or the statistics) against the first build's, from the same inputs.
        const std::size_t out_bytes = static_cast<std::size_t>(n) * (bf16 ? 2 : 4);
        const std::vector<float> rm0 = running_mean, rv0 = running_var;
        std::vector<double> first_vec;
        bool same = true;
        for (std::size_t i = 0; i < builds.size(); ++i) {
          running_mean = rm0;
          running_var = rv0;
          call(builds[i]);
          std::vector<double> vec(stats_mean);
          vec.insert(vec.end(), stats_var.begin(), stats_var.end());
          vec.insert(vec.end(), dweight.begin(), dweight.end());
          vec.insert(vec.end(), dbias.begin(), dbias.end());
          if (op == 2) {
            vec.insert(vec.end(), saved_mean.begin(), saved_mean.end());
            vec.insert(vec.end(), saved_invstd.begin(), saved_invstd.end());
            vec.insert(vec.end(), running_mean.begin(), running_mean.end());
            vec.insert(vec.end(), running_var.begin(), running_var.end());
          }
          if (i == 0) {
            std::memcpy(y_first, y, out_bytes);
            first_vec = vec;
          } else {
            same = same && (op == 0 || std::memcmp(y_first, y, out_bytes) == 0) &&
                   std::memcmp(first_vec.data(), vec.data(), vec.size() * sizeof(double)) == 0;
          }
        }
        for (const Build& b : builds) call(b);  // warm-up
        std::vector<std::vector<double>> ms(builds.size());
        for (int r = 0; r < rounds; ++r)
          for (std::size_t k = 0; k < builds.size(); ++k) {
            const std::size_t i = (k + static_cast<std::size_t>(r)) % builds.size();
            const auto t0 = std::chrono::steady_clock::now();
            call(builds[i]);
            ms[i].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          }
        char row[64];
        std::snprintf(row, sizeof row, "%s %s %s", cf ? "NCHW" : "NHWC", bf16 ? "bf16" : "f32", op_names[op]);
        std::printf("%-22s", row);
        for (const auto& t : ms) {
          std::vector<double> s = t;
          std::sort(s.begin(), s.end());
          std::printf(" %14.3f", s[s.size() / 2]);
        }
        const int lo = std::max(0, static_cast<int>(std::floor(rounds / 2.0 - 0.98 * std::sqrt(rounds))));
        const int hi = std::min(rounds - 1, static_cast<int>(std::ceil(rounds / 2.0 + 0.98 * std::sqrt(rounds))));
        for (std::size_t i = 1; i < builds.size(); ++i) {
          std::vector<double> q(static_cast<std::size_t>(rounds));
          for (int r = 0; r < rounds; ++r) q[static_cast<std::size_t>(r)] = ms[i][static_cast<std::size_t>(r)] / ms[0][static_cast<std::size_t>(r)];
          std::sort(q.begin(), q.end());
          std::printf("   %.3f [%.3f, %.3f]", q[static_cast<std::size_t>(rounds / 2)], q[static_cast<std::size_t>(lo)],
                      q[static_cast<std::size_t>(hi)]);
        }
        std::printf("   %s\n", builds.size() < 2 ? "" : same ? "same bits" : "DIFFERENT");
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
