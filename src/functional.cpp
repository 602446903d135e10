// The functional layer: validates every argument, then runs the kernels, then (training) writes
// the saved and running statistics. Nothing is written before all checks have passed.
#include <bnorm/functional.hpp>

#include "functional_parts.hpp"
#include "kernels/kernels.hpp"
#include "validate.hpp"
#include "workspace.hpp"

#include <algorithm>
#include <cmath>
#include <span>

namespace bnorm {
namespace {

using detail::check_vector;
using kernels::Compute;
using kernels::Geometry;
// Every per-channel buffer of a call comes from the calling thread's workspace (workspace.hpp), so
// that a call allocates nothing once an earlier one on the thread has needed as much. Each function
// that takes buffers opens its own scope, which gives them back when it returns.
using Scope = detail::Workspace::Scope;

// Calls f(T{}) with T the storage type of dtype (float, double or bfloat16); validation has
// already refused any other dtype.
template <class F>
void with_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(bfloat16{});
    case DType::Float32: break;
  }
  f(float{});
}

// Reads a per-channel vector that goes with a tensor stored as T (so of dtype Compute<T>, or
// float64) as doubles into `out` (one per channel); absent gives `fallback`.
template <class T>
void read_channels_into(std::span<double> out, const ConstVectorView& v, double fallback) {
  using P = Compute<T>;
  if (!v.present()) {
    std::fill(out.begin(), out.end(), fallback);
    return;
  }
  for (std::size_t c = 0; c < out.size(); ++c)
    out[c] = v.dtype() == DType::Float64 ? static_cast<const double*>(v.data())[c]
                                         : static_cast<double>(static_cast<const P*>(v.data())[c]);
}

// The same into a span of C taken from `scope`.
template <class T>
std::span<double> read_channels(Scope& scope, const ConstVectorView& v, std::int64_t C, double fallback) {
  std::span<double> out = scope.take<double>(static_cast<std::size_t>(C));
  read_channels_into<T>(out, v, fallback);
  return out;
}

template <class T>
void write_channels(const VectorView& v, std::span<const double> values) {
  using P = Compute<T>;
  if (!v.present()) return;
  for (std::size_t c = 0; c < values.size(); ++c) {
    if (v.dtype() == DType::Float64)
      static_cast<double*>(v.data())[c] = values[c];
    else
      static_cast<P*>(v.data())[c] = static_cast<P>(values[c]);
  }
}

// The means split in hi + lo parts of P (kernels::split_mean), in spans taken from `scope`.
template <class P>
struct SplitMeans {
  std::span<P> hi, lo;
};
template <class P>
SplitMeans<P> split_means(Scope& scope, std::span<const double> mean) {
  SplitMeans<P> s{scope.take<P>(mean.size()), scope.take<P>(mean.size())};
  for (std::size_t c = 0; c < mean.size(); ++c) kernels::split_mean(mean[c], s.hi[c], s.lo[c]);
  return s;
}

// The workspace of channel_moments and backward_reduce for g (zeros), taken from `scope`.
std::span<double> reduce_workspace(Scope& scope, const Geometry& g) {
  return scope.take<double>(
      static_cast<std::size_t>(kernels::reduce_workspace_doubles(g, kernels::reduce_threads(g))));
}

// Normalizes x into y with the given per-channel statistics (shared by every non-fused path).
template <class T>
void normalize_with(const T* x, T* y, const Geometry& g, std::span<const double> mean,
                    std::span<const double> invstd, std::span<const double> gamma, std::span<const double> beta,
                    Activation act, const T* residual = nullptr) {
  using P = Compute<T>;
  const std::size_t uC = mean.size();
  Scope scope;
  const SplitMeans<P> means = split_means<P>(scope, mean);
  const std::span<P> scale = scope.take<P>(uC), shift = scope.take<P>(uC);
  for (std::size_t c = 0; c < uC; ++c) {
    scale[c] = static_cast<P>(gamma[c] * invstd[c]);
    shift[c] = static_cast<P>(beta[c]);
  }
  if (g.per_channel() > 0)
    kernels::normalize(x, y, g, {means.hi.data(), means.lo.data(), scale.data(), shift.data()}, act, residual);
}

