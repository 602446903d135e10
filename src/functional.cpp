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
    shift[c] = kernels::normalize_shift<P>(beta[c], means.lo[c], scale[c]);
  }
  if (g.per_channel() > 0) kernels::normalize(x, y, g, {means.hi.data(), scale.data(), shift.data()}, act, residual);
}

// Training only: the saved statistics, and the running update with the unbiased variance of m values.
template <class T>
void commit_training(std::span<const double> mean, std::span<const double> var, std::span<const double> invstd,
                     double m, RunningStats running, double momentum, SavedStats save) {
  const std::size_t uC = mean.size();
  const auto C = static_cast<std::int64_t>(uC);
  write_channels<T>(save.mean, mean);
  write_channels<T>(save.invstd, invstd);
  if (running.mean.present()) {
    Scope scope;
    const std::span<double> rm = read_channels<T>(scope, running.mean, C, 0.0),
                            rv = read_channels<T>(scope, running.var, C, 1.0);
    for (std::size_t c = 0; c < uC; ++c) {
      rm[c] = (1 - momentum) * rm[c] + momentum * mean[c];
      rv[c] = (1 - momentum) * rv[c] + momentum * var[c] * m / (m - 1);  // unbiased batch variance
    }
    write_channels<T>(running.mean, rm);
    write_channels<T>(running.var, rv);
  }
}

