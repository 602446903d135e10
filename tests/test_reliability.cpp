// Reliability: bad input, faults and concurrency (docs/reliability.md, docs/errors.md).
//
//   ErrorTable.*        the rows of docs/errors.md that the other test files do not already prove
//   Concurrency.*       many threads on one eval-mode layer, separate training layers, saves racing loads;
//                       every output checked against the float64 reference, for a bounded time
//   CrashSafety.*       a process killed (SIGKILL) at random points while saving: the file is always
//                       a complete, loadable checkpoint (the previous one or the new one)
//   BoundedResources.*  huge shapes refused before allocating (under an address-space limit), and the
//                       memory of training forward + backward measured against the documented workspace
#include "test_util.hpp"

#include "kernels/kernels.hpp"
#include "workspace.hpp"

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define BNORM_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define BNORM_TEST_SANITIZED 1
#endif
#endif
#ifndef BNORM_TEST_SANITIZED
#define BNORM_TEST_SANITIZED 0
#endif

namespace bnorm::test {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

#define EXPECT_ERROR_WITH(call, ...)                                                        \
  do {                                                                                      \
    const std::string msg_ = error_of([&] { call; });                                      \
    for (const char* frag_ : {__VA_ARGS__})                                                 \
      EXPECT_NE(msg_.find(frag_), std::string::npos) << "'" << frag_ << "' not in: " << msg_; \
  } while (0)

fs::path temp_dir(const std::string& tag) {
  const fs::path dir = fs::temp_directory_path() / ("bnorm_reliability_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// ================================================================================================
// ErrorTable: one test per row group of docs/errors.md
// ================================================================================================

// Pointers off the element's alignment are refused (they were undefined behaviour in the kernels).
TEST(ErrorTable, MisalignedPointers) {
  const Shape s{4, 3, 5};
  alignas(16) static unsigned char raw[2][60 * 8 + 16];
  std::vector<float> x(60, 1.f), y(60), rm(3, 0.f), rv(3, 1.f);
  for (int i = 0; i < 60; ++i) x[static_cast<std::size_t>(i)] = static_cast<float>(i % 7);
  float* odd_in = reinterpret_cast<float*>(raw[0] + 1);
  float* odd_out = reinterpret_cast<float*>(raw[1] + 2);
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(static_cast<const void*>(odd_in), DType::Float32, s),
                               TensorView(y.data(), s), rm, rv, {}, {}, true),
                    "bnorm::batch_norm: input: expected a data pointer aligned to 4 bytes (float32)");
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(x.data(), s), TensorView(static_cast<void*>(odd_out), DType::Float32, s),
                               rm, rv, {}, {}, true),
                    "output: expected a data pointer aligned to 4 bytes");
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s),
                               VectorView(static_cast<void*>(raw[0] + 3), DType::Float32, 3), rv, {}, {}, true),
                    "running_mean: expected a data pointer aligned to 4 bytes");
  // float64 needs 8: a 4-byte-aligned double pointer is refused too.
  std::vector<double> xd(60, 1.0), yd(60);
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(static_cast<const void*>(raw[0] + 4), DType::Float64, s),
                               TensorView(yd.data(), s), {}, {}, {}, {}, true),
                    "input: expected a data pointer aligned to 8 bytes (float64)");
  EXPECT_ERROR_WITH(batch_stats(ConstTensorView(xd.data(), s), VectorView(static_cast<void*>(raw[1] + 4), DType::Float64, 3),
                                VectorView(static_cast<void*>(raw[1] + 64), DType::Float64, 3)),
                    "bnorm::batch_stats: mean: expected a data pointer aligned to 8 bytes");
  std::vector<float> sm(3), si(3, 1.f), dx(60);
  EXPECT_ERROR_WITH(batch_norm_backward(ConstTensorView(static_cast<const void*>(odd_in), DType::Float32, s),
                                        {.input = ConstTensorView(x.data(), s), .saved = {sm, si}}, {.training = true},
                                        TensorView(dx.data(), s)),
                    "bnorm::batch_norm_backward: grad_output: expected a data pointer aligned to 4 bytes");
  BatchNorm1d bn(3);
  EXPECT_ERROR_WITH(bn.forward(ConstTensorView(static_cast<const void*>(odd_in), DType::Float32, s), TensorView(y.data(), s)),
                    "input: expected a data pointer aligned to 4 bytes");
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  EXPECT_EQ(rm, std::vector<float>(3, 0.f));
  EXPECT_EQ(y, std::vector<float>(60, 0.f));
}

TEST(ErrorTable, NullPointers) {
  const Shape s{4, 3, 5};
  std::vector<float> x(60, 1.f), y(60), sm(3), si(3, 1.f), dx(60);
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(x.data(), s), TensorView(static_cast<float*>(nullptr), s), {}, {}, {}, {}, true),
                    "output: expected a data pointer, got null");
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), {}, {},
                               ConstVectorView(static_cast<const float*>(nullptr), 3), {}, true),
                    "weight: expected a data pointer, got null for 3 values");
  EXPECT_ERROR_WITH(batch_norm_backward(ConstTensorView(static_cast<const float*>(nullptr), s),
                                        {.input = ConstTensorView(x.data(), s), .saved = {sm, si}}, {.training = true},
                                        TensorView(dx.data(), s)),
                    "grad_output: expected a data pointer, got null");
  EXPECT_ERROR_WITH(batch_stats(ConstTensorView(x.data(), s), VectorView(static_cast<float*>(nullptr), 3), VectorView(si)),
                    "mean: expected a data pointer, got null");
  BatchNorm1d bn(3);
  EXPECT_ERROR_WITH(bn.forward(ConstTensorView(static_cast<const float*>(nullptr), s), TensorView(y.data(), s)),
                    "input: expected a data pointer, got null");
  // Null is fine for an empty tensor (nothing to read).
  std::vector<float> rm(3, 0.f), rv(3, 1.f);
  EXPECT_NO_THROW(batch_norm(ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 5}),
                             TensorView(static_cast<float*>(nullptr), Shape{0, 3, 5}), rm, rv, {}, {}, false));
}

