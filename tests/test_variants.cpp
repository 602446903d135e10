// Ghost Batch Normalization and Batch Renormalization (functional.hpp) against their float64
// references (reference.cpp: Ghost BN as batch_norm applied to each virtual batch in turn; Batch
// Renorm from Algorithm 1), in both layouts, float32 and float64, over several training steps; and
// their errors, after which nothing has been written.
#include "test_util.hpp"

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

namespace bnorm::test {
namespace {

// One layer's state and a batch, in T, in `layout`; the logical float64 copies the reference reads.
template <class T>
struct Batch {
  Dims dims;
  Layout layout;
  std::vector<double> x, dy, w, b;
  std::vector<T> xm, dym, ym, dxm;
  std::vector<T> wt, bt, rm, rv, gw, gb;
  Batch(Dims d, Layout l, std::uint64_t seed) : dims(std::move(d)), layout(l) {
    std::mt19937_64 rng(seed);
    x = random_input<T>(dims, rng);
    dy = random_input<T>(dims, rng, 1.0);
    w = random_vector<T>(dims.C(), rng, 0.5, 1.5);
    b = random_vector<T>(dims.C(), rng, -0.5, 0.5);
    xm = to_layout<T>(x, dims, layout);
    dym = to_layout<T>(dy, dims, layout);
    ym.assign(xm.size(), T{});
    dxm.assign(xm.size(), T{});
    wt = cast<T>(w);
    bt = cast<T>(b);
    rm.assign(static_cast<std::size_t>(dims.C()), T{0});
    rv.assign(static_cast<std::size_t>(dims.C()), T{1});
    gw.assign(rm.size(), T{});
    gb.assign(rm.size(), T{});
  }
  ConstTensorView in() const { return {xm.data(), dims.view_shape(), layout}; }
  TensorView out() { return {ym.data(), dims.view_shape(), layout}; }
  ConstTensorView grad_out() const { return {dym.data(), dims.view_shape(), layout}; }
  TensorView grad_in() { return {dxm.data(), dims.view_shape(), layout}; }
  std::vector<double> y() const { return from_layout(ym, dims, layout); }
  std::vector<double> dx() const { return from_layout(dxm, dims, layout); }
  reference::Problem problem(bool training) const { return {dims.N(), dims.C(), dims.S(), training, 0.1, 1e-5}; }
};

template <class T>
constexpr double loose() {  // gradients and outputs that go through sums of many values
  return std::is_same_v<T, float> ? 3e-5 : 1e-10;
}

// Ghost BN, several training steps (the running statistics carried), then eval.
template <class T>
void check_ghost(const Dims& dims, Layout layout, std::int64_t vbs) {
  SCOPED_TRACE(dims.str() + (layout == Layout::ChannelsLast ? " channels-last" : " channels-first") +
               " virtual_batch_size " + std::to_string(vbs));
  Batch<T> t(dims, layout, 7);
  std::vector<double> ref_rm(t.rm.size(), 0.0), ref_rv(t.rv.size(), 1.0);
  const std::int64_t k = ghost_batch_count(dims.N(), vbs);
  std::vector<double> save_mean(static_cast<std::size_t>(k * dims.C())), save_invstd(save_mean.size());
  const Options train{.training = true, .momentum = 0.1, .eps = 1e-5};
  for (int step = 0; step < 3; ++step) {
    ghost_batch_norm(t.in(), t.out(), vbs, {t.rm, t.rv}, {t.wt, t.bt}, train, {save_mean, save_invstd});
    const reference::Forward f = reference::ghost_forward(t.problem(true), vbs, t.x, t.w, t.b, ref_rm, ref_rv);
    ref_rm = f.running_mean;
    ref_rv = f.running_var;
    EXPECT_TRUE(close(t.y(), f.y, loose<T>(), loose<T>(), "y"));
    EXPECT_TRUE(close(save_mean, f.mean, loose<T>(), loose<T>(), "save_mean"));
    EXPECT_TRUE(close(save_invstd, f.invstd, loose<T>(), loose<T>(), "save_invstd"));
    EXPECT_TRUE(close(widen(t.rm), ref_rm, loose<T>(), loose<T>(), "running_mean"));
    EXPECT_TRUE(close(widen(t.rv), ref_rv, loose<T>(), loose<T>(), "running_var"));
    ghost_batch_norm_backward(t.grad_out(), {.input = t.in(), .weight = t.wt, .saved = {save_mean, save_invstd}}, vbs,
                              train, t.grad_in(), {t.gw, t.gb});
    const reference::Backward g = reference::ghost_backward(t.problem(true), vbs, t.x, t.w, f, t.dy);
    const double scale = max_abs(g.dx);
    EXPECT_TRUE(close(t.dx(), g.dx, loose<T>() * scale, loose<T>(), "dx"));
    EXPECT_TRUE(close(widen(t.gw), g.dweight, loose<T>() * max_abs(g.dweight), loose<T>(), "dweight"));
    EXPECT_TRUE(close(widen(t.gb), g.dbias, loose<T>() * max_abs(g.dbias), loose<T>(), "dbias"));
  }
  // Eval is batch normalization with the running statistics.
  ghost_batch_norm(t.in(), t.out(), vbs, {t.rm, t.rv}, {t.wt, t.bt}, {.training = false});
  const reference::Forward e = reference::forward(t.problem(false), t.x, t.w, t.b, widen(t.rm), widen(t.rv));
  EXPECT_TRUE(close(t.y(), e.y, loose<T>(), loose<T>(), "eval y"));
}

TEST(GhostBatchNorm, MatchesPerVirtualBatchReference) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    check_ghost<float>({{10, 5, 3, 4}}, layout, 4);   // 4 + 4 + 2
    check_ghost<float>({{9, 3, 7}}, layout, 3);       // three equal ones, rank 3
    check_ghost<double>({{10, 5, 3, 4}}, layout, 4);
    check_ghost<float>({{6, 300, 2, 2}}, layout, 4);  // channels-last tiles of 256 channels
    check_ghost<float>({{5, 2, 2, 2}}, layout, 1);    // one sample each: 8 values per channel
    check_ghost<float>({{8, 4, 2, 3, 2}}, layout, 3);  // rank 5 (BatchNorm3d)
  }
}

