// The BatchNorm layer: torch's options and state rules, train/eval, gradients, save and load.
#include "test_util.hpp"

#include <filesystem>
#include <fstream>

namespace bnorm::test {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir() {
  const fs::path dir = fs::temp_directory_path() / ("bnorm_layer_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

TEST(Layer, DefaultsMatchTorch) {
  BatchNorm2d bn(4);
  EXPECT_TRUE(bn.is_training());
  EXPECT_EQ(bn.options().eps, 1e-5);
  EXPECT_EQ(*bn.options().momentum, 0.1);
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(bn.weight()[c], 1.f);
    EXPECT_EQ(bn.bias()[c], 0.f);
    EXPECT_EQ(bn.running_mean()[c], 0.f);
    EXPECT_EQ(bn.running_var()[c], 1.f);
  }
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

TEST(Layer, AcceptedRanksLikeTorch) {
  std::vector<float> buf(2 * 3 * 4 * 5 * 6, 1.f), out(buf.size());
  std::iota(buf.begin(), buf.end(), 0.f);
  auto fwd = [&](BasicBatchNorm<float>& bn, Shape s) { bn.forward(ConstTensorView(buf.data(), s), TensorView(out.data(), s)); };
  BatchNorm1d b1(3);
  EXPECT_NO_THROW(fwd(b1, {4, 3}));
  EXPECT_NO_THROW(fwd(b1, {4, 3, 5}));
  EXPECT_NE(error_of([&] { fwd(b1, {2, 3, 4, 5}); }).find("expected rank 2 (N, C) or 3 (N, C, L), got rank 4"), std::string::npos);
  BatchNorm2d b2(3);
  EXPECT_NO_THROW(fwd(b2, {2, 3, 4, 5}));
  EXPECT_NE(error_of([&] { fwd(b2, {2, 3, 4}); }).find("expected rank 4 (N, C, H, W), got rank 3 with shape [2, 3, 4]"), std::string::npos);
  BatchNorm3d b3(3);
  EXPECT_NO_THROW(fwd(b3, {2, 3, 4, 5, 6}));
  EXPECT_NE(error_of([&] { fwd(b3, {2, 3, 4, 5}); }).find("rank 5 (N, C, D, H, W)"), std::string::npos);
  EXPECT_NE(error_of([&] { fwd(b2, {2, 4, 3, 5}); }).find("expected 3 channels (num_features) in dim 1, got 4"), std::string::npos);
}

// A subclass that hands the protected constructor no source of batch statistics gets an Error,
// not a crash.
struct NoReducerLayer : BasicBatchNorm<float> {
  NoReducerLayer() : BasicBatchNorm<float>(3, {}, -1, nullptr) {}
};
TEST(Layer, NullReducerIsRefused) {
  const std::string e = error_of([] { NoReducerLayer layer; });
  EXPECT_NE(e.find("bnorm::BatchNorm: reducer: expected a source of batch statistics, got null"), std::string::npos)
      << e;
}

TEST(Layer, ConstructorValidates) {
  EXPECT_NE(error_of([] { BatchNorm2d bn(0); }).find("num_features: expected >= 1, got 0"), std::string::npos);
  EXPECT_NE(error_of([] { BatchNorm2d bn(3, {.eps = -1}); }).find("eps"), std::string::npos);
  EXPECT_NE(error_of([] { BatchNorm2d bn(3, {.momentum = 2.0}); }).find("momentum: expected a value in [0, 1], got 2"),
            std::string::npos);
}

// Several training steps then eval, against the reference replayed step by step.
template <class P>
void replay(BatchNormOptions opt, Layout layout) {
  SCOPED_TRACE(std::string("momentum ") + (opt.momentum ? std::to_string(*opt.momentum) : "None") +
               (opt.affine ? " affine" : "") + (opt.track_running_stats ? " track" : "") + " " + to_string(layout));
  const Dims d{{6, 5, 4, 3}};
  const std::int64_t C = d.C();
  BasicBatchNorm<P> bn(C, opt, 2);
  std::mt19937_64 rng(23);
  std::vector<double> w, b;
  if (opt.affine) {
    w = random_vector<P>(C, rng, 0.5, 1.5);
    b = random_vector<P>(C, rng, -1, 1);
    std::copy(w.begin(), w.end(), bn.weight().begin());
    std::copy(b.begin(), b.end(), bn.bias().begin());
  }
  std::vector<double> rm(static_cast<std::size_t>(C), 0.0), rv(rm.size(), 1.0);
  if (!opt.track_running_stats) rm.clear(), rv.clear();
  const double t = tol<P>();
  for (int step = 1; step <= 4; ++step) {
    const std::vector<double> x = random_input<P>(d, rng);
    const double factor = opt.momentum ? *opt.momentum : 1.0 / step;
    const reference::Forward ref = reference::forward({d.N(), C, d.S(), true, factor, opt.eps, false}, x, w, b, rm, rv);
    const std::vector<P> xm = to_layout<P>(x, d, layout);
    std::vector<P> y(xm.size());
    bn.forward(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout));
    EXPECT_TRUE(close(from_layout(y, d, layout), ref.y, t, t, "y step " + std::to_string(step)));
    rm = ref.running_mean;
    rv = ref.running_var;
    if (opt.track_running_stats) {
      EXPECT_TRUE(close(widen(std::vector<P>(bn.running_mean().begin(), bn.running_mean().end())), rm, t, t, "running_mean"));
      EXPECT_TRUE(close(widen(std::vector<P>(bn.running_var().begin(), bn.running_var().end())), rv, t, t, "running_var"));
      EXPECT_EQ(bn.num_batches_tracked(), step);
    } else {
      EXPECT_TRUE(bn.running_mean().empty());
      EXPECT_EQ(bn.num_batches_tracked(), 0);
    }
    // Backward of this step: gradients accumulate across steps until zero_grad.
    const std::vector<double> dy = random_input<P>(d, rng, 0.5);
    const reference::Backward rb = reference::backward({d.N(), C, d.S(), true, factor, opt.eps, false}, x, w, ref, dy);
    const std::vector<P> dym = to_layout<P>(dy, d, layout);
    std::vector<P> dx(xm.size());
    bn.zero_grad();
    bn.backward(ConstTensorView(xm.data(), d.view_shape(), layout), ConstTensorView(dym.data(), d.view_shape(), layout),
                TensorView(dx.data(), d.view_shape(), layout));
    EXPECT_TRUE(close(from_layout(dx, d, layout), rb.dx, 4 * t * std::max(1.0, max_abs(rb.dx)), 0, "dx"));
    if (opt.affine) {
      EXPECT_TRUE(close(widen(std::vector<P>(bn.weight_grad().begin(), bn.weight_grad().end())), rb.dweight, 1e3 * t, t, "dweight"));
      EXPECT_TRUE(close(widen(std::vector<P>(bn.bias_grad().begin(), bn.bias_grad().end())), rb.dbias, 1e3 * t, t, "dbias"));
    } else {
      EXPECT_TRUE(bn.weight_grad().empty());
    }
  }
  // Eval: running statistics when tracked (frozen-statistics backward), batch statistics otherwise.
  bn.eval();
  const std::vector<double> x = random_input<P>(d, rng);
  const bool tracked = opt.track_running_stats;
  const reference::Problem p{d.N(), C, d.S(), !tracked, 0.1, opt.eps, false};
  const reference::Forward ref = reference::forward(p, x, w, b, tracked ? rm : std::vector<double>{}, tracked ? rv : std::vector<double>{});
  const std::vector<P> xm = to_layout<P>(x, d, layout);
  std::vector<P> y(xm.size());
  const std::int64_t nbt = bn.num_batches_tracked();
  bn.forward(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout));
  EXPECT_TRUE(close(from_layout(y, d, layout), ref.y, t, t, "eval y"));
  EXPECT_EQ(bn.num_batches_tracked(), nbt);
  const std::vector<double> dy = random_input<P>(d, rng, 0.5);
  const reference::Backward rb = reference::backward(p, x, w, ref, dy);
  const std::vector<P> dym = to_layout<P>(dy, d, layout);
  std::vector<P> dx(xm.size());
  bn.backward(ConstTensorView(xm.data(), d.view_shape(), layout), ConstTensorView(dym.data(), d.view_shape(), layout),
              TensorView(dx.data(), d.view_shape(), layout));
  EXPECT_TRUE(close(from_layout(dx, d, layout), rb.dx, 4 * t * std::max(1.0, max_abs(rb.dx)), 0, "eval dx"));
}

TEST(Layer, TrainingStepsThenEvalAgainstReference) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast})
    for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>(0.7), std::optional<double>()})
      for (bool affine : {true, false})
        for (bool track : {true, false}) {
          BatchNormOptions o;
          o.momentum = momentum;
          o.affine = affine;
          o.track_running_stats = track;
          replay<float>(o, layout);
          replay<double>(o, layout);
        }
}

