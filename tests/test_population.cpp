// PopulationStats (population.hpp) in one process: against the float64 two-pass over all the data,
// in both layouts and every dtype, with class-sorted batches where an average of batch variances is
// far off, and its refusals. The collective checks are in population_check.hpp.
#include "population_check.hpp"

namespace bnorm::test {
namespace {

template <class T>
void check_exact(Layout layout) {
  const DataSet d = class_sorted_batches<T>(5, 7, 31, 3);
  PopulationStats p(d.C);
  for (std::size_t b = 0; b < d.values.size(); ++b) add_batch<T>(p, d, b, layout);
  std::vector<double> rm(5), rv(5);
  p.finalize({VectorView(rm), VectorView(rv)});
  expect_population_close(rm, rv, two_pass_reference(d), to_string(dtype_of<T>()) + " " + to_string(layout));
  // The count is every value of a channel.
  double m = 0;
  for (const Dims& dims : d.dims) m += static_cast<double>(dims.N() * dims.S());
  EXPECT_EQ(p.count(), m);
}

TEST(Population, ExactAgainstFloat64TwoPass) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    check_exact<double>(layout);
    check_exact<float>(layout);
    check_exact<bfloat16>(layout);
  }
}

TEST(Population, OrderOfBatchesDoesNotMatter) {
  const DataSet d = class_sorted_batches<float>(3, 5, 12, 8);
  PopulationStats forward(3), backward(3);
  for (std::size_t b = 0; b < d.values.size(); ++b) {
    add_batch<float>(forward, d, b, Layout::ChannelsFirst);
    add_batch<float>(backward, d, d.values.size() - 1 - b, Layout::ChannelsLast);
  }
  std::vector<double> m1(3), v1(3), m2(3), v2(3);
  forward.finalize({VectorView(m1), VectorView(v1)});
  backward.finalize({VectorView(m2), VectorView(v2)});
  const Population want = two_pass_reference(d);
  expect_population_close(m1, v1, want, "forward order");
  expect_population_close(m2, v2, want, "backward order");
}

// Class-sorted batches: the average of the batches' unbiased variances (swa_utils.update_bn's and
// fvcore's estimate) misses the spread between the class means; the population variance keeps it.
TEST(Population, ClassSortedBatchesWhereAveragedVariancesAreWrong) {
  const DataSet d = class_sorted_batches<double>(2, 16, 25, 4);
  PopulationStats p(2);
  std::vector<double> avg_var(2, 0.0);
  for (std::size_t b = 0; b < d.values.size(); ++b) {
    add_batch<double>(p, d, b, Layout::ChannelsFirst);
    std::vector<double> mu(2), var(2);
    const std::vector<double> mem = batch_memory<double>(d, b, Layout::ChannelsFirst);
    batch_stats(ConstTensorView(mem.data(), d.dims[b].view_shape()), VectorView(mu), VectorView(var));
    const double m = static_cast<double>(d.dims[b].N() * d.dims[b].S());
    for (std::size_t c = 0; c < 2; ++c) avg_var[c] += var[c] * m / (m - 1) / static_cast<double>(d.values.size());
  }
  std::vector<double> rm(2), rv(2);
  p.finalize({VectorView(rm), VectorView(rv)});
  const Population want = two_pass_reference(d);
  expect_population_close(rm, rv, want, "class-sorted");
  for (std::size_t c = 0; c < 2; ++c) {
    // Class means 0, 4, 8, 12, 16 apart: a spread of variance 32 on top of the within-class 0.25-0.56.
    EXPECT_LT(avg_var[c], 0.1 * want.var[c]) << "channel " << c << ": averaged " << avg_var[c] << ", population "
                                             << want.var[c];
  }
}

TEST(Population, IntoALayersRunningBuffers) {
  const DataSet d = class_sorted_batches<float>(3, 4, 6, 9);
  PopulationStats p(3);
  for (std::size_t b = 0; b < d.values.size(); ++b) add_batch<float>(p, d, b, Layout::ChannelsFirst);
  const Population want = two_pass_reference(d);
  BatchNorm2d bn(3);
  BatchNorm64 bn64(3);
  p.finalize(bn);
  p.finalize(bn64);
  for (std::size_t c = 0; c < 3; ++c) {
    EXPECT_EQ(bn.running_mean()[c], static_cast<float>(bn64.running_mean()[c]));
    EXPECT_EQ(bn.running_var()[c], static_cast<float>(bn64.running_var()[c]));
  }
  expect_population_close(std::vector<double>(bn64.running_mean().begin(), bn64.running_mean().end()),
                          std::vector<double>(bn64.running_var().begin(), bn64.running_var().end()), want, "layer");
  EXPECT_EQ(bn.num_batches_tracked(), 0);
}

