// KernelTester: one row of the kernel table (BNORM_KERNELS, src/kernels/kernels.hpp) called directly,
// under one row of the ISA table, on one problem, against the float64 reference; a failure names
// the kernel, its storage type, the ISA and the problem. Set up fluently, then run per storage type:
//
//   KernelTester().kernel(Kernel::normalize).isa(isa).shape({4, 5, 33}).relu(true).test<float>();
//
// The per-channel inputs of a kernel (coefficients, means, sums) are derived from the reference's
// statistics the way the functional layer derives them, so that each kernel is checked alone.
#pragma once

#include "test_util.hpp"

#include <cstdint>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

namespace bnorm::test {

// One enumerator per row of the kernel table, in its order: a new row is a new test case, and a
// compile error in KernelTester::run until the tester knows how to check it (-Wswitch).
enum class Kernel {
#define BNORM_KERNEL_ENUMERATOR(name, parameters, arguments) name,
  BNORM_KERNELS(BNORM_KERNEL_ENUMERATOR)
#undef BNORM_KERNEL_ENUMERATOR
};
inline constexpr Kernel kAllKernels[] = {
#define BNORM_KERNEL_LIST_ENTRY(name, parameters, arguments) Kernel::name,
    BNORM_KERNELS(BNORM_KERNEL_LIST_ENTRY)
#undef BNORM_KERNEL_LIST_ENTRY
};
inline const char* kernel_name(Kernel k) {
  switch (k) {
#define BNORM_KERNEL_NAME(name, parameters, arguments) \
  case Kernel::name: return #name;
    BNORM_KERNELS(BNORM_KERNEL_NAME)
#undef BNORM_KERNEL_NAME
  }
  return "unknown";
}

// Test parameters print as their names.
inline void PrintTo(Kernel k, std::ostream* os) { *os << kernel_name(k); }

// The channels-first fast paths are defined for that layout only.
inline bool kernel_takes(Kernel k, Layout layout) {
  return layout == Layout::ChannelsFirst || (k != Kernel::fused_forward_cf && k != Kernel::fused_backward_cf);
}

// Per-channel L1 sums of v * w (w empty: 1) over logical channels-first data: they bound the
// rounding error of a reduction.
inline double l1_bound(const Dims& d, const std::vector<double>& v, const std::vector<double>& w) {
  double worst = 0;
  for (std::int64_t c = 0; c < d.C(); ++c) {
    double s = 0;
    for (std::int64_t n = 0; n < d.N(); ++n)
      for (std::int64_t i = 0; i < d.S(); ++i) {
        const auto k = static_cast<std::size_t>((n * d.C() + c) * d.S() + i);
        s += std::abs(v[k] * (w.empty() ? 1.0 : w[k]));
      }
    worst = std::max(worst, s);
  }
  return worst;
}

class KernelTester {
 public:
  KernelTester& kernel(Kernel k) { kernel_ = k; return *this; }
  KernelTester& isa(kernels::Isa isa) { isa_ = isa; return *this; }
  KernelTester& shape(std::vector<std::int64_t> dims) { dims_.shape = std::move(dims); return *this; }
  KernelTester& layout(Layout layout) { layout_ = layout; return *this; }
  // The backward's full (batch statistics) or frozen form.
  KernelTester& training(bool on) { training_ = on; return *this; }
  // Forward: Activation::Relu; backward: dy masked by the forward's output.
  KernelTester& relu(bool on) { relu_ = on; return *this; }
  // The forward's residual input (normalize, fused_forward_cf).
  KernelTester& residual(bool on) { residual_ = on; return *this; }
  // The output written over an input: y over x, dx over dy.
  KernelTester& in_place(bool on) { in_place_ = on; return *this; }
  // gamma and beta given (false: null, the fused kernels' 1 and 0).
  KernelTester& affine(bool on) { affine_ = on; return *this; }
  KernelTester& threads(int n) { threads_ = n; return *this; }
  KernelTester& seed(std::uint64_t s) { seed_ = s; return *this; }

