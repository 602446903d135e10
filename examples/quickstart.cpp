// The README's C++ example, compiled and run by the tests (ctest -R Quickstart) so that it stays true.
#include <bnorm/bnorm.hpp>

#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

int main() {
  const std::int64_t N = 8, C = 64, H = 17, W = 17;
  std::vector<float> data(N * C * H * W), out(data.size()), grad(data.size()), dx(data.size());
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(3.f, 2.f);
  for (float& v : data) v = normal(rng);
  for (float& v : grad) v = normal(rng) * 0.01f;

  bnorm::BatchNorm2d bn(C);                                 // eps 1e-5, momentum 0.1, affine, tracked
  bnorm::ConstTensorView x(data.data(), {N, C, H, W});      // logical NCHW shape; add
  bnorm::TensorView y(out.data(), {N, C, H, W});            //   bnorm::Layout::ChannelsLast for NHWC memory
  bn.forward(x, y);                                         // training: batch statistics, running update
  bn.backward(x, bnorm::ConstTensorView(grad.data(), {N, C, H, W}), bnorm::TensorView(dx.data(), {N, C, H, W}));
  bn.eval();                                                // running statistics from now on
  const std::string path = (std::filesystem::temp_directory_path() / "bnorm_quickstart.safetensors").string();
  bn.save(path);                                            // torch state_dict keys, atomic write

  // The functional form, like torch.nn.functional.batch_norm: the per-channel vectors travel in named
  // structs, so that running and saved statistics cannot be swapped by mistake.
  std::vector<float> running_mean(C, 0.f), running_var(C, 1.f), weight(C, 1.f), bias(C, 0.f);
  std::vector<double> save_mean(C), save_invstd(C);
  // Its positional form, torch's argument order (here on copies of the running statistics):
  std::vector<float> positional_mean = running_mean, positional_var = running_var;
  bnorm::batch_norm(x, y, positional_mean, positional_var, weight, bias, /*training=*/true, 0.1, 1e-5);
  const bnorm::Options options{.training = true, .momentum = 0.1, .eps = 1e-5};
  bnorm::batch_norm(x, y, {.mean = running_mean, .var = running_var}, {.weight = weight, .bias = bias}, options,
                    {.mean = save_mean, .invstd = save_invstd});
  std::vector<float> dweight_f(C), dbias_f(C);
  bnorm::batch_norm_backward(bnorm::ConstTensorView(grad.data(), {N, C, H, W}),
                             {.input = x, .weight = weight, .saved = {save_mean, save_invstd}}, options,
                             bnorm::TensorView(dx.data(), {N, C, H, W}), {.weight = dweight_f, .bias = dbias_f});

  bnorm::BatchNorm2d restored(C);
  restored.load(path);
  std::filesystem::remove(path);
  std::printf("quickstart: y[0] = %.4f, running_mean[0] = %.4f (layer) / %.4f (functional), dgamma[0] = %.4f / %.4f\n",
              static_cast<double>(out[0]), static_cast<double>(restored.running_mean()[0]),
              static_cast<double>(running_mean[0]), static_cast<double>(bn.weight_grad()[0]),
              static_cast<double>(dweight_f[0]));
  // The layer and the functional form ran the same computation on the same batch.
  return restored.running_mean()[0] == running_mean[0] && positional_mean == running_mean &&
                 positional_var == running_var && bn.weight_grad()[0] == dweight_f[0]
             ? 0
             : 1;
}