TEST(GhostBatchNorm, OneVirtualBatchIsBatchNorm) {
  // virtual_batch_size >= N: batch_norm itself, bit for bit.
  Batch<float> g({{6, 4, 5}}, Layout::ChannelsFirst, 3), p({{6, 4, 5}}, Layout::ChannelsFirst, 3);
  const Options train{.training = true};
  ghost_batch_norm(g.in(), g.out(), 8, {g.rm, g.rv}, {g.wt, g.bt}, train);
  batch_norm(p.in(), p.out(), {p.rm, p.rv}, {p.wt, p.bt}, train);
  EXPECT_EQ(g.ym.size(), p.ym.size());
  EXPECT_TRUE(close(g.y(), p.y(), 0, 0, "y"));
  EXPECT_TRUE(close(widen(g.rv), widen(p.rv), 0, 0, "running_var"));
}

TEST(GhostBatchNorm, InPlaceForwardAndAliasedBackward) {
  // output == input and grad_input == grad_output are accepted, as batch_norm accepts them, and give
  // the same results as separate buffers.
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Batch<float> a({{9, 3, 4}}, layout, 4), b({{9, 3, 4}}, layout, 4);
    std::vector<double> sm(9), si(9), sm2(9), si2(9);
    const Options train{.training = true};
    ghost_batch_norm(a.in(), a.out(), 3, {a.rm, a.rv}, {a.wt, a.bt}, train, {sm, si});
    ghost_batch_norm(b.in(), TensorView(b.xm.data(), b.dims.view_shape(), layout), 3, {b.rm, b.rv}, {b.wt, b.bt},
                     train, {sm2, si2});
    EXPECT_EQ(b.xm, a.ym);
    ghost_batch_norm_backward(a.grad_out(), {.input = a.in(), .weight = a.wt, .saved = {sm, si}}, 3, train,
                              a.grad_in());
    Batch<float> c({{9, 3, 4}}, layout, 4);
    ghost_batch_norm_backward(c.grad_out(), {.input = c.in(), .weight = c.wt, .saved = {sm, si}}, 3, train,
                              TensorView(c.dym.data(), c.dims.view_shape(), layout));
    EXPECT_EQ(c.dym, a.dxm);
  }
}