// Zero-sized dims: no-ops where there is nothing to compute, errors where statistics are needed.
TEST(ErrorTable, ZeroSizedDims) {
  std::vector<float> buf(8, 3.f), out(8, 7.f), rm(3, 0.5f), rv(3, 2.f), none;
  // C = 0: nothing per channel; every per-channel vector has 0 values.
  EXPECT_NO_THROW(batch_norm(ConstTensorView(buf.data(), Shape{4, 0, 5}), TensorView(out.data(), Shape{4, 0, 5}), none, none,
                             {}, {}, true));
  EXPECT_NO_THROW(batch_norm(ConstTensorView(buf.data(), Shape{4, 0, 5}), TensorView(out.data(), Shape{4, 0, 5}),
                             VectorView(buf.data(), 0), VectorView(buf.data() + 1, 0), {}, {}, false));
  // S = 0 (a zero spatial dim): eval is a no-op, training has no values per channel.
  EXPECT_NO_THROW(batch_norm(ConstTensorView(buf.data(), Shape{4, 3, 0}), TensorView(out.data(), Shape{4, 3, 0}), rm, rv, {},
                             {}, false));
  EXPECT_ERROR_WITH(batch_norm(ConstTensorView(buf.data(), Shape{4, 3, 0, 2}), TensorView(out.data(), Shape{4, 3, 0, 2}), rm,
                               rv, {}, {}, true),
                    "Expected more than 1 value per channel when training", "[4, 3, 0, 2]");
  EXPECT_ERROR_WITH(batch_stats(ConstTensorView(buf.data(), Shape{0, 3}), VectorView(rm), VectorView(rv)),
                    "bnorm::batch_stats: input: expected at least 1 value per channel");
  EXPECT_EQ(out, std::vector<float>(8, 7.f));
  EXPECT_EQ(rm, std::vector<float>(3, 0.5f));
  // Backward of an empty batch: zero parameter gradients, nothing else.
  std::vector<float> gw(3, 9.f), gb(3, 9.f);
  EXPECT_NO_THROW(batch_norm_backward(
      ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 4}),
      {.input = ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 4}), .running = {rm, rv}},
      {.training = false}, TensorView(static_cast<float*>(nullptr), Shape{0, 3, 4}), {gw, gb}));
  EXPECT_EQ(gw, std::vector<float>(3, 0.f));
  // The layer: num_features >= 1, and the input's channel count must match.
  EXPECT_ERROR_WITH(BatchNorm2d(0), "num_features: expected >= 1, got 0");
  BatchNorm2d bn(3);
  bn.eval();
  EXPECT_NO_THROW(bn.forward(ConstTensorView(static_cast<const float*>(nullptr), Shape{0, 3, 4, 4}),
                             TensorView(static_cast<float*>(nullptr), Shape{0, 3, 4, 4})));
  EXPECT_ERROR_WITH(bn.forward(ConstTensorView(buf.data(), Shape{1, 0, 2, 2}), TensorView(out.data(), Shape{1, 0, 2, 2})),
                    "expected 3 channels (num_features) in dim 1, got 0");
}

// Element counts or byte sizes past int64 (hence size_t on 64-bit targets): refused before any access.
TEST(ErrorTable, OverflowingElementCounts) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  float dummy[4] = {};
  std::vector<float> v(3), w(3, 1.f);
  for (const Shape& s : {Shape{kMax, 2}, Shape{std::int64_t{1} << 62, 4}, Shape{std::int64_t{1} << 31, std::int64_t{1} << 31, std::int64_t{1} << 31},
                         Shape{3, 3, std::int64_t{1} << 40, std::int64_t{1} << 40}, Shape{std::int64_t{1} << 61, 3}}) {
    SCOPED_TRACE(s.str());
    EXPECT_ERROR_WITH(batch_norm(ConstTensorView(dummy, s), TensorView(dummy, s), {}, {}, {}, {}, true),
                      "input: expected a shape whose size in bytes fits in int64");
    EXPECT_ERROR_WITH(
        batch_norm_backward(ConstTensorView(dummy, s), {.input = ConstTensorView(dummy, s), .saved = {v, w}},
                            {.training = true}, TensorView(dummy, s)),
        "fits in int64");
    EXPECT_ERROR_WITH(batch_stats(ConstTensorView(dummy, s), VectorView(v), VectorView(w)), "fits in int64");
  }
  // (1<<61) float32 elements fit in int64, their bytes do not; as float64 even (1<<60) do not.
  EXPECT_ERROR_WITH(batch_stats(ConstTensorView(static_cast<const void*>(dummy), DType::Float64, Shape{std::int64_t{1} << 60, 1}),
                                VectorView(static_cast<void*>(dummy), DType::Float64, 1), VectorView(static_cast<void*>(dummy), DType::Float64, 1)),
                    "fits in int64");
  BasicBatchNorm<float> bn(3);
  const Shape huge{std::int64_t{1} << 40, 3, std::int64_t{1} << 40};
  EXPECT_ERROR_WITH(bn.forward(ConstTensorView(dummy, huge), TensorView(dummy, huge)), "fits in int64");
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