  // Runs the kernel for storage type S under the ISA (which the CPU must support) and compares.
  template <class S>
  void test() const {
    using P = kernels::Compute<S>;
    const bool forward = kernel_ == Kernel::normalize || kernel_ == Kernel::fused_forward_cf;
    const bool backward = !forward && kernel_ != Kernel::channel_moments;
    const bool with_residual = residual_ && forward;  // the backward kernels take none
    const std::string label = std::string("kernel ") + kernel_name(kernel_) + "<" + type_name<S>() + "> under isa " +
                              kernels::isa_name(isa_) + ", " + dims_.str() + " " + to_string(layout_) +
                              (training_ ? " training" : " eval") + (relu_ ? " relu" : "") +
                              (with_residual ? " residual" : "") + (in_place_ ? " in-place" : "") +
                              (affine_ ? "" : " no-affine") + " threads=" + std::to_string(threads_) + ": ";
    const IsaScope isa_scope(isa_);
    ASSERT_EQ(kernels::active_isa(), isa_) << label << "the CPU does not run this ISA";
    ASSERT_TRUE(kernel_takes(kernel_, layout_)) << label << "not a layout of this kernel";
    const ThreadScope thread_scope(threads_);
    const Dims& d = dims_;
    const std::int64_t C = d.C();
    const auto uC = static_cast<std::size_t>(C);
    const double m = static_cast<double>(d.N() * d.S());
    kernels::Geometry g{d.N(), C, d.S(), layout_};
    // The functional layer's view (check_tensor): with one spatial value both layouts are one memory.
    if (g.S == 1 && kernel_takes(kernel_, Layout::ChannelsLast)) g.layout = Layout::ChannelsLast;
    g.reduce_threads = kernels::reduce_threads(g);

    std::mt19937_64 rng(seed_);
    const std::vector<double> x = rounded<S>(random_input<double>(d, rng));
    const std::vector<double> dy = rounded<S>(random_input<double>(d, rng, 0.5));
    const std::vector<double> z = with_residual ? rounded<S>(random_input<double>(d, rng, 1.0)) : std::vector<double>{};
    const std::vector<double> gamma = affine_ ? random_vector<P>(C, rng, 0.5, 1.5) : std::vector<double>(uC, 1.0);
    const std::vector<double> beta = affine_ ? random_vector<P>(C, rng, -1, 1) : std::vector<double>(uC, 0.0);
    // The frozen statistics of eval (and of normalize, which takes any statistics).
    const std::vector<double> rm = random_vector<P>(C, rng, -1, 1), rv = random_vector<P>(C, rng, 0.5, 2);

    // The reference: the forward (its statistics, y without the residual) and the backward. normalize
    // takes any statistics (the frozen ones here), a backward kernel those of its form.
    const bool frozen = kernel_ == Kernel::normalize || (backward && !training_);
    const reference::Problem p{d.N(), C, d.S(), !frozen, 0.1, 1e-5, relu_ && !with_residual};
    const reference::Forward ref = reference::forward(p, x, gamma, beta, rm, rv);
    std::vector<double> want_y = ref.y;  // act(bn(x) + z)
    if (with_residual)
      for (std::size_t i = 0; i < want_y.size(); ++i) want_y[i] = act(want_y[i] + z[i]);
    const reference::Backward rb = reference::backward(p, x, gamma, ref, dy);
    std::vector<double> want_sum_dy_xmu(uC);  // sum(dy' * (x - mean)) = sum(dy' * xhat) / invstd
    for (std::size_t c = 0; c < uC; ++c) want_sum_dy_xmu[c] = rb.dweight[c] / ref.invstd[c];

    const std::vector<S> xm = memory<S>(x, d), dym = memory<S>(dy, d), zm = memory<S>(z, d);
    const std::vector<S> ym = memory<S>(want_y, d);  // the forward's output, for the ReLU's mask
    std::vector<S> out(xm.size());
    std::vector<double> mean(uC), second(uC);  // statistics or sums, per the kernel
    std::vector<double> workspace(static_cast<std::size_t>(kernels::reduce_workspace_doubles(g, g.reduce_threads)));
    std::vector<P> mean_hi(uC), mean_lo(uC), k1(uC), k2(uC), k3(uC);
    for (std::size_t c = 0; c < uC; ++c) kernels::split_mean(ref.mean[c], mean_hi[c], mean_lo[c]);
    const double* gamma_or_null = affine_ ? gamma.data() : nullptr;
    const double* beta_or_null = affine_ ? beta.data() : nullptr;
    const S* residual = with_residual ? zm.data() : nullptr;
    const S* mask = relu_ ? ym.data() : nullptr;
    const Activation activation = relu_ ? Activation::Relu : Activation::None;

    // The tolerances: of a result computed in P, and of one stored in S.
    const double t = tol<P>(), t_out = std::is_same_v<S, bfloat16> ? 1.0 / 256 : t;
    const double t_y = (with_residual ? 4 : 1) * t_out;
    const double t_sum_dy = t * l1_bound(d, dy, {});
    std::vector<double> dy_xmu(x.size());
    for_each_element(d, Layout::ChannelsFirst, [&](std::size_t i, std::size_t) {
      dy_xmu[i] = dy[i] * (x[i] - ref.mean[(i / static_cast<std::size_t>(d.S())) % uC]);
    });
    // The mean enters as hi + lo in P: x - mean moves by up to |mean| * t, which the sum feels
    // through sum(|dy|).
    const double t_sum_dy_xmu = t * (l1_bound(d, dy_xmu, {}) + std::max(1.0, max_abs(ref.mean)) * l1_bound(d, dy, {}));
    // dx = k_dy * dy - k_x * (x - mean) - k_c cancels heavily for small m: its rounding error scales
    // with the terms, gamma * invstd * |dy|, not with the result.
    double gain = 0;
    for (std::size_t c = 0; c < uC; ++c) gain = std::max(gain, gamma[c] * ref.invstd[c]);
    const double dx_scale = std::max({1.0, max_abs(rb.dx), 3 * gain * max_abs(dy)});
    const double t_dx = 4 * t * dx_scale + t_out * max_abs(rb.dx);
    auto expect_stats = [&] {
      EXPECT_TRUE(close(mean, ref.mean, t * std::max(1.0, max_abs(x)), t, label + "mean"));
      std::vector<double> var(second);
      if (kernel_ == Kernel::channel_moments)
        for (double& v : var) v /= m;  // M2
      EXPECT_TRUE(close(var, ref.var, t * std::max(1.0, max_abs(x)), 4 * t, label + "var"));
    };
    auto expect_sums = [&] {
      EXPECT_TRUE(close(mean, rb.dbias, t_sum_dy, t, label + "sum_dy"));
      EXPECT_TRUE(close(second, want_sum_dy_xmu, t_sum_dy_xmu, t, label + "sum_dy_xmu"));
    };
    auto backward_coeffs = [&](const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xmu) {
      for (std::size_t c = 0; c < uC; ++c)
        kernels::backward_coeffs(gamma[c], ref.invstd[c], sum_dy[c], sum_dy_xmu[c], m, training_, mean_lo[c], k1[c],
                                 k2[c], k3[c]);
    };
    // In place: the output buffer starts as the input it overwrites.
    if (in_place_) out = backward ? dym : xm;
    const S* x_in = in_place_ && forward ? out.data() : xm.data();
    const S* dy_in = in_place_ && backward ? out.data() : dym.data();

    switch (kernel_) {
      case Kernel::channel_moments:
        kernels::channel_moments(xm.data(), g, mean.data(), second.data(), workspace.data());
        expect_stats();
        break;
      case Kernel::normalize:
        for (std::size_t c = 0; c < uC; ++c) {
          k1[c] = static_cast<P>(gamma[c] * ref.invstd[c]);
          k2[c] = kernels::normalize_shift<P>(beta[c], mean_lo[c], k1[c]);
        }
        kernels::normalize(x_in, out.data(), g, {mean_hi.data(), k1.data(), k2.data()}, activation, residual);
        EXPECT_TRUE(close(logical(out, d), want_y, t_y, t_y, label + "y"));
        break;
      case Kernel::backward_reduce:
        kernels::backward_reduce(dym.data(), xm.data(), mask, g, mean_hi.data(), mean_lo.data(), mean.data(),
                                 second.data(), workspace.data());
        expect_sums();
        break;
      case Kernel::backward_apply:
        backward_coeffs(rb.dbias, want_sum_dy_xmu);
        kernels::backward_apply(dy_in, xm.data(), mask, out.data(), g, {mean_hi.data(), k1.data(), k2.data(), k3.data()});
        EXPECT_TRUE(close(logical(out, d), rb.dx, t_dx, 0, label + "dx"));
        break;
      case Kernel::fused_forward_cf:
        kernels::fused_forward_cf(x_in, out.data(), g, gamma_or_null, beta_or_null, p.eps, activation, residual,
                                  mean.data(), second.data());
        expect_stats();
        EXPECT_TRUE(close(logical(out, d), want_y, t_y, t_y, label + "y"));
        break;
      case Kernel::fused_backward_cf:
        kernels::fused_backward_cf(dy_in, xm.data(), mask, out.data(), g,
                                   {ref.mean.data(), ref.invstd.data(), gamma_or_null}, training_, mean.data(),
                                   second.data());
        expect_sums();
        EXPECT_TRUE(close(logical(out, d), rb.dx, t_dx, 0, label + "dx"));
        break;
    }
  }

