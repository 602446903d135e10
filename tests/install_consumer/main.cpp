// A user's program built against the installed library: normalizes a small batch and checks it.
#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8}, y(8);
  bnorm::BatchNorm1d bn(2);
  bn.forward(bnorm::ConstTensorView(x.data(), {4, 2}), bnorm::TensorView(y.data(), {4, 2}));
  const double sum = y[0] + y[2] + y[4] + y[6];
  if (std::abs(sum) > 1e-5) return std::printf("consumer: channel 0 mean %g, expected 0\n", sum / 4), 1;
  std::printf("consumer: ok\n");
  return 0;
}