// Eval reads the running statistics from `frozen`; training updates `update`.
template <class T>
void forward_impl(const T* x, T* y, const Geometry& g, FrozenStats frozen, RunningStats update, Affine affine,
                  const Options& options, SavedStats save, const T* residual) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  const bool training = options.training;
  const double eps = options.eps;
  const Activation act = options.activation;
  Scope scope;
  const std::span<double> mean = scope.take<double>(uC), var = scope.take<double>(uC),
                          invstd = scope.take<double>(uC);
  const std::span<const double> gamma = read_channels<T>(scope, affine.weight, C, 1.0),
                                beta = read_channels<T>(scope, affine.bias, C, 0.0);
  if (training && kernels::use_fused_forward<T>(g)) {
    kernels::fused_forward_cf(x, y, g, gamma.data(), beta.data(), eps, act, residual, mean.data(), var.data());
    for (std::size_t c = 0; c < uC; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  } else {
    if (training) {
      const std::span<double> m2 = scope.take<double>(uC), ws = reduce_workspace(scope, g);
      kernels::channel_moments(x, g, mean.data(), m2.data(), ws.data());
      for (std::size_t c = 0; c < uC; ++c) var[c] = m2[c] / m;
    } else {
      read_channels_into<T>(mean, frozen.mean, 0.0);
      read_channels_into<T>(var, frozen.var, 1.0);
    }
    for (std::size_t c = 0; c < uC; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    normalize_with(x, y, g, mean, invstd, gamma, beta, act, residual);
  }
  if (training) commit_training<T>(mean, var, invstd, m, update, options.momentum, save);
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

// What dx needs per channel: gamma, invstd and the sums over the m values the statistics came from.
struct DxInputs {
  std::span<const double> gamma, invstd;
  const double* sum_dy;
  const double* sum_dy_xmu;
  double m;
};

template <class T>
void apply_dx(const T* dy, const T* x, const T* out, T* dx, const Geometry& g, const SplitMeans<Compute<T>>& means,
              const DxInputs& in, bool training) {
  using P = Compute<T>;
  if (g.per_channel() < 1) return;
  const std::size_t uC = means.hi.size();
  Scope scope;
  const std::span<P> k_dy = scope.take<P>(uC), k_x = scope.take<P>(uC), k_c = scope.take<P>(uC);
  for (std::size_t c = 0; c < uC; ++c)
    kernels::backward_coeffs(in.gamma[c], in.invstd[c], in.sum_dy[c], in.sum_dy_xmu[c], in.m, training, means.lo[c],
                             k_dy[c], k_x[c], k_c[c]);
  kernels::backward_apply(dy, x, out, dx, g, {means.hi.data(), k_dy.data(), k_x.data(), k_c.data()});
}

// dgamma = sum(dy' * (x - mean)) * invstd, dbeta = sum(dy').
template <class T>
void write_param_grads(ParamGrads grads, const double* sum_dy, const double* sum_dy_xmu,
                       std::span<const double> invstd) {
  if (grads.weight.present()) {
    Scope scope;
    const std::span<double> dgamma = scope.take<double>(invstd.size());
    for (std::size_t c = 0; c < invstd.size(); ++c) dgamma[c] = sum_dy_xmu[c] * invstd[c];
    write_channels<T>(grads.weight, dgamma);
  }
  write_channels<T>(grads.bias, std::span<const double>(sum_dy, invstd.size()));
}

template <class T>
void backward_impl(const T* dy, const T* x, const T* out, T* dx, const Geometry& g, const ForwardState& forward,
                   const Options& options, ParamGrads grads) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  const bool training = options.training;
  Scope scope;
  const std::span<double> mean = read_channels<T>(scope, training ? forward.saved.mean : forward.running.mean, C, 0.0);
  const std::span<double> invstd =
      read_channels<T>(scope, training ? forward.saved.invstd : forward.running.var, C, 1.0);
  if (!training)
    for (double& v : invstd) v = 1.0 / std::sqrt(v + options.eps);
  const std::span<const double> gamma = read_channels<T>(scope, forward.weight, C, 1.0);

  // The reductions are needed for the parameter gradients and, in training, for dx.
  const std::span<double> sum_dy = scope.take<double>(uC), sum_dy_xmu = scope.take<double>(uC);
  const bool need_sums = grads.weight.present() || grads.bias.present() || (training && dx);
  // x, dy, the ReLU's output, and dx unless it is streamed
  if ((need_sums || dx) && kernels::use_fused_backward<T>(g, out != nullptr, dx != nullptr)) {
    kernels::fused_backward_cf(dy, x, out, dx, g, {mean.data(), invstd.data(), gamma.data()}, training,
                               sum_dy.data(), sum_dy_xmu.data());
  } else {
    const SplitMeans<Compute<T>> means = split_means<Compute<T>>(scope, mean);
    if (need_sums) reduce_sums(dy, x, out, g, means, sum_dy.data(), sum_dy_xmu.data());
    if (dx) apply_dx(dy, x, out, dx, g, means, {gamma, invstd, sum_dy.data(), sum_dy_xmu.data(), m}, training);
  }
  write_param_grads<T>(grads, sum_dy.data(), sum_dy_xmu.data(), invstd);
}

template <class T>
const T* data_or_null(ConstTensorView t) {
  return t.empty() ? nullptr : static_cast<const T*>(t.data());
}

}  // namespace