// A refused call changes nothing: the accumulator's state and the buffers keep their bits.
TEST(Population, RefusalsChangeNothing) {
  PopulationStats p(3);
  std::vector<float> good(2 * 3 * 4);
  for (std::size_t i = 0; i < good.size(); ++i) good[i] = static_cast<float>(i % 7) - 2.5f;
  p.add(ConstTensorView(good.data(), {2, 3, 4}));
  const std::vector<double> mean(p.mean().begin(), p.mean().end()), m2(p.m2().begin(), p.m2().end());
  const double count = p.count();
  auto unchanged = [&] {
    EXPECT_EQ(p.count(), count);
    EXPECT_EQ(std::vector<double>(p.mean().begin(), p.mean().end()), mean);
    EXPECT_EQ(std::vector<double>(p.m2().begin(), p.m2().end()), m2);
  };
  // NaN in one channel only, and an Inf.
  std::vector<float> bad = good;
  bad[1 * 4 + 2] = std::numeric_limits<float>::quiet_NaN();  // sample 0, channel 1
  EXPECT_NE(error_of([&] { p.add(ConstTensorView(bad.data(), {2, 3, 4})); })
                .find("bnorm::PopulationStats::add: batch: expected finite values, got mean nan"),
            std::string::npos);
  EXPECT_NE(error_of([&] { p.add(ConstTensorView(bad.data(), {2, 3, 4})); }).find("in channel 1"), std::string::npos);
  unchanged();
  bad = good;
  bad[2 * 4] = std::numeric_limits<float>::infinity();
  EXPECT_NE(error_of([&] { p.add(ConstTensorView(bad.data(), {2, 3, 4}, Layout::ChannelsFirst)); }).find("in channel 2"),
            std::string::npos);
  unchanged();
  // Wrong channels, wrong rank.
  EXPECT_EQ(error_of([&] { p.add(ConstTensorView(good.data(), {2, 4, 3})); }),
            "bnorm::PopulationStats::add: batch: expected 3 channels in dim 1, got 4 in shape [2, 4, 3]");
  EXPECT_NE(error_of([&] { p.add(ConstTensorView(good.data(), {24})); }).find("bnorm::PopulationStats::add: batch: "),
            std::string::npos);
  unchanged();
  // An empty batch adds nothing and is no error.
  p.add(ConstTensorView(good.data(), {0, 3, 4}));
  unchanged();
  // merge's checks.
  const std::vector<double> two{1.0, 2.0}, three{1.0, 2.0, 3.0}, neg{1.0, -1.0, 0.0};
  EXPECT_NE(error_of([&] { p.merge(5, two, two); }).find("mean: expected 3 values"), std::string::npos);
  EXPECT_NE(error_of([&] { p.merge(-1, three, three); }).find("count: expected a finite count >= 0, got -1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { p.merge(5, three, neg); }).find("m2: expected values >= 0, got -1 in channel 1"),
            std::string::npos);
  unchanged();

  // finalize: too few values, wrong buffers, a layer without running statistics or of other width.
  std::vector<float> rm(3, 0.5f), rv(3, 2.f), rm2(2, 0.5f);
  PopulationStats one(3);
  std::vector<float> x1{1.f, 2.f, 3.f};
  one.add(ConstTensorView(x1.data(), {1, 3}));
  EXPECT_EQ(error_of([&] { one.finalize({VectorView(rm), VectorView(rv)}); }),
            "bnorm::PopulationStats::finalize: count: expected more than 1 value per channel to take an unbiased "
            "variance of, got 1");
  EXPECT_EQ(error_of([&] { p.finalize({VectorView(rm2), VectorView(rv)}); }),
            "bnorm::PopulationStats::finalize: running_mean: expected 3 values (one per channel), got 2");
  EXPECT_NE(error_of([&] { p.finalize({}); }).find("running_mean: expected running_mean and running_var"),
            std::string::npos);
  BatchNorm untracked(3, {.track_running_stats = false}), wide(4);
  EXPECT_NE(error_of([&] { p.finalize(untracked); }).find("layer: expected a layer that tracks running statistics"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { p.finalize(wide); }),
            "bnorm::PopulationStats::finalize: layer: expected 3 features (the statistics'), got 4");
  EXPECT_EQ(rm, std::vector<float>(3, 0.5f));
  EXPECT_EQ(rv, std::vector<float>(3, 2.f));
  EXPECT_EQ(wide.running_var()[0], 1.f);
  // A variance beyond float32's range is refused for float32 buffers and written to float64 ones.
  PopulationStats huge(1);
  std::vector<double> h{-1e30, 1e30};
  huge.add(ConstTensorView(h.data(), {2, 1}));
  std::vector<float> fm(1, 0.f), fv(1, 1.f);
  EXPECT_NE(error_of([&] { huge.finalize({VectorView(fm), VectorView(fv)}); })
                .find("running_var: expected a population mean and variance that the buffers' dtype holds"),
            std::string::npos);
  EXPECT_EQ(fv[0], 1.f);
  std::vector<double> dm(1), dv(1);
  huge.finalize({VectorView(dm), VectorView(dv)});
  EXPECT_DOUBLE_EQ(dv[0], 2e60);
  EXPECT_NE(error_of([] { PopulationStats bad_channels(0); }).find("channels: expected 1 to 2^24, got 0"),
            std::string::npos);
}

TEST(Population, ResetStartsOver) {
  PopulationStats p(1);
  std::vector<double> a{1.0, 3.0}, b{10.0, 14.0};
  p.add(ConstTensorView(a.data(), {2, 1}));
  p.reset();
  p.add(ConstTensorView(b.data(), {2, 1}));
  std::vector<double> m(1), v(1);
  p.finalize({VectorView(m), VectorView(v)});
  EXPECT_EQ(m[0], 12.0);
  EXPECT_EQ(v[0], 8.0);
}

}  // namespace
}  // namespace bnorm::test
