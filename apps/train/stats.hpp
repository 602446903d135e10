// The statistics behind bnorm-train's verdicts, free of torch so that they are tested on their own
// (test_stats.cpp, also under ASan + UBSan): the percentile bootstrap of a mean over paired per-seed
// effects, the Clopper-Pearson interval of a failure rate, and the rule that turns an interval into a verdict.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bnorm::train::stats {

// An estimate with its 95% interval.
struct Interval {
  double estimate = 0, lo = 0, hi = 0;
};

double mean(const std::vector<double>& x);

// Percentile bootstrap interval of the mean of `x`: `resamples` resamples of size n drawn with replacement
// (a fixed-seed generator, so the same data always give the same interval), the interval from the 2.5% and
// 97.5% quantiles of their means. With few values (6 or 8 seeds) it is narrower than its nominal level; the
// report says so.
Interval bootstrap_mean(const std::vector<double>& x, int resamples = 10000, std::uint64_t seed = 20261207);

// The geometric mean of the paired ratios num[i] / den[i], with the bootstrap interval of the mean of their
// logs, exponentiated. Every value must be > 0.
Interval bootstrap_ratio(const std::vector<double>& num, const std::vector<double>& den, int resamples = 10000,
                         std::uint64_t seed = 20261207);

// Exact (Clopper-Pearson) 95% interval of a binomial proportion, k successes of n (the estimate is k / n):
// lo solves P(X >= k | p) = 0.025 (0 for k = 0), hi solves P(X <= k | p) = 0.025 (1 for k = n).
Interval clopper_pearson(int k, int n);

enum class Verdict { supported, contradicted, inconclusive };
std::string to_string(Verdict v);

// A difference whose claimed sign is `sign` (+1: the claim says it is > 0, -1: < 0): supported where the interval
// excludes 0 on the claimed side, contradicted where it excludes 0 on the other, else inconclusive.
Verdict by_difference(const Interval& i, int sign);
// A ratio claimed to be > 1 (sign +1) or < 1 (sign -1), by whether the interval excludes 1.
Verdict by_ratio(const Interval& i, int sign);
// A claim of NO effect (a difference of about 0): supported where the whole interval lies inside (-margin, +margin)
// (equivalence), contradicted where it lies wholly outside it, else inconclusive.
Verdict by_equivalence(const Interval& i, double margin);

}  // namespace bnorm::train::stats