// Aliasing: the same memory or disjoint memory, never a partial overlap.
TEST(ErrorTable, AliasingInBackward) {
  const Dims d{{4, 3, 5}};
  const Shape s = d.view_shape();
  std::mt19937_64 rng(3);
  const std::vector<float> x = cast<float>(random_input<float>(d, rng));
  std::vector<float> y(60), sm(3), si(3);
  batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), {}, {},
             {.training = true, .activation = Activation::Relu}, {sm, si});
  std::vector<float> buf(61), dy = cast<float>(random_input<float>(d, rng, 0.5));
  std::copy(dy.begin(), dy.end(), buf.begin());
  auto backward = [&](const float* g, const float* in, float* dx, const float* out) {
    batch_norm_backward(ConstTensorView(g, s),
                        {.input = ConstTensorView(in, s), .output = ConstTensorView(out, s), .saved = {sm, si}},
                        {.training = true, .activation = Activation::Relu}, TensorView(dx, s));
  };
  EXPECT_ERROR_WITH(backward(buf.data(), x.data(), buf.data() + 1, y.data()),
                    "grad_input: expected the same memory as grad_output or memory disjoint from it, got a partial overlap");
  std::vector<float> xbuf(61);
  std::copy(x.begin(), x.end(), xbuf.begin());
  EXPECT_ERROR_WITH(backward(dy.data(), xbuf.data(), xbuf.data() + 1, y.data()), "grad_input", "input", "partial overlap");
  std::vector<float> ybuf(61);
  std::copy(y.begin(), y.end(), ybuf.begin() + 1);
  std::vector<float> dxo(61);
  EXPECT_ERROR_WITH(backward(dy.data(), x.data(), ybuf.data(), ybuf.data() + 1), "grad_input", "output", "partial overlap");
  // The same memory is allowed: dx over dy gives what a separate dx gives.
  std::vector<float> dx(60), inplace = dy;
  backward(dy.data(), x.data(), dx.data(), y.data());
  backward(inplace.data(), x.data(), inplace.data(), y.data());
  EXPECT_EQ(dx, inplace);
}

// NaN/Inf in the running statistics: documented results per channel, other channels untouched.
TEST(ErrorTable, NonFiniteRunningStatistics) {
  const Dims d{{3, 5, 4}};
  const Shape s = d.view_shape();
  std::mt19937_64 rng(8);
  const std::vector<float> x = cast<float>(random_input<float>(d, rng));
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  // channel 0 fine, 1: running_mean NaN, 2: running_var +Inf, 3: running_var < -eps, 4: running_mean +Inf
  std::vector<float> rm{0.f, nan, 0.f, 0.f, inf}, rv{1.f, 1.f, inf, -1.f, 1.f}, b{0.5f, 0.5f, 0.5f, 0.5f, 0.5f}, y(x.size());
  batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), rm, rv, {}, b, false);
  for (std::int64_t n = 0; n < d.N(); ++n)
    for (std::int64_t i = 0; i < d.S(); ++i) {
      auto at = [&](std::int64_t c) { return y[static_cast<std::size_t>((n * 5 + c) * 4 + i)]; };
      EXPECT_TRUE(std::isfinite(at(0)));
      EXPECT_TRUE(std::isnan(at(1)));
      EXPECT_EQ(at(2), 0.5f);  // invstd = 0: y = beta
      EXPECT_TRUE(std::isnan(at(3)));
      EXPECT_EQ(at(4), -inf);  // x - Inf = -Inf, as in torch
    }
  // With the fused ReLU, -Inf becomes 0 and NaN stays NaN.
  batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), {rm, rv}, {{}, b},
             {.training = false, .activation = Activation::Relu});
  EXPECT_EQ(y[4 * 4], 0.f);
  EXPECT_TRUE(std::isnan(y[1 * 4]));
  // Training: the running statistics are updated with the batch's; a NaN one stays NaN, the others are finite.
  std::vector<float> rm2{0.f, nan, 0.f, 0.f, 0.f}, rv2{1.f, 1.f, 1.f, nan, 1.f};
  batch_norm(ConstTensorView(x.data(), s), TensorView(y.data(), s), rm2, rv2, {}, {}, true);
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
  EXPECT_TRUE(std::isnan(rm2[1]) && std::isnan(rv2[3]));
  EXPECT_TRUE(std::isfinite(rm2[0]) && std::isfinite(rv2[1]) && std::isfinite(rm2[3]));
  // The checkpoint loader refuses a NaN or negative running_var (covered for negatives in test_layer).
  const fs::path dir = temp_dir("nanvar");
  BatchNorm1d src(2);
  src.running_var()[1] = nan;
  src.save((dir / "bn.safetensors").string());
  BatchNorm1d dst(2);
  EXPECT_ERROR_WITH(dst.load((dir / "bn.safetensors").string()), "running_var': expected values >= 0, got");
  EXPECT_EQ(dst.running_var()[1], 1.f);
  fs::remove_all(dir);
}

TEST(ErrorTable, LayerOptionsOutOfRange) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (double eps : {0.0, -1e-5, nan, inf}) {
    BatchNormOptions o;
    o.eps = eps;
    EXPECT_ERROR_WITH(BatchNorm2d(4, o), "bnorm::BatchNorm: eps: expected a finite value > 0");
  }
  for (double m : {-0.1, 1.5, nan, inf}) {
    BatchNormOptions o;
    o.momentum = m;
    EXPECT_ERROR_WITH(BatchNorm2d(4, o), "bnorm::BatchNorm: momentum: expected a value in [0, 1]");
  }
  BatchNormOptions cumulative;
  cumulative.momentum = std::nullopt;
  EXPECT_NO_THROW(BatchNorm2d(4, cumulative));
  BatchNormOptions act;
  act.activation = static_cast<Activation>(3);
  EXPECT_ERROR_WITH(BatchNorm2d(4, act), "activation: expected None or Relu");
  EXPECT_ERROR_WITH(BasicBatchNorm<float>(4, {}, 4), "spatial_dims: expected 1, 2, 3 or -1");
  EXPECT_ERROR_WITH(set_num_threads(0), "bnorm::set_num_threads: n: expected >= 1, got 0");
}

