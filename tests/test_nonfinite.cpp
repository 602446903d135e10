// The non-finite guard (Options::skip_nonfinite, BatchNormOptions::skip_nonfinite): a training batch
// that would make a running statistic not finite updates none of them and no num_batches_tracked,
// the output is the unguarded call's, bit for bit, and the skip is counted. The SyncBatchNorm case
// (a global decision) is in test_sync.cpp.
#include "test_util.hpp"

#include <cstring>
#include <limits>

namespace bnorm::test {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> batch(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  return cast<float>(random_input<float>(Dims{{4, 3, 5}}, rng));
}

struct Outcome {
  std::vector<float> y, rm, rv;
  std::int64_t skips = 0;
};

Outcome train_once(const std::vector<float>& x, bool guard, Layout layout = Layout::ChannelsFirst) {
  Outcome r{std::vector<float>(x.size()), {0.5f, -1.f, 2.f}, {1.5f, 0.25f, 3.f}, 0};
  const Shape shape{4, 3, 5};
  batch_norm(ConstTensorView(x.data(), shape, layout), TensorView(r.y.data(), shape, layout),
             {VectorView(r.rm), VectorView(r.rv)}, {},
             {.training = true, .momentum = 0.25, .skip_nonfinite = guard, .nonfinite_skips = &r.skips});
  return r;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(NonfiniteGuard, SkipsNaNInfAndOneChannelKeepingTheOutput) {
  const std::vector<float> rm0{0.5f, -1.f, 2.f}, rv0{1.5f, 0.25f, 3.f};  // as train_once sets them
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    std::vector<std::vector<float>> bad(3, batch(2));
    for (float& v : bad[0]) v = kNaN;           // a NaN batch
    bad[1][7] = kInf;                           // an Inf in one element
    bad[2][layout == Layout::ChannelsFirst ? 1 * 5 + 2 : 2 * 3 + 1] = kNaN;  // a NaN in channel 1 only
    for (const std::vector<float>& x : bad) {
      const Outcome guarded = train_once(x, true, layout), plain = train_once(x, false, layout);
      EXPECT_TRUE(same_bits(guarded.rm, rm0)) << to_string(layout);
      EXPECT_TRUE(same_bits(guarded.rv, rv0)) << to_string(layout);
      EXPECT_EQ(guarded.skips, 1);
      EXPECT_TRUE(same_bits(guarded.y, plain.y)) << "the output is the unguarded one";
      EXPECT_EQ(plain.skips, 0);
      bool poisoned = false;
      for (float v : plain.rv) poisoned |= !std::isfinite(v);
      EXPECT_TRUE(poisoned) << "without the guard the batch poisons the running variance";
    }
  }
  // A finite batch: the guard changes nothing.
  const Outcome guarded = train_once(batch(3), true), plain = train_once(batch(3), false);
  EXPECT_TRUE(same_bits(guarded.rm, plain.rm));
  EXPECT_TRUE(same_bits(guarded.rv, plain.rv));
  EXPECT_TRUE(same_bits(guarded.y, plain.y));
  EXPECT_EQ(guarded.skips, 0);
}

TEST(NonfiniteGuard, LayerCountsAndKeepsNumBatchesTracked) {
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>()}) {
    BatchNorm guarded(3, {.momentum = momentum, .skip_nonfinite = true}), plain(3, {.momentum = momentum});
    std::vector<float> y(60);
    auto step = [&](BatchNorm& bn, const std::vector<float>& x) {
      bn.forward(ConstTensorView(x.data(), {4, 3, 5}), TensorView(y.data(), {4, 3, 5}));
    };
    step(guarded, batch(4));
    step(plain, batch(4));
    const std::vector<float> rm(guarded.running_mean().begin(), guarded.running_mean().end()),
        rv(guarded.running_var().begin(), guarded.running_var().end());
    std::vector<float> nan_batch = batch(5);
    nan_batch[3] = kNaN;
    step(guarded, nan_batch);
    EXPECT_EQ(guarded.num_batches_tracked(), 1);
    EXPECT_EQ(guarded.nonfinite_skipped(), 1);
    EXPECT_TRUE(same_bits(std::vector<float>(guarded.running_mean().begin(), guarded.running_mean().end()), rm));
    EXPECT_TRUE(same_bits(std::vector<float>(guarded.running_var().begin(), guarded.running_var().end()), rv));
    // The next finite batch updates as if the bad one had never come (momentum None: the same
    // 1 / (num_batches_tracked + 1)).
    step(guarded, batch(6));
    step(plain, batch(6));
    EXPECT_EQ(guarded.num_batches_tracked(), 2);
    EXPECT_EQ(plain.num_batches_tracked(), 2);
    for (std::size_t c = 0; c < 3; ++c) {
      EXPECT_EQ(guarded.running_mean()[c], plain.running_mean()[c]);
      EXPECT_EQ(guarded.running_var()[c], plain.running_var()[c]);
    }
    // Eval does not count.
    guarded.eval();
    step(guarded, nan_batch);
    EXPECT_EQ(guarded.nonfinite_skipped(), 1);
  }
}