// Training only: the saved statistics, and the running update with the unbiased variance of m values.
template <class T>
void commit_training(std::span<const double> mean, std::span<const double> var, std::span<const double> invstd,
                     double m, VectorView running_mean, VectorView running_var, double momentum, VectorView save_mean,
                     VectorView save_invstd) {
  const std::size_t uC = mean.size();
  const auto C = static_cast<std::int64_t>(uC);
  write_channels<T>(save_mean, mean);
  write_channels<T>(save_invstd, invstd);
  if (running_mean.present()) {
    Scope scope;
    const std::span<double> rm = read_channels<T>(scope, running_mean, C, 0.0),
                            rv = read_channels<T>(scope, running_var, C, 1.0);
    for (std::size_t c = 0; c < uC; ++c) {
      rm[c] = (1 - momentum) * rm[c] + momentum * mean[c];
      rv[c] = (1 - momentum) * rv[c] + momentum * var[c] * m / (m - 1);  // unbiased batch variance
    }
    write_channels<T>(running_mean, rm);
    write_channels<T>(running_var, rv);
  }
}

template <class T>
void forward_impl(const T* x, T* y, const Geometry& g, VectorView running_mean, VectorView running_var,
                  ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps,
                  VectorView save_mean, VectorView save_invstd, Activation act, const T* residual) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  Scope scope;
  const std::span<double> mean = scope.take<double>(uC), var = scope.take<double>(uC),
                          invstd = scope.take<double>(uC);
  const std::span<const double> gamma = read_channels<T>(scope, weight, C, 1.0),
                                beta = read_channels<T>(scope, bias, C, 0.0);
  if (training && kernels::use_fused_forward<T>(g)) {
    kernels::fused_forward_cf(x, y, g, gamma.data(), beta.data(), eps, act, residual, mean.data(), var.data());
    for (std::size_t c = 0; c < uC; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  } else {
    if (training) {
      const std::span<double> m2 = scope.take<double>(uC), ws = reduce_workspace(scope, g);
      kernels::channel_moments(x, g, mean.data(), m2.data(), ws.data());
      for (std::size_t c = 0; c < uC; ++c) var[c] = m2[c] / m;
    } else {
      read_channels_into<T>(mean, running_mean, 0.0);
      read_channels_into<T>(var, running_var, 1.0);
    }
    for (std::size_t c = 0; c < uC; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    normalize_with(x, y, g, mean, invstd, gamma, beta, act, residual);
  }
  if (training) commit_training<T>(mean, var, invstd, m, running_mean, running_var, momentum, save_mean, save_invstd);
}

// sum(dy') and sum(dy' * (x - mean)) of this input (zeros when it holds no values).
template <class T>
void reduce_sums(const T* dy, const T* x, const T* out, const Geometry& g, const SplitMeans<Compute<T>>& means,
                 double* sum_dy, double* sum_dy_xmu) {
  if (g.per_channel() < 1) return;
  Scope scope;
  const std::span<double> ws = reduce_workspace(scope, g);
  kernels::backward_reduce(dy, x, out, g, means.hi.data(), means.lo.data(), sum_dy, sum_dy_xmu, ws.data());
}

// dx from the sums over the m values the statistics came from.
template <class T>
void apply_dx(const T* dy, const T* x, const T* out, T* dx, const Geometry& g, const SplitMeans<Compute<T>>& means,
              std::span<const double> gamma, std::span<const double> invstd, const double* sum_dy,
              const double* sum_dy_xmu, double m, bool training) {
  using P = Compute<T>;
  if (g.per_channel() < 1) return;
  const std::size_t uC = means.hi.size();
  Scope scope;
  const std::span<P> k_dy = scope.take<P>(uC), k_x = scope.take<P>(uC), k_c = scope.take<P>(uC);
  for (std::size_t c = 0; c < uC; ++c)
    kernels::backward_coeffs(gamma[c], invstd[c], sum_dy[c], sum_dy_xmu[c], m, training, k_dy[c], k_x[c], k_c[c]);
  kernels::backward_apply(dy, x, out, dx, g,
                          {means.hi.data(), means.lo.data(), k_dy.data(), k_x.data(), k_c.data()});
}

// dgamma = sum(dy' * (x - mean)) * invstd, dbeta = sum(dy').
template <class T>
void write_param_grads(VectorView grad_weight, VectorView grad_bias, const double* sum_dy, const double* sum_dy_xmu,
                       std::span<const double> invstd) {
  if (grad_weight.present()) {
    Scope scope;
    const std::span<double> dgamma = scope.take<double>(invstd.size());
    for (std::size_t c = 0; c < invstd.size(); ++c) dgamma[c] = sum_dy_xmu[c] * invstd[c];
    write_channels<T>(grad_weight, dgamma);
  }
  write_channels<T>(grad_bias, std::span<const double>(sum_dy, invstd.size()));
}

template <class T>
void backward_impl(const T* dy, const T* x, const T* out, T* dx, const Geometry& g, ConstVectorView weight,
                   ConstVectorView running_mean, ConstVectorView running_var, ConstVectorView save_mean,
                   ConstVectorView save_invstd, bool training, double eps, VectorView grad_weight,
                   VectorView grad_bias) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  Scope scope;
  const std::span<double> mean = read_channels<T>(scope, training ? save_mean : running_mean, C, 0.0);
  const std::span<double> invstd = read_channels<T>(scope, training ? save_invstd : running_var, C, 1.0);
  if (!training)
    for (double& v : invstd) v = 1.0 / std::sqrt(v + eps);
  const std::span<const double> gamma = read_channels<T>(scope, weight, C, 1.0);

  // The reductions are needed for the parameter gradients and, in training, for dx.
  const std::span<double> sum_dy = scope.take<double>(uC), sum_dy_xmu = scope.take<double>(uC);
  const bool need_sums = grad_weight.present() || grad_bias.present() || (training && dx);
  // x, dy, the ReLU's output, and dx unless it is streamed
  if ((need_sums || dx) && kernels::use_fused_backward<T>(g, out != nullptr, dx != nullptr)) {
    kernels::fused_backward_cf(dy, x, out, dx, g, mean.data(), invstd.data(), gamma.data(), training, sum_dy.data(),
                               sum_dy_xmu.data());
  } else {
    const SplitMeans<Compute<T>> means = split_means<Compute<T>>(scope, mean);
    if (need_sums) reduce_sums(dy, x, out, g, means, sum_dy.data(), sum_dy_xmu.data());
    if (dx) apply_dx(dy, x, out, dx, g, means, gamma, invstd, sum_dy.data(), sum_dy_xmu.data(), m, training);
  }
  write_param_grads<T>(grad_weight, grad_bias, sum_dy.data(), sum_dy_xmu.data(), invstd);
}

}  // namespace