TEST(ErrorTable, LayerStateMisuse) {
  BatchNorm1d bn(3);
  std::vector<float> x(30), y(30), dy(30), dx(30);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 4);
  bn.forward(ConstTensorView(x.data(), Shape{10, 3}), TensorView(y.data(), Shape{10, 3}));
  // Backward needs the shape of the batch whose statistics it differentiates.
  EXPECT_ERROR_WITH(bn.backward(ConstTensorView(x.data(), Shape{5, 3, 2}), ConstTensorView(dy.data(), Shape{5, 3, 2}),
                                TensorView(dx.data(), Shape{5, 3, 2})),
                    "x: expected the last forward's input shape [10, 3], got [5, 3, 2]");
  // With a fused ReLU, backward needs the forward's output.
  BatchNormOptions o;
  o.activation = Activation::Relu;
  BatchNorm1d relu(3, o);
  relu.forward(ConstTensorView(x.data(), Shape{10, 3}), TensorView(y.data(), Shape{10, 3}));
  EXPECT_ERROR_WITH(relu.backward(ConstTensorView(x.data(), Shape{10, 3}), ConstTensorView(dy.data(), Shape{10, 3}),
                                  TensorView(dx.data(), Shape{10, 3})),
                    "output: expected the forward's output with activation=Relu, got none");
  EXPECT_EQ(relu.weight_grad()[0], 0.f);
}

TEST(ErrorTable, CheckpointFilesThatAreNotFiles) {
  const fs::path dir = temp_dir("notfile");
  BatchNorm1d bn(2);
  EXPECT_ERROR_WITH(bn.load(dir.string()), "not a regular file");
  EXPECT_ERROR_WITH(bn.load((dir / "missing.safetensors").string()), "missing.safetensors", "open failed");
  EXPECT_ERROR_WITH(bn.save(""), "the path is empty");
  EXPECT_ERROR_WITH(bn.save(dir.string()), "rename over the target failed");  // a folder is in the way
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 0u) << "a failed save left a temporary file";
  fs::remove_all(dir);
}

// ================================================================================================
// Concurrency: the thread-safety contract of docs/reliability.md, exercised for a bounded time
// ================================================================================================

// Runs `threads` workers until each has done at least min_iters and `budget` has passed (or
// max_iters); collects the first failure of each.
struct Worker {
  std::int64_t iterations = 0;
  std::int64_t failures = 0;
  std::string first_failure;
  void fail(const std::string& what) {
    if (failures++ == 0) first_failure = what;
  }
};

template <class Body>
std::vector<Worker> run_workers(int threads, std::chrono::milliseconds budget, std::int64_t min_iters, std::int64_t max_iters,
                                Body body) {
  std::vector<Worker> workers(static_cast<std::size_t>(threads));
  std::vector<std::thread> pool;
  const auto deadline = Clock::now() + budget;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      Worker& w = workers[static_cast<std::size_t>(t)];
      std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(t));
      while (w.iterations < max_iters && (w.iterations < min_iters || Clock::now() < deadline)) {
        try {
          body(t, rng, w);
        } catch (const std::exception& e) {
          w.fail(std::string("exception: ") + e.what());
        }
        ++w.iterations;
      }
    });
  for (auto& th : pool) th.join();
  return workers;
}

void expect_clean(const std::vector<Worker>& workers, std::int64_t min_iters) {
  std::int64_t total = 0;
  for (std::size_t t = 0; t < workers.size(); ++t) {
    EXPECT_EQ(workers[t].failures, 0) << "thread " << t << ": " << workers[t].first_failure;
    EXPECT_GE(workers[t].iterations, min_iters);
    total += workers[t].iterations;
  }
  std::printf("[ reliability ] %zu threads, %lld checked calls\n", workers.size(), static_cast<long long>(total));
}

// Sanitized builds run the same checks, for the same wall time, over fewer calls.
constexpr auto kBudget = std::chrono::milliseconds(BNORM_TEST_SANITIZED ? 1500 : 1000);

template <class Range>
std::vector<double> values(const Range& s) {
  return std::vector<double>(s.begin(), s.end());
}

template <class P>
void train_a_little(BasicBatchNorm<P>& bn, std::mt19937_64& rng) {
  const Dims d{{6, bn.num_features(), 3, 3}};
  for (int step = 0; step < 3; ++step) {
    const std::vector<P> x = cast<P>(random_input<P>(d, rng));
    std::vector<P> y(x.size());
    bn.forward(ConstTensorView(x.data(), d.view_shape()), TensorView(y.data(), d.view_shape()));
  }
  for (std::size_t c = 0; c < bn.weight().size(); ++c) {
    bn.weight()[c] = static_cast<P>(0.75 + 0.25 * static_cast<double>(c));
    bn.bias()[c] = static_cast<P>(0.5 - 0.125 * static_cast<double>(c));
  }
}

