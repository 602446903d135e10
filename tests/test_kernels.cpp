// Every row of the kernel table under every row of the ISA table against the float64 reference
// (KernelRows, through KernelTester); the functional layer's paths over the kernels: shapes odd and
// even, both layouts, both dtypes, every option combination, in place, several thread counts; then
// the numerical robustness cases.
#include "kernel_tester.hpp"
#include "test_util.hpp"

#include "kernels/kernels.hpp"

#include <cstring>
#include <limits>

namespace bnorm::test {
namespace {

struct Options {
  Layout layout = Layout::ChannelsFirst;
  bool training = true, affine = true, track = true, relu = false, in_place = false;
  double momentum = 0.1, eps = 1e-5;
  int threads = 1;
  std::string str() const {
    return std::string(layout == Layout::ChannelsFirst ? "CF" : "CL") + (training ? " train" : " eval") +
           (affine ? " affine" : "") + (track ? " track" : "") + (relu ? " relu" : "") + (in_place ? " inplace" : "") +
           " threads=" + std::to_string(threads);
  }
};

template <class T>
void check_against_reference(const Dims& d, const Options& o, std::uint64_t seed) {
  SCOPED_TRACE(d.str() + " " + o.str() + (std::is_same_v<T, float> ? " f32" : " f64"));
  ThreadScope threads(o.threads);
  std::mt19937_64 rng(seed);
  const std::int64_t C = d.C();
  const std::vector<double> x = random_input<T>(d, rng);
  const std::vector<double> w = o.affine ? random_vector<T>(C, rng, 0.5, 1.5) : std::vector<double>{};
  const std::vector<double> b = o.affine ? random_vector<T>(C, rng, -1, 1) : std::vector<double>{};
  const std::vector<double> rm0 = o.track ? random_vector<T>(C, rng, -1, 1) : std::vector<double>{};
  const std::vector<double> rv0 = o.track ? random_vector<T>(C, rng, 0.5, 2) : std::vector<double>{};
  const std::vector<double> dy = random_input<T>(d, rng, 0.5);

  reference::Problem p{d.N(), C, d.S(), o.training, o.momentum, o.eps, o.relu};
  const reference::Forward ref = reference::forward(p, x, w, b, rm0, rv0);

  const Shape shape = d.view_shape();
  const std::vector<T> xm = to_layout<T>(x, d, o.layout);
  std::vector<T> y(xm.size()), wt = cast<T>(w), bt = cast<T>(b), rm = cast<T>(rm0), rv = cast<T>(rv0);
  std::vector<T> sm(static_cast<std::size_t>(C)), si(static_cast<std::size_t>(C));
  if (o.in_place) y = xm;
  const T* in = o.in_place ? y.data() : xm.data();
  batch_norm(ConstTensorView(in, shape, o.layout), TensorView(y.data(), shape, o.layout),
             {o.track ? VectorView(rm) : VectorView(), o.track ? VectorView(rv) : VectorView()},
             {o.affine ? ConstVectorView(wt) : ConstVectorView(), o.affine ? ConstVectorView(bt) : ConstVectorView()},
             {.training = o.training,
              .momentum = o.momentum,
              .eps = o.eps,
              .activation = o.relu ? Activation::Relu : Activation::None},
             {VectorView(sm), VectorView(si)});

  const double t = tol<T>();
  EXPECT_TRUE(close(from_layout(y, d, o.layout), ref.y, t, t, "y"));
  if (o.training) {
    EXPECT_TRUE(close(widen(sm), ref.mean, t, t, "save_mean"));
    EXPECT_TRUE(close(widen(si), ref.invstd, t, t, "save_invstd"));
  }
  if (o.track) {
    EXPECT_TRUE(close(widen(rm), ref.running_mean, t, t, "running_mean"));
    EXPECT_TRUE(close(widen(rv), ref.running_var, t, t, "running_var"));
  }

  // Backward, from the forward's saved (training) or running (eval) statistics.
  const reference::Backward rb = reference::backward(p, x, w, ref, dy);
  const std::vector<T> dym = to_layout<T>(dy, d, o.layout);
  std::vector<T> dx(xm.size()), gw(static_cast<std::size_t>(C)), gb(static_cast<std::size_t>(C));
  if (o.in_place) dx = dym;
  const std::vector<T> rm_used = cast<T>(o.track ? (o.training ? rm0 : rm0) : std::vector<double>{});
  const std::vector<T> rv_used = cast<T>(o.track ? rv0 : std::vector<double>{});
  batch_norm_backward(
      ConstTensorView(o.in_place ? dx.data() : dym.data(), shape, o.layout),
      {.input = ConstTensorView(xm.data(), shape, o.layout),
       .output = o.relu ? ConstTensorView(y.data(), shape, o.layout) : ConstTensorView(),
       .weight = o.affine ? ConstVectorView(wt) : ConstVectorView(),
       .saved = {ConstVectorView(sm), ConstVectorView(si)},
       .running = {o.training ? ConstVectorView() : ConstVectorView(rm_used),
                   o.training ? ConstVectorView() : ConstVectorView(rv_used)}},
      {.training = o.training, .eps = o.eps, .activation = o.relu ? Activation::Relu : Activation::None},
      TensorView(dx.data(), shape, o.layout), {VectorView(gw), VectorView(gb)});
  // dx = k_dy * dy - k_x * (x - mean) - k_c cancels heavily for small m: its rounding error scales
  // with the terms, gamma * invstd * |dy|, not with the result.
  double gain = 0;
  for (std::size_t c = 0; c < static_cast<std::size_t>(C); ++c) gain = std::max(gain, (w.empty() ? 1.0 : w[c]) * ref.invstd[c]);
  const double scale = std::max({1.0, max_abs(rb.dx), 3 * gain * max_abs(dy)});
  EXPECT_TRUE(close(from_layout(dx, d, o.layout), rb.dx, 4 * t * scale, 0, "grad_input"));
  std::vector<double> xhat(x.size());
  for (std::int64_t n = 0; n < d.N(); ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t s = 0; s < d.S(); ++s) {
        const auto i = static_cast<std::size_t>((n * C + c) * d.S() + s);
        xhat[i] = (x[i] - ref.mean[static_cast<std::size_t>(c)]) * ref.invstd[static_cast<std::size_t>(c)];
      }
  EXPECT_TRUE(close(widen(gb), rb.dbias, t * l1_bound(d, dy, {}), t, "grad_bias"));
  // The saved mean is rounded to T: xhat moves by up to |mean| * invstd * t, which sum(dy * xhat)
  // feels through sum(|dy|).
  double mean_shift = 0;
  for (std::size_t c = 0; c < static_cast<std::size_t>(C); ++c) mean_shift = std::max(mean_shift, std::abs(ref.mean[c]) * ref.invstd[c]);
  EXPECT_TRUE(close(widen(gw), rb.dweight, t * (l1_bound(d, dy, xhat) + mean_shift * l1_bound(d, dy, {})), t, "grad_weight"));
}

const std::vector<Dims>& shapes() {
  static const std::vector<Dims> s = {
      {{5, 33, 27}},     {{4, 200, 17, 16}}, {{1, 19, 4, 6, 6}}, {{2, 1}},       {{2, 3, 1, 1}},
      {{7, 1, 5}},       {{3, 16}},          {{2, 5, 1}},        {{64, 17}},     {{3, 4, 3000}},
      {{700, 3}},        {{2, 2049, 2}},     {{4, 7, 5, 6}},     {{2, 5, 3, 4, 3}}, {{9, 8, 2, 1, 1, 3}},
      // 3 channels of 560 KB: fused at 1 and 3 threads, the unfused channels-first passes at 2 (3
      // channels do not spread evenly over 2 threads); its blocks split rows (S > kBlock).
      {{2, 3, 70001}},
  };
  return s;
}

std::string shape_name(const Dims& d) {
  std::string name;
  for (std::int64_t v : d.shape) {
    if (!name.empty()) name += 'x';
    name += std::to_string(v);
  }
  return name;
}

// Each row of the kernel table under each row of the ISA table: a test case per pair, skipped (and
// named) where this CPU does not run the ISA. Every shape above, both layouts where the kernel takes
// them, float, double and bfloat16, four option sets a shape (ReLU, residual or eval, in place,
// without gamma and beta, 1 to 3 threads).
class KernelRows : public ::testing::TestWithParam<std::tuple<Kernel, kernels::Isa>> {};

TEST_P(KernelRows, MatchReference) {
  const auto [kernel, isa] = GetParam();
  if (!kernels::isa_supported(isa))
    GTEST_SKIP() << "isa " << kernels::isa_name(isa) << " is not run here: not built for this target, or this CPU "
                 << "lacks its features";
  std::uint64_t seed = 7;
  for (std::size_t i = 0; i < shapes().size(); ++i)
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      if (!kernel_takes(kernel, layout)) continue;
      for (int bits = 0; bits < 4; ++bits) {
        KernelTester tester;
        tester.kernel(kernel)
            .isa(isa)
            .shape(shapes()[i].shape)
            .layout(layout)
            .relu(bits & 1)
            .residual(bits & 2)
            .training(!(bits & 2))
            .in_place(bits == 1 || bits == 2)
            .affine(bits != 3)
            .threads(1 + static_cast<int>(i + static_cast<std::size_t>(bits)) % 3);
        tester.seed(++seed).test<float>();
        tester.seed(++seed).test<double>();
        tester.seed(++seed).test<bfloat16>();
        if (HasFailure()) return;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Table, KernelRows,
                         ::testing::Combine(::testing::ValuesIn(kAllKernels), ::testing::ValuesIn(kernels::kAllIsas)),
                         [](const ::testing::TestParamInfo<std::tuple<Kernel, kernels::Isa>>& p) {
                           return std::string(kernel_name(std::get<0>(p.param))) + "_" +
                                  kernels::isa_name(std::get<1>(p.param));
                         });

class KernelVsReference : public ::testing::TestWithParam<std::size_t> {};

// Every option through the functional layer under the active (best) instruction set. The other
// rows of the ISA table run the same functional code over their own kernels, which KernelRows
// checks one by one.
TEST_P(KernelVsReference, EveryOptionBothLayoutsBothDtypes) {
  const Dims& d = shapes()[GetParam()];
  std::uint64_t seed = 1000 * GetParam();
  for (int bits = 0; bits < 64; ++bits) {
    Options o;
    o.layout = bits & 1 ? Layout::ChannelsLast : Layout::ChannelsFirst;
    o.training = !(bits & 2);
    o.affine = !(bits & 4);
    o.track = !(bits & 8) || !o.training;  // eval needs running statistics in the functional API
    o.relu = bits & 16;
    o.in_place = bits & 32;
    o.threads = 1 + bits % 3;
    o.momentum = bits % 5 == 0 ? 1.0 : 0.1;
    o.eps = bits % 7 == 0 ? 1e-3 : 1e-5;
    check_against_reference<float>(d, o, ++seed);
    check_against_reference<double>(d, o, ++seed);
    if (HasFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, KernelVsReference, ::testing::Range<std::size_t>(0, shapes().size()),
                         [](const ::testing::TestParamInfo<std::size_t>& p) { return shape_name(shapes()[p.param]); });

// The measured threshold is the first probed size at which the streamed copy wins twice in a row,
// or twice the last size when none does; the sizes double from the first, and a size is probed again
// only after a win. (Small sizes, to keep it quick: which size wins here depends on the machine and
// its load, the rule by which it is picked does not.)
TEST(Kernels, StreamThresholdIsTheFirstSizeThatStreamingWinsTwice) {
  const std::int64_t first = std::int64_t{1} << 20, last = std::int64_t{8} << 20;
  const kernels::StreamThreshold t = kernels::calibrate_stream_threshold(first, last);
#if defined(__SSE2__)
  ASSERT_FALSE(t.probes.empty());
  // Timed on the kernels' threads: a single-thread copy answers for another load than theirs.
  EXPECT_EQ(t.threads, bnorm::num_threads());
  std::int64_t size = first, expect = 2 * last;
  for (std::size_t i = 0; i < t.probes.size(); ++i) {
    const kernels::StreamProbe& p = t.probes[i];
    EXPECT_EQ(p.bytes, size) << "probe " << i;
    EXPECT_GT(p.cached_s, 0.0);
    EXPECT_GT(p.streamed_s, 0.0);
    EXPECT_EQ(kernels::stream_wins(p), p.streamed_s <= 0.97 * p.cached_s);
    const bool again = i > 0 && t.probes[i - 1].bytes == p.bytes;
    if (again && kernels::stream_wins(p)) {
      expect = p.bytes;
      EXPECT_EQ(i + 1, t.probes.size()) << "probing went on after streaming won twice";
      break;
    }
    if (kernels::stream_wins(p) && !again) continue;  // the same size once more
    size *= 2;
  }
  if (expect == 2 * last) {
    EXPECT_EQ(t.probes.back().bytes, last);
  }
  EXPECT_EQ(t.bytes, expect);
#else
  EXPECT_TRUE(t.probes.empty());
  EXPECT_EQ(t.bytes, std::numeric_limits<std::int64_t>::max());
#endif
  // Not measured below the first size: outputs that small are never streamed.
  EXPECT_FALSE(kernels::stream_output_bytes(std::int64_t{64} << 10));
}

// Outputs of the stream threshold or more are written with non-temporal stores, in either layout
// only when every row is whole cache lines and starts on a vector boundary. y and dx against the
// reference, both layouts, the fused channels-first path (256 KiB channels) and the unfused one,
// output buffers 64-byte aligned (streamed) and 4 bytes off (ordinary stores), with the ReLU masks.
TEST(Kernels, StreamedLargeOutputsMatchReference) {
  ThreadScope threads(2);
  const StreamThresholdScope streamed(std::int64_t{32} << 20);  // both shapes, wherever this runs
  for (const Dims& d : {Dims{{8, 160, 8192}}, Dims{{2, 6, 1 << 20}}}) {
    ASSERT_GE(d.numel() * 4, std::int64_t{32} << 20);
    ASSERT_TRUE(kernels::stream_output_bytes(d.numel() * 4));
    std::mt19937_64 rng(99);
    const std::vector<double> x = random_input<float>(d, rng), dy = random_input<float>(d, rng, 0.5);
    const reference::Problem p{d.N(), d.C(), d.S(), true, 0.1, 1e-5, true};
    const reference::Forward ref = reference::forward(p, x, {}, {}, {}, {});
    const reference::Backward rb = reference::backward(p, x, {}, ref, dy);
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
      for (std::size_t offset : {std::size_t{0}, std::size_t{1}}) {
        SCOPED_TRACE(d.str() + (layout == Layout::ChannelsLast ? " CL" : " CF") + " offset " + std::to_string(offset));
        const std::size_t n = static_cast<std::size_t>(d.numel());
        const std::vector<float> xm = to_layout<float>(x, d, layout), dym = to_layout<float>(dy, d, layout);
        std::vector<float> ybuf(n + 32), dxbuf(n + 32), sm(static_cast<std::size_t>(d.C())), si(sm.size());
        auto aligned = [&](std::vector<float>& b) {
          auto a = reinterpret_cast<std::uintptr_t>(b.data());
          return b.data() + ((64 - a % 64) % 64) / 4 + offset;
        };
        float* y = aligned(ybuf);
        float* dx = aligned(dxbuf);
        const Shape s = d.view_shape();
        batch_norm(ConstTensorView(xm.data(), s, layout), TensorView(y, s, layout), {}, {},
                   {.training = true, .activation = Activation::Relu}, {VectorView(sm), VectorView(si)});
        batch_norm_backward(ConstTensorView(dym.data(), s, layout),
                            {.input = ConstTensorView(xm.data(), s, layout),
                             .output = ConstTensorView(y, s, layout),
                             .saved = {ConstVectorView(sm), ConstVectorView(si)}},
                            {.training = true, .activation = Activation::Relu}, TensorView(dx, s, layout));
        const double t = tol<float>();
        EXPECT_TRUE(close(from_layout(std::vector<float>(y, y + n), d, layout), ref.y, t, t, "y"));
        EXPECT_TRUE(close(from_layout(std::vector<float>(dx, dx + n), d, layout), rb.dx, 4 * t * std::max(1.0, max_abs(rb.dx)),
                          0, "dx"));
      }
  }
}

// The rule of stream_output: only rows of whole cache lines are streamed (a line shared by two rows
// would take ordinary and streamed stores at once), never bfloat16, never fresh outputs.
TEST(Kernels, OnlyRowsOfWholeCacheLinesAreStreamed) {
  const StreamThresholdScope every(1);
  using kernels::Geometry;
  EXPECT_TRUE(kernels::stream_output<float>(Geometry{32, 64, 56 * 56, Layout::ChannelsFirst}));     // 196 lines
  EXPECT_FALSE(kernels::stream_output<float>(Geometry{32, 2048, 7 * 7, Layout::ChannelsFirst}));    // 196 bytes
  EXPECT_FALSE(kernels::stream_output<float>(Geometry{32, 1024, 14 * 14, Layout::ChannelsFirst}));  // 784 bytes
  EXPECT_TRUE(kernels::stream_output<float>(Geometry{32, 512, 28 * 28, Layout::ChannelsFirst}));    // 49 lines
  EXPECT_TRUE(kernels::stream_output<double>(Geometry{32, 2048, 8 * 8, Layout::ChannelsFirst}));    // 8 lines
  EXPECT_TRUE(kernels::stream_output<float>(Geometry{32, 64, 7 * 7, Layout::ChannelsLast}));        // rows of C
  EXPECT_FALSE(kernels::stream_output<float>(Geometry{32, 6, 56 * 56, Layout::ChannelsLast}));
  EXPECT_FALSE(kernels::stream_output<bfloat16>(Geometry{32, 64, 56 * 56, Layout::ChannelsFirst}));
  Geometry fresh{32, 64, 56 * 56, Layout::ChannelsFirst};
  fresh.may_stream = false;
  EXPECT_FALSE(kernels::stream_output<float>(fresh));
}

// The fused residual: y = act(bn(x) + z), training and eval, both layouts, fused and unfused
// channels-first paths, with the output written over the residual; errors for a residual that does
// not match or partly overlaps the output.
TEST(Kernels, FusedResidualAddMatchesReference) {
  for (const Dims& d : {Dims{{4, 5, 33}}, Dims{{2, 3, 70001}}, Dims{{3, 300, 2, 3}}})
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
      for (bool relu : {false, true})
        for (bool training : {true, false})
          for (bool into_residual : {false, true}) {
            SCOPED_TRACE(d.str() + (layout == Layout::ChannelsLast ? " CL" : " CF") + (relu ? " relu" : "") +
                         (training ? " train" : " eval") + (into_residual ? " y=z" : ""));
            std::mt19937_64 rng(21);
            const std::int64_t C = d.C();
            const std::vector<double> x = random_input<float>(d, rng), z = random_input<float>(d, rng, 1.0);
            const std::vector<double> w = random_vector<float>(C, rng, 0.5, 1.5), b = random_vector<float>(C, rng, -1, 1);
            const std::vector<double> rm = random_vector<float>(C, rng, -1, 1), rv = random_vector<float>(C, rng, 0.5, 2);
            const reference::Problem p{d.N(), C, d.S(), training, 0.1, 1e-5, false};
            const reference::Forward ref = reference::forward(p, x, w, b, rm, rv);
            std::vector<double> want(x.size());
            for (std::size_t i = 0; i < want.size(); ++i) {
              const double v = ref.y[i] + z[i];
              want[i] = relu && v < 0 ? 0.0 : v;
            }
            const Shape s = d.view_shape();
            const std::vector<float> xm = to_layout<float>(x, d, layout), wt = cast<float>(w), bt = cast<float>(b);
            std::vector<float> zm = to_layout<float>(z, d, layout), y(xm.size()), rmt = cast<float>(rm), rvt = cast<float>(rv);
            float* out = into_residual ? zm.data() : y.data();
            batch_norm(ConstTensorView(xm.data(), s, layout), TensorView(out, s, layout), {rmt, rvt}, {wt, bt},
                       {.training = training, .activation = relu ? Activation::Relu : Activation::None}, {},
                       ConstTensorView(zm.data(), s, layout));
            EXPECT_TRUE(close(from_layout(std::vector<float>(out, out + xm.size()), d, layout), want, 4 * tol<float>(),
                              4 * tol<float>(), "y"));
          }
  const Dims d{{2, 3, 4}};
  std::vector<float> x(24, 1.f), y(24), z(30), rm(3, 0.f), rv(3, 1.f);
  const Shape s = d.view_shape();
  EXPECT_NE(error_of([&] {
              batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), {rm, rv}, {}, {.training = false}, {},
                         ConstTensorView(z.data(), Shape{2, 3, 5}));
            }).find("residual: expected the shape of input"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              batch_norm(ConstTensorView(x.data(), s), TensorView(z.data(), s), {rm, rv}, {}, {.training = false}, {},
                         ConstTensorView(z.data() + 1, s));
            }).find("output"),
            std::string::npos);
}

// ---- Numerical robustness -------------------------------------------------------------------

// Batch statistics of float32 data with |mean| / std = ratio, in both layouts and with 1..4
// threads: the variance must be within 1e-5 (relative) of the float64 reference on the same values.
void check_large_offset(double mean, double stddev, Layout layout, int threads) {
  SCOPED_TRACE("mean " + std::to_string(mean) + " std " + std::to_string(stddev) + " threads " + std::to_string(threads) +
               (layout == Layout::ChannelsLast ? " CL" : " CF"));
  ThreadScope scope(threads);
  const Dims d{{16, 24, 13, 11}};
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(mean, stddev);
  std::vector<double> x(static_cast<std::size_t>(d.numel()));
  for (double& v : x) v = static_cast<double>(static_cast<float>(normal(rng)));
  reference::Problem p{d.N(), d.C(), d.S(), true, 1.0, 1e-5, false};
  const std::vector<double> ones(static_cast<std::size_t>(d.C()), 1.0), zeros(ones.size(), 0.0);
  const reference::Forward ref = reference::forward(p, x, {}, {}, zeros, ones);

  const std::vector<float> xm = to_layout<float>(x, d, layout);
  std::vector<float> y(xm.size()), rm(ones.size(), 0.f), rv(ones.size(), 1.f), sm(ones.size()), si(ones.size());
  // momentum 1: running_var becomes the unbiased batch variance itself.
  batch_norm(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout), {rm, rv},
             {}, {.training = true, .momentum = 1.0}, {sm, si});
  for (std::size_t c = 0; c < rv.size(); ++c) {
    EXPECT_NEAR(rv[c], ref.running_var[c], 1e-5 * ref.running_var[c]) << "channel " << c;
    EXPECT_GE(rv[c], 0.f);
  }
  std::vector<double> var64(ones.size()), mean64(ones.size());
  batch_stats(ConstTensorView(xm.data(), d.view_shape(), layout), VectorView(mean64), VectorView(var64));
  // Float32 input is summed in float32 within a block (at most 64 terms per lane, then double):
  // docs/numerics.md bounds the error at 64 ulp relative; it is far smaller in practice.
  EXPECT_TRUE(close(var64, ref.var, 0, 4e-6, "batch_stats var (float64 out)"));
  EXPECT_TRUE(close(mean64, ref.mean, 4e-6 * stddev, 0, "batch_stats mean"));
  EXPECT_TRUE(close(widen(si), ref.invstd, 0, 1e-5, "save_invstd"));
  // The normalized output keeps full float32 precision: no cancellation of x * a against b.
  EXPECT_TRUE(close(from_layout(y, d, layout), ref.y, 1e-5, 1e-5, "y"));
}

TEST(Robustness, VarianceAtLargeOffsetEveryLayoutThreadCountAndIsa) {
  for_each_supported_isa([](kernels::Isa) {
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
      for (int threads = 1; threads <= 4; ++threads) {
        check_large_offset(1e4, 1.0, layout, threads);
        check_large_offset(-3e4, 3.0, layout, threads);
        check_large_offset(1e6, 100.0, layout, threads);
      }
  });
}

// A constant channel at 1e7 normalizes to exactly beta, in both layouts, with any thread count,
// and its variance is exactly 0 (never negative).
TEST(Robustness, ConstantChannelGivesExactlyBeta) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
    for (int threads = 1; threads <= 3; ++threads) {
      ThreadScope scope(threads);
      const Dims d{{8, 5, 37}};
      std::vector<float> x(static_cast<std::size_t>(d.numel()), 1e7f);
      const std::vector<float> w = {2.f, 0.5f, 1.f, 3.f, 1.f}, b = {0.25f, -1.5f, 3.f, 0.f, 7.f};
      std::vector<float> y(x.size()), rm(5, 0.f), rv(5, 1.f), sm(5), si(5);
      batch_norm(ConstTensorView(x.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout),
                 {rm, rv}, {w, b}, {.training = true}, {sm, si});
      const std::vector<float> yl = cast<float>(from_layout(y, d, layout));
      for (std::size_t i = 0; i < yl.size(); ++i) {
        const std::size_t c = (i / 37) % 5;
        ASSERT_EQ(yl[i], b[c]) << "element " << i << " layout " << to_string(layout) << " threads " << threads;
      }
      for (std::size_t c = 0; c < 5; ++c) {
        EXPECT_EQ(sm[c], 1e7f);
        EXPECT_FLOAT_EQ(si[c], static_cast<float>(1.0 / std::sqrt(1e-5)));
        EXPECT_FLOAT_EQ(rv[c], 0.9f);  // (1 - 0.1) * 1 + 0.1 * 0
      }
    }
}

