// The statistics of bnorm-train's verdicts against values known exactly: Clopper-Pearson intervals in closed
// form (k = 0 or n) and as R's binom.test gives them, bootstrap intervals whose resampling distribution can be
// enumerated by hand, and the verdict rules at their edges.
#include "stats.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

using namespace bnorm::train::stats;

TEST(ClopperPearson, ClosedFormsAtTheEnds) {
  // k = 0: hi = 1 - 0.025^(1/n); k = n: lo = 0.025^(1/n).
  for (int n : {1, 6, 8, 10, 40}) {
    const Interval z = clopper_pearson(0, n), a = clopper_pearson(n, n);
    EXPECT_EQ(z.lo, 0.0);
    EXPECT_NEAR(z.hi, 1 - std::pow(0.025, 1.0 / n), 1e-10) << n;
    EXPECT_NEAR(a.lo, std::pow(0.025, 1.0 / n), 1e-10) << n;
    EXPECT_EQ(a.hi, 1.0);
    EXPECT_DOUBLE_EQ(a.estimate, 1.0);
  }
}

TEST(ClopperPearson, MatchesRBinomTest) {
  // binom.test(k, n)$conf.int in R 4.x.
  const Interval a = clopper_pearson(5, 10);
  EXPECT_NEAR(a.lo, 0.1870860, 1e-6);
  EXPECT_NEAR(a.hi, 0.8129140, 1e-6);
  const Interval b = clopper_pearson(1, 10);
  EXPECT_NEAR(b.lo, 0.002528579, 1e-8);
  EXPECT_NEAR(b.hi, 0.4450161, 1e-6);
  const Interval c = clopper_pearson(3, 20);
  EXPECT_NEAR(c.lo, 0.03207094, 1e-6);
  EXPECT_NEAR(c.hi, 0.3789268, 1e-6);
  EXPECT_DOUBLE_EQ(c.estimate, 0.15);
}

TEST(ClopperPearson, SymmetricAndRefusesBadCounts) {
  const Interval a = clopper_pearson(2, 7), b = clopper_pearson(5, 7);
  EXPECT_NEAR(a.lo, 1 - b.hi, 1e-10);
  EXPECT_NEAR(a.hi, 1 - b.lo, 1e-10);
  EXPECT_THROW(clopper_pearson(3, 2), std::invalid_argument);
  EXPECT_THROW(clopper_pearson(0, 0), std::invalid_argument);
  EXPECT_THROW(clopper_pearson(-1, 5), std::invalid_argument);
}

TEST(Bootstrap, ConstantDataGiveAPointInterval) {
  const Interval i = bootstrap_mean({0.25, 0.25, 0.25});
  EXPECT_EQ(i.estimate, 0.25);
  EXPECT_EQ(i.lo, 0.25);
  EXPECT_EQ(i.hi, 0.25);
}

TEST(Bootstrap, EnumerableDistributions) {
  // {0, 1}: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
  // quantiles are 0 and 1.
  Interval i = bootstrap_mean({0, 1});
  EXPECT_EQ(i.estimate, 0.5);
  EXPECT_EQ(i.lo, 0.0);
  EXPECT_EQ(i.hi, 1.0);
  // {0, 0, 0, 1}: the mean is k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 0.316 > 0.025, so lo = 0;
  // P(k >= 3) = 0.0508 > 0.025 > P(k = 4) = 0.0039, so hi = 3/4.
  i = bootstrap_mean({0, 0, 0, 1});
  EXPECT_EQ(i.lo, 0.0);
  EXPECT_EQ(i.hi, 0.75);
}

TEST(Bootstrap, LargeSampleMatchesTheNormalInterval) {
  // 400 values spread evenly (mean 0.5, sd 0.2887 like a uniform): the bootstrap interval is about
  // mean +- 1.96 sd / sqrt(n) = 0.5 +- 0.0283.
  std::vector<double> x;
  for (int i = 0; i < 400; ++i) x.push_back((i + 0.5) / 400.0);
  const Interval b = bootstrap_mean(x, 20000);
  EXPECT_NEAR(b.estimate, 0.5, 1e-12);
  EXPECT_NEAR(b.lo, 0.5 - 0.0283, 0.002);
  EXPECT_NEAR(b.hi, 0.5 + 0.0283, 0.002);
}

TEST(Bootstrap, SameDataSameIntervalAndRatioIsGeometric) {
  const std::vector<double> x{0.1, -0.3, 0.7, 0.2, 0.05, 0.4};
  const Interval a = bootstrap_mean(x), b = bootstrap_mean(x);
  EXPECT_EQ(a.lo, b.lo);
  EXPECT_EQ(a.hi, b.hi);
  // Ratios 2, 8: geometric mean 4.
  const Interval r = bootstrap_ratio({2, 16}, {1, 2});
  EXPECT_NEAR(r.estimate, 4.0, 1e-12);
  EXPECT_NEAR(r.lo, 2.0, 1e-12);
  EXPECT_NEAR(r.hi, 8.0, 1e-12);
  EXPECT_THROW(bootstrap_ratio({1, 0}, {1, 1}), std::invalid_argument);
  EXPECT_THROW(bootstrap_mean({}), std::invalid_argument);
}

TEST(Verdict, Rules) {
  EXPECT_EQ(by_difference({0.1, 0.01, 0.2}, +1), Verdict::supported);
  EXPECT_EQ(by_difference({0.1, 0.01, 0.2}, -1), Verdict::contradicted);
  EXPECT_EQ(by_difference({0.1, 0.0, 0.2}, +1), Verdict::inconclusive);  // touching 0 does not exclude it
  EXPECT_EQ(by_difference({-0.1, -0.2, -0.01}, -1), Verdict::supported);
  EXPECT_EQ(by_ratio({3, 1.5, 6}, +1), Verdict::supported);
  EXPECT_EQ(by_ratio({0.5, 0.3, 0.9}, +1), Verdict::contradicted);
  EXPECT_EQ(by_ratio({1.2, 0.9, 1.6}, +1), Verdict::inconclusive);
  EXPECT_EQ(by_equivalence({0.001, -0.004, 0.006}, 0.01), Verdict::supported);
  EXPECT_EQ(by_equivalence({0.03, 0.015, 0.05}, 0.01), Verdict::contradicted);
  EXPECT_EQ(by_equivalence({0.01, -0.005, 0.02}, 0.01), Verdict::inconclusive);
  EXPECT_EQ(to_string(Verdict::inconclusive), "inconclusive");
}