// Ghost BN decides per virtual batch: the one with the NaN is skipped, the others update.
TEST(NonfiniteGuard, GhostSkipsOnlyTheBadVirtualBatch) {
  GhostBatchNormT<float> guarded(3, 2, {.skip_nonfinite = true}), plain(3, 2);
  std::vector<float> x = batch(7), y(x.size());
  std::vector<float> good_half(x.begin(), x.begin() + 30), y_half(30);
  x[30 + 4] = kNaN;  // sample 2: the second virtual batch
  guarded.forward(ConstTensorView(x.data(), {4, 3, 5}), TensorView(y.data(), {4, 3, 5}));
  plain.forward(ConstTensorView(good_half.data(), {2, 3, 5}), TensorView(y_half.data(), {2, 3, 5}));
  EXPECT_EQ(guarded.num_batches_tracked(), 1);
  EXPECT_EQ(guarded.nonfinite_skipped(), 1);
  for (std::size_t c = 0; c < 3; ++c) {
    EXPECT_EQ(guarded.running_mean()[c], plain.running_mean()[c]);
    EXPECT_EQ(guarded.running_var()[c], plain.running_var()[c]);
  }
}

// A finite batch whose unbiased variance is beyond float32: the update would store Inf.
TEST(NonfiniteGuard, SkipsAVarianceBeyondTheBuffersDtype) {
  std::vector<double> x{-1e30, 1e30, 0.0, 0.0}, y(4);
  std::vector<float> rm{0.f}, rv{1.f};
  std::int64_t skips = 0;
  // float64 data with float32 buffers is refused by the dtype rule; float64 buffers hold 1e60.
  std::vector<double> drm{0.0}, drv{1.0};
  batch_norm(ConstTensorView(x.data(), {4, 1}), TensorView(y.data(), {4, 1}), {VectorView(drm), VectorView(drv)}, {},
             {.training = true, .momentum = 1.0, .skip_nonfinite = true, .nonfinite_skips = &skips});
  EXPECT_EQ(skips, 0);
  EXPECT_DOUBLE_EQ(drv[0], 2e60 / 3);
  std::vector<float> fx{-3e19f, 3e19f, 0.f, 0.f}, fy(4);
  batch_norm(ConstTensorView(fx.data(), {4, 1}), TensorView(fy.data(), {4, 1}), {VectorView(rm), VectorView(rv)}, {},
             {.training = true, .momentum = 1.0, .skip_nonfinite = true, .nonfinite_skips = &skips});
  EXPECT_EQ(skips, 1);
  EXPECT_EQ(rv[0], 1.f);
}

}  // namespace
}  // namespace bnorm::test