// Variance is never negative, even for near-constant data where rounding could push it below 0.
TEST(Robustness, VarianceNeverNegative) {
  std::mt19937_64 rng(3);
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const Dims d{{33, 40, 7}};
    std::vector<float> x(static_cast<std::size_t>(d.numel()));
    std::uniform_int_distribution<int> bit(0, 1);
    for (float& v : x) v = bit(rng) ? 16777216.f : std::nextafter(16777216.f, 0.f);  // values one ulp apart
    std::vector<double> mean(40), var(40);
    batch_stats(ConstTensorView(x.data(), d.view_shape(), layout), VectorView(mean), VectorView(var));
    for (double v : var) EXPECT_GE(v, 0.0);
  }
}

// A NaN or Inf poisons its own channel's outputs and statistics, and no other channel's.
TEST(Robustness, NonFiniteInputStaysInItsChannel) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const Dims d{{4, 3, 10}};
    std::mt19937_64 rng(11);
    std::vector<double> x = random_input<float>(d, rng);
    x[static_cast<std::size_t>((2 * 3 + 1) * 10 + 4)] = std::numeric_limits<double>::quiet_NaN();  // channel 1
    x[static_cast<std::size_t>((0 * 3 + 2) * 10 + 0)] = std::numeric_limits<double>::infinity();   // channel 2
    std::vector<float> xm = to_layout<float>(x, d, layout), y(xm.size()), rm(3, 0.f), rv(3, 1.f);
    batch_norm(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout), rm, rv,
               {}, {}, true, 0.1, 1e-5);
    const std::vector<double> yl = from_layout(y, d, layout);
    for (std::size_t i = 0; i < yl.size(); ++i) {
      const std::size_t c = (i / 10) % 3;
      if (c == 0)
        EXPECT_TRUE(std::isfinite(yl[i])) << i;
      else
        EXPECT_TRUE(std::isnan(yl[i])) << i;
    }
    EXPECT_TRUE(std::isfinite(rm[0]) && std::isfinite(rv[0]));
    EXPECT_TRUE(std::isnan(rm[1]) && std::isnan(rv[1]));
    // One +Inf: the mean is +Inf (as torch), the variance NaN (Inf - Inf in the deviations).
    EXPECT_TRUE(std::isinf(rm[2]) && rm[2] > 0 && std::isnan(rv[2])) << rm[2] << " " << rv[2];
  }
}