TEST(Layer, FailedForwardChangesNothing) {
  BatchNorm1d bn(3);
  std::vector<float> x(3, 1.f), y(3, 5.f);
  EXPECT_NE(error_of([&] { bn.forward(ConstTensorView(x.data(), Shape{1, 3}), TensorView(y.data(), Shape{1, 3})); })
                .find("Expected more than 1 value per channel when training, got input size [1, 3]"),
            std::string::npos);
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_EQ(bn.running_mean()[0], 0.f);
  EXPECT_EQ(y, std::vector<float>(3, 5.f));
  EXPECT_NE(error_of([&] {
              std::vector<float> xx(3), dy(3), dx(3);
              bn.backward(ConstTensorView(xx.data(), Shape{1, 3}), ConstTensorView(dy.data(), Shape{1, 3}),
                          TensorView(dx.data(), Shape{1, 3}));
            }).find("expected a forward call before backward"),
            std::string::npos);
  // Eval with one sample works with running statistics.
  bn.eval();
  EXPECT_NO_THROW(bn.forward(ConstTensorView(x.data(), Shape{1, 3}), TensorView(y.data(), Shape{1, 3})));
}

TEST(Layer, WrongDtypeIsRejected) {
  BatchNorm2d bn(2);
  std::vector<double> x(16), y(16);
  EXPECT_NE(error_of([&] { bn.forward(ConstTensorView(x.data(), Shape{2, 2, 2, 2}), TensorView(y.data(), Shape{2, 2, 2, 2})); })
                .find("expected dtype float32 or bfloat16 (the layer's), got float64"),
            std::string::npos);
}

