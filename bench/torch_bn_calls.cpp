// torch's CPU BatchNorm inference (at::native_batch_norm_out, eval mode, float32 parameters) called R
// times on an N x C x H x H NCHW tensor, 1 thread: the peer of bench/tail_ab.cpp for instruction counts.
// Not part of the build. With T the torch package folder (python3 -c "import torch, os;
// print(os.path.dirname(torch.__file__))"):
//   g++ -O2 -std=c++20 bench/torch_bn_calls.cpp -I$T/include -I$T/include/torch/csrc/api/include
//       -L$T/lib -Wl,-rpath,$T/lib -ltorch_cpu -lc10 -o torch_bn_calls   (one command)
//   ATEN_CPU_CAPABILITY=avx2 valgrind --tool=callgrind ./torch_bn_calls 8 256 56 <R> <bf16|f32>
// Instructions per value = (total at R=3 - total at R=1) / 2 / (N*C*H*H), as for tail_ab.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  if (argc < 5) return 2;
  const std::int64_t N = std::atoll(argv[1]), C = std::atoll(argv[2]), H = std::atoll(argv[3]);
  const int reps = std::atoi(argv[4]);
  const bool bf16 = argc > 5 && std::string(argv[5]) == "bf16";
  at::set_num_threads(1);
  const at::Tensor x = at::randn({N, C, H, H}).to(bf16 ? at::kBFloat16 : at::kFloat);
  const at::Tensor w = at::ones({C}), b = at::zeros({C}), mean = at::zeros({C}), var = at::ones({C});
  at::Tensor y = at::empty_like(x), saved_mean = at::empty({0}), saved_invstd = at::empty({0});
  for (int r = 0; r < reps; ++r)
    at::native_batch_norm_out(y, saved_mean, saved_invstd, x, w, b, mean, var, false, 0.1, 1e-5);
  return y.numel() == 0 ? 1 : 0;
}
