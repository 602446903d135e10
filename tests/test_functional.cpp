// The functional API: finite-difference gradient checks in float64, and every error case, each
// checked for its message and for leaving every buffer untouched.
#include "test_util.hpp"

namespace bnorm::test {
namespace {

// ---- Gradient check -------------------------------------------------------------------------

// L(x, gamma, beta) = sum(r * y): its gradient is backward with grad_output = r.
struct GradProblem {
  Dims d{{3, 4, 5}};
  Layout layout = Layout::ChannelsFirst;
  bool training = true;
  bool relu = false;
  std::vector<double> x, w, b, rm, rv, r;

  double loss(const std::vector<double>& xv, const std::vector<double>& wv, const std::vector<double>& bv) const {
    std::vector<double> y(xv.size()), rmc = rm, rvc = rv;
    batch_norm(ConstTensorView(xv.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout),
               {rmc, rvc}, {wv, bv}, {.training = training, .activation = relu ? Activation::Relu : Activation::None});
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += r[i] * y[i];
    return l;
  }
};

void gradient_check(bool training, bool relu, Layout layout) {
  SCOPED_TRACE(std::string(training ? "training" : "eval") + (relu ? " relu" : "") + " " + to_string(layout));
  GradProblem p;
  p.layout = layout;
  p.training = training;
  p.relu = relu;
  std::mt19937_64 rng(17);
  const std::int64_t C = p.d.C();
  p.x = to_layout<double>(random_input<double>(p.d, rng), p.d, layout);
  p.r = to_layout<double>(random_input<double>(p.d, rng, 0.5), p.d, layout);
  p.w = random_vector<double>(C, rng, 0.5, 1.5);
  p.b = random_vector<double>(C, rng, -0.5, 0.5);
  p.rm = random_vector<double>(C, rng, -1, 1);
  p.rv = random_vector<double>(C, rng, 0.5, 2);

  std::vector<double> y(p.x.size()), sm(static_cast<std::size_t>(C)), si(sm.size()), rmc = p.rm, rvc = p.rv;
  const Shape shape = p.d.view_shape();
  batch_norm(ConstTensorView(p.x.data(), shape, layout), TensorView(y.data(), shape, layout), {rmc, rvc}, {p.w, p.b},
             {.training = training, .activation = relu ? Activation::Relu : Activation::None}, {sm, si});
  std::vector<double> dx(p.x.size()), dw(sm.size()), db(sm.size());
  batch_norm_backward(ConstTensorView(p.r.data(), shape, layout),
                      {.input = ConstTensorView(p.x.data(), shape, layout),
                       .output = ConstTensorView(y.data(), shape, layout),
                       .weight = p.w,
                       .saved = {sm, si},
                       .running = {p.rm, p.rv}},
                      {.training = training, .activation = relu ? Activation::Relu : Activation::None},
                      TensorView(dx.data(), shape, layout), {dw, db});

  const double h = 1e-6;
  auto numeric = [&](std::vector<double>& v, std::size_t i) {
    const double keep = v[i];
    v[i] = keep + h;
    const double up = p.loss(p.x, p.w, p.b);
    v[i] = keep - h;
    const double down = p.loss(p.x, p.w, p.b);
    v[i] = keep;
    return (up - down) / (2 * h);
  };
  for (std::size_t i = 0; i < p.x.size(); ++i) EXPECT_NEAR(dx[i], numeric(p.x, i), 1e-7) << "dx[" << i << "]";
  for (std::size_t c = 0; c < dw.size(); ++c) {
    EXPECT_NEAR(dw[c], numeric(p.w, c), 1e-7) << "dweight[" << c << "]";
    EXPECT_NEAR(db[c], numeric(p.b, c), 1e-7) << "dbias[" << c << "]";
  }
}

TEST(GradientCheck, TrainingFiniteDifferences) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) gradient_check(true, false, l);
}
TEST(GradientCheck, EvalFiniteDifferences) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) gradient_check(false, false, l);
}
TEST(GradientCheck, FusedReluFiniteDifferences) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    gradient_check(true, true, l);
    gradient_check(false, true, l);
  }
}

// ---- Errors ---------------------------------------------------------------------------------

