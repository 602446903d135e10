#include <bnorm/bnorm.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
using namespace bnorm;
int main(int argc, char** argv) {
  const std::int64_t N = atoll(argv[1]), C = atoll(argv[2]), H = atoll(argv[3]); int reps = atoi(argv[4]);
  bnorm::set_num_threads(argc > 5 ? atoi(argv[5]) : 1);
  Shape shape{N, C, H, H}; const std::size_t n = N * C * H * H;
  std::vector<std::uint16_t> xb(n), yb(n); std::vector<float> rm(C, 0.1f), rv(C, 1.2f), w(C, 1.1f), b(C, 0.2f), sm(C), si(C);
  for (std::size_t i = 0; i < n; ++i) { float f = float(i % 97) * 0.1f - 3; std::uint32_t u; std::memcpy(&u, &f, 4); xb[i] = std::uint16_t(u >> 16); }
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    batch_norm(ConstTensorView(xb.data(), DType::BFloat16, shape), TensorView(yb.data(), DType::BFloat16, shape),
               RunningStats{VectorView(rm.data(), C), VectorView(rv.data(), C)}, Affine{VectorView(w.data(), C), VectorView(b.data(), C)},
               Options{.training = true}, SavedStats{VectorView(sm.data(), C), VectorView(si.data(), C)});
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end()); printf("bf16 train %lldx%lldx%lldx%lld: %.1f us\n", (long long)N, (long long)C, (long long)H, (long long)H, t[t.size() / 2]);
}