namespace detail {

Checked<TensorInfo> check_forward_args(ConstTensorView input, TensorView output, FrozenStats running, Affine affine,
                                       const Options& options, SavedStats save) {
  const Checked<TensorInfo> in = check_tensor("input", input);
  BNORM_CHECK(in.problem);
  BNORM_CHECK(check_tensor("output", output).problem);
  BNORM_CHECK(check_like("output", output, "input", input));
  const std::int64_t bytes = in.value.bytes;
  BNORM_CHECK(check_alias("output", output.data(), bytes, "input", input.data(), bytes));
  const std::int64_t C = in.value.geometry.C;
  const DType dt = input.dtype();
  if (running.mean.present() != running.var.present())
    return Problem(std::string("running_var: expected ") + (running.mean.present() ? "a vector" : "none") +
                   " like running_mean, got " + (running.var.present() ? "a vector" : "none"));
  if (running.mean.present()) {
    BNORM_CHECK(check_vector("running_mean", running.mean, C, dt));
    BNORM_CHECK(check_vector("running_var", running.var, C, dt));
  } else if (!options.training) {
    return Problem("running_mean: expected running statistics when training=false, got none");
  }
  if (affine.weight.present()) BNORM_CHECK(check_vector("weight", affine.weight, C, dt));
  if (affine.bias.present()) BNORM_CHECK(check_vector("bias", affine.bias, C, dt));
  if (save.mean.present()) BNORM_CHECK(check_vector("save_mean", save.mean, C, dt, true));
  if (save.invstd.present()) BNORM_CHECK(check_vector("save_invstd", save.invstd, C, dt, true));
  BNORM_CHECK(check_activation(options.activation));
  BNORM_CHECK(check_eps(options.eps));
  BNORM_CHECK(check_momentum(options.momentum));
  return in;
}

// The residual: like the input; the output may be the residual itself (each element is read before
// it is written), not a partial overlap of it.
Problem check_residual(ConstTensorView residual, ConstTensorView input, TensorView output, const TensorInfo& in) {
  if (residual.empty()) return {};
  BNORM_CHECK(check_tensor("residual", residual).problem);
  BNORM_CHECK(check_like("residual", residual, "input", input));
  return check_alias("output", output.data(), in.bytes, "residual", residual.data(), in.bytes);
}

// The input's geometry with the kernels' store policy for these outputs (Options::outputs).
Geometry output_geometry(const TensorInfo& in, const Options& options) {
  Geometry g = in.geometry;
  g.may_stream = options.outputs == OutputMemory::Reused;
  return g;
}

void run_forward(const TensorInfo& in, ConstTensorView input, TensorView output, FrozenStats frozen,
                 RunningStats update, Affine affine, const Options& options, SavedStats save,
                 ConstTensorView residual) {
  const Geometry g = output_geometry(in, options);
  with_storage(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    forward_impl(static_cast<const T*>(input.data()), static_cast<T*>(output.data()), g, frozen, update,
                 affine, options, save, data_or_null<T>(residual));
  });
}

Checked<TensorInfo> check_backward_args(ConstTensorView grad_output, const ForwardState& forward,
                                        const Options& options, TensorView grad_input, ParamGrads grads) {
  const ConstTensorView input = forward.input;
  const Checked<TensorInfo> in = check_tensor("input", input);
  BNORM_CHECK(in.problem);
  const std::int64_t bytes = in.value.bytes;
  BNORM_CHECK(check_tensor("grad_output", grad_output).problem);
  BNORM_CHECK(check_like("grad_output", grad_output, "input", input));
  const bool want_dx = !grad_input.empty();
  if (want_dx) {
    BNORM_CHECK(check_tensor("grad_input", grad_input).problem);
    BNORM_CHECK(check_like("grad_input", grad_input, "input", input));
    BNORM_CHECK(check_alias("grad_input", grad_input.data(), bytes, "grad_output", grad_output.data(), bytes));
    BNORM_CHECK(check_alias("grad_input", grad_input.data(), bytes, "input", input.data(), bytes));
  }
  BNORM_CHECK(check_activation(options.activation));
  if (options.activation == Activation::Relu) {
    const ConstTensorView output = forward.output;
    if (output.empty()) return Problem("output: expected the forward's output with activation=Relu, got none");
    BNORM_CHECK(check_tensor("output", output).problem);
    BNORM_CHECK(check_like("output", output, "input", input));
    if (want_dx) BNORM_CHECK(check_alias("grad_input", grad_input.data(), bytes, "output", output.data(), bytes));
  }
  const std::int64_t C = in.value.geometry.C;
  const DType dt = input.dtype();
  if (forward.weight.present()) BNORM_CHECK(check_vector("weight", forward.weight, C, dt));
  if (options.training) {
    if (!forward.saved.mean.present() || !forward.saved.invstd.present())
      return Problem("save_mean: expected save_mean and save_invstd from the forward when training=true, got none");
    BNORM_CHECK(check_vector("save_mean", forward.saved.mean, C, dt, true));
    BNORM_CHECK(check_vector("save_invstd", forward.saved.invstd, C, dt, true));
  } else {
    if (!forward.running.mean.present() || !forward.running.var.present())
      return Problem("running_mean: expected running_mean and running_var when training=false, got none");
    BNORM_CHECK(check_vector("running_mean", forward.running.mean, C, dt));
    BNORM_CHECK(check_vector("running_var", forward.running.var, C, dt));
    BNORM_CHECK(check_eps(options.eps));
  }
  if (grads.weight.present()) BNORM_CHECK(check_vector("grad_weight", grads.weight, C, dt));
  if (grads.bias.present()) BNORM_CHECK(check_vector("grad_bias", grads.bias, C, dt));
  return in;
}