// A forward call set up with valid arguments that each error test breaks in one way.
struct Call {
  std::vector<std::int64_t> dims{4, 3, 5};
  std::vector<float> x = std::vector<float>(60, 0.f), y = std::vector<float>(60, 7.f);
  std::vector<float> rm = std::vector<float>(3, 0.25f), rv = std::vector<float>(3, 2.f);
  std::vector<float> w = std::vector<float>(3, 1.5f), b = std::vector<float>(3, -1.f);
  std::vector<float> sm = std::vector<float>(3, 9.f), si = std::vector<float>(3, 9.f);
  bool training = true;
  double momentum = 0.1, eps = 1e-5;
  Call() {
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7);
  }
  void run(ConstTensorView in, TensorView out, VectorView rmv, VectorView rvv, ConstVectorView wv, ConstVectorView bv) {
    batch_norm(in, out, {rmv, rvv}, {wv, bv}, {.training = training, .momentum = momentum, .eps = eps},
               {VectorView(sm), VectorView(si)});
  }
  Shape shape() const { return Shape{std::span<const std::int64_t>(dims)}; }
  ConstTensorView in() const { return ConstTensorView(x.data(), shape()); }
  TensorView out() { return TensorView(y.data(), shape()); }
  void run() { run(in(), out(), rm, rv, w, b); }
};

// Runs f, expects bnorm::Error whose message contains every fragment, and that no buffer changed.
template <class F>
void expect_error(Call& call, F f, std::initializer_list<const char*> fragments) {
  const Call before = call;
  try {
    f(call);
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* frag : fragments) EXPECT_NE(msg.find(frag), std::string::npos) << "'" << frag << "' not in: " << msg;
  }
  EXPECT_EQ(call.y, before.y) << "output changed by a failed call";
  EXPECT_EQ(call.rm, before.rm) << "running_mean changed by a failed call";
  EXPECT_EQ(call.rv, before.rv) << "running_var changed by a failed call";
  EXPECT_EQ(call.sm, before.sm) << "save_mean changed by a failed call";
  EXPECT_EQ(call.si, before.si) << "save_invstd changed by a failed call";
}

TEST(Errors, ValidCallSucceeds) {
  Call c;
  c.run();
  EXPECT_NE(c.rm, Call().rm);
}

TEST(Errors, WrongRank) {
  Call c;
  expect_error(c, [](Call& k) { k.dims = {60}; k.run(); }, {"batch_norm", "input", "rank >= 2", "rank 1", "[60]"});
}

TEST(Errors, TooManyDims) {
  EXPECT_THROW((Shape{1, 2, 3, 4, 5, 6, 7, 8, 9}), Error);
}

// The kind a binding maps to its own exception without reading the message (Python: TypeError for
// Type, ValueError for Value); every Error is still a std::invalid_argument.
TEST(Errors, CarryAKind) {
  const Error dtype("bnorm::batch_norm: weight: expected dtype float32, got float64", ErrorKind::Type);
  EXPECT_EQ(dtype.kind(), ErrorKind::Type);
  EXPECT_STREQ(dtype.what(), "bnorm::batch_norm: weight: expected dtype float32, got float64");
  try {
    Shape{1, 2, 3, 4, 5, 6, 7, 8, 9};
    ADD_FAILURE() << "no error thrown";
  } catch (const std::invalid_argument& e) {
    const auto* error = dynamic_cast<const Error*>(&e);
    ASSERT_NE(error, nullptr);
    EXPECT_EQ(error->kind(), ErrorKind::Value);
  }
}