namespace detail {

TensorInfo check_forward_args(const char* fn, ConstTensorView input, TensorView output, VectorView running_mean,
                              VectorView running_var, ConstVectorView weight, ConstVectorView bias, bool training,
                              double momentum, double eps, VectorView save_mean, VectorView save_invstd,
                              Activation activation) {
  const detail::TensorInfo in = detail::check_tensor(fn, "input", input);
  detail::check_tensor(fn, "output", output);
  detail::check_like(fn, "output", output, "input", input);
  detail::check_alias(fn, "output", output.data(), in.bytes, "input", input.data(), in.bytes);
  const std::int64_t C = in.geometry.C;
  const DType dt = input.dtype();
  if (running_mean.present() != running_var.present())
    detail::fail(fn, std::string("running_var: expected ") + (running_mean.present() ? "a vector" : "none") +
                         " like running_mean, got " + (running_var.present() ? "a vector" : "none"));
  if (running_mean.present()) {
    check_vector(fn, "running_mean", running_mean, C, dt);
    check_vector(fn, "running_var", running_var, C, dt);
  } else if (!training) {
    detail::fail(fn, "running_mean: expected running statistics when training=false, got none");
  }
  if (weight.present()) check_vector(fn, "weight", weight, C, dt);
  if (bias.present()) check_vector(fn, "bias", bias, C, dt);
  if (save_mean.present()) check_vector(fn, "save_mean", save_mean, C, dt, true);
  if (save_invstd.present()) check_vector(fn, "save_invstd", save_invstd, C, dt, true);
  if (activation != Activation::None && activation != Activation::Relu)
    detail::fail(fn, "activation: expected None or Relu, got unsupported value " +
                         std::to_string(static_cast<int>(activation)));
  detail::check_eps(fn, eps);
  detail::check_momentum(fn, momentum);
  return in;
}

}  // namespace detail

