// bnorm::fold_into_producer / fold_into_consumer (include/bnorm/fold.hpp) against float64 references
// computed here without the folding algebra: a direct (transposed) convolution of random inputs,
// once with the folded weights and once with the layer and the BatchNorm applied one after the other.
#include "test_util.hpp"

#include <bnorm/fold.hpp>

#include <bit>
#include <cmath>
#include <limits>

namespace bnorm::test {
namespace {

using Index = std::vector<std::int64_t>;

// Calls f(index) for every multi-index below `sizes` (row-major, once for no dims).
template <class F>
void for_each_index(const Index& sizes, F f) {
  Index i(sizes.size(), 0);
  for (const std::int64_t s : sizes)
    if (s == 0) return;
  while (true) {
    f(i);
    std::size_t d = sizes.size();
    while (d > 0 && ++i[d - 1] == sizes[d - 1]) i[--d] = 0;
    if (d == 0) return;
  }
}

std::int64_t flat(const Index& i, const Index& sizes) {
  std::int64_t r = 0;
  for (std::size_t d = 0; d < sizes.size(); ++d) r = r * sizes[d] + i[d];
  return r;
}

std::int64_t product(const Index& v) {
  std::int64_t p = 1;
  for (const std::int64_t x : v) p *= x;
  return p;
}

// A convolution (torch's Conv{1,2,3}d / Linear with no spatial dims: weight (C_out, C_in/g, k...)) or a
// transposed one (ConvTranspose, Gemm transB=0: weight (C_in, C_out/g, k...)), of one example x (C_in,
// spatial...), in float64. Writes the output's spatial sizes into out_sizes.
struct Conv {
  Index kernel, stride, dilation, padding;
  std::int64_t groups = 1;
  bool transposed = false;