// The library's own errors: a wrong dtype is Type (the functional checks and the layer's), the rest Value.
TEST(Errors, DtypeProblemsAreTypeTheRestValue) {
  auto kind_of = [](auto f) -> std::optional<ErrorKind> {
    try {
      f();
    } catch (const Error& e) {
      return e.kind();
    }
    return std::nullopt;
  };
  Call c;
  const std::vector<double> w64(3, 1.0);
  std::vector<double> x64(60, 1.0);
  EXPECT_EQ(kind_of([&] { c.run(c.in(), c.out(), c.rm, c.rv, w64, c.b); }), ErrorKind::Type);  // vector dtype
  EXPECT_EQ(kind_of([&] {
              batch_norm(ConstTensorView(x64.data(), c.shape()), c.out(), {c.rm, c.rv}, {}, {.training = true});
            }),
            ErrorKind::Type);  // output's dtype unlike the input's
  EXPECT_EQ(kind_of([&] { c.run(c.in(), c.out(), c.rm, c.rv, VectorView(c.w.data(), 2), c.b); }),
            ErrorKind::Value);  // a length
  EXPECT_EQ(kind_of([&] { batch_norm(c.in(), c.out(), {c.rm, c.rv}, {}, {.training = true, .eps = -1}); }),
            ErrorKind::Value);
  BatchNorm bn(3);
  EXPECT_EQ(kind_of([&] { bn.forward(ConstTensorView(x64.data(), c.shape()), TensorView(x64.data(), c.shape())); }),
            ErrorKind::Type);  // the layer's dtype
  EXPECT_EQ(kind_of([&] { bn.forward(c.in(), TensorView(c.y.data(), Shape{4, 3, 4})); }), ErrorKind::Value);
}

TEST(Errors, NegativeDim) {
  Call c;
  expect_error(c, [](Call& k) { k.dims = {4, 3, -5}; k.run(); }, {"input", "non-negative", "-5"});
}

TEST(Errors, OverflowingShape) {
  Call c;
  expect_error(c, [](Call& k) { k.dims = {1LL << 40, 3, 1LL << 30}; k.run(); }, {"input", "fits in int64"});
}

TEST(Errors, ChannelCountMismatch) {
  std::vector<float> four(4, 0.f), two(2, 1.f), five(5, 0.f);
  Call c;
  expect_error(c, [&](Call& k) { k.run(k.in(), k.out(), four, k.rv, k.w, k.b); },
               {"running_mean", "expected 3 values", "got 4"});
  expect_error(c, [&](Call& k) { k.run(k.in(), k.out(), k.rm, four, k.w, k.b); },
               {"running_var", "expected 3 values", "got 4"});
  expect_error(c, [&](Call& k) { k.run(k.in(), k.out(), k.rm, k.rv, two, k.b); }, {"weight", "expected 3 values", "got 2"});
  expect_error(c, [&](Call& k) { k.run(k.in(), k.out(), k.rm, k.rv, k.w, five); }, {"bias", "expected 3 values", "got 5"});
  expect_error(
      c,
      [&](Call& k) {
        batch_norm(k.in(), k.out(), {k.rm, k.rv}, {k.w, k.b}, {.training = true}, {VectorView(four), VectorView(k.si)});
      },
      {"save_mean", "expected 3 values", "got 4"});
}

TEST(Errors, OneValuePerChannelInTraining) {
  Call c;
  expect_error(c, [](Call& k) { k.dims = {1, 3, 1}; k.run(); },
               {"Expected more than 1 value per channel when training", "[1, 3, 1]"});
  Call d;
  d.dims = {1, 60};
  for (auto* v : {&d.rm, &d.rv, &d.w, &d.b, &d.sm, &d.si}) v->resize(60, 1.f);
  expect_error(d, [](Call& k) { k.run(); }, {"Expected more than 1 value per channel", "[1, 60]"});
  // In eval a single sample is fine.
  Call e;
  e.training = false;
  e.dims = {1, 3, 1};
  EXPECT_NO_THROW(e.run());
}

TEST(Errors, BadEps) {
  for (double eps : {0.0, -1e-5, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    Call c;
    expect_error(c, [eps](Call& k) { k.eps = eps; k.run(); }, {"eps", "finite value > 0"});
  }
}

TEST(Errors, BadMomentum) {
  for (double m : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    Call c;
    expect_error(c, [m](Call& k) { k.momentum = m; k.run(); }, {"momentum", "[0, 1]"});
  }
}

TEST(Errors, NullData) {
  Call c;
  expect_error(c, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(static_cast<const float*>(nullptr), s), TensorView(k.y.data(), s), k.rm, k.rv, k.w, k.b);
  }, {"input", "null"});
  Call d;
  expect_error(d, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s), TensorView(k.y.data(), s), VectorView(static_cast<float*>(nullptr), 3), k.rv, k.w, k.b);
  }, {"running_mean", "null"});
}