 private:
  template <class S>
  static const char* type_name() {
    if constexpr (std::is_same_v<S, float>)
      return "float";
    else if constexpr (std::is_same_v<S, double>)
      return "double";
    else
      return "bfloat16";
  }
  double act(double v) const { return relu_ && v < 0 ? 0.0 : v; }
  // Logical doubles as S would store them, so that the reference sees exactly the kernel's inputs.
  template <class S>
  static std::vector<double> rounded(std::vector<double> v) {
    if constexpr (std::is_same_v<S, bfloat16>) {
      return round_to_bf16(std::move(v));
    } else {
      for (double& e : v) e = static_cast<double>(static_cast<S>(e));
      return v;
    }
  }
  // Logical doubles -> memory of S in the tester's layout, and back.
  template <class S>
  std::vector<S> memory(const std::vector<double>& v, const Dims& d) const {
    if (v.empty()) return {};
    if constexpr (std::is_same_v<S, bfloat16>)
      return to_bf16(v, d, layout_);
    else
      return to_layout<S>(v, d, layout_);
  }
  template <class S>
  std::vector<double> logical(const std::vector<S>& mem, const Dims& d) const {
    if constexpr (std::is_same_v<S, bfloat16>)
      return from_bf16(mem, d, layout_);
    else
      return from_layout(mem, d, layout_);
  }

  Kernel kernel_ = Kernel::normalize;
  kernels::Isa isa_ = kernels::kAllIsas[0];
  Dims dims_{{2, 3, 4}};
  Layout layout_ = Layout::ChannelsFirst;
  bool training_ = true, relu_ = false, residual_ = false, in_place_ = false, affine_ = true;
  int threads_ = 1;
  std::uint64_t seed_ = 1;
};

}  // namespace bnorm::test

namespace bnorm::kernels {
inline void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace bnorm::kernels