TEST(GhostBatchNorm, BatchCount) {
  EXPECT_EQ(ghost_batch_count(10, 4), 3);
  EXPECT_EQ(ghost_batch_count(8, 4), 2);
  EXPECT_EQ(ghost_batch_count(3, 4), 1);
  EXPECT_EQ(ghost_batch_count(0, 4), 0);
  EXPECT_NE(error_of([] { (void)ghost_batch_count(4, 0); }).find("virtual_batch_size: expected >= 1, got 0"),
            std::string::npos);
}

// Batch Renorm over steps whose limits change (the paper's warm-up), with running statistics far
// enough from the batch's that r and d are clipped in the first steps.
template <class T>
void check_renorm(const Dims& dims, Layout layout) {
  SCOPED_TRACE(dims.str() + (layout == Layout::ChannelsLast ? " channels-last" : " channels-first"));
  Batch<T> t(dims, layout, 11);
  const std::size_t C = t.rm.size();
  for (std::size_t c = 0; c < C; ++c) {  // running statistics away from the batch's
    t.rm[c] = static_cast<T>(0.25 * static_cast<double>(c) - 1.0);
    t.rv[c] = static_cast<T>(c % 2 == 0 ? 0.05 : 9.0);
  }
  std::vector<double> ref_rm = widen(t.rm), ref_rv = widen(t.rv);
  std::vector<double> mean(C), invstd(C), r(C), d(C);
  const Options train{.training = true, .momentum = 0.1, .eps = 1e-5};
  const RenormLimits limits[] = {{1.0, 0.0}, {1.5, 0.5}, {3.0, 5.0},
                                 {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()}};
  bool clipped = false, unclipped = false;
  for (const RenormLimits& lim : limits) {
    SCOPED_TRACE("r_max " + std::to_string(lim.r_max) + " d_max " + std::to_string(lim.d_max));
    batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {t.wt, t.bt}, train, lim, {mean, invstd}, {r, d});
    const reference::Renorm f = reference::renorm_forward(t.problem(true), lim.r_max, lim.d_max, t.x, t.w, t.b,
                                                          ref_rm, ref_rv);
    ref_rm = f.fwd.running_mean;
    ref_rv = f.fwd.running_var;
    for (std::size_t c = 0; c < C; ++c) {
      clipped |= f.r[c] == lim.r_max || f.d[c] == lim.d_max || f.d[c] == -lim.d_max;
      unclipped |= f.r[c] < lim.r_max && f.r[c] > 1 / lim.r_max;
    }
    EXPECT_TRUE(close(t.y(), f.fwd.y, loose<T>(), loose<T>(), "y"));
    EXPECT_TRUE(close(r, f.r, loose<T>(), loose<T>(), "r"));
    EXPECT_TRUE(close(d, f.d, loose<T>(), loose<T>(), "d"));
    EXPECT_TRUE(close(mean, f.fwd.mean, loose<T>(), loose<T>(), "save_mean"));
    EXPECT_TRUE(close(widen(t.rm), ref_rm, loose<T>(), loose<T>(), "running_mean"));
    EXPECT_TRUE(close(widen(t.rv), ref_rv, loose<T>(), loose<T>(), "running_var"));
    batch_renorm_backward(t.grad_out(), {.input = t.in(), .weight = t.wt, .saved = {mean, invstd}}, {r, d}, train,
                          t.grad_in(), {t.gw, t.gb});
    const reference::Backward g = reference::renorm_backward(t.problem(true), t.x, t.w, f, t.dy);
    EXPECT_TRUE(close(t.dx(), g.dx, loose<T>() * max_abs(g.dx), loose<T>(), "dx"));
    EXPECT_TRUE(close(widen(t.gw), g.dweight, loose<T>() * max_abs(g.dweight), loose<T>(), "dweight"));
    EXPECT_TRUE(close(widen(t.gb), g.dbias, loose<T>() * max_abs(g.dbias), loose<T>(), "dbias"));
  }
  EXPECT_TRUE(clipped);
  EXPECT_TRUE(unclipped);
  batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {t.wt, t.bt}, {.training = false}, {});
  const reference::Forward e = reference::forward(t.problem(false), t.x, t.w, t.b, widen(t.rm), widen(t.rv));
  EXPECT_TRUE(close(t.y(), e.y, loose<T>(), loose<T>(), "eval y"));
}