// Many threads share one layer in eval mode (an inference server's use): forward from every
// thread at once, shapes and layouts differing per call; a few threads also call the functional
// API on the same layer's state. Every output is checked against the reference, and the layer's
// state is bit-for-bit what it was.
TEST(Concurrency, OneEvalLayerSharedByManyThreads) {
  ThreadScope omp(2);  // every call runs its own OpenMP team of 2 inside each of the 8 threads
  std::mt19937_64 rng(77);
  BatchNorm2d plain(6);
  BatchNormOptions ro;
  ro.activation = Activation::Relu;
  ro.eps = 1e-3;
  BasicBatchNorm<double> relu(5, ro, -1);
  train_a_little(plain, rng);
  train_a_little(relu, rng);
  plain.eval();
  relu.eval();
  const std::vector<double> pw = values(plain.weight()), pb = values(plain.bias()), prm = values(plain.running_mean()),
                            prv = values(plain.running_var());
  const std::vector<double> rw = values(relu.weight()), rb = values(relu.bias()), rrm = values(relu.running_mean()),
                            rrv = values(relu.running_var());
  const std::int64_t nbt = plain.num_batches_tracked();

  const auto workers = run_workers(8, kBudget, 20, 1'000'000, [&](int t, std::mt19937_64& r, Worker& w) {
    std::uniform_int_distribution<int> dim(1, 7);
    const Layout layout = r() % 2 ? Layout::ChannelsLast : Layout::ChannelsFirst;
    if (t % 2 == 0) {
      const Dims d{{dim(r), 6, dim(r), dim(r)}};
      const std::vector<double> x = random_input<float>(d, r);
      const std::vector<float> xm = to_layout<float>(x, d, layout);
      std::vector<float> y(xm.size());
      if (t == 6) {  // the functional API over the shared layer's const state
        const BatchNorm2d& shared = plain;
        std::vector<float> rm(shared.running_mean().begin(), shared.running_mean().end());
        std::vector<float> rv(shared.running_var().begin(), shared.running_var().end());
        batch_norm(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout), rm, rv,
                   shared.weight(), shared.bias(), false, 0.1, shared.options().eps);
      } else {
        plain.forward(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout));
      }
      const reference::Forward ref = reference::forward({d.N(), 6, d.S(), false, 0.1, 1e-5, false}, x, pw, pb, prm, prv);
      const auto ok = close(from_layout(y, d, layout), ref.y, tol<float>(), tol<float>(), "shared eval y " + d.str());
      if (!ok) w.fail(ok.message());
    } else {
      const Dims d{{dim(r), 5, dim(r)}};
      const std::vector<double> x = random_input<double>(d, r);
      std::vector<double> xm = to_layout<double>(x, d, layout), y(xm.size());
      relu.forward(ConstTensorView(xm.data(), d.view_shape(), layout), TensorView(y.data(), d.view_shape(), layout));
      const reference::Forward ref = reference::forward({d.N(), 5, d.S(), false, 0.1, 1e-3, true}, x, rw, rb, rrm, rrv);
      const auto ok = close(from_layout(y, d, layout), ref.y, tol<double>(), tol<double>(), "shared eval relu y " + d.str());
      if (!ok) w.fail(ok.message());
    }
  });
  expect_clean(workers, 20);
  EXPECT_EQ(values(plain.running_mean()), prm);
  EXPECT_EQ(values(plain.running_var()), prv);
  EXPECT_EQ(values(relu.running_var()), rrv);
  EXPECT_EQ(plain.num_batches_tracked(), nbt);
}

// Separate layers in training mode, one per thread, all at once: each replays its steps against
// the reference (outputs, running statistics, input and parameter gradients).
TEST(Concurrency, SeparateTrainingLayersPerThread) {
  ThreadScope omp(2);
  const auto workers = run_workers(4, kBudget, 3, 1'000'000, [&](int t, std::mt19937_64& r, Worker& w) {
    BatchNormOptions o;
    o.momentum = t == 3 ? std::optional<double>() : std::optional<double>(0.1 * (t + 1));
    o.activation = t == 2 ? Activation::Relu : Activation::None;
    const std::int64_t C = 3 + t;
    BasicBatchNorm<float> bn(C, o, 2);
    const Layout layout = t % 2 ? Layout::ChannelsLast : Layout::ChannelsFirst;
    std::vector<double> rm(static_cast<std::size_t>(C), 0.0), rv(rm.size(), 1.0);
    for (int step = 1; step <= 3; ++step) {
      const Dims d{{2 + static_cast<std::int64_t>(r() % 4), C, 1 + static_cast<std::int64_t>(r() % 6), 5}};
      const std::vector<double> x = random_input<float>(d, r), dy = random_input<float>(d, r, 0.5);
      const double factor = o.momentum ? *o.momentum : 1.0 / step;
      const reference::Problem p{d.N(), C, d.S(), true, factor, o.eps, o.activation == Activation::Relu};
      const std::vector<double> ones(rm.size(), 1.0), zeros(rm.size(), 0.0);
      const reference::Forward ref = reference::forward(p, x, ones, zeros, rm, rv);
      const std::vector<float> xm = to_layout<float>(x, d, layout), dym = to_layout<float>(dy, d, layout);
      std::vector<float> y(xm.size()), dx(xm.size());
      const Shape s = d.view_shape();
      bn.forward(ConstTensorView(xm.data(), s, layout), TensorView(y.data(), s, layout));
      bn.zero_grad();
      bn.backward(ConstTensorView(xm.data(), s, layout), ConstTensorView(dym.data(), s, layout), TensorView(dx.data(), s, layout),
                  ConstTensorView(y.data(), s, layout));
      reference::Forward fwd = ref;
      fwd.y = from_layout(y, d, layout);  // the ReLU mask of what the layer produced
      const reference::Backward rb = reference::backward(p, x, ones, fwd, dy);
      rm = ref.running_mean;
      rv = ref.running_var;
      const double t6 = tol<float>();
      for (auto ok : {close(from_layout(y, d, layout), ref.y, t6, t6, "y"),
                      close(values(bn.running_mean()), rm, t6, t6, "running_mean"),
                      close(values(bn.running_var()), rv, t6, t6, "running_var"),
                      close(from_layout(dx, d, layout), rb.dx, 4 * t6 * std::max(1.0, max_abs(rb.dx)), 0, "dx"),
                      close(values(bn.weight_grad()), rb.dweight, 1e3 * t6, t6, "dweight"),
                      close(values(bn.bias_grad()), rb.dbias, 1e3 * t6, t6, "dbias")})
        if (!ok) w.fail(ok.message());
      if (bn.num_batches_tracked() != step) w.fail("num_batches_tracked");
    }
  });
  expect_clean(workers, 3);
}

