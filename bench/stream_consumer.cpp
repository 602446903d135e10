// bnorm-stream-ab: the stream threshold's evidence from the consumer's side. For each output size,
// the median time of an inference batch_norm (float32, channels-first, rows of whole cache lines)
// followed by a read of its whole output (the next layer), over `reps` repetitions. Run it with
// BNORM_STREAM_BYTES=0 (every output streamed) and with a huge value (none streamed), alternating
// processes (bench/stream_ab.sh does), to see where streaming starts to pay once the consumer is
// counted (BENCHMARKS.md, "Non-temporal stores").
//
//   bnorm-stream-ab [reps] [MiB...]      default: 30 repetitions of 4 8 16 32 64 MiB
#include <bnorm/bnorm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 30;
  std::vector<long> sizes;
  for (int i = 2; i < argc; ++i) sizes.push_back(std::atol(argv[i]));
  if (sizes.empty()) sizes = {4, 8, 16, 32, 64};
  if (reps < 1) {
    std::fprintf(stderr, "bnorm-stream-ab: reps: expected a positive count, got '%s'\n", argv[1]);
    return 2;
  }
  const std::int64_t N = 32, C = 64;
  for (const long mib : sizes) {
    const std::int64_t S = (mib << 20) / 4 / (N * C);  // a multiple of 16 floats for these sizes
    const std::size_t n = static_cast<std::size_t>(N * C * S);
    std::vector<float> x(n), y(n), mean(C, 0.5f), var(C, 2.0f), w(C, 1.5f), b(C, 0.25f);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 251) * 0.01f;
    const bnorm::ConstTensorView xv(x.data(), {N, C, S});
    const bnorm::TensorView yv(y.data(), {N, C, S});
    std::vector<double> t;
    double sink = 0;
    for (int r = 0; r < reps + 2; ++r) {  // 2 warm-up calls
      const auto t0 = std::chrono::steady_clock::now();
      bnorm::batch_norm(xv, yv, mean, var, w, b, /*training=*/false, 0.1, 1e-5);
      float sum = 0;
      for (std::size_t i = 0; i < n; ++i) sum += y[i];
      sink += sum;
      if (r >= 2) t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    std::printf("%ld MiB %.4f ms (%g)\n", mib, t[t.size() / 2], sink > 0 ? 0.0 : 1.0);
  }
  return 0;
}