TEST(BatchRenorm, MatchesAlgorithm1Reference) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    check_renorm<float>({{6, 5, 3, 4}}, layout);
    check_renorm<double>({{6, 5, 3, 4}}, layout);
    check_renorm<float>({{16, 3}}, layout);
    check_renorm<float>({{4, 300, 4, 4}}, layout);
  }
}

TEST(BatchRenorm, UnclippedFactorsAreBatchNorm) {
  // r_max = 1 and d_max = 0 force r = 1 and d = 0: batch_norm itself, whatever the running statistics.
  Batch<double> a({{5, 3, 4}}, Layout::ChannelsFirst, 5), b({{5, 3, 4}}, Layout::ChannelsFirst, 5);
  batch_renorm(a.in(), a.out(), {a.rm, a.rv}, {a.wt, a.bt}, {.training = true}, {1.0, 0.0});
  batch_norm(b.in(), b.out(), {b.rm, b.rv}, {b.wt, b.bt}, {.training = true});
  EXPECT_TRUE(close(a.y(), b.y(), 1e-14, 1e-14, "y"));
  EXPECT_TRUE(close(widen(a.rv), widen(b.rv), 1e-15, 0, "running_var"));
}

// bfloat16 tensors with float32 vectors: the reference on the same bfloat16 values; outputs and
// input gradients carry one bfloat16 rounding, statistics and parameter gradients are float32.
TEST(VariantBFloat16, GhostAndRenormAgainstReference) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const Dims d{{10, 4, 3, 5}};
    std::mt19937_64 rng(31);
    const std::vector<double> x = round_to_bf16(random_input<float>(d, rng)),
                              dy = round_to_bf16(random_input<float>(d, rng, 1.0));
    const std::vector<double> w = random_vector<float>(4, rng, 0.5, 1.5), b = random_vector<float>(4, rng, -0.5, 0.5);
    const std::vector<bfloat16> xm = to_bf16(x, d, layout), dym = to_bf16(dy, d, layout);
    std::vector<bfloat16> ym(xm.size()), dxm(xm.size());
    const std::vector<float> wt = cast<float>(w), bt = cast<float>(b);
    std::vector<float> gw(4), gb(4);
    const ConstTensorView in(xm.data(), d.view_shape(), layout), gout(dym.data(), d.view_shape(), layout);
    const TensorView out(ym.data(), d.view_shape(), layout), gin(dxm.data(), d.view_shape(), layout);
    const reference::Problem p{d.N(), d.C(), d.S(), true, 0.1, 1e-5};
    const Options train{.training = true};
    const double bf = 1.0 / 128;  // two bfloat16 roundings
    {
      std::vector<float> rm(4, 0.f), rv(4, 1.f);
      std::vector<double> sm(12), si(12);
      ghost_batch_norm(in, out, 4, {rm, rv}, {wt, bt}, train, {sm, si});
      const reference::Forward f = reference::ghost_forward(p, 4, x, w, b, std::vector<double>(4, 0.0),
                                                            std::vector<double>(4, 1.0));
      EXPECT_TRUE(close(from_bf16(ym, d, layout), f.y, bf, bf, "ghost y"));
      EXPECT_TRUE(close(widen(rv), f.running_var, 1e-6, 1e-6, "ghost running_var"));
      ghost_batch_norm_backward(gout, {.input = in, .weight = wt, .saved = {sm, si}}, 4, train, gin, {gw, gb});
      const reference::Backward g = reference::ghost_backward(p, 4, x, w, f, dy);
      EXPECT_TRUE(close(from_bf16(dxm, d, layout), g.dx, bf * max_abs(g.dx), bf, "ghost dx"));
      EXPECT_TRUE(close(widen(gw), g.dweight, 1e-5 * max_abs(g.dweight), 1e-5, "ghost dweight"));
    }
    {
      std::vector<float> rm = {0.5f, -1.f, 2.f, 0.f}, rv = {0.1f, 4.f, 1.f, 9.f};
      const std::vector<double> rm0 = widen(rm), rv0 = widen(rv);
      std::vector<double> sm(4), si(4), r(4), dd(4);
      batch_renorm(in, out, {rm, rv}, {wt, bt}, train, {1.5, 0.5}, {sm, si}, {r, dd});
      const reference::Renorm f = reference::renorm_forward(p, 1.5, 0.5, x, w, b, rm0, rv0);
      EXPECT_TRUE(close(from_bf16(ym, d, layout), f.fwd.y, bf, bf, "renorm y"));
      EXPECT_TRUE(close(r, f.r, 1e-6, 1e-6, "r"));
      EXPECT_TRUE(close(widen(rm), f.fwd.running_mean, 1e-6, 1e-6, "renorm running_mean"));
      batch_renorm_backward(gout, {.input = in, .weight = wt, .saved = {sm, si}}, {r, dd}, train, gin, {gw, gb});
      const reference::Backward g = reference::renorm_backward(p, x, w, f, dy);
      EXPECT_TRUE(close(from_bf16(dxm, d, layout), g.dx, bf * max_abs(g.dx), bf, "renorm dx"));
      EXPECT_TRUE(close(widen(gw), g.dweight, 1e-5 * max_abs(g.dweight), 1e-5, "renorm dweight"));
    }
  }
}