TEST(Errors, DtypeAndShapeMismatch) {
  Call c;
  expect_error(c, [](Call& k) {
    std::vector<double> yd(60);
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s), TensorView(yd.data(), s), k.rm, k.rv, k.w, k.b);
  }, {"output", "dtype", "float32", "float64"});
  Call d;
  expect_error(d, [](Call& k) {
    std::vector<double> wd(3, 1.0);
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s), TensorView(k.y.data(), s), k.rm, k.rv, wd, k.b);
  }, {"weight", "dtype float32", "float64"});
  Call e;
  expect_error(e, [](Call& k) {
    k.run(ConstTensorView(k.x.data(), Shape{4, 3, 5}), TensorView(k.y.data(), Shape{4, 5, 3}), k.rm, k.rv, k.w, k.b);
  }, {"output", "shape", "[4, 3, 5]", "[4, 5, 3]"});
  Call f;
  expect_error(f, [](Call& k) {
    k.run(ConstTensorView(k.x.data(), Shape{4, 3, 5}), TensorView(k.y.data(), Shape{4, 3, 5}, Layout::ChannelsLast), k.rm,
          k.rv, k.w, k.b);
  }, {"output", "layout", "channels_first", "channels_last"});
}

TEST(Errors, UnsupportedDtypeAndLayout) {
  Call c;
  expect_error(c, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), static_cast<DType>(42), s), TensorView(k.y.data(), s), k.rm, k.rv, k.w, k.b);
  }, {"input", "unsupported", "dtype"});
  Call d;
  expect_error(d, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s, static_cast<Layout>(9)), TensorView(k.y.data(), s), k.rm, k.rv, k.w, k.b);
  }, {"input", "unsupported", "layout"});
}

TEST(Errors, RunningStatsBothOrNeither) {
  Call c;
  expect_error(c, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s), TensorView(k.y.data(), s), k.rm, {}, k.w, k.b);
  }, {"running_var", "expected a vector like running_mean"});
  Call d;
  d.training = false;
  expect_error(d, [](Call& k) {
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(k.x.data(), s), TensorView(k.y.data(), s), {}, {}, k.w, k.b);
  }, {"running_mean", "training=false"});
}

TEST(Errors, PartialOverlapOfInputAndOutput) {
  Call c;
  expect_error(c, [](Call& k) {
    std::vector<float> buf(61);
    const Shape s{4, 3, 5};
    k.run(ConstTensorView(buf.data(), s), TensorView(buf.data() + 1, s), k.rm, k.rv, k.w, k.b);
  }, {"output", "partial overlap"});
}