// ---- Save and load ----------------------------------------------------------------------------

template <class P>
BasicBatchNorm<P> trained_layer(std::int64_t C, BatchNormOptions o = {}) {
  BasicBatchNorm<P> bn(C, o, 2);
  std::mt19937_64 rng(31);
  const Dims d{{4, C, 3, 3}};
  for (int step = 0; step < 3; ++step) {
    const std::vector<P> x = cast<P>(random_input<P>(d, rng));
    std::vector<P> y(x.size());
    bn.forward(ConstTensorView(x.data(), d.view_shape()), TensorView(y.data(), d.view_shape()));
  }
  for (std::size_t c = 0; c < bn.weight().size(); ++c) {
    bn.weight()[c] = static_cast<P>(0.5 + static_cast<double>(c));
    bn.bias()[c] = static_cast<P>(-0.25 * static_cast<double>(c));
  }
  return bn;
}

template <class P>
void expect_same_state(const BasicBatchNorm<P>& a, const BasicBatchNorm<P>& b) {
  EXPECT_TRUE(std::equal(a.weight().begin(), a.weight().end(), b.weight().begin(), b.weight().end()));
  EXPECT_TRUE(std::equal(a.bias().begin(), a.bias().end(), b.bias().begin(), b.bias().end()));
  EXPECT_TRUE(std::equal(a.running_mean().begin(), a.running_mean().end(), b.running_mean().begin(), b.running_mean().end()));
  EXPECT_TRUE(std::equal(a.running_var().begin(), a.running_var().end(), b.running_var().begin(), b.running_var().end()));
  EXPECT_EQ(a.num_batches_tracked(), b.num_batches_tracked());
}

TEST(Checkpoint, RoundTripBothDtypesAndPrefix) {
  const fs::path dir = temp_dir();
  const BatchNorm a = trained_layer<float>(5);
  a.save((dir / "bn.safetensors").string());
  BatchNorm b(5, {}, 2);
  b.load((dir / "bn.safetensors").string());
  expect_same_state(a, b);

  const BatchNorm64 a64 = trained_layer<double>(7);
  a64.save((dir / "bn64.safetensors").string(), "features.1.");
  BatchNorm64 b64(7, {}, 2);
  b64.load((dir / "bn64.safetensors").string(), "features.1.");
  expect_same_state(a64, b64);
  // A float64 file loads into a float32 layer (converted, like torch's load_state_dict).
  BatchNorm b32(7, {}, 2);
  b32.load((dir / "bn64.safetensors").string(), "features.1.");
  EXPECT_EQ(b32.running_mean()[3], static_cast<float>(a64.running_mean()[3]));
  EXPECT_EQ(b32.num_batches_tracked(), 3);
  // Without running statistics or parameters, only what exists is written and read.
  BatchNormOptions bare;
  bare.affine = false;
  bare.track_running_stats = false;
  const BatchNorm c(4, bare, 2);
  c.save((dir / "bare.safetensors").string());
  BatchNorm d(4, bare, 2);
  EXPECT_NO_THROW(d.load((dir / "bare.safetensors").string()));
  fs::remove_all(dir);
}