void run_backward(const TensorInfo& in, ConstTensorView grad_output, const ForwardState& forward,
                  const Options& options, TensorView grad_input, ParamGrads grads) {
  const bool relu = options.activation == Activation::Relu;
  with_storage(forward.input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    backward_impl(static_cast<const T*>(grad_output.data()), static_cast<const T*>(forward.input.data()),
                  relu ? static_cast<const T*>(forward.output.data()) : nullptr,
                  grad_input.empty() ? nullptr : static_cast<T*>(grad_input.data()), output_geometry(in, options),
                  forward, options,
                  grads);
  });
}

}  // namespace detail

void batch_norm(ConstTensorView input, TensorView output, RunningStats running, Affine affine, Options options,
                SavedStats save, ConstTensorView residual) {
  const char* fn = "batch_norm";
  const detail::Checked<detail::TensorInfo> in =
      detail::check_forward_args(input, output, running, affine, options, save);
  detail::raise_if(fn, in.problem);
  detail::raise_if(fn, detail::check_residual(residual, input, output, in.value));
  if (options.training) detail::raise_if(fn, detail::check_training_count(input, in.value));
  detail::run_forward(in.value, input, output, running, running, affine, options, save, residual);
}

void batch_norm(ConstTensorView input, TensorView output, VectorView running_mean, VectorView running_var,
                ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps) {
  batch_norm(input, output, {running_mean, running_var}, {weight, bias}, {training, momentum, eps});
}

void batch_norm_inference(ConstTensorView input, TensorView output, FrozenStats running, Affine affine, double eps,
                          Activation activation) {
  const char* fn = "batch_norm_inference";
  if (!running.mean.present() || !running.var.present())
    detail::fail(fn, "running_mean: expected running_mean and running_var, got none");
  // momentum is unused in eval; 0 keeps the options valid.
  const Options options{false, 0.0, eps, activation};
  const detail::Checked<detail::TensorInfo> in = detail::check_forward_args(input, output, running, affine, options, {});
  detail::raise_if(fn, in.problem);
  detail::run_forward(in.value, input, output, running, {}, affine, options, {}, {});
}

void batch_norm_backward(ConstTensorView grad_output, const ForwardState& forward, Options options,
                         TensorView grad_input, ParamGrads grads) {
  const detail::Checked<detail::TensorInfo> in =
      detail::check_backward_args(grad_output, forward, options, grad_input, grads);
  detail::raise_if("batch_norm_backward", in.problem);
  detail::run_backward(in.value, grad_output, forward, options, grad_input, grads);
}