// Random small cases (fixed seed): shapes of rank 2-5, both layouts, virtual batch sizes and limits
// around their edges. Each call either matches the reference or, exactly when the rules say it is
// invalid, fails having written nothing.
TEST(VariantRandomCases, MatchReferenceOrFailCleanly) {
  std::mt19937_64 rng(2026);
  auto pick = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
  int ran = 0, refused = 0;
  for (int i = 0; i < 300; ++i) {
    std::vector<std::int64_t> shape{pick(1, 9), pick(1, 5)};
    for (std::int64_t r = pick(0, 3); r > 0; --r) shape.push_back(pick(1, 3));
    const Layout layout = pick(0, 1) ? Layout::ChannelsLast : Layout::ChannelsFirst;
    const std::int64_t vbs = pick(-1, 6);
    const RenormLimits lim{static_cast<double>(pick(0, 6)) / 2, static_cast<double>(pick(-1, 4)) / 2};
    Batch<double> t(Dims{shape}, layout, static_cast<std::uint64_t>(i));
    SCOPED_TRACE("case " + std::to_string(i) + " " + t.dims.str() + " vbs " + std::to_string(vbs));
    const std::int64_t N = t.dims.N(), S = t.dims.S();
    const std::vector<double> y0 = widen(t.ym), rm0 = widen(t.rm), rv0 = widen(t.rv);
    const Options train{.training = true};
    // Ghost BN: vbs >= 1 and more than 1 value per channel in the last (smallest) virtual batch.
    const std::int64_t last = vbs < 1 ? 0 : (N % vbs == 0 ? std::min(vbs, N) : N % vbs);
    const bool ghost_ok = vbs >= 1 && last * S > 1;
    const std::string ghost_error = error_of([&] { ghost_batch_norm(t.in(), t.out(), vbs, {t.rm, t.rv}, {t.wt, t.bt}, train); });
    EXPECT_EQ(ghost_error == "(no error)", ghost_ok) << ghost_error;
    if (ghost_ok) {
      const reference::Forward f = reference::ghost_forward(t.problem(true), vbs, t.x, t.w, t.b, rm0, rv0);
      EXPECT_TRUE(close(t.y(), f.y, 1e-10, 1e-10, "ghost y"));
      EXPECT_TRUE(close(widen(t.rv), f.running_var, 1e-12, 1e-12, "ghost running_var"));
      ++ran;
    } else {
      EXPECT_EQ(widen(t.ym), y0);
      EXPECT_EQ(widen(t.rm), rm0);
      EXPECT_EQ(widen(t.rv), rv0);
      ++refused;
    }
    // Batch Renorm: r_max >= 1, d_max >= 0, more than 1 value per channel.
    Batch<double> u(Dims{shape}, layout, static_cast<std::uint64_t>(i));
    const bool renorm_ok = lim.r_max >= 1 && lim.d_max >= 0 && N * S > 1;
    std::vector<double> r(u.rm.size()), d(u.rm.size());
    const std::string renorm_error =
        error_of([&] { batch_renorm(u.in(), u.out(), {u.rm, u.rv}, {u.wt, u.bt}, train, lim, {}, {r, d}); });
    EXPECT_EQ(renorm_error == "(no error)", renorm_ok) << renorm_error;
    if (renorm_ok) {
      const reference::Renorm f = reference::renorm_forward(u.problem(true), lim.r_max, lim.d_max, u.x, u.w, u.b,
                                                            rm0, rv0);
      EXPECT_TRUE(close(u.y(), f.fwd.y, 1e-10, 1e-10, "renorm y"));
      EXPECT_TRUE(close(d, f.d, 1e-12, 1e-12, "d"));
    } else {
      EXPECT_EQ(widen(u.ym), y0);
      EXPECT_EQ(widen(u.rv), rv0);
    }
  }
  EXPECT_GT(ran, 50);
  EXPECT_GT(refused, 20);
}