TEST(Checkpoint, MismatchedFilesAreRejectedAndChangeNothing) {
  const fs::path dir = temp_dir();
  const std::string path = (dir / "bn.safetensors").string();
  trained_layer<float>(5).save(path);
  BatchNorm wrong_c(6, {}, 2);
  EXPECT_NE(error_of([&] { wrong_c.load(path); }).find("expected shape [6] (num_features), got [5]"), std::string::npos);
  EXPECT_EQ(wrong_c.running_var()[0], 1.f);
  EXPECT_EQ(wrong_c.num_batches_tracked(), 0);
  BatchNormOptions no_affine;
  no_affine.affine = false;
  BatchNorm unexpected(5, no_affine, 2);
  EXPECT_NE(error_of([&] { unexpected.load(path); }).find("key 'bias': unexpected"), std::string::npos);
  BatchNorm missing(5, {}, 2);
  EXPECT_NE(error_of([&] { missing.load(path, "layer2."); }).find("key 'layer2.weight': expected in the file, missing"),
            std::string::npos);
  EXPECT_NE(error_of([&] { missing.load((dir / "absent.safetensors").string()); }).find("absent.safetensors"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Checkpoint, LoadErrorsNameTheLayerType) {
  const fs::path dir = temp_dir();
  const std::string path = (dir / "bn.safetensors").string();
  trained_layer<float>(5).save(path);
  BatchNorm bn(6, {}, 2);
  GhostBatchNormT<float> ghost(6, 2, {}, 2);
  BatchRenormT<float> renorm(6, {}, {}, 2);
  const std::string at = "::load('" + path + "'): ";
  EXPECT_EQ(error_of([&] { bn.load(path); }).rfind("bnorm::BatchNorm" + at, 0), 0u);
  EXPECT_EQ(error_of([&] { ghost.load(path); }).rfind("bnorm::GhostBatchNorm" + at, 0), 0u);
  EXPECT_EQ(error_of([&] { renorm.load(path); }).rfind("bnorm::BatchRenorm" + at, 0), 0u);
  fs::remove_all(dir);
}

TEST(Checkpoint, CorruptFilesGiveClearErrors) {
  const fs::path dir = temp_dir();
  const std::string path = (dir / "bn.safetensors").string();
  trained_layer<float>(5).save(path);
  std::vector<char> image;
  {
    std::ifstream in(path, std::ios::binary);
    image.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write = [&](const std::vector<char>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  BatchNorm bn(5, {}, 2);
  // Truncated.
  write(std::vector<char>(image.begin(), image.end() - 7));
  EXPECT_NE(error_of([&] { bn.load(path); }).find("bn.safetensors"), std::string::npos);
  // Oversized header length.
  std::vector<char> big = image;
  for (int i = 0; i < 8; ++i) big[static_cast<std::size_t>(i)] = static_cast<char>(0x7f);
  write(big);
  EXPECT_NE(error_of([&] { bn.load(path); }), "(no error)");
  // Bit flips anywhere: an error or a valid load, never a crash; header flips are caught.
  int errors = 0;
  for (std::size_t i = 0; i < image.size(); i += 3) {
    std::vector<char> flipped = image;
    flipped[i] = static_cast<char>(flipped[i] ^ 0x10);
    write(flipped);
    BatchNorm probe(5, {}, 2);
    if (error_of([&] { probe.load(path); }) != "(no error)") ++errors;
  }
  EXPECT_GT(errors, 0);
  EXPECT_EQ(bn.running_var()[0], 1.f) << "a failed load changed the layer";
  fs::remove_all(dir);
}

TEST(Checkpoint, SaveIsAtomicAndFailsCleanly) {
  const fs::path dir = temp_dir();
  const std::string path = (dir / "bn.safetensors").string();
  const BatchNorm a = trained_layer<float>(5);
  a.save(path);
  a.save(path);  // replacing an existing file
  BatchNorm b(5, {}, 2);
  b.load(path);
  expect_same_state(a, b);
  EXPECT_NE(error_of([&] { a.save((dir / "no_such_dir" / "bn.safetensors").string()); }).find("no_such_dir"),
            std::string::npos);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1u) << "a temporary file was left behind";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace bnorm::test
