#include "stats.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace bnorm::train::stats {

double mean(const std::vector<double>& x) {
  if (x.empty()) throw std::invalid_argument("stats::mean: no values");
  double s = 0;
  for (double v : x) s += v;
  return s / static_cast<double>(x.size());
}

namespace {

// splitmix64: the same stream on every platform and standard library (std::uniform_int_distribution is not).
struct SplitMix {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
};

// The q-quantile of sorted values by the nearest rank below (q = 0.025 of 10000 values: the 250th smallest).
double quantile(const std::vector<double>& sorted, double q) {
  const auto i = static_cast<std::size_t>(std::floor(q * static_cast<double>(sorted.size() - 1) + 1e-9));
  return sorted[std::min(i, sorted.size() - 1)];
}

// log C(n, k) + k log p + (n - k) log(1 - p), for 0 < p < 1.
double log_binom_pmf(int k, int n, double p) {
  return std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0) + k * std::log(p) +
         (n - k) * std::log1p(-p);
}

// P(X <= k) for X ~ Binomial(n, p).
double binom_cdf(int k, int n, double p) {
  if (k < 0) return 0;
  if (k >= n) return 1;
  double s = 0;
  for (int i = 0; i <= k; ++i) s += std::exp(log_binom_pmf(i, n, p));
  return std::min(s, 1.0);
}

// The p in (0, 1) where f(p) = target, for f decreasing in p (bisection to 1e-13).
template <class F>
double solve_decreasing(F f, double target) {
  double a = 0, b = 1;
  for (int i = 0; i < 200 && b - a > 1e-13; ++i) {
    const double m = 0.5 * (a + b);
    (f(m) > target ? a : b) = m;
  }
  return 0.5 * (a + b);
}

}  // namespace

Interval bootstrap_mean(const std::vector<double>& x, int resamples, std::uint64_t seed) {
  if (x.empty()) throw std::invalid_argument("stats::bootstrap_mean: no values");
  if (resamples < 2) throw std::invalid_argument("stats::bootstrap_mean: resamples must be >= 2");
  SplitMix rng{seed};
  const std::size_t n = x.size();
  std::vector<double> means(static_cast<std::size_t>(resamples));
  for (auto& m : means) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += x[rng.next() % n];
    m = s / static_cast<double>(n);
  }
  std::sort(means.begin(), means.end());
  return {mean(x), quantile(means, 0.025), quantile(means, 0.975)};
}

Interval bootstrap_ratio(const std::vector<double>& num, const std::vector<double>& den, int resamples,
                         std::uint64_t seed) {
  if (num.size() != den.size()) throw std::invalid_argument("stats::bootstrap_ratio: unpaired values");
  std::vector<double> logs;
  for (std::size_t i = 0; i < num.size(); ++i) {
    if (!(num[i] > 0) || !(den[i] > 0)) throw std::invalid_argument("stats::bootstrap_ratio: values must be > 0");
    logs.push_back(std::log(num[i] / den[i]));
  }
  const Interval l = bootstrap_mean(logs, resamples, seed);
  return {std::exp(l.estimate), std::exp(l.lo), std::exp(l.hi)};
}

Interval clopper_pearson(int k, int n) {
  if (n < 1 || k < 0 || k > n) throw std::invalid_argument("stats::clopper_pearson: need 0 <= k <= n, n >= 1");
  const double alpha2 = 0.025;
  Interval i{static_cast<double>(k) / n, 0, 1};
  // P(X >= k | p) = 1 - P(X <= k - 1 | p) rises with p; P(X <= k | p) falls with p.
  if (k > 0) i.lo = solve_decreasing([&](double p) { return binom_cdf(k - 1, n, p); }, 1 - alpha2);
  if (k < n) i.hi = solve_decreasing([&](double p) { return binom_cdf(k, n, p); }, alpha2);
  return i;
}

std::string to_string(Verdict v) {
  switch (v) {
    case Verdict::supported: return "supported";
    case Verdict::contradicted: return "contradicted";
    default: return "inconclusive";
  }
}

Verdict by_difference(const Interval& i, int sign) {
  if (i.lo > 0) return sign > 0 ? Verdict::supported : Verdict::contradicted;
  if (i.hi < 0) return sign > 0 ? Verdict::contradicted : Verdict::supported;
  return Verdict::inconclusive;
}

Verdict by_ratio(const Interval& i, int sign) {
  if (i.lo > 1) return sign > 0 ? Verdict::supported : Verdict::contradicted;
  if (i.hi < 1) return sign > 0 ? Verdict::contradicted : Verdict::supported;
  return Verdict::inconclusive;
}

Verdict by_equivalence(const Interval& i, double margin) {
  if (i.lo > -margin && i.hi < margin) return Verdict::supported;
  if (i.lo >= margin || i.hi <= -margin) return Verdict::contradicted;
  return Verdict::inconclusive;
}

}  // namespace bnorm::train::stats
