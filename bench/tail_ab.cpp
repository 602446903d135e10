// A/B driver for kernel changes: inference (f32, bf16), training forward and backward through the
// public API, channels-first. Not part of the build: compile it against two builds' libbnorm.a,
//   g++ -O2 -std=c++20 -I<src>/include bench/tail_ab.cpp <build>/libbnorm.a -fopenmp -o tb-<name>
// and run `tb-<name> N C H reps [infer|infer_bf16|train|backward|all] [threads]`, for instruction
// counts under `BNORM_ISA=avx2 valgrind --tool=callgrind` (valgrind reports no AVX-512, so the
// AVX-512 rows can only be timed) or for median times.
#include <bnorm/bnorm.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <string>
#include <algorithm>
using namespace bnorm;
int main(int argc, char** argv) {
  const std::int64_t N = argc > 1 ? std::atoll(argv[1]) : 32, C = argc > 2 ? std::atoll(argv[2]) : 512,
                     H = argc > 3 ? std::atoll(argv[3]) : 7;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 50;
  const char* what = argc > 5 ? argv[5] : "all";
  bnorm::set_num_threads(argc > 6 ? std::atoi(argv[6]) : 1);
  Shape shape{N, C, H, H};
  const std::size_t n = static_cast<std::size_t>(N * C * H * H);
  std::vector<float> x(n), y(n), dy(n), dx(n), rm(C, 0.1f), rv(C, 1.2f), w(C, 1.1f), b(C, 0.2f), sm(C), si(C), gw(C), gb(C);
  for (std::size_t i = 0; i < n; ++i) { x[i] = float(i % 97) * 0.1f - 3; dy[i] = float(i % 89) * 0.01f - 0.4f; }
  auto time = [&](const char* name, auto&& f) {
    if (std::string(what) != "all" && std::string(what) != name) return;
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      f();
      t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    std::printf("%-10s %8.1f us\n", name, t[t.size() / 2]);
  };
  const ConstTensorView xin(x.data(), shape);
  time("infer", [&] {
    batch_norm(xin, TensorView(y.data(), shape), RunningStats{VectorView(rm.data(), C), VectorView(rv.data(), C)},
               Affine{VectorView(w.data(), C), VectorView(b.data(), C)}, Options{.training = false});
  });
  std::vector<std::uint16_t> xb(n), yb(n);
  for (std::size_t i = 0; i < n; ++i) { float f = x[i]; std::uint32_t u; std::memcpy(&u, &f, 4); xb[i] = std::uint16_t(u >> 16); }
  time("infer_bf16", [&] {
    batch_norm(ConstTensorView(xb.data(), DType::BFloat16, shape), TensorView(yb.data(), DType::BFloat16, shape),
               RunningStats{VectorView(rm.data(), C), VectorView(rv.data(), C)},
               Affine{VectorView(w.data(), C), VectorView(b.data(), C)}, Options{.training = false});
  });
  time("train", [&] {
    batch_norm(xin, TensorView(y.data(), shape), RunningStats{VectorView(rm.data(), C), VectorView(rv.data(), C)},
               Affine{VectorView(w.data(), C), VectorView(b.data(), C)}, Options{.training = true},
               SavedStats{VectorView(sm.data(), C), VectorView(si.data(), C)});
  });
  time("backward", [&] {
    ForwardState st{.input = xin, .weight = VectorView(w.data(), C)};
    st.saved = {VectorView(sm.data(), C), VectorView(si.data(), C)};
    batch_norm_backward(ConstTensorView(dy.data(), shape), st, Options{.training = true}, TensorView(dx.data(), shape),
                        ParamGrads{VectorView(gw.data(), C), VectorView(gb.data(), C)});
  });
}
