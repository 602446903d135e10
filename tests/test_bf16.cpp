// bfloat16 storage: the conversion, and every kernel path (both layouts, fused and unfused, ReLU,
// each instruction set) against the float64 reference on the same bfloat16 values.
#include "test_util.hpp"

#include "kernels/kernels.hpp"

#include <bit>
#include <limits>

namespace bnorm::test {
namespace {

std::uint16_t bits_of(float f) { return bfloat16::from_float(f).bits; }

TEST(BFloat16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(bits_of(1.0f), 0x3f80);
  EXPECT_EQ(bits_of(1.00390625f), 0x3f80);  // 1 + 2^-8: halfway between 0x3f80 and 0x3f81, to even
  EXPECT_EQ(bits_of(1.01171875f), 0x3f82);  // 1 + 3 * 2^-8: halfway between 0x3f81 and 0x3f82, to even
  EXPECT_EQ(bits_of(std::nextafter(1.00390625f, 2.f)), 0x3f81);  // just above halfway
  EXPECT_EQ(bits_of(-2.5f), 0xc020);
  EXPECT_EQ(bits_of(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bits_of(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(bits_of(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to Inf
  const bfloat16 nan = bfloat16::from_float(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(nan.to_float()));
  // A signalling NaN whose payload sits only in the low 16 bits must not become Inf.
  EXPECT_TRUE(std::isnan(bfloat16::from_float(std::bit_cast<float>(0x7f800001u)).to_float()));
  for (std::uint32_t b = 0; b < 0x10000; b += 7) {  // every finite bfloat16 converts back to itself
    const bfloat16 v{static_cast<std::uint16_t>(b)};
    if (std::isfinite(v.to_float())) {
      EXPECT_EQ(bfloat16::from_float(v.to_float()).bits, v.bits);
    }
  }
}

struct Case {
  Layout layout;
  bool relu;
  int threads;
};

// Training forward and backward on bfloat16 tensors with float32 vectors, against the reference on
// the same (bfloat16-representable) values. Outputs carry one bfloat16 rounding (2^-9 relative);
// statistics and parameter gradients are float32 results of float32 arithmetic.
void check_bf16(const Dims& d, const Case& k, std::uint64_t seed) {
  SCOPED_TRACE(d.str() + (k.layout == Layout::ChannelsLast ? " CL" : " CF") + (k.relu ? " relu" : "") + " threads " +
               std::to_string(k.threads));
  ThreadScope threads(k.threads);
  std::mt19937_64 rng(seed);
  const std::int64_t C = d.C();
  const std::vector<double> x = round_to_bf16(random_input<float>(d, rng));
  const std::vector<double> dy = round_to_bf16(random_input<float>(d, rng, 0.5));
  const std::vector<double> w = random_vector<float>(C, rng, 0.5, 1.5), b = random_vector<float>(C, rng, -1, 1);
  const std::vector<double> rm0(static_cast<std::size_t>(C), 0.0), rv0(static_cast<std::size_t>(C), 1.0);
  const reference::Problem p{d.N(), C, d.S(), true, 0.1, 1e-5, k.relu};
  const reference::Forward ref = reference::forward(p, x, w, b, rm0, rv0);
  const reference::Backward rb = reference::backward(p, x, w, ref, dy);

  const Shape s = d.view_shape();
  const std::vector<bfloat16> xm = to_bf16(x, d, k.layout), dym = to_bf16(dy, d, k.layout);
  std::vector<bfloat16> y(xm.size()), dx(xm.size());
  std::vector<float> wt = cast<float>(w), bt = cast<float>(b), rm = cast<float>(rm0), rv = cast<float>(rv0);
  std::vector<float> sm(static_cast<std::size_t>(C)), si(sm.size()), gw(sm.size()), gb(sm.size());
  const Activation act = k.relu ? Activation::Relu : Activation::None;
  batch_norm(ConstTensorView(xm.data(), s, k.layout), TensorView(y.data(), s, k.layout), {rm, rv}, {wt, bt},
             {.training = true, .activation = act}, {VectorView(sm), VectorView(si)});
  const double t = tol<float>(), half_ulp = 1.0 / 256;
  EXPECT_TRUE(close(from_bf16(y, d, k.layout), ref.y, half_ulp, half_ulp, "y"));
  EXPECT_TRUE(close(widen(sm), ref.mean, 10 * t, 10 * t, "save_mean"));
  EXPECT_TRUE(close(widen(si), ref.invstd, 10 * t, 10 * t, "save_invstd"));
  EXPECT_TRUE(close(widen(rv), ref.running_var, 10 * t, 10 * t, "running_var"));

  // Backward through the ReLU needs the forward's output: the reference's own, rounded as stored.
  const std::vector<bfloat16> out = to_bf16(ref.y, d, k.layout);
  batch_norm_backward(ConstTensorView(dym.data(), s, k.layout),
                      {.input = ConstTensorView(xm.data(), s, k.layout),
                       .output = k.relu ? ConstTensorView(out.data(), s, k.layout) : ConstTensorView(),
                       .weight = wt,
                       .saved = {ConstVectorView(sm), ConstVectorView(si)}},
                      {.training = true, .activation = act}, TensorView(dx.data(), s, k.layout),
                      {VectorView(gw), VectorView(gb)});
  EXPECT_TRUE(close(from_bf16(dx, d, k.layout), rb.dx, half_ulp * std::max(1.0, 2 * max_abs(rb.dx)), half_ulp, "dx"));
  double l1 = 0;
  for (double v : dy) l1 += std::abs(v);
  EXPECT_TRUE(close(widen(gb), rb.dbias, 10 * t * l1, 0, "grad_bias"));
  EXPECT_TRUE(close(widen(gw), rb.dweight, 10 * t * 4 * l1, 0, "grad_weight"));
}

TEST(BFloat16, EveryPathAgainstReferenceEveryIsa) {
  for_each_supported_isa([](kernels::Isa) {
    // Short and long rows, C of one tile and of several (with a scalar tail), 2-D, and a channel too
    // large for the fused channels-first path.
    for (const Dims& d : {Dims{{4, 5, 33}}, Dims{{3, 300, 2, 3}}, Dims{{64, 17}}, Dims{{2, 3, 70001}}})
      for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
        for (bool relu : {false, true})
          for (int threads : {1, 2}) check_bf16(d, {layout, relu, threads}, 17);
  });
}

// Every build stores the bits bfloat16::from_float gives. The avx512bf16 build converts with
// VCVTNEPS2BF16, which flushes subnormal inputs to zero, so the scales push part of each channel
// into the subnormal range: a vector holding one must go the integer way. The products are exact in float (8 significant bits
// times a power of two, above 2^-149), so every build computes the same float before rounding.
// A NaN whose payload fills the low bits (a float32 weight 0x7fffffff reaches the output through
// the product) must not round into the sign (0x7fffffff + 0x8000 carries out): the stores keep
// NaN as from_float does, on every ISA, in short rows, long rows and both layouts.
TEST(BFloat16, KernelStoresKeepFullPayloadNaNsOnEveryIsa) {
  const float nan_scale[2] = {std::bit_cast<float>(0x7fffffffu), std::bit_cast<float>(0xffffffffu)};
  const float zero[2] = {};
  for_each_supported_isa([&](kernels::Isa) {
    for (const std::int64_t S : {std::int64_t{13}, std::int64_t{301}})
      for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
        SCOPED_TRACE("S " + std::to_string(S) + " " + to_string(layout));
        const std::int64_t N = 2, C = 2, n = N * C * S;
        std::vector<bfloat16> x(static_cast<std::size_t>(n), bfloat16::from_float(1.5f)), y(x.size());
        kernels::normalize<bfloat16>(x.data(), y.data(), kernels::Geometry{N, C, S, layout}, {zero, nan_scale, zero},
                                     Activation::None, nullptr);
        std::int64_t not_nan = 0;
        for (const bfloat16& v : y) not_nan += !std::isnan(v.to_float());
        EXPECT_EQ(not_nan, 0);
      }
  });
}

TEST(BFloat16, KernelStoresRoundLikeFromFloatOnEveryIsa) {
  const float scales[] = {1.0f, std::ldexp(1.0f, -128), std::ldexp(1.0f, -133), std::ldexp(1.0f, 100)};
  for_each_supported_isa([&](kernels::Isa) {
    // (2, 4, 77): short rows with tails; (3, 4, 5003): long rows.
    for (const std::int64_t S : {std::int64_t{77}, std::int64_t{5003}})
      for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
        const std::int64_t N = S == 77 ? 2 : 3, C = 4, n = N * C * S;
        SCOPED_TRACE("S " + std::to_string(S) + " " + to_string(layout));
        std::vector<bfloat16> pattern(4099), x(static_cast<std::size_t>(n)), y(x.size());
        std::mt19937_64 rng(5);
        std::uniform_int_distribution<int> exponent(-8, 10), mantissa(0, 127);
        for (bfloat16& v : pattern) {
          const float f = std::ldexp(1.0f + static_cast<float>(mantissa(rng)) / 128, exponent(rng));
          v = bfloat16::from_float(rng() % 2 ? f : -f);
        }
        // NaNs (quiet, negative, signalling, with payloads) and infinities here and there: the stores'
        // rare path (a vector that holds a NaN) must give from_float's bits too.
        const std::uint16_t specials[] = {0x7fc1, 0xffa0, 0x7f81, 0x7f80, 0xff80};
        for (std::size_t i = 7, j = 0; i < pattern.size(); i += 101, ++j) pattern[i].bits = specials[j % 5];
        for (std::size_t i = 0; i < x.size(); i += pattern.size())
          std::copy_n(pattern.begin(), std::min(pattern.size(), x.size() - i), x.begin() + static_cast<std::ptrdiff_t>(i));
        const float zero[4] = {}, *scale = scales;
        const kernels::Geometry g{N, C, S, layout};
        kernels::normalize<bfloat16>(x.data(), y.data(), g, {zero, scale, zero}, Activation::None, nullptr);
        std::int64_t wrong = 0, subnormal = 0;
        const bool cl = layout == Layout::ChannelsLast;
        for (std::int64_t i = 0, c = 0, s_left = S; i < n; ++i) {  // c: the channel of element i
          const float expected = x[static_cast<std::size_t>(i)].to_float() * scales[c];
          subnormal += std::abs(expected) < std::numeric_limits<float>::min();
          wrong += y[static_cast<std::size_t>(i)].bits != bfloat16::from_float(expected).bits;
          if (cl) {
            c = c + 1 == C ? 0 : c + 1;
          } else if (--s_left == 0) {
            s_left = S;
            c = c + 1 == C ? 0 : c + 1;
          }
        }
        EXPECT_EQ(wrong, 0);
        EXPECT_GT(subnormal, n / 8);
      }
  });
}

// The float32 layer takes bfloat16 activations: the same statistics as on the float32 copy of the
// same values, and outputs within one bfloat16 rounding.
TEST(BFloat16, Float32LayerTakesBf16Input) {
  const Dims d{{6, 4, 5, 5}};
  std::mt19937_64 rng(8);
  const std::vector<double> x = round_to_bf16(random_input<float>(d, rng));
  const std::vector<float> xf = to_layout<float>(x, d, Layout::ChannelsFirst);
  const std::vector<bfloat16> xb = to_bf16(x, d, Layout::ChannelsFirst);
  BatchNorm2d a(4), b(4);
  std::vector<float> yf(xf.size());
  std::vector<bfloat16> yb(xb.size());
  a.forward(ConstTensorView(xf.data(), d.view_shape()), TensorView(yf.data(), d.view_shape()));
  b.forward(ConstTensorView(xb.data(), d.view_shape()), TensorView(yb.data(), d.view_shape()));
  auto vec = [](std::span<const float> v) { return std::vector<double>(v.begin(), v.end()); };
  EXPECT_TRUE(close(vec(b.running_mean()), vec(a.running_mean()), 1e-6, 1e-6, "running_mean"));
  EXPECT_TRUE(close(vec(b.running_var()), vec(a.running_var()), 1e-6, 1e-6, "running_var"));
  EXPECT_TRUE(close(from_bf16(yb, d, Layout::ChannelsFirst), from_layout(yf, d, Layout::ChannelsFirst), 1.0 / 256,
                    1.0 / 256, "y"));
  BatchNorm64 c(4);
  EXPECT_NE(error_of([&] { c.forward(ConstTensorView(xb.data(), d.view_shape()), TensorView(yb.data(), d.view_shape())); })
                .find("expected dtype float64 (the layer's), got bfloat16"),
            std::string::npos);
}

}  // namespace
}  // namespace bnorm::test