// Channels-first statistics do not depend on the thread count at all (blocks are per channel).
TEST(Robustness, ChannelsFirstResultsIndependentOfThreads) {
  const Dims d{{6, 9, 300}};
  std::mt19937_64 rng(5);
  const std::vector<float> x = cast<float>(random_input<float>(d, rng, 100.0));
  std::vector<float> y1(x.size()), y3(x.size()), rm(9, 0.f), rv(9, 1.f);
  {
    ThreadScope t(1);
    batch_norm(ConstTensorView(x.data(), d.view_shape()), TensorView(y1.data(), d.view_shape()), {}, {}, {}, {}, true);
  }
  {
    ThreadScope t(3);
    batch_norm(ConstTensorView(x.data(), d.view_shape()), TensorView(y3.data(), d.view_shape()), {}, {}, {}, {}, true);
  }
  EXPECT_EQ(0, std::memcmp(y1.data(), y3.data(), y1.size() * sizeof(float)));
}

}  // namespace
}  // namespace bnorm::test

// bnorm::runtime_info reports what the kernels read: the active ISA, the caches, and the variants
// that use_fused_forward / use_fused_backward / stream_output pick (bnorm info prints it).
TEST(RuntimeInfo, NamesTheActiveIsaAndTheVariantsTheKernelsTake) {
  const std::string info = bnorm::runtime_info();
  EXPECT_NE(info.find(std::string("active: ") + bnorm::kernels::isa_name(bnorm::kernels::active_isa())), std::string::npos) << info;
  EXPECT_NE(info.find("threads: " + std::to_string(bnorm::num_threads())), std::string::npos) << info;
  EXPECT_NE(info.find("L2 "), std::string::npos) << info;
  const bnorm::kernels::Geometry g{32, 512, 49, bnorm::Layout::ChannelsFirst};
  const std::string want = std::string("32x512x7x7 channels_first: forward ") +
                           (bnorm::kernels::use_fused_forward<float>(g) ? "fused" : "separate passes");
  EXPECT_NE(info.find(want), std::string::npos) << info;
}