  std::vector<double> operator()(const std::vector<double>& x, std::int64_t c_in, const Index& in_sizes,
                                 const std::vector<double>& w, std::int64_t c_out, const std::vector<double>& b,
                                 Index& out_sizes) const {
    const std::size_t r = in_sizes.size();
    out_sizes.assign(r, 0);
    for (std::size_t d = 0; d < r; ++d) {
      const std::int64_t span = dilation[d] * (kernel[d] - 1) + 1;
      out_sizes[d] = transposed ? (in_sizes[d] - 1) * stride[d] + span : (in_sizes[d] + 2 * padding[d] - span) / stride[d] + 1;
    }
    const std::int64_t S = product(out_sizes), cin_g = c_in / groups, cout_g = c_out / groups;
    std::vector<double> y(static_cast<std::size_t>(c_out * S));
    for (std::int64_t o = 0; o < c_out; ++o)
      for (std::int64_t s = 0; s < S; ++s) y[static_cast<std::size_t>(o * S + s)] = b.empty() ? 0.0 : b[static_cast<std::size_t>(o)];
    const Index& outer = transposed ? in_sizes : out_sizes;  // the positions the loop runs over
    for (std::int64_t o = 0; o < c_out; ++o)
      for (std::int64_t ic = 0; ic < cin_g; ++ic) {
        const std::int64_t i = o / cout_g * cin_g + ic, j = o % cout_g;
        for_each_index(outer, [&](const Index& p) {
          for_each_index(kernel, [&](const Index& k) {
            Index q(r);
            for (std::size_t d = 0; d < r; ++d) {
              q[d] = transposed ? p[d] * stride[d] + k[d] * dilation[d] : p[d] * stride[d] - padding[d] + k[d] * dilation[d];
              if (q[d] < 0 || q[d] >= (transposed ? out_sizes[d] : in_sizes[d])) return;
            }
            const std::int64_t kf = flat(k, kernel);
            const std::int64_t wi = transposed ? (i * cout_g + j) * product(kernel) + kf : (o * cin_g + ic) * product(kernel) + kf;
            const std::int64_t xi = i * product(in_sizes) + flat(transposed ? p : q, in_sizes);
            const std::int64_t yi = o * S + flat(transposed ? q : p, out_sizes);
            y[static_cast<std::size_t>(yi)] += w[static_cast<std::size_t>(wi)] * x[static_cast<std::size_t>(xi)];
          });
        });
      }
    return y;
  }
};

// BN in eval, straight from its formula, on (C, S) values.
struct BN {
  std::vector<double> mean, var, gamma, beta;
  double eps = 1e-5;
  std::vector<double> operator()(const std::vector<double>& x) const {
    const std::size_t C = mean.size(), S = x.size() / C;
    std::vector<double> y(x.size());
    for (std::size_t c = 0; c < C; ++c)
      for (std::size_t s = 0; s < S; ++s)
        y[c * S + s] = (x[c * S + s] - mean[c]) / std::sqrt(var[c] + eps) * (gamma.empty() ? 1.0 : gamma[c]) +
                       (beta.empty() ? 0.0 : beta[c]);
    return y;
  }
};

std::vector<double> uniform(std::size_t n, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = u(rng);
  return v;
}

BN random_bn(std::int64_t C, std::mt19937_64& rng, bool affine = true) {
  const auto n = static_cast<std::size_t>(C);
  BN bn{uniform(n, rng, -2, 2), uniform(n, rng, 0.05, 4), {}, {}, 1e-5};
  if (affine) {
    bn.gamma = uniform(n, rng, -2, 2);
    bn.beta = uniform(n, rng, -1, 1);
  }
  return bn;
}

FoldBatchNorm view_of(const BN& bn) {
  return {bn.mean, bn.var, bn.gamma.empty() ? ConstVectorView{} : ConstVectorView(bn.gamma),
          bn.beta.empty() ? ConstVectorView{} : ConstVectorView(bn.beta), bn.eps};
}

double max_relative(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double scale = 0, worst = 0;
  for (const double v : b) scale = std::max(scale, std::fabs(v));
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  return worst / std::max(scale, 1e-300);
}

struct Case {
  std::string name;
  std::int64_t c_in, c_out;
  Index in_sizes;
  Conv conv;
  bool bias;
  bool consumer;  // BN before the layer
};

Index weight_shape(const Case& k) {
  Index s = k.conv.transposed ? Index{k.c_in, k.c_out / k.conv.groups} : Index{k.c_out, k.c_in / k.conv.groups};
  s.insert(s.end(), k.conv.kernel.begin(), k.conv.kernel.end());
  return s;
}

// Folds in float64 and checks that the folded layer computes what the layer and the BN compute.
void check_case(const Case& k, std::uint64_t seed) {
  SCOPED_TRACE(k.name);
  std::mt19937_64 rng(seed);
  const Index ws = weight_shape(k);
  const std::vector<double> w = uniform(static_cast<std::size_t>(product(ws)), rng, -1, 1);
  const std::vector<double> b = k.bias ? uniform(static_cast<std::size_t>(k.c_out), rng, -1, 1) : std::vector<double>{};
  const std::vector<double> x = uniform(static_cast<std::size_t>(k.c_in * product(k.in_sizes)), rng, -3, 3);
  const BN bn = random_bn(k.consumer ? k.c_in : k.c_out, rng, seed % 2 == 0);
  std::vector<double> fw(w.size()), fb(static_cast<std::size_t>(k.c_out));
  const FoldLayer layer{ConstTensorView(w.data(), Shape(std::span<const std::int64_t>(ws))),
                        k.bias ? ConstVectorView(b) : ConstVectorView{},
                        k.conv.transposed ? WeightLayout::InOut : WeightLayout::OutIn, k.conv.groups};
  const TensorView out(fw.data(), Shape(std::span<const std::int64_t>(ws)));
  if (k.consumer)
    fold_into_consumer(layer, view_of(bn), out, fb);
  else
    fold_into_producer(layer, view_of(bn), out, fb);
  Index sizes;
  const std::vector<double> expected = k.consumer ? k.conv(bn(x), k.c_in, k.in_sizes, w, k.c_out, b, sizes)
                                                  : bn(k.conv(x, k.c_in, k.in_sizes, w, k.c_out, b, sizes));
  const std::vector<double> folded = k.conv(x, k.c_in, k.in_sizes, fw, k.c_out, fb, sizes);
  ASSERT_GT(expected.size(), 0u);
  EXPECT_LT(max_relative(folded, expected), 1e-13);
}

Conv conv(Index kernel, Index stride, Index dilation, std::int64_t groups, bool transposed = false) {
  return {kernel, stride, dilation, Index(kernel.size(), 0), groups, transposed};
}

TEST(Fold, ConvOfEveryRankWithGroupsDilationAndStrideAbsorbsTheBatchNormAfterIt) {
  const Case cases[] = {
      {"conv1d groups 2 dilation 2", 4, 6, {11}, conv({3}, {1}, {2}, 2), true, false},
      {"conv2d depthwise no bias", 6, 6, {7, 6}, conv({3, 3}, {2, 1}, {1, 2}, 6), false, false},
      {"conv2d groups 3 padded", 6, 9, {5, 5}, {{3, 3}, {1, 1}, {1, 1}, {1, 1}, 3, false}, true, false},
      {"conv3d", 3, 4, {4, 5, 3}, conv({2, 3, 1}, {1, 2, 1}, {1, 1, 2}, 1), true, false},
      {"linear (no spatial dims)", 5, 7, {}, conv({}, {}, {}, 1), true, false},
      {"linear no bias", 5, 7, {}, conv({}, {}, {}, 1), false, false},
  };
  std::uint64_t seed = 1;
  for (const Case& k : cases) check_case(k, seed++);
}

TEST(Fold, ConvTransposeWithGroupsAndStrideAbsorbsTheBatchNormAfterIt) {
  const Case cases[] = {
      {"convtranspose1d groups 2 stride 2", 4, 6, {5}, conv({3}, {2}, {1}, 2, true), true, false},
      {"convtranspose2d groups 3 stride (2, 3) dilation 2", 6, 9, {3, 4}, conv({3, 2}, {2, 3}, {2, 1}, 3, true), false, false},
      {"convtranspose2d depthwise", 4, 4, {3, 3}, conv({2, 2}, {2, 2}, {1, 1}, 4, true), true, false},
      {"convtranspose3d groups 2", 2, 4, {2, 3, 2}, conv({2, 1, 2}, {1, 2, 2}, {1, 1, 1}, 2, true), true, false},
      {"gemm transB=0 (in, out)", 5, 3, {}, conv({}, {}, {}, 1, true), true, false},
  };
  std::uint64_t seed = 11;
  for (const Case& k : cases) check_case(k, seed++);
}

TEST(Fold, LayerWithoutPaddingAbsorbsTheBatchNormBeforeIt) {
  const Case cases[] = {
      {"conv2d groups 2 stride 2 dilation 2", 4, 6, {9, 8}, conv({3, 2}, {2, 2}, {2, 1}, 2), true, true},
      {"conv1d depthwise no bias", 3, 6, {10}, conv({3}, {1}, {1}, 3), false, true},
      {"conv3d", 2, 3, {3, 4, 3}, conv({2, 2, 2}, {1, 1, 1}, {1, 1, 1}, 1), true, true},
      {"linear", 6, 4, {}, conv({}, {}, {}, 1), true, true},
      {"gemm transB=0", 6, 4, {}, conv({}, {}, {}, 1, true), false, true},
  };
  std::uint64_t seed = 21;
  for (const Case& k : cases) check_case(k, seed++);
}

// The folded weights of one Conv, rounded to float32 and bfloat16, are the nearest values to the float64
// ones (one rounding).
double nearest_bfloat16(double v) {
  const bfloat16 guess = bfloat16::from_float(static_cast<float>(v));
  double best = guess.to_float();
  for (const int step : {-1, 1}) {
    const double other = bfloat16{static_cast<std::uint16_t>(guess.bits + step)}.to_float();
    if (std::fabs(other - v) < std::fabs(best - v)) best = other;
  }
  return best;
}

TEST(Fold, RoundsOnceToTheOutputDtype) {
  std::mt19937_64 rng(5);
  const std::int64_t C = 8;
  const Index ws{C, 3, 3};
  const std::vector<double> w = uniform(24 * 3, rng, -1, 1), b = uniform(C, rng, -1, 1);
  const BN bn = random_bn(C, rng);
  std::vector<double> fw(w.size()), fb(C);
  const Shape shape{std::span<const std::int64_t>(ws)};
  const FoldLayer layer{.weight = ConstTensorView(w.data(), shape), .bias = b};
  fold_into_producer(layer, view_of(bn), TensorView(fw.data(), shape), fb);
  std::vector<float> w32(w.size()), b32(C);
  fold_into_producer(layer, view_of(bn), TensorView(w32.data(), shape), b32);
  std::vector<bfloat16> w16(w.size()), b16(C);
  fold_into_producer(layer, view_of(bn), TensorView(w16.data(), shape), VectorView(b16.data(), C));
  for (std::size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(w32[i], static_cast<float>(fw[i])) << i;
    EXPECT_EQ(static_cast<double>(w16[i].to_float()), nearest_bfloat16(fw[i])) << i;
  }
  for (std::size_t o = 0; o < static_cast<std::size_t>(C); ++o) {
    EXPECT_EQ(b32[o], static_cast<float>(fb[o])) << o;
    EXPECT_EQ(static_cast<double>(b16[o].to_float()), nearest_bfloat16(fb[o])) << o;
  }
  // 1 + 2^-8 + 2^-30 lies just above the midpoint of the bfloat16 values 1 and 1 + 2^-7: rounded to
  // float32 first it would be the midpoint, and then 1 (to even).
  const double tricky = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30);
  const std::vector<double> one{tricky}, zero{0.0}, unit{1.0};
  bfloat16 out{}, out_b{};
  fold_into_producer({.weight = ConstTensorView(one.data(), Shape{1, 1})}, {.running_mean = zero, .running_var = unit, .eps = 0.0},
                     TensorView(&out, Shape{1, 1}), VectorView(&out_b, 1));
  EXPECT_EQ(out.bits, 0x3f81);
  EXPECT_EQ(out_b.bits, 0);
}

TEST(Fold, Float32AndBFloat16InputsAreReadExactly) {
  // A float32 weight and bfloat16 statistics: the reference reads the same values as doubles.
  const std::vector<float> w{0.1f, -0.7f, 1.3f, 2.5f, -3.25f, 0.02f};
  const std::vector<bfloat16> mean{bfloat16::from_float(0.3f), bfloat16::from_float(-1.1f)};
  const std::vector<float> var{0.5f, 2.0f};
  std::vector<double> fw(6), fb(2);
  fold_into_producer({.weight = ConstTensorView(w.data(), Shape{2, 3})},
                     {.running_mean = ConstVectorView(mean.data(), 2), .running_var = var, .eps = 1e-3},
                     TensorView(fw.data(), Shape{2, 3}), fb);
  for (std::size_t i = 0; i < 6; ++i) {
    const std::size_t o = i / 3;
    EXPECT_DOUBLE_EQ(fw[i], static_cast<double>(w[i]) / std::sqrt(static_cast<double>(var[o]) + 1e-3));
  }
  EXPECT_DOUBLE_EQ(fb[1], -static_cast<double>(mean[1].to_float()) / std::sqrt(2.0 + 1e-3));
}

TEST(Fold, InPlaceGivesTheSameValues) {
  std::mt19937_64 rng(9);
  const std::vector<double> w0 = uniform(4 * 2 * 3, rng, -1, 1), b0 = uniform(4, rng, -1, 1);
  const BN bn = random_bn(4, rng);
  const Shape shape{4, 2, 3};
  for (const bool consumer : {false, true}) {
    const BN& used = consumer ? random_bn(4, rng) : bn;
    std::vector<double> fw(w0.size()), fb(4), w = w0, b = b0;
    const FoldLayer apart{ConstTensorView(w0.data(), shape), b0, WeightLayout::OutIn, consumer ? 2 : 1};
    const FoldLayer in_place{ConstTensorView(w.data(), shape), b, WeightLayout::OutIn, consumer ? 2 : 1};
    auto f = consumer ? &fold_into_consumer : &fold_into_producer;
    f(apart, view_of(used), TensorView(fw.data(), shape), fb);
    f(in_place, view_of(used), TensorView(w.data(), shape), b);
    EXPECT_EQ(w, fw);
    EXPECT_EQ(b, fb);
  }
}

TEST(Fold, RunningVarNearZeroWithEps) {
  // var = 0 with eps: s = gamma / sqrt(eps), large but finite and exact in float64.
  const std::vector<double> w{1.0, 2.0}, mean{0.5}, var{0.0}, gamma{1.0}, beta{0.25};
  std::vector<double> fw(2), fb(1);
  fold_into_producer({.weight = ConstTensorView(w.data(), Shape{1, 2})}, {mean, var, gamma, beta, 1e-5},
                     TensorView(fw.data(), Shape{1, 2}), fb);
  EXPECT_DOUBLE_EQ(fw[1], 2.0 / std::sqrt(1e-5));
  EXPECT_DOUBLE_EQ(fb[0], -0.5 / std::sqrt(1e-5) + 0.25);
}

TEST(Fold, ErrorsNameTheArgumentAndChangeNothing) {
  std::vector<double> w(12, 1.0), b(4, 0.5), mean(4, 0.0), var(4, 1.0), fw(12, 7.0), fb(4, 7.0);
  const Shape shape{4, 3};
  const FoldLayer layer{.weight = ConstTensorView(w.data(), shape), .bias = b};
  const FoldBatchNorm bn{.running_mean = mean, .running_var = var};
  const TensorView out(fw.data(), shape);
  auto producer = [&](const FoldLayer& l, const FoldBatchNorm& n, TensorView ow, VectorView ob) {
    return error_of([&] { fold_into_producer(l, n, ow, ob); });
  };
  EXPECT_EQ(producer({.weight = ConstTensorView(w.data(), Shape{12})}, bn, out, fb),
            "bnorm::fold_into_producer: layer.weight: expected a weight of rank >= 2 ((C_out, C_in / groups, k...) or "
            "(C_in, C_out / groups, k...)), got rank 1 with shape [12]");
  EXPECT_EQ(producer({layer.weight, b, WeightLayout::OutIn, 3}, bn, out, fb),
            "bnorm::fold_into_producer: layer.groups: expected a divisor of the weight's dim 0 (4), got 3");
  EXPECT_EQ(producer({layer.weight, b, WeightLayout::OutIn, 0}, bn, out, fb),
            "bnorm::fold_into_producer: layer.groups: expected a value >= 1, got 0");
  // An empty weight whose dim 1 times groups overflows: said as such, not as a divisor problem.
  const Shape huge{0, std::int64_t{1} << 62};
  EXPECT_EQ(producer({ConstTensorView(w.data(), huge), {}, WeightLayout::OutIn, 4}, bn, TensorView(fw.data(), huge), fb),
            "bnorm::fold_into_producer: layer.groups: expected a value whose product with the weight's dim 1 "
            "(4611686018427387904) fits in int64, got 4");
  EXPECT_EQ(producer({.weight = layer.weight, .bias = ConstVectorView(b.data(), 3)}, bn, out, fb),
            "bnorm::fold_into_producer: layer.bias: expected 4 values (one per channel), got 3");
  EXPECT_EQ(producer(layer, {.running_mean = ConstVectorView(mean.data(), 3), .running_var = var}, out, fb),
            "bnorm::fold_into_producer: bn.running_mean: expected 4 values (one per channel), got 3");
  EXPECT_EQ(producer(layer, {.running_mean = mean}, out, fb),
            "bnorm::fold_into_producer: bn.running_var: expected 4 values (one per channel), got none");
  EXPECT_EQ(producer(layer, {mean, var, {}, {}, -1.0}, out, fb),
            "bnorm::fold_into_producer: bn.eps: expected a finite value >= 0, got -1");
  std::vector<double> bad_var{1.0, 1.0, -2.0, 1.0};
  EXPECT_EQ(producer(layer, {mean, bad_var, {}, {}, 1.0}, out, fb),
            "bnorm::fold_into_producer: bn.running_var: expected running_var + eps > 0 in every channel, got -1 in "
            "channel 2");
  std::vector<double> nan_var{1.0, std::nan(""), 1.0, 1.0};
  EXPECT_NE(producer(layer, {.running_mean = mean, .running_var = nan_var}, out, fb).find("bn.running_var: expected running_var + eps > 0"),
            std::string::npos);
  EXPECT_EQ(producer(layer, bn, TensorView(fw.data(), Shape{3, 4}), fb),
            "bnorm::fold_into_producer: out_weight: expected layer.weight's shape [4, 3], got [3, 4]");
  EXPECT_EQ(producer(layer, bn, out, {}),
            "bnorm::fold_into_producer: out_bias: expected 4 values (one per channel), got none");
  EXPECT_EQ(producer(layer, bn, TensorView(w.data() + 1, shape), fb),
            "bnorm::fold_into_producer: out_weight: expected memory disjoint from layer.weight, got an overlap");
  EXPECT_EQ(producer(layer, bn, out, VectorView(mean.data(), 4)),
            "bnorm::fold_into_producer: out_bias: expected memory disjoint from bn.running_mean, got an overlap");
  EXPECT_EQ(producer(layer, bn, out, VectorView(fw.data() + 8, 4)),
            "bnorm::fold_into_producer: out_weight: expected memory disjoint from out_bias, got an overlap");
  EXPECT_EQ(error_of([&] {
              fold_into_consumer({.weight = ConstTensorView(w.data(), Shape{2, 2, 3}), .layout = WeightLayout::InOut}, bn, out, fb);
            }),
            "bnorm::fold_into_consumer: layer.weight: expected a WeightLayout::InOut weight of rank 2 (Gemm, MatMul): a "
            "transposed convolution cannot absorb the BatchNorm in front of it exactly, got rank 3");
  EXPECT_EQ(error_of([&] { fold_into_consumer(layer, bn, out, fb); }),
            "bnorm::fold_into_consumer: bn.running_mean: expected 3 values (one per channel), got 4");
  for (const double v : fw) EXPECT_EQ(v, 7.0);  // nothing written by any failed call
  for (const double v : fb) EXPECT_EQ(v, 7.0);
  // An ErrorKind::Type for a dtype that is none of the three.
  try {
    fold_into_producer({.weight = ConstTensorView(w.data(), static_cast<DType>(9), shape)}, bn, out, fb);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Type);
    EXPECT_EQ(std::string(e.what()),
              "bnorm::fold_into_producer: layer.weight: expected dtype float32, float64 or bfloat16, got unsupported dtype(9)");
  }
}

}  // namespace
}  // namespace bnorm::test