void batch_norm(ConstTensorView input, TensorView output, VectorView running_mean, VectorView running_var,
                ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps,
                VectorView save_mean, VectorView save_invstd, Activation activation, ConstTensorView residual) {
  const char* fn = "batch_norm";
  const detail::TensorInfo in = detail::check_forward_args(fn, input, output, running_mean, running_var, weight, bias,
                                                           training, momentum, eps, save_mean, save_invstd, activation);
  if (!residual.empty()) {
    detail::check_tensor(fn, "residual", residual);
    detail::check_like(fn, "residual", residual, "input", input);
    // The output may be the residual itself (each element is read before it is written), not a
    // partial overlap of it.
    detail::check_alias(fn, "output", output.data(), in.bytes, "residual", residual.data(), in.bytes);
  }
  if (training) detail::check_training_count(fn, input, in);
  with_storage(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    forward_impl(static_cast<const T*>(input.data()), static_cast<T*>(output.data()), in.geometry, running_mean,
                 running_var, weight, bias, training, momentum, eps, save_mean, save_invstd, activation,
                 residual.empty() ? nullptr : static_cast<const T*>(residual.data()));
  });
}

void batch_norm_inference(ConstTensorView input, TensorView output, ConstVectorView running_mean,
                          ConstVectorView running_var, ConstVectorView weight, ConstVectorView bias, double eps,
                          Activation activation) {
  if (!running_mean.present() || !running_var.present())
    detail::fail("batch_norm_inference", "running_mean: expected running_mean and running_var, got none");
  // With training = false batch_norm only reads the running statistics.
  batch_norm(input, output, VectorView(const_cast<void*>(running_mean.data()), running_mean.dtype(), running_mean.size()),
             VectorView(const_cast<void*>(running_var.data()), running_var.dtype(), running_var.size()), weight, bias,
             false, 0.1, eps, {}, {}, activation);
}

namespace detail {

TensorInfo check_backward_args(const char* fn, ConstTensorView grad_output, ConstTensorView input,
                               ConstVectorView weight, ConstVectorView running_mean, ConstVectorView running_var,
                               ConstVectorView save_mean, ConstVectorView save_invstd, bool training, double eps,
                               TensorView grad_input, VectorView grad_weight, VectorView grad_bias,
                               Activation activation, ConstTensorView output) {
  const detail::TensorInfo in = detail::check_tensor(fn, "input", input);
  detail::check_tensor(fn, "grad_output", grad_output);
  detail::check_like(fn, "grad_output", grad_output, "input", input);
  const bool want_dx = !grad_input.empty();
  if (want_dx) {
    detail::check_tensor(fn, "grad_input", grad_input);
    detail::check_like(fn, "grad_input", grad_input, "input", input);
    detail::check_alias(fn, "grad_input", grad_input.data(), in.bytes, "grad_output", grad_output.data(), in.bytes);
    detail::check_alias(fn, "grad_input", grad_input.data(), in.bytes, "input", input.data(), in.bytes);
  }
  if (activation != Activation::None && activation != Activation::Relu)
    detail::fail(fn, "activation: expected None or Relu, got unsupported value " +
                         std::to_string(static_cast<int>(activation)));
  const bool relu = activation == Activation::Relu;
  if (relu) {
    if (output.empty()) detail::fail(fn, "output: expected the forward's output with activation=Relu, got none");
    detail::check_tensor(fn, "output", output);
    detail::check_like(fn, "output", output, "input", input);
    if (want_dx)
      detail::check_alias(fn, "grad_input", grad_input.data(), in.bytes, "output", output.data(), in.bytes);
  }
  const std::int64_t C = in.geometry.C;
  const DType dt = input.dtype();
  if (weight.present()) check_vector(fn, "weight", weight, C, dt);
  if (training) {
    if (!save_mean.present() || !save_invstd.present())
      detail::fail(fn, "save_mean: expected save_mean and save_invstd from the forward when training=true, got none");
    check_vector(fn, "save_mean", save_mean, C, dt, true);
    check_vector(fn, "save_invstd", save_invstd, C, dt, true);
  } else {
    if (!running_mean.present() || !running_var.present())
      detail::fail(fn, "running_mean: expected running_mean and running_var when training=false, got none");
    check_vector(fn, "running_mean", running_mean, C, dt);
    check_vector(fn, "running_var", running_var, C, dt);
    detail::check_eps(fn, eps);
  }
  if (grad_weight.present()) check_vector(fn, "grad_weight", grad_weight, C, dt);
  if (grad_bias.present()) check_vector(fn, "grad_bias", grad_bias, C, dt);
  return in;
}

}  // namespace detail