TEST(Errors, BackwardArguments) {
  const Shape s{4, 3, 5};
  std::vector<float> x(60, 1.f), dy(60, 1.f), dx(60, 5.f), sm(3, 0.f), si(3, 1.f), gw(3, 5.f), gb(3, 5.f);
  auto expect = [&](auto f, std::initializer_list<const char*> frags) {
    try {
      f();
      ADD_FAILURE() << "no error thrown";
    } catch (const Error& e) {
      for (const char* frag : frags) EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
    EXPECT_EQ(dx, std::vector<float>(60, 5.f));
    EXPECT_EQ(gw, std::vector<float>(3, 5.f));
  };
  expect(
      [&] {
        batch_norm_backward(ConstTensorView(dy.data(), Shape{4, 3, 4}),
                            {.input = ConstTensorView(x.data(), s), .saved = {sm, si}}, {.training = true},
                            TensorView(dx.data(), s), {gw, gb});
      },
      {"batch_norm_backward", "grad_output", "[4, 3, 5]", "[4, 3, 4]"});
  expect(
      [&] {
        batch_norm_backward(ConstTensorView(dy.data(), s), {.input = ConstTensorView(x.data(), s)}, {.training = true},
                            TensorView(dx.data(), s), {gw, gb});
      },
      {"save_mean", "training=true"});
  expect(
      [&] {
        batch_norm_backward(ConstTensorView(dy.data(), s), {.input = ConstTensorView(x.data(), s)}, {.training = false},
                            TensorView(dx.data(), s), {gw, gb});
      },
      {"running_mean", "training=false"});
  expect(
      [&] {
        batch_norm_backward(ConstTensorView(dy.data(), s), {.input = ConstTensorView(x.data(), s), .saved = {sm, si}},
                            {.training = true, .activation = Activation::Relu}, TensorView(dx.data(), s), {gw, gb});
      },
      {"output", "Relu"});
  expect(
      [&] {
        batch_norm_backward(ConstTensorView(dy.data(), s), {.input = ConstTensorView(x.data(), s), .saved = {sm, si}},
                            {.training = true}, TensorView(dx.data(), s), {VectorView(gw.data(), 2), gb});
      },
      {"grad_weight", "expected 3 values", "got 2"});
}

// Inference from read-only running statistics equals batch_norm in eval mode.
TEST(EdgeCases, InferenceWithConstStatistics) {
  const Dims d{{5, 6, 7}};
  std::mt19937_64 rng(13);
  const std::vector<float> x = cast<float>(random_input<float>(d, rng));
  const std::vector<float> rm = cast<float>(random_vector<float>(6, rng, -1, 1)),
                           rv = cast<float>(random_vector<float>(6, rng, 0.5, 2)),
                           w = cast<float>(random_vector<float>(6, rng, 0.5, 1.5));
  std::vector<float> y1(x.size()), y2(x.size()), rm2 = rm, rv2 = rv;
  batch_norm_inference(ConstTensorView(x.data(), d.view_shape()), TensorView(y1.data(), d.view_shape()), {rm, rv},
                       {w, {}}, 1e-5, Activation::Relu);
  batch_norm(ConstTensorView(x.data(), d.view_shape()), TensorView(y2.data(), d.view_shape()), {rm2, rv2}, {w, {}},
             {.training = false, .activation = Activation::Relu});
  EXPECT_EQ(y1, y2);
  EXPECT_THROW(
      batch_norm_inference(ConstTensorView(x.data(), d.view_shape()), TensorView(y1.data(), d.view_shape()), {}),
      Error);
  // Its errors name it (they named batch_norm while it was a wrapper over it), and change nothing.
  const std::vector<float> w5(5, 1.f);
  const std::vector<float> y_before = y1;
  const std::string e = error_of([&] {
    batch_norm_inference(ConstTensorView(x.data(), d.view_shape()), TensorView(y1.data(), d.view_shape()), {rm, rv},
                         {w5, {}});
  });
  EXPECT_NE(e.find("bnorm::batch_norm_inference: weight: expected 6 values (one per channel), got 5"),
            std::string::npos)
      << e;
  EXPECT_EQ(y1, y_before);
}

// Empty batches: eval is a no-op, training is the m == 1 rule's error (m = 0).
TEST(EdgeCases, EmptyBatch) {
  std::vector<float> rm(3, 0.f), rv(3, 1.f);
  EXPECT_NO_THROW(batch_norm(ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 5}),
                             TensorView(static_cast<float*>(nullptr), Shape{0, 3, 5}), rm, rv, {}, {}, false));
  EXPECT_THROW(batch_norm(ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 5}),
                          TensorView(static_cast<float*>(nullptr), Shape{0, 3, 5}), rm, rv, {}, {}, true),
               Error);
}

// Policy::Torch: torch's rules for the edge cases, which the bindings take (functional.hpp, Policy).
TEST(TorchPolicy, AnyMomentumRunsTheSameUpdate) {
  const Shape shape{4, 3, 5};
  std::vector<double> x(60);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.7 * static_cast<double>(i)) * 3.0 + 1.0;
  std::vector<double> y(60), mean(3), var(3);
  batch_stats(ConstTensorView(x.data(), shape), mean, var);
  for (double m : {-0.5, 1.5, 7.0}) {
    std::vector<double> rm{0.25, -1.0, 2.0}, rv{1.0, 0.5, 3.0};
    const std::vector<double> rm0 = rm, rv0 = rv;
    const Options strict{.training = true, .momentum = m};
    EXPECT_NE(error_of([&] {
                batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {rm, rv}, {}, strict);
              }).find("momentum: expected a value in [0, 1]"),
              std::string::npos);
    EXPECT_EQ(rm, rm0);
    Options torch = strict;
    torch.policy = Policy::Torch;
    batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {rm, rv}, {}, torch);
    for (std::size_t c = 0; c < 3; ++c) {
      EXPECT_NEAR(rm[c], (1 - m) * rm0[c] + m * mean[c], 1e-12) << "momentum " << m;
      EXPECT_NEAR(rv[c], (1 - m) * rv0[c] + m * var[c] * 20.0 / 19.0, 1e-12) << "momentum " << m;
    }
  }
}