void batch_stats(ConstTensorView input, VectorView mean, VectorView var) {
  const char* fn = "batch_stats";
  const detail::Checked<detail::TensorInfo> in = detail::check_tensor("input", input);
  detail::raise_if(fn, in.problem);
  const Geometry& g = in.value.geometry;
  const std::int64_t C = g.C;
  detail::raise_if(fn, detail::check_vector("mean", mean, C, input.dtype(), true));
  detail::raise_if(fn, detail::check_vector("var", var, C, input.dtype(), true));
  if (C > 0 && g.per_channel() < 1)
    detail::fail(fn, "input: expected at least 1 value per channel, got shape " + input.shape().str());
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
void forward_with_stats_t(ConstTensorView input, TensorView output, const Geometry& g, detail::BatchMoments stats,
                          RunningStats running, Affine affine, const Options& options, SavedStats save) {
  const std::int64_t C = g.C;
  Scope scope;
  const std::span<double> invstd = scope.take<double>(stats.mean.size());
  for (std::size_t c = 0; c < invstd.size(); ++c) invstd[c] = 1.0 / std::sqrt(stats.var[c] + options.eps);
  normalize_with(static_cast<const T*>(input.data()), static_cast<T*>(output.data()), g, stats.mean, invstd,
                 read_channels<T>(scope, affine.weight, C, 1.0), read_channels<T>(scope, affine.bias, C, 0.0),
                 options.activation);
  if (options.training)
    commit_training<T>(stats.mean, stats.var, invstd, stats.count, running, options.momentum, save);
}

template <class T>
void backward_sums_t(ConstTensorView dy, const ForwardState& forward, const Geometry& g, detail::ChannelSums out) {
  Scope scope;
  const SplitMeans<Compute<T>> means =
      split_means<Compute<T>>(scope, read_channels<T>(scope, forward.saved.mean, g.C, 0.0));
  reduce_sums(static_cast<const T*>(dy.data()), static_cast<const T*>(forward.input.data()),
              data_or_null<T>(forward.output), g, means, out.dy, out.dy_xmu);
}

template <class T>
void backward_finish_t(ConstTensorView dy, const ForwardState& forward, const Geometry& g, detail::ChannelSums local,
                       detail::ChannelSums global, double count, TensorView dx, ParamGrads grads) {
  Scope scope;
  const std::span<const double> invstd = read_channels<T>(scope, forward.saved.invstd, g.C, 1.0);
  if (!dx.empty()) {
    const SplitMeans<Compute<T>> means =
        split_means<Compute<T>>(scope, read_channels<T>(scope, forward.saved.mean, g.C, 0.0));
    apply_dx(static_cast<const T*>(dy.data()), static_cast<const T*>(forward.input.data()),
             data_or_null<T>(forward.output), static_cast<T*>(dx.data()), g, means,
             {read_channels<T>(scope, forward.weight, g.C, 1.0), invstd, global.dy, global.dy_xmu, count}, true);
  }
  write_param_grads<T>(grads, local.dy, local.dy_xmu, invstd);
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

void forward_with_stats(ConstTensorView input, TensorView output, const TensorInfo& in, BatchMoments stats,
                        RunningStats running, Affine affine, const Options& options, SavedStats save) {
  with_storage(input.dtype(), [&](auto tag) {
    forward_with_stats_t<decltype(tag)>(input, output, output_geometry(in, options), stats, running, affine, options,
                                        save);
  });
}

void backward_sums(ConstTensorView grad_output, const ForwardState& forward, const TensorInfo& in, ChannelSums out) {
  std::fill(out.dy, out.dy + in.geometry.C, 0.0);
  std::fill(out.dy_xmu, out.dy_xmu + in.geometry.C, 0.0);
  with_storage(forward.input.dtype(),
               [&](auto tag) { backward_sums_t<decltype(tag)>(grad_output, forward, in.geometry, out); });
}

void backward_finish(ConstTensorView grad_output, const ForwardState& forward, const TensorInfo& in,
                     ChannelSums local, ChannelSums global, double count, TensorView grad_input, ParamGrads grads) {
  with_storage(forward.input.dtype(), [&](auto tag) {
    backward_finish_t<decltype(tag)>(grad_output, forward, in.geometry, local, global, count, grad_input, grads);
  });
}

}  // namespace detail

}  // namespace bnorm