void batch_norm_backward(ConstTensorView grad_output, ConstTensorView input, ConstVectorView weight,
                         ConstVectorView running_mean, ConstVectorView running_var, ConstVectorView save_mean,
                         ConstVectorView save_invstd, bool training, double eps, TensorView grad_input,
                         VectorView grad_weight, VectorView grad_bias, Activation activation, ConstTensorView output) {
  const detail::TensorInfo in =
      detail::check_backward_args("batch_norm_backward", grad_output, input, weight, running_mean, running_var,
                                  save_mean, save_invstd, training, eps, grad_input, grad_weight, grad_bias, activation,
                                  output);
  const bool want_dx = !grad_input.empty();
  const bool relu = activation == Activation::Relu;
  with_storage(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    backward_impl(static_cast<const T*>(grad_output.data()), static_cast<const T*>(input.data()),
                  relu ? static_cast<const T*>(output.data()) : nullptr,
                  want_dx ? static_cast<T*>(grad_input.data()) : nullptr, in.geometry, weight, running_mean,
                  running_var, save_mean, save_invstd, training, eps, grad_weight, grad_bias);
  });
}

void batch_stats(ConstTensorView input, VectorView mean, VectorView var) {
  const char* fn = "batch_stats";
  const detail::TensorInfo in = detail::check_tensor(fn, "input", input);
  const std::int64_t C = in.geometry.C;
  check_vector(fn, "mean", mean, C, input.dtype(), true);
  check_vector(fn, "var", var, C, input.dtype(), true);
  if (C > 0 && in.geometry.per_channel() < 1)
    detail::fail(fn, "input: expected at least 1 value per channel, got shape " + input.shape().str());
  const Geometry& g = in.geometry;
  Scope scope;
  const std::span<double> mu = scope.take<double>(static_cast<std::size_t>(C)), m2 = scope.take<double>(mu.size()),
                          ws = reduce_workspace(scope, g);
  with_storage(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    kernels::channel_moments(static_cast<const T*>(input.data()), g, mu.data(), m2.data(), ws.data());
    for (double& v : m2) v /= static_cast<double>(g.per_channel());
    write_channels<T>(mean, mu);
    write_channels<T>(var, m2);
  });
}