// Each call fails with the message and writes nothing: not the output, not the running statistics.
template <class F>
void expect_refused(Batch<float>& t, F call, std::initializer_list<const char*> fragments) {
  const std::vector<float> y0 = t.ym, rm0 = t.rm, rv0 = t.rv;
  const std::string what = error_of(call);
  for (const char* f : fragments) EXPECT_NE(what.find(f), std::string::npos) << what << "\n  lacks: " << f;
  EXPECT_EQ(t.ym, y0);
  EXPECT_EQ(t.rm, rm0);
  EXPECT_EQ(t.rv, rv0);
}

TEST(VariantErrors, GhostArguments) {
  Batch<float> t({{5, 3}}, Layout::ChannelsFirst, 1);
  const Options train{.training = true};
  expect_refused(t, [&] { ghost_batch_norm(t.in(), t.out(), 0, {t.rm, t.rv}, {}, train); },
                 {"bnorm::ghost_batch_norm: virtual_batch_size: expected >= 1, got 0"});
  expect_refused(t, [&] { ghost_batch_norm(t.in(), t.out(), 2, {t.rm, t.rv}, {}, train); },
                 {"bnorm::ghost_batch_norm: input: expected more than 1 value per channel in every virtual batch",
                  "got 1 in the last one", "[5, 3]", "virtual_batch_size 2"});
  std::vector<double> short_save(3);
  expect_refused(t, [&] { ghost_batch_norm(t.in(), t.out(), 3, {t.rm, t.rv}, {}, train, {short_save, {}}); },
                 {"bnorm::ghost_batch_norm: save_mean: expected 6 values", "got 3"});
  expect_refused(t,
                 [&] {
                   ghost_batch_norm(t.in(), t.out(), 3, {t.rm, t.rv}, {},
                                    {.training = true, .activation = Activation::Relu});
                 },
                 {"bnorm::ghost_batch_norm: activation: expected None", "got Relu"});
  expect_refused(t, [&] { ghost_batch_norm(t.in(), t.out(), 3, {t.rm, t.rv}, {}, {.training = true, .momentum = 2}); },
                 {"bnorm::ghost_batch_norm: momentum: expected a value in [0, 1], got 2"});
  // Eval takes any virtual_batch_size >= 1 (a last batch of 1 is fine there).
  EXPECT_EQ(error_of([&] { ghost_batch_norm(t.in(), t.out(), 2, {t.rm, t.rv}, {}, {.training = false}); }),
            "(no error)");
  std::vector<double> mean(3), invstd(3);
  expect_refused(t,
                 [&] {
                   ghost_batch_norm_backward(t.grad_out(), {.input = t.in(), .saved = {mean, invstd}}, 3, train,
                                             t.grad_in());
                 },
                 {"bnorm::ghost_batch_norm_backward: save_mean: expected 6 values", "got 3"});
  expect_refused(t, [&] { ghost_batch_norm_backward(t.grad_out(), {.input = t.in()}, 3, train, t.grad_in()); },
                 {"bnorm::ghost_batch_norm_backward: save_mean: expected save_mean and save_invstd"});
  const std::vector<float> dx0 = t.dxm;
  expect_refused(t, [&] { ghost_batch_norm_backward(t.grad_out(), {.input = t.in()}, -1, train, t.grad_in()); },
                 {"bnorm::ghost_batch_norm_backward: virtual_batch_size: expected >= 1, got -1"});
  EXPECT_EQ(t.dxm, dx0);
}