TEST(TorchPolicy, ZeroEpsInEvalRunsAsTheSmallestDouble) {
  const Shape shape{2, 2, 3};
  const std::vector<double> x{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  std::vector<double> rm{1.0, 2.0}, rv{4.0, 0.0};
  std::vector<double> y(12), expect(12);
  const Options zero{.eps = 0.0, .policy = Policy::Torch};
  batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {rm, rv}, {}, zero);
  batch_norm_inference(ConstTensorView(x.data(), shape), TensorView(expect.data(), shape), {rm, rv}, {},
                       std::numeric_limits<double>::denorm_min());
  EXPECT_EQ(y, expect);
  EXPECT_EQ(y[0], 0.0);  // (1 - 1) / sqrt(4)
  const Options strict{.eps = 0.0};
  EXPECT_NE(error_of([&] {
              batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {rm, rv}, {}, strict);
            }).find("eps: expected a finite value > 0, got 0"),
            std::string::npos);
  for (double eps : {-1e-5, std::numeric_limits<double>::infinity()}) {
    const Options bad{.eps = eps, .policy = Policy::Torch};
    EXPECT_NE(error_of([&] {
                batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {rm, rv}, {}, bad);
              }).find("bnorm::batch_norm: eps: expected a finite value >= 0 in eval, got "),
              std::string::npos);
  }
  // Training keeps eps > 0 under either policy.
  const Options training{.training = true, .eps = 0.0, .policy = Policy::Torch};
  EXPECT_NE(error_of([&] {
              batch_norm(ConstTensorView(x.data(), shape), TensorView(y.data(), shape), {}, {}, training);
            }).find("eps: expected a finite value > 0, got 0"),
            std::string::npos);
}

TEST(TorchPolicy, AnEmptyTrainingBatchChangesNothing) {
  std::vector<float> rm{0.5f, 1.f, 2.f}, rv{1.f, 2.f, 3.f};
  std::vector<double> sm(3, 7.0), si(3, 7.0);
  const ConstTensorView x(static_cast<const float*>(nullptr), Shape{0, 3, 5});
  const TensorView y(static_cast<float*>(nullptr), Shape{0, 3, 5});
  const Options torch{.training = true, .momentum = 0.5, .policy = Policy::Torch};
  batch_norm(x, y, {rm, rv}, {}, torch, {sm, si});
  EXPECT_EQ(rm, (std::vector<float>{0.5f, 1.f, 2.f}));
  EXPECT_EQ(rv, (std::vector<float>{1.f, 2.f, 3.f}));
  EXPECT_EQ(sm, std::vector<double>(3, 0.0));
  EXPECT_EQ(si, std::vector<double>(3, 0.0));
  // The other checks still run: a running_mean of the wrong length is refused.
  std::vector<float> short_rm(2, 0.f);
  EXPECT_NE(error_of([&] { batch_norm(x, y, {short_rm, rv}, {}, torch); })
                .find("running_mean: expected 3 values (one per channel), got 2"),
            std::string::npos);
  // And its parameter gradients are zeros, whatever the statistics.
  std::vector<float> gw(3, 7.f), gb(3, 7.f);
  const std::vector<double> inf(3, std::numeric_limits<double>::infinity());
  batch_norm_backward(ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 5}),
                      {.input = x, .saved = {inf, inf}}, torch, {}, {gw, gb});
  EXPECT_EQ(gw, std::vector<float>(3, 0.f));
  EXPECT_EQ(gb, std::vector<float>(3, 0.f));
}