// The shared pieces (functional_parts.hpp): the same templates as above, entered with a dtype.
namespace {

template <class T>
void forward_with_stats_t(ConstTensorView input, TensorView output, const Geometry& g, std::span<const double> mean,
                          std::span<const double> var, double count, VectorView running_mean, VectorView running_var,
                          ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps,
                          VectorView save_mean, VectorView save_invstd, Activation act) {
  const std::int64_t C = g.C;
  Scope scope;
  const std::span<double> invstd = scope.take<double>(mean.size());
  for (std::size_t c = 0; c < invstd.size(); ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  normalize_with(static_cast<const T*>(input.data()), static_cast<T*>(output.data()), g, mean, invstd,
                 read_channels<T>(scope, weight, C, 1.0), read_channels<T>(scope, bias, C, 0.0), act);
  if (training)
    commit_training<T>(mean, var, invstd, count, running_mean, running_var, momentum, save_mean, save_invstd);
}

template <class T>
const T* data_or_null(ConstTensorView t) {
  return t.empty() ? nullptr : static_cast<const T*>(t.data());
}

template <class T>
void backward_sums_t(ConstTensorView dy, ConstTensorView x, ConstTensorView out, const Geometry& g,
                     ConstVectorView save_mean, double* sum_dy, double* sum_dy_xmu) {
  Scope scope;
  const SplitMeans<Compute<T>> means = split_means<Compute<T>>(scope, read_channels<T>(scope, save_mean, g.C, 0.0));
  reduce_sums(static_cast<const T*>(dy.data()), static_cast<const T*>(x.data()), data_or_null<T>(out), g, means,
              sum_dy, sum_dy_xmu);
}

template <class T>
void backward_finish_t(ConstTensorView dy, ConstTensorView x, ConstTensorView out, const Geometry& g,
                       ConstVectorView weight, ConstVectorView save_mean, ConstVectorView save_invstd,
                       const double* local_sum_dy, const double* local_sum_dy_xmu, const double* sum_dy,
                       const double* sum_dy_xmu, double count, TensorView dx, VectorView grad_weight,
                       VectorView grad_bias) {
  Scope scope;
  const std::span<const double> invstd = read_channels<T>(scope, save_invstd, g.C, 1.0);
  if (!dx.empty()) {
    const SplitMeans<Compute<T>> means = split_means<Compute<T>>(scope, read_channels<T>(scope, save_mean, g.C, 0.0));
    apply_dx(static_cast<const T*>(dy.data()), static_cast<const T*>(x.data()), data_or_null<T>(out),
             static_cast<T*>(dx.data()), g, means, read_channels<T>(scope, weight, g.C, 1.0), invstd, sum_dy,
             sum_dy_xmu, count, true);
  }
  write_param_grads<T>(grad_weight, grad_bias, local_sum_dy, local_sum_dy_xmu, invstd);
}

}  // namespace

namespace detail {

void local_moments(ConstTensorView input, const TensorInfo& in, double* mean, double* m2) {
  const Geometry& g = in.geometry;
  if (g.per_channel() < 1) {
    // No values here (a rank holding 0 samples): the merge skips a count of 0, so these are unused.
    std::fill(mean, mean + g.C, 0.0);
    std::fill(m2, m2 + g.C, 0.0);
    return;
  }
  Scope scope;
  const std::span<double> ws = reduce_workspace(scope, g);
  with_storage(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    kernels::channel_moments(static_cast<const T*>(input.data()), g, mean, m2, ws.data());
  });
}

void forward_with_stats(ConstTensorView input, TensorView output, const TensorInfo& in, std::span<const double> mean,
                        std::span<const double> var, double count, VectorView running_mean, VectorView running_var,
                        ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps,
                        VectorView save_mean, VectorView save_invstd, Activation activation) {
  with_storage(input.dtype(), [&](auto tag) {
    forward_with_stats_t<decltype(tag)>(input, output, in.geometry, mean, var, count, running_mean, running_var, weight,
                                        bias, training, momentum, eps, save_mean, save_invstd, activation);
  });
}

void backward_sums(ConstTensorView grad_output, ConstTensorView input, ConstTensorView output, const TensorInfo& in,
                   ConstVectorView save_mean, double* sum_dy, double* sum_dy_xmu) {
  std::fill(sum_dy, sum_dy + in.geometry.C, 0.0);
  std::fill(sum_dy_xmu, sum_dy_xmu + in.geometry.C, 0.0);
  with_storage(input.dtype(), [&](auto tag) {
    backward_sums_t<decltype(tag)>(grad_output, input, output, in.geometry, save_mean, sum_dy, sum_dy_xmu);
  });
}

void backward_finish(ConstTensorView grad_output, ConstTensorView input, ConstTensorView output, const TensorInfo& in,
                     ConstVectorView weight, ConstVectorView save_mean, ConstVectorView save_invstd,
                     const double* local_sum_dy, const double* local_sum_dy_xmu, const double* sum_dy,
                     const double* sum_dy_xmu, double count, TensorView grad_input, VectorView grad_weight,
                     VectorView grad_bias) {
  with_storage(input.dtype(), [&](auto tag) {
    backward_finish_t<decltype(tag)>(grad_output, input, output, in.geometry, weight, save_mean, save_invstd,
                                     local_sum_dy, local_sum_dy_xmu, sum_dy, sum_dy_xmu, count, grad_input, grad_weight,
                                     grad_bias);
  });
}

}  // namespace detail

}  // namespace bnorm