// set_num_threads from one thread while others are inside channels-last reductions, whose
// workspace is sized by the thread count: each call reads the count once (it used to read it twice,
// and a change in between overflowed the workspace: an ASan heap-buffer-overflow).
TEST(Concurrency, SetNumThreadsWhileCallsRun) {
  ThreadScope restore(2);
  std::atomic<bool> stop{false};
  std::thread toggler([&] {
    for (int k = 0; !stop.load(); k = (k + 1) % 8) set_num_threads(1 + k);
  });
  const auto workers = run_workers(2, std::chrono::milliseconds(700), 5, 1'000'000, [&](int, std::mt19937_64& r, Worker& w) {
    const Dims d{{16, 1 + static_cast<std::int64_t>(r() % 40), 4, 8}};
    const Shape s = d.view_shape();
    const std::vector<double> x = random_input<float>(d, r), dy = random_input<float>(d, r, 0.5);
    const std::vector<float> xm = to_layout<float>(x, d, Layout::ChannelsLast), dym = to_layout<float>(dy, d, Layout::ChannelsLast);
    std::vector<float> y(xm.size()), dx(xm.size());
    std::vector<double> sm(static_cast<std::size_t>(d.C())), si(sm.size());
    batch_norm(ConstTensorView(xm.data(), s, Layout::ChannelsLast), TensorView(y.data(), s, Layout::ChannelsLast), {},
               {}, {.training = true}, {VectorView(sm), VectorView(si)});
    batch_norm_backward(ConstTensorView(dym.data(), s, Layout::ChannelsLast),
                        {.input = ConstTensorView(xm.data(), s, Layout::ChannelsLast),
                         .saved = {ConstVectorView(sm), ConstVectorView(si)}},
                        {.training = true}, TensorView(dx.data(), s, Layout::ChannelsLast));
    const reference::Problem p{d.N(), d.C(), d.S(), true, 0.1, 1e-5, false};
    const reference::Forward ref = reference::forward(p, x, {}, {}, {}, {});
    const reference::Backward rb = reference::backward(p, x, {}, ref, dy);
    const double t = tol<float>();
    for (auto ok : {close(from_layout(y, d, Layout::ChannelsLast), ref.y, t, t, "y"), close(sm, ref.mean, 1e-6, 1e-6, "mean"),
                    close(from_layout(dx, d, Layout::ChannelsLast), rb.dx, 4 * t * std::max(1.0, max_abs(rb.dx)), 0, "dx")})
      if (!ok) w.fail(ok.message());
  });
  stop = true;
  toggler.join();
  expect_clean(workers, 5);
}

// State k of a layer: every value a function of k and the channel (weight[0] = k), so that a loaded
// file can be checked for being one complete save.
template <class P>
void set_pattern(BasicBatchNorm<P>& bn, std::int64_t k) {
  for (std::size_t c = 0; c < bn.weight().size(); ++c) {
    const double v = static_cast<double>(k) + 0.5 * static_cast<double>(c);
    bn.weight()[c] = static_cast<P>(v);
    bn.bias()[c] = static_cast<P>(-v);
    bn.running_mean()[c] = static_cast<P>(0.25 * v);
    bn.running_var()[c] = static_cast<P>(1 + v);
  }
}
template <class P>
std::string pattern_mismatch(const BasicBatchNorm<P>& bn, std::int64_t k) {
  for (std::size_t c = 0; c < bn.weight().size(); ++c) {
    const double v = static_cast<double>(k) + 0.5 * static_cast<double>(c);
    if (bn.weight()[c] != static_cast<P>(v) || bn.bias()[c] != static_cast<P>(-v) ||
        bn.running_mean()[c] != static_cast<P>(0.25 * v) || bn.running_var()[c] != static_cast<P>(1 + v))
      return "channel " + std::to_string(c) + " is not from the save of state " + std::to_string(k);
  }
  return "";
}
// Threads saving different states to one path while others load it: every load succeeds and gets
// one complete state (write_file_atomic: a unique temporary file, then rename).
TEST(Concurrency, SavesRacingLoadsOfOnePath) {
  const fs::path dir = temp_dir("race");
  const std::string path = (dir / "bn.safetensors").string();
  constexpr std::int64_t C = 256;
  {
    BatchNorm first(C);
    set_pattern(first, 0);
    first.save(path);
  }
  const auto workers = run_workers(4, std::chrono::milliseconds(600), 5, 1'000'000, [&](int t, std::mt19937_64& r, Worker& w) {
    BatchNorm bn(C);
    if (t < 2) {  // savers: states t + 2j
      set_pattern(bn, t + 2 * static_cast<std::int64_t>(r() % 1000));
      bn.save(path);
    } else {  // loaders: the state is identified by weight[0] = k, and must be all of save k
      bn.load(path);
      const std::string bad = pattern_mismatch(bn, static_cast<std::int64_t>(bn.weight()[0]));
      if (!bad.empty()) w.fail(bad);
    }
  });
  expect_clean(workers, 5);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1u) << "a temporary file was left behind";
  fs::remove_all(dir);
}

// ================================================================================================
// CrashSafety: SIGKILL in the middle of a save
// ================================================================================================

// Shared with the child: which save it is in, and which one it finished last.
struct SaveProgress {
  std::atomic<std::int64_t> in_progress{-1};
  std::atomic<std::int64_t> done{-1};
};