TEST(VariantErrors, RenormArguments) {
  Batch<float> t({{5, 3}}, Layout::ChannelsFirst, 1);
  const Options train{.training = true};
  expect_refused(t, [&] { batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {}, train, {0.5, 1.0}); },
                 {"bnorm::batch_renorm: r_max: expected a value >= 1 (inf: r unclipped), got 0.5"});
  expect_refused(t, [&] { batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {}, train, {2.0, -1.0}); },
                 {"bnorm::batch_renorm: d_max: expected a value >= 0 (inf: d unclipped), got -1"});
  expect_refused(t,
                 [&] { batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {}, train, {std::nan(""), 1.0}); },
                 {"bnorm::batch_renorm: r_max: expected", "got nan"});
  expect_refused(t, [&] { batch_renorm(t.in(), t.out(), {}, {}, train, {}); },
                 {"bnorm::batch_renorm: running_mean: expected running statistics when training=true"});
  std::vector<double> two(2);
  expect_refused(t, [&] { batch_renorm(t.in(), t.out(), {t.rm, t.rv}, {}, train, {}, {}, {two, {}}); },
                 {"bnorm::batch_renorm: r: expected 3 values", "got 2"});
  Batch<float> one({{1, 3}}, Layout::ChannelsFirst, 1);
  expect_refused(one, [&] { batch_renorm(one.in(), one.out(), {one.rm, one.rv}, {}, train, {}); },
                 {"bnorm::batch_renorm: input: Expected more than 1 value per channel when training"});
  std::vector<double> mean(3), invstd(3), r(3);
  expect_refused(t,
                 [&] {
                   batch_renorm_backward(t.grad_out(), {.input = t.in(), .saved = {mean, invstd}}, {r, {}}, train,
                                         t.grad_in());
                 },
                 {"bnorm::batch_renorm_backward: r: expected the forward's r and d when training=true, got none"});
}


// The layers: BatchNorm's state and checks, the variants' statistics (the functional forms above).
TEST(VariantLayers, GhostLayerMatchesReferenceOverSteps) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Batch<float> t({{10, 4, 3, 2}}, layout, 21);
    GhostBatchNormT<float> layer(4, 4, {}, 2);
    std::copy(t.wt.begin(), t.wt.end(), layer.weight().begin());
    std::copy(t.bt.begin(), t.bt.end(), layer.bias().begin());
    std::vector<double> rm(4, 0.0), rv(4, 1.0);
    for (int step = 0; step < 2; ++step) {
      layer.forward(t.in(), t.out());
      const reference::Forward f = reference::ghost_forward(t.problem(true), 4, t.x, t.w, t.b, rm, rv);
      rm = f.running_mean;
      rv = f.running_var;
      EXPECT_TRUE(close(t.y(), f.y, loose<float>(), loose<float>(), "y"));
      EXPECT_TRUE(close(widen(std::vector<float>(layer.running_var().begin(), layer.running_var().end())), rv,
                        loose<float>(), loose<float>(), "running_var"));
      layer.zero_grad();
      layer.backward(t.in(), t.grad_out(), t.grad_in());
      const reference::Backward g = reference::ghost_backward(t.problem(true), 4, t.x, t.w, f, t.dy);
      EXPECT_TRUE(close(t.dx(), g.dx, loose<float>() * max_abs(g.dx), loose<float>(), "dx"));
      EXPECT_TRUE(close(widen(std::vector<float>(layer.weight_grad().begin(), layer.weight_grad().end())), g.dweight,
                        loose<float>() * max_abs(g.dweight), loose<float>(), "dweight"));
    }
    EXPECT_EQ(layer.num_batches_tracked(), 2 * 3);  // one per virtual batch
    layer.eval();
    layer.forward(t.in(), t.out());
    EXPECT_TRUE(close(t.y(), reference::forward(t.problem(false), t.x, t.w, t.b, rm, rv).y, loose<float>(),
                      loose<float>(), "eval y"));
  }
}

