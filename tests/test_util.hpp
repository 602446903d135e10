// Helpers shared by the tests: random data with chosen per-channel offsets, the channels-last
// permutation, and comparisons that report the worst element.
#pragma once

#include <bnorm/bnorm.hpp>

#include "kernels/kernels.hpp"
#include "kernels/reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace bnorm::test {

struct Dims {
  std::vector<std::int64_t> shape;  // logical (N, C, ...)
  std::int64_t N() const { return shape[0]; }
  std::int64_t C() const { return shape[1]; }
  std::int64_t S() const {
    std::int64_t s = 1;
    for (std::size_t i = 2; i < shape.size(); ++i) s *= shape[i];
    return s;
  }
  std::int64_t numel() const { return N() * C() * S(); }
  Shape view_shape() const { return Shape(std::span<const std::int64_t>(shape)); }
  std::string str() const { return view_shape().str(); }
};

// Position in memory of logical element (n, c, s) under `layout`.
inline std::size_t memory_index(const Dims& d, Layout layout, std::int64_t n, std::int64_t c, std::int64_t s) {
  return static_cast<std::size_t>(layout == Layout::ChannelsFirst ? (n * d.C() + c) * d.S() + s
                                                                  : (n * d.S() + s) * d.C() + c);
}

// The message of the bnorm::Error that f throws, or "(no error)".
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Calls f(logical index, memory index) for every element.
template <class F>
void for_each_element(const Dims& d, Layout layout, F f) {
  for (std::int64_t n = 0; n < d.N(); ++n)
    for (std::int64_t c = 0; c < d.C(); ++c)
      for (std::int64_t s = 0; s < d.S(); ++s)
        f(memory_index(d, Layout::ChannelsFirst, n, c, s), memory_index(d, layout, n, c, s));
}

// Logical channels-first values -> memory in `layout`.
template <class T>
std::vector<T> to_layout(const std::vector<double>& logical, const Dims& d, Layout layout) {
  std::vector<T> out(logical.size());
  for_each_element(d, layout, [&](std::size_t li, std::size_t mi) { out[mi] = static_cast<T>(logical[li]); });
  return out;
}

// Memory in `layout` -> logical channels-first doubles.
template <class T>
std::vector<double> from_layout(const std::vector<T>& mem, const Dims& d, Layout layout) {
  std::vector<double> out(mem.size());
  for_each_element(d, layout, [&](std::size_t li, std::size_t mi) { out[li] = static_cast<double>(mem[mi]); });
  return out;
}

// Values x = offset[c] + scale[c] * normal, rounded to T (so the reference sees exactly what the
// kernel sees), returned as logical doubles.
template <class T>
std::vector<double> random_input(const Dims& d, std::mt19937_64& rng, double offset_max = 3.0, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uni(-offset_max, offset_max), sc(0.5, 2.0);
  std::vector<double> off(static_cast<std::size_t>(d.C())), scl(off.size());
  for (std::size_t c = 0; c < off.size(); ++c) {
    off[c] = uni(rng);
    scl[c] = scale * sc(rng);
  }
  std::vector<double> x(static_cast<std::size_t>(d.numel()));
  for (std::int64_t n = 0; n < d.N(); ++n)
    for (std::int64_t c = 0; c < d.C(); ++c)
      for (std::int64_t s = 0; s < d.S(); ++s) {
        const auto i = static_cast<std::size_t>((n * d.C() + c) * d.S() + s);
        x[i] = static_cast<double>(static_cast<T>(off[static_cast<std::size_t>(c)] + scl[static_cast<std::size_t>(c)] * normal(rng)));
      }
  return x;
}

template <class T>
std::vector<double> random_vector(std::int64_t n, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (double& e : v) e = static_cast<double>(static_cast<T>(u(rng)));
  return v;
}

template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// |got - want| <= atol + rtol * |want| everywhere (NaN must match NaN).
inline ::testing::AssertionResult close(const std::vector<double>& got, const std::vector<double>& want, double atol,
                                        double rtol, const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " != " << want.size();
  double worst = 0;
  std::size_t wi = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i]) != std::isnan(got[i]))
      return ::testing::AssertionFailure() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    if (std::isnan(want[i])) continue;
    const double excess = std::abs(got[i] - want[i]) - (atol + rtol * std::abs(want[i]));
    if (excess > worst) {
      worst = excess;
      wi = i;
    }
  }
  if (worst > 0)
    return ::testing::AssertionFailure() << what << "[" << wi << "]: got " << got[wi] << ", want " << want[wi]
                                         << " (|diff| " << std::abs(got[wi] - want[wi]) << " > atol " << atol
                                         << " + rtol " << rtol << " * |want|)";
  return ::testing::AssertionSuccess();
}

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::abs(e));
  return m;
}

// Tolerances of a T-precision result against the float64 reference.
template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-12;
}

// bfloat16 storage: values rounded to it, logical doubles -> bfloat16 memory in `layout`, and back.
inline std::vector<double> round_to_bf16(std::vector<double> v) {
  for (double& x : v) x = bfloat16::from_float(static_cast<float>(x)).to_float();
  return v;
}
inline std::vector<bfloat16> to_bf16(const std::vector<double>& logical, const Dims& d, Layout layout) {
  const std::vector<float> f = to_layout<float>(logical, d, layout);
  std::vector<bfloat16> out(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) out[i] = bfloat16::from_float(f[i]);
  return out;
}
inline std::vector<double> from_bf16(const std::vector<bfloat16>& mem, const Dims& d, Layout layout) {
  std::vector<float> f(mem.size());
  for (std::size_t i = 0; i < f.size(); ++i) f[i] = mem[i].to_float();
  return from_layout(f, d, layout);
}

// Restores the library's thread count at scope exit.
struct ThreadScope {
  int saved = num_threads();
  explicit ThreadScope(int n) { set_num_threads(n); }
  ~ThreadScope() { set_num_threads(saved); }
};

// Restores the kernels' instruction set at scope exit.
struct IsaScope {
  kernels::Isa saved = kernels::active_isa();
  explicit IsaScope(kernels::Isa isa) { kernels::set_isa(isa); }
  ~IsaScope() { kernels::set_isa(saved); }
};

// Calls f(isa) for every row of the ISA table that this CPU runs, lowest first, with that row active.
template <class F>
void for_each_supported_isa(F f) {
  for (kernels::Isa isa : kernels::kAllIsas) {
    if (!kernels::isa_supported(isa)) continue;
    const IsaScope scope(isa);
    SCOPED_TRACE(std::string("isa ") + kernels::isa_name(isa));
    f(isa);
  }
}

// Outputs of at least `bytes` streamed while in scope, instead of at this machine's measured threshold
// (stream_threshold.cpp): for tests that must take the streamed path wherever they run.
struct StreamThresholdScope {
  explicit StreamThresholdScope(std::int64_t bytes) { kernels::set_stream_threshold_for_testing(bytes); }
  ~StreamThresholdScope() { kernels::set_stream_threshold_for_testing(-1); }
};

}  // namespace bnorm::test