// The child saves states 1, 2, 3, ... over one path (about 2.4 MB each, so that a save takes a
// while); the parent kills it after a random delay, then loads the path. The file must be a whole
// checkpoint: the last finished save's, or the interrupted save's if the kill came after its
// rename. Temporary files of killed saves are left behind (nothing can remove them after SIGKILL);
// they never replace the target, and are counted and removed here.
TEST(CrashSafety, KilledSaveLeavesALoadableCheckpoint) {
  const fs::path dir = temp_dir("crash");
  const std::string path = (dir / "bn.safetensors").string();
  constexpr std::int64_t C = 150'000;
  constexpr int kTries = BNORM_TEST_SANITIZED ? 12 : 30;
  auto* progress = static_cast<SaveProgress*>(
      ::mmap(nullptr, sizeof(SaveProgress), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(progress, MAP_FAILED);
  new (progress) SaveProgress();

  BatchNorm layer(C);
  set_pattern(layer, 0);
  layer.save(path);  // the checkpoint before the first kill
  std::int64_t expected_last = 0, next = 1;
  int inside_save = 0, leftovers = 0;
  std::mt19937_64 rng(2024);
  for (int attempt = 0; attempt < kTries; ++attempt) {
    progress->in_progress = -1;
    progress->done = expected_last;
    const std::int64_t first = next;
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {  // child: save forever (bounded), recording progress; never returns into gtest
      for (std::int64_t k = first; k < first + 100'000; ++k) {
        set_pattern(layer, k);
        progress->in_progress = k;
        layer.save(path);
        progress->done = k;
      }
      ::_exit(0);
    }
    // Kill at a random moment once the child is saving: a loaded machine may take long to start it,
    // and a kill before its first save would show nothing (the count below would be luck).
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (progress->in_progress < first && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 20'000)(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the child ended on its own";
    const std::int64_t done = progress->done, in_progress = progress->in_progress;
    if (in_progress > done) ++inside_save;

    BatchNorm probe(C);
    ASSERT_NO_THROW(probe.load(path)) << "attempt " << attempt << ": the checkpoint does not load";
    // The state is identified by its weight[0] = k.
    const auto k = static_cast<std::int64_t>(probe.weight()[0]);
    EXPECT_EQ(pattern_mismatch(probe, k), "") << "attempt " << attempt;
    EXPECT_TRUE(k == done || (k == in_progress && in_progress > done))
        << "attempt " << attempt << ": loaded state " << k << ", last finished save " << done << ", interrupted " << in_progress;
    expected_last = k;
    next = std::max(done, in_progress) + 1;
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().filename() == "bn.safetensors") continue;
      EXPECT_EQ(e.path().filename().string().rfind("bn.safetensors.tmp.", 0), 0u) << e.path();
      fs::remove(e.path());
      ++leftovers;
    }
  }
  std::printf("[ reliability ] %d kills, %d inside a save, %d temporary files left by killed saves\n", kTries, inside_save,
              leftovers);
  EXPECT_GE(inside_save, kTries / 3) << "too few kills landed inside a save to show anything";
  ::munmap(progress, sizeof(SaveProgress));
  fs::remove_all(dir);
}

// ================================================================================================
// BoundedResources
// ================================================================================================

// Huge requests are refused before anything is allocated: run under an address-space limit of
// 256 MiB above what the process already maps, they must all throw bnorm::Error (a bad_alloc or an
// OOM kill would fail the child). Sanitizers reserve terabytes of shadow memory, so there the
// limit is left out and only the errors are checked.
TEST(BoundedResources, HugeRequestsRefusedBeforeAllocating) {
  const fs::path dir = temp_dir("huge");
  const std::string big_file = (dir / "big.safetensors").string();
  {  // a sparse file just over the loader's 1 GiB limit (no disk space used)
    const int fd = ::open(big_file.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, (off_t{1} << 30) + 1), 0);
    ::close(fd);
  }
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    if (!BNORM_TEST_SANITIZED) {
      std::ifstream status("/proc/self/status");
      std::string line;
      long vm_kb = 0;
      while (std::getline(status, line))
        if (line.rfind("VmSize:", 0) == 0) vm_kb = std::stol(line.substr(7));
      const rlimit lim{static_cast<rlim_t>(vm_kb + 256 * 1024) * 1024, static_cast<rlim_t>(vm_kb + 256 * 1024) * 1024};
      if (::setrlimit(RLIMIT_AS, &lim) != 0) ::_exit(90);
    }
    auto expect = [&](auto f, const char* frag, int bit) {
      try {
        f();
        code |= bit;  // accepted
      } catch (const Error& e) {
        if (std::string(e.what()).find(frag) == std::string::npos) code |= bit;
      } catch (...) {
        code |= bit;  // bad_alloc or anything else
      }
    };
    float dummy[4] = {};
    expect([] { BatchNorm2d bn(std::int64_t{1} << 40); }, "num_features: expected at most 16777216", 1);
    expect([] { BatchNorm64 bn((std::int64_t{1} << 24) + 1); }, "num_features: expected at most", 2);
    expect([&] {
      const Shape s{std::int64_t{1} << 40, 3, std::int64_t{1} << 40};
      batch_norm(ConstTensorView(dummy, s), TensorView(dummy, s), {}, {}, {}, {}, true);
    }, "fits in int64", 4);
    expect([&] { BatchNorm bn(3); bn.load(big_file); }, "exceeds the limit of 1 GiB", 8);
    expect([&] {  // a header length of 2^63 in an 8-byte file
      const std::string hdr_file = (dir / "hdr.safetensors").string();
      std::ofstream(hdr_file, std::ios::binary) << std::string("\x00\x00\x00\x00\x00\x00\x00\x80", 8);
      BatchNorm bn(3);
      bn.load(hdr_file);
    }, "exceeds the limit of 100000000 bytes", 16);
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child was killed (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "bit mask of the requests that were not refused with the expected bnorm::Error "
                                       "(1, 2: layer num_features; 4: shape; 8: 1 GiB file; 16: header length; 90: setrlimit)";
  fs::remove_all(dir);
}

long status_kb(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(field);
  while (std::getline(status, line))
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') return std::stol(line.substr(n + 1));
  return -1;
}

// Peak resident memory added by one training forward + backward of a layer, over what the tensors
// and the layer already hold: the high-water mark is reset (/proc/self/clear_refs) just before.
template <class P>
long extra_peak_kb(const Dims& d, Layout layout) {
  BasicBatchNorm<P> bn(d.C(), {}, -1);
  const auto n = static_cast<std::size_t>(d.numel());
  std::vector<P> x(n), y(n), dy(n), dx(n);
  for (std::size_t i = 0; i < n; ++i) {
    x[i] = static_cast<P>(static_cast<double>(i % 97) * 0.25);
    dy[i] = static_cast<P>(static_cast<double>(i % 13) * 0.01);
  }
  const Shape s = d.view_shape();
  {  // warm up: OpenMP's threads started by a layer of 2 channels (its allocations are tiny)
    const Dims t{{2, 2, 3}};
    std::vector<P> tx(12), ty(12);
    tx[0] = P(2);
    BasicBatchNorm<P> warm(2, {}, -1);
    warm.forward(ConstTensorView(tx.data(), t.view_shape(), layout), TensorView(ty.data(), t.view_shape(), layout));
  }
  // ... and the once-per-process measurement of the stream threshold, whose buffers (docs/reliability.md)
  // are not the per-call workspace measured here.
  (void)kernels::stream_threshold();
  // Free heap pages go back to the kernel, so that whatever the call allocates is counted.
  ::malloc_trim(0);
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
  }
  const long base = status_kb("VmRSS");
  bn.forward(ConstTensorView(x.data(), s, layout), TensorView(y.data(), s, layout));
  bn.backward(ConstTensorView(x.data(), s, layout), ConstTensorView(dy.data(), s, layout), TensorView(dx.data(), s, layout));
  return status_kb("VmHWM") - base;
}