TEST(VariantLayers, RenormLayerMatchesReferenceWithChangingLimits) {
  Batch<double> t({{6, 3, 5}}, Layout::ChannelsFirst, 22);
  BatchRenormT<double> layer(3, {1.0, 0.0});
  std::copy(t.w.begin(), t.w.end(), layer.weight().begin());
  std::copy(t.b.begin(), t.b.end(), layer.bias().begin());
  std::vector<double> rm(3, 0.0), rv(3, 1.0);
  for (const RenormLimits lim : {RenormLimits{1.0, 0.0}, RenormLimits{1.2, 0.1}, RenormLimits{3.0, 5.0}}) {
    layer.set_limits(lim);
    EXPECT_EQ(layer.limits().r_max, lim.r_max);
    layer.forward(t.in(), t.out());
    const reference::Renorm f = reference::renorm_forward(t.problem(true), lim.r_max, lim.d_max, t.x, t.w, t.b, rm, rv);
    rm = f.fwd.running_mean;
    rv = f.fwd.running_var;
    EXPECT_TRUE(close(t.y(), f.fwd.y, 1e-12, 1e-12, "y"));
    layer.zero_grad();
    layer.backward(t.in(), t.grad_out(), t.grad_in());
    const reference::Backward g = reference::renorm_backward(t.problem(true), t.x, t.w, f, t.dy);
    EXPECT_TRUE(close(t.dx(), g.dx, 1e-10 * max_abs(g.dx), 1e-10, "dx"));
    EXPECT_TRUE(close(std::vector<double>(layer.weight_grad().begin(), layer.weight_grad().end()), g.dweight,
                      1e-10 * max_abs(g.dweight), 1e-10, "dweight"));
  }
  EXPECT_TRUE(close(std::vector<double>(layer.running_mean().begin(), layer.running_mean().end()), rm, 1e-12, 1e-12,
                    "running_mean"));
  EXPECT_EQ(layer.num_batches_tracked(), 3);
}

TEST(VariantLayers, Errors) {
  EXPECT_NE(error_of([] { GhostBatchNormT<float> l(4, 0); }).find("bnorm::GhostBatchNorm: virtual_batch_size: "
                                                                 "expected >= 1, got 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { GhostBatchNormT<float> l(4, 2, {.momentum = std::nullopt}); })
                .find("bnorm::GhostBatchNorm: momentum: expected a value in [0, 1]"),
            std::string::npos);
  EXPECT_NE(error_of([] { BatchRenormT<float> l(4, {}, {.track_running_stats = false}); })
                .find("bnorm::BatchRenorm: track_running_stats: expected true"),
            std::string::npos);
  BatchRenormT<float> l(3, {2.0, 1.0});
  EXPECT_NE(error_of([&] { l.set_limits({0.5, 1.0}); }).find("bnorm::BatchRenorm: r_max: expected a value >= 1"),
            std::string::npos);
  EXPECT_EQ(l.limits().r_max, 2.0);
  // The layer's own checks name the layer; a failed forward changes nothing.
  Batch<float> t({{5, 3}}, Layout::ChannelsFirst, 1);
  GhostBatchNormT<float> g(3, 2);
  EXPECT_NE(error_of([&] { g.forward(t.in(), t.out()); })
                .find("bnorm::ghost_batch_norm: input: expected more than 1 value per channel in every virtual batch"),
            std::string::npos);
  EXPECT_EQ(g.num_batches_tracked(), 0);
  EXPECT_EQ(g.running_mean()[0], 0.0f);
  Batch<float> four({{5, 4}}, Layout::ChannelsFirst, 1);
  EXPECT_NE(error_of([&] { g.forward(four.in(), four.out()); })
                .find("bnorm::GhostBatchNorm::forward: input: expected 3 channels"),
            std::string::npos);
}

}  // namespace
}  // namespace bnorm::test