// The saved statistics may be float64 for float32 input: backward then keeps the mean's precision.
TEST(EdgeCases, Float64SavedStatisticsForFloat32Input) {
  const Dims d{{8, 2, 50}};
  std::mt19937_64 rng(9);
  const std::vector<double> x = random_input<float>(d, rng, 1e4);
  const std::vector<double> dy = random_input<float>(d, rng, 0.5);
  const reference::Problem p{d.N(), d.C(), d.S(), true, 0.1, 1e-5, false};
  const reference::Forward ref = reference::forward(p, x, {}, {}, {}, {});
  const reference::Backward rb = reference::backward(p, x, {}, ref, dy);
  const std::vector<float> xf = cast<float>(x), dyf = cast<float>(dy);
  std::vector<float> y(xf.size()), dx(xf.size());
  std::vector<double> sm(2), si(2), gw(2), gb(2);
  batch_norm(ConstTensorView(xf.data(), d.view_shape()), TensorView(y.data(), d.view_shape()), {}, {},
             {.training = true}, {VectorView(sm), VectorView(si)});
  std::vector<float> gwf(2), gbf(2);
  batch_norm_backward(
      ConstTensorView(dyf.data(), d.view_shape()),
      {.input = ConstTensorView(xf.data(), d.view_shape()), .saved = {ConstVectorView(sm), ConstVectorView(si)}},
      {.training = true}, TensorView(dx.data(), d.view_shape()), {VectorView(gwf), VectorView(gbf)});
  EXPECT_TRUE(close(sm, ref.mean, 0, 1e-15, "save_mean (float64)"));
  EXPECT_TRUE(close(widen(gwf), rb.dweight, 1e-4, 1e-6, "grad_weight at offset 1e4"));
  EXPECT_TRUE(close(widen(dx), rb.dx, 1e-5 * max_abs(rb.dx), 0, "grad_input at offset 1e4"));
}

}  // namespace
}  // namespace bnorm::test

namespace bnorm::test {
namespace {

// Options::outputs changes how large outputs are stored (non-temporal or ordinary stores), never
// what is stored: both give the same bits, forward and backward, in both layouts. 2x32x384x384
// float is 36 MiB, above the 32 MiB set here at which Reused outputs stream.
TEST(OutputMemory, FreshAndReusedGiveTheSameBits) {
  const StreamThresholdScope streamed(std::int64_t{32} << 20);
  const Dims d{{2, 32, 384, 384}};
  const auto n = static_cast<std::size_t>(d.numel());
  std::vector<float> x(n), dy(n);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  for (std::size_t i = 0; i < n; ++i) {
    x[i] = normal(rng);
    dy[i] = normal(rng) - 3.0f;
  }
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    std::vector<float> y[2], dx[2], sm[2], si[2];
    for (int k = 0; k < 2; ++k) {
      const OutputMemory memory = k == 0 ? OutputMemory::Reused : OutputMemory::Fresh;
      y[k].assign(n, 0.0f);
      dx[k].assign(n, 0.0f);
      sm[k].assign(32, 0.0f);
      si[k].assign(32, 0.0f);
      const Options options{.training = true, .activation = Activation::Relu, .outputs = memory};
      const ConstTensorView in{x.data(), DType::Float32, d.view_shape(), layout};
      const TensorView out{y[k].data(), DType::Float32, d.view_shape(), layout};
      batch_norm(in, out, {}, {}, options, {{sm[k].data(), DType::Float32, 32}, {si[k].data(), DType::Float32, 32}});
      batch_norm_backward({dy.data(), DType::Float32, d.view_shape(), layout},
                          {.input = in,
                           .output = {y[k].data(), DType::Float32, d.view_shape(), layout},
                           .saved = {{sm[k].data(), DType::Float32, 32}, {si[k].data(), DType::Float32, 32}}},
                          options, {dx[k].data(), DType::Float32, d.view_shape(), layout});
    }
    EXPECT_TRUE(y[0] == y[1]) << to_string(layout) << ": forward outputs differ";
    EXPECT_TRUE(dx[0] == dx[1]) << to_string(layout) << ": grad_input differs";
  }
}

}  // namespace
}  // namespace bnorm::test