// The documented workspace (docs/reliability.md): training forward + backward of a layer holds at
// most (16 + 5 t) * C doubles beyond the tensors and the layer, t the threads of a channels-last
// reduction (channels-first: 16 * C); nothing proportional to N or the spatial size.
template <class P>
void check_workspace(const Dims& d, Layout layout) {
  const double slack_kb = 1024;  // allocator and page granularity
  const kernels::Geometry g{d.N(), d.C(), d.S(), d.S() == 1 ? Layout::ChannelsLast : layout};
  const int t = g.layout == Layout::ChannelsLast ? kernels::reduce_threads(g) : 0;
  const double workspace_kb = (16.0 + 5.0 * t) * static_cast<double>(d.C()) * 8 / 1024;
  const double tensor_kb = static_cast<double>(d.numel()) * sizeof(P) / 1024;
  const long measured = extra_peak_kb<P>(d, layout);
  std::printf("[ reliability ] %s %s %s: tensor %.0f KiB; extra peak %ld KiB = %.1f * C doubles (documented at most %.0f "
              "KiB = %d * C)\n",
              d.str().c_str(), to_string(layout).c_str(), to_string(dtype_of<P>()).c_str(), tensor_kb, measured,
              static_cast<double>(measured) * 1024 / (8.0 * static_cast<double>(d.C())), workspace_kb, 16 + 5 * t);
  EXPECT_LE(static_cast<double>(measured), workspace_kb + slack_kb) << d.str() << " " << to_string(layout);
}

TEST(BoundedResources, TrainingWorkspaceIsPerChannelOnly) {
  if (status_kb("VmHWM") < 0) GTEST_SKIP() << "no /proc/self/status";
  if (BNORM_TEST_SANITIZED) GTEST_SKIP() << "sanitizers' shadow memory and quarantine swamp the measurement";
  ThreadScope omp(2);
  // Large tensors, few channels: any tensor-sized temporary (8 MiB) would show.
  check_workspace<float>({{8, 16, 128, 128}}, Layout::ChannelsFirst);
  check_workspace<float>({{8, 16, 128, 128}}, Layout::ChannelsLast);
  // Many channels: the per-channel workspace itself, against the formula.
  check_workspace<float>({{4, 65536, 2, 2}}, Layout::ChannelsLast);
  check_workspace<float>({{2, 65536, 600}}, Layout::ChannelsFirst);
  check_workspace<double>({{4, 65536, 3}}, Layout::ChannelsLast);
}

// Spans taken for overwrite are not zeroed, so in the sanitizer build they start as NaN: a value read
// before it is written then spoils the numbers that every other test compares (with the last channel's
// coefficients left unwritten, 111 of the sanitizer build's tests fail). take() still zeroes or fills
// the same memory afterwards.
TEST(Workspace, SpansForOverwriteStartAsNanInTheSanitizerBuild) {
  detail::Workspace ws;
  for (int round = 0; round < 2; ++round) {
    {
      detail::Workspace::Scope scope(ws);
      const std::span<double> d = scope.take_for_overwrite<double>(100);
      const std::span<float> f = scope.take_for_overwrite<float>(33);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(d.data()) % 64, 0u);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(f.data()) % 64, 0u);
      EXPECT_TRUE(scope.take_for_overwrite<double>(0).empty());
#if defined(BNORM_POISON_WORKSPACE)
      for (double v : d) EXPECT_TRUE(std::isnan(v));
      for (float v : f) EXPECT_TRUE(std::isnan(v));
#endif
      for (double& v : d) v = 3.0;  // what the caller does: write, then read
      for (float& v : f) v = 4.0f;
    }
    detail::Workspace::Scope scope(ws);  // the same memory again
    const std::span<double> zeros = scope.take<double>(100), sevens = scope.take<double>(33, 7.0);
    for (double v : zeros) EXPECT_EQ(v, 0.0);
    for (double v : sevens) EXPECT_EQ(v, 7.0);
  }
}

}  // namespace
}  // namespace bnorm::test
