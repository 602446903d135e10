// The functional layer: validates every argument, then runs the kernels, then (training) writes
// the saved and running statistics. Nothing is written before all checks have passed.
#include <bnorm/functional.hpp>

#include "functional_parts.hpp"
#include "kernels/kernels.hpp"
#include "validate.hpp"
#include "workspace.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <type_traits>

namespace bnorm {
namespace {

using detail::check_vector;
using detail::dispatch;
using detail::typed;
using detail::typed_or_null;
using kernels::Compute;
using kernels::Geometry;
// Every per-channel buffer of a call comes from the calling thread's workspace (workspace.hpp), so
// that a call allocates nothing once an earlier one on the thread has needed as much. Each function
// that takes buffers opens its own scope, which gives them back when it returns.
using Scope = detail::Workspace::Scope;

// A per-channel vector that goes with a tensor stored as T (so of dtype Compute<T>, or float64), read in
// place as doubles; absent gives `fallback`. Loops over the channels read their vectors through these
// rather than staging each in a buffer first (see normalize_frozen).
template <class T>
class ChannelValues {
 public:
  ChannelValues(const ConstVectorView& v, double fallback)
      : data_(v.present() ? v.data() : nullptr), f64_(v.dtype() == DType::Float64), fallback_(fallback) {}
  double operator[](std::size_t c) const {
    if (data_ == nullptr) return fallback_;
    return f64_ ? static_cast<const double*>(data_)[c] : static_cast<double>(static_cast<const Compute<T>*>(data_)[c]);
  }

 private:
  const void* data_;
  bool f64_;
  double fallback_;
};

// A per-channel output vector written in place from doubles (absent: nothing is written).
template <class T>
class ChannelSink {
 public:
  explicit ChannelSink(const VectorView& v)
      : data_(v.present() ? v.data() : nullptr), f64_(v.dtype() == DType::Float64) {}
  bool present() const { return data_ != nullptr; }
  // Whether `value` stays finite as set() stores it (a double beyond float's range does not).
  bool finite_as_stored(double value) const {
    return std::isfinite(f64_ ? value : static_cast<double>(static_cast<Compute<T>>(value)));
  }
  void set(std::size_t c, double value) const {
    if (data_ == nullptr) return;
    if (f64_)
      static_cast<double*>(data_)[c] = value;
    else
      static_cast<Compute<T>*>(data_)[c] = static_cast<Compute<T>>(value);
  }

 private:
  void* data_;
  bool f64_;
};

// A vector read into a span of C doubles taken from `scope`, for the paths that pass it on whole.
template <class T>
std::span<double> read_channels(Scope& scope, const ConstVectorView& v, std::int64_t C, double fallback) {
  std::span<double> out = scope.take_for_overwrite<double>(static_cast<std::size_t>(C));
  const ChannelValues<T> in(v, fallback);
  for (std::size_t c = 0; c < out.size(); ++c) out[c] = in[c];
  return out;
}

template <class T>
void write_channels(const VectorView& v, std::span<const double> values) {
  const ChannelSink<T> out(v);
  if (!out.present()) return;
  for (std::size_t c = 0; c < values.size(); ++c) out.set(c, values[c]);
}

// The means split in hi + lo parts of P (kernels::split_mean), in spans taken from `scope`.
template <class P>
struct SplitMeans {
  std::span<P> hi, lo;
};
template <class P>
SplitMeans<P> split_means(Scope& scope, std::span<const double> mean) {
  SplitMeans<P> s{scope.take_for_overwrite<P>(mean.size()), scope.take_for_overwrite<P>(mean.size())};
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
  const std::span<P> mean_hi = scope.take_for_overwrite<P>(uC), scale = scope.take_for_overwrite<P>(uC),
                     shift = scope.take_for_overwrite<P>(uC);
  for (std::size_t c = 0; c < uC; ++c) {  // one pass: a call's fixed cost grows with C
    P mean_lo;
    kernels::split_mean(mean[c], mean_hi[c], mean_lo);
    scale[c] = static_cast<P>(gamma[c] * invstd[c]);
    shift[c] = kernels::normalize_shift<P>(beta[c], mean_lo, scale[c]);
  }
  if (g.per_channel() > 0) kernels::normalize(x, y, g, {mean_hi.data(), scale.data(), shift.data()}, act, residual);
}

// Eval: normalizes x into y with the frozen statistics. The coefficients are those of
// normalize_with, bit for bit, computed in one pass over the channels: at C = 2048 the staged form
// (each vector read into a buffer, then invstd, the split means and scale and shift each a loop of
// its own) took about twice as long (BENCHMARKS.md, "Per-call costs"). The cost is one double sqrt and one
// divide a channel; it is a call's fixed cost, which a batch-1 deployment pays on every layer.
template <class T>
void normalize_frozen(const T* x, T* y, const Geometry& g, FrozenStats frozen, Affine affine, double eps,
                      Activation act, const T* residual) {
  using P = Compute<T>;
  const auto uC = static_cast<std::size_t>(g.C);
  Scope scope;
  const std::span<P> mean_hi = scope.take_for_overwrite<P>(uC), scale = scope.take_for_overwrite<P>(uC),
                     shift = scope.take_for_overwrite<P>(uC);
  const ChannelValues<T> mean(frozen.mean, 0.0), var(frozen.var, 1.0), gamma(affine.weight, 1.0),
      beta(affine.bias, 0.0);
  for (std::size_t c = 0; c < uC; ++c) {
    const double invstd = 1.0 / std::sqrt(var[c] + eps);
    P mean_lo;
    kernels::split_mean(mean[c], mean_hi[c], mean_lo);
    scale[c] = static_cast<P>(gamma[c] * invstd);
    shift[c] = kernels::normalize_shift<P>(beta[c], mean_lo, scale[c]);
  }
  if (g.per_channel() > 0) kernels::normalize(x, y, g, {mean_hi.data(), scale.data(), shift.data()}, act, residual);
}

// Training only: the saved statistics, and the running update with the unbiased variance of m values,
// in one pass over the channels (a channel's saved values are written before its running ones are
// read, as when each was a loop of its own).
// With options.skip_nonfinite, a first pass over the channels decides whether every updated value,
// as stored, is finite (C values: nothing next to the pass over the data that made the statistics).
template <class T>
void commit_training(std::span<const double> mean, std::span<const double> var, std::span<const double> invstd,
                     double m, RunningStats running, const Options& options, SavedStats save) {
  const double momentum = options.momentum;
  const ChannelSink<T> save_mean(save.mean), save_invstd(save.invstd), run_mean(running.mean), run_var(running.var);
  const ChannelValues<T> old_mean(running.mean, 0.0), old_var(running.var, 1.0);
  bool update = run_mean.present();
  if (update && options.skip_nonfinite) {
    for (std::size_t c = 0; c < mean.size() && update; ++c)
      update = run_mean.finite_as_stored((1 - momentum) * old_mean[c] + momentum * mean[c]) &&
               run_var.finite_as_stored((1 - momentum) * old_var[c] + momentum * var[c] * m / (m - 1));
    if (!update && options.nonfinite_skips != nullptr) ++*options.nonfinite_skips;
  }
  for (std::size_t c = 0; c < mean.size(); ++c) {
    save_mean.set(c, mean[c]);
    save_invstd.set(c, invstd[c]);
    if (!update) continue;
    run_mean.set(c, (1 - momentum) * old_mean[c] + momentum * mean[c]);
    run_var.set(c, (1 - momentum) * old_var[c] + momentum * var[c] * m / (m - 1));  // unbiased batch variance
  }
}

// Eval reads the running statistics from `frozen`; training updates `update`.
template <class T>
void forward_impl(const T* x, T* y, const Geometry& g, FrozenStats frozen, RunningStats update, Affine affine,
                  const Options& options, SavedStats save, const T* residual) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  const double eps = options.eps;
  const Activation act = options.activation;
  if (!options.training) return normalize_frozen(x, y, g, frozen, affine, eps, act, residual);
  Scope scope;
  const std::span<double> mean = scope.take_for_overwrite<double>(uC), var = scope.take_for_overwrite<double>(uC),
                          invstd = scope.take_for_overwrite<double>(uC);
  const std::span<const double> gamma = read_channels<T>(scope, affine.weight, C, 1.0),
                                beta = read_channels<T>(scope, affine.bias, C, 0.0);
  if (kernels::use_fused_forward<T>(g)) {
    kernels::fused_forward_cf(x, y, g, gamma.data(), beta.data(), eps, act, residual, mean.data(), var.data());
    for (std::size_t c = 0; c < uC; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  } else {
    const std::span<double> m2 = scope.take_for_overwrite<double>(uC), ws = reduce_workspace(scope, g);
    kernels::channel_moments(x, g, mean.data(), m2.data(), ws.data());
    for (std::size_t c = 0; c < uC; ++c) {
      var[c] = m2[c] / m;
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    }
    normalize_with(x, y, g, mean, invstd, gamma, beta, act, residual);
  }
  commit_training<T>(mean, var, invstd, m, update, options, save);
}

// sum(dy') and sum(dy' * (x - mean)) of this input (zeros when it holds no values).
template <class T>
void reduce_sums(const T* dy, const T* x, std::type_identity_t<const T*> out, const Geometry& g, const SplitMeans<Compute<T>>& means,
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
void apply_dx(const T* dy, const T* x, std::type_identity_t<const T*> out, T* dx, const Geometry& g, const SplitMeans<Compute<T>>& means,
              const DxInputs& in, bool training) {
  using P = Compute<T>;
  if (g.per_channel() < 1) return;
  const std::size_t uC = means.hi.size();
  Scope scope;
  const std::span<P> k_dy = scope.take_for_overwrite<P>(uC), k_x = scope.take_for_overwrite<P>(uC),
                     k_c = scope.take_for_overwrite<P>(uC);
  for (std::size_t c = 0; c < uC; ++c)
    kernels::backward_coeffs(in.gamma[c], in.invstd[c], in.sum_dy[c], in.sum_dy_xmu[c], in.m, training, means.lo[c],
                             k_dy[c], k_x[c], k_c[c]);
  kernels::backward_apply(dy, x, out, dx, g, {means.hi.data(), k_dy.data(), k_x.data(), k_c.data()});
}

// dgamma = sum(dy' * (x - mean)) * invstd, dbeta = sum(dy').
// An input of no values has zero gradients, whatever its statistics (torch's rule: not 0 * invstd).
template <class T>
void write_param_grads(ParamGrads grads, const double* sum_dy, const double* sum_dy_xmu,
                       std::span<const double> invstd, double m) {
  if (grads.weight.present()) {
    Scope scope;
    const std::span<double> dgamma = scope.take_for_overwrite<double>(invstd.size());
    for (std::size_t c = 0; c < invstd.size(); ++c) dgamma[c] = m > 0 ? sum_dy_xmu[c] * invstd[c] : 0.0;
    write_channels<T>(grads.weight, dgamma);
  }
  write_channels<T>(grads.bias, std::span<const double>(sum_dy, invstd.size()));
}

template <class T>
void backward_impl(const T* dy, const T* x, std::type_identity_t<const T*> out, T* dx, const Geometry& g, const ForwardState& forward,
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
  write_param_grads<T>(grads, sum_dy.data(), sum_dy_xmu.data(), invstd, m);
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
  BNORM_CHECK(check_eps(options));
  BNORM_CHECK(check_momentum(options));
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

template <class T>
void run_forward(const TensorInfo& in, const T* x, T* y, FrozenStats frozen, RunningStats update, Affine affine,
                 const Options& options, SavedStats save, const T* residual) {
  Options run = options;
  run.eps = kernel_eps(options);
  forward_impl(x, y, output_geometry(in, options), frozen, update, affine, run, save, residual);
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, run_forward)

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
    BNORM_CHECK(check_eps(options));
  }
  if (grads.weight.present()) BNORM_CHECK(check_vector("grad_weight", grads.weight, C, dt));
  if (grads.bias.present()) BNORM_CHECK(check_vector("grad_bias", grads.bias, C, dt));
  return in;
}

template <class T>
void run_backward(const TensorInfo& in, const T* dy, const ForwardState& forward, const Options& options, T* dx,
                  ParamGrads grads) {
  const bool relu = options.activation == Activation::Relu;
  Options run = options;
  run.eps = kernel_eps(options);
  backward_impl(dy, typed<T>(forward.input), relu ? typed<T>(forward.output) : nullptr, dx,
                output_geometry(in, options), forward, run, grads);
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, run_backward)

}  // namespace detail

void batch_norm(ConstTensorView input, TensorView output, RunningStats running, Affine affine, Options options,
                SavedStats save, ConstTensorView residual) {
  const char* fn = "batch_norm";
  const detail::Checked<detail::TensorInfo> in =
      detail::check_forward_args(input, output, running, affine, options, save);
  detail::raise_if(fn, in.problem);
  detail::raise_if(fn, detail::check_residual(residual, input, output, in.value));
  if (detail::torch_empty_batch(options, in.value)) {  // nothing to compute, and nothing changes
    for (const VectorView& v : {save.mean, save.invstd})
      if (v.present()) std::memset(v.data(), 0, static_cast<std::size_t>(v.size()) * size_of(v.dtype()));
    return;
  }
  if (options.training) detail::raise_if(fn, detail::check_training_count(input, in.value));
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    detail::run_forward(in.value, typed<T>(input), typed<T>(output), running, running, affine, options, save,
                        typed_or_null<T>(residual));
  });
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
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    detail::run_forward<T>(in.value, typed<T>(input), typed<T>(output), running, {}, affine, options, {}, nullptr);
  });
}

void batch_norm_backward(ConstTensorView grad_output, const ForwardState& forward, Options options,
                         TensorView grad_input, ParamGrads grads) {
  const detail::Checked<detail::TensorInfo> in =
      detail::check_backward_args(grad_output, forward, options, grad_input, grads);
  detail::raise_if("batch_norm_backward", in.problem);
  dispatch(forward.input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    detail::run_backward(in.value, typed<T>(grad_output), forward, options, typed_or_null<T>(grad_input), grads);
  });
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
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    kernels::channel_moments(typed<T>(input), g, mu.data(), m2.data(), ws.data());
    for (double& v : m2) v /= static_cast<double>(g.per_channel());
    write_channels<T>(mean, mu);
    write_channels<T>(var, m2);
  });
}

// The shared pieces (functional_parts.hpp): the same templates as above.
namespace detail {

template <class T>
void local_moments(const T* x, const TensorInfo& in, double* mean, double* m2) {
  const Geometry& g = in.geometry;
  if (g.per_channel() < 1) {
    // No values here (a rank holding 0 samples): the merge skips a count of 0, so these are unused.
    std::fill(mean, mean + g.C, 0.0);
    std::fill(m2, m2 + g.C, 0.0);
    return;
  }
  Scope scope;
  const std::span<double> ws = reduce_workspace(scope, g);
  kernels::channel_moments(x, g, mean, m2, ws.data());
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, local_moments)

template <class T>
void forward_with_stats(const T* x, T* y, const TensorInfo& in, BatchMoments stats, RunningStats running,
                        Affine affine, const Options& options, SavedStats save) {
  const Geometry g = output_geometry(in, options);
  const std::int64_t C = g.C;
  Scope scope;
  const std::span<double> invstd = scope.take<double>(stats.mean.size());
  for (std::size_t c = 0; c < invstd.size(); ++c) invstd[c] = 1.0 / std::sqrt(stats.var[c] + options.eps);
  normalize_with(x, y, g, stats.mean, invstd, read_channels<T>(scope, affine.weight, C, 1.0),
                 read_channels<T>(scope, affine.bias, C, 0.0), options.activation);
  if (options.training)
    commit_training<T>(stats.mean, stats.var, invstd, stats.count, running, options, save);
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, forward_with_stats)

template <class T>
void backward_sums(const T* dy, const ForwardState& forward, const TensorInfo& in, ChannelSums out) {
  const Geometry& g = in.geometry;
  std::fill(out.dy, out.dy + g.C, 0.0);
  std::fill(out.dy_xmu, out.dy_xmu + g.C, 0.0);
  Scope scope;
  const SplitMeans<Compute<T>> means =
      split_means<Compute<T>>(scope, read_channels<T>(scope, forward.saved.mean, g.C, 0.0));
  reduce_sums(dy, typed<T>(forward.input), typed_or_null<T>(forward.output), g, means, out.dy, out.dy_xmu);
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, backward_sums)

template <class T>
void backward_finish(const T* dy, const ForwardState& forward, const TensorInfo& in, ChannelSums local,
                     ChannelSums global, double count, T* dx, ParamGrads grads) {
  const Geometry& g = in.geometry;
  Scope scope;
  const std::span<const double> invstd = read_channels<T>(scope, forward.saved.invstd, g.C, 1.0);
  if (dx != nullptr) {
    const SplitMeans<Compute<T>> means =
        split_means<Compute<T>>(scope, read_channels<T>(scope, forward.saved.mean, g.C, 0.0));
    apply_dx(dy, typed<T>(forward.input), typed_or_null<T>(forward.output), dx, g, means,
             {read_channels<T>(scope, forward.weight, g.C, 1.0), invstd, global.dy, global.dy_xmu, count}, true);
  }
  write_param_grads<T>(grads, local.dy, local.dy_xmu, invstd, static_cast<double>(g.per_channel()));  // this rank's part
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, backward_finish)

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The variants: Ghost Batch Normalization and Batch Renormalization (functional.hpp).
namespace {

// Virtual batch j of a ghost batch: samples [j * vbs, min(N, (j + 1) * vbs)), a contiguous slab in
// either layout (channels-first n * C * S + ..., channels-last n * S * C + ...), so it is the same
// geometry with fewer samples, starting `offset` elements in.
struct Slab {
  Geometry g;
  std::int64_t offset = 0;
};
Slab virtual_batch(const Geometry& g, std::int64_t vbs, std::int64_t j) {
  Slab s{g, j * vbs * g.C * g.S};
  s.g.N = std::min(vbs, g.N - j * vbs);
  return s;
}

template <class T>
void ghost_forward_impl(const T* x, T* y, const Geometry& g, std::int64_t vbs, RunningStats running, Affine affine,
                        const Options& options, SavedStats save) {
  const std::int64_t C = g.C, k = ghost_batch_count(g.N, vbs);
  const auto uC = static_cast<std::size_t>(C), uK = static_cast<std::size_t>(k);
  Scope scope;
  const std::span<double> mean = scope.take<double>(uK * uC), var = scope.take<double>(uK * uC),
                          invstd = scope.take<double>(uK * uC);
  const std::span<const double> gamma = read_channels<T>(scope, affine.weight, C, 1.0),
                                beta = read_channels<T>(scope, affine.bias, C, 0.0);
  // One pass for the statistics: every virtual batch's slab is read once, in order.
  for (std::size_t j = 0; j < uK; ++j) {
    const Slab b = virtual_batch(g, vbs, static_cast<std::int64_t>(j));
    Scope inner;
    const std::span<double> m2 = inner.take<double>(uC), ws = reduce_workspace(inner, b.g);
    kernels::channel_moments(x + b.offset, b.g, mean.data() + j * uC, m2.data(), ws.data());
    for (std::size_t c = 0; c < uC; ++c) {
      var[j * uC + c] = m2[c] / static_cast<double>(b.g.per_channel());
      invstd[j * uC + c] = 1.0 / std::sqrt(var[j * uC + c] + options.eps);
    }
  }
  for (std::size_t j = 0; j < uK; ++j) {
    const Slab b = virtual_batch(g, vbs, static_cast<std::int64_t>(j));
    normalize_with(x + b.offset, y + b.offset, b.g, mean.subspan(j * uC, uC), invstd.subspan(j * uC, uC), gamma,
                   beta, Activation::None);
  }
  // The running statistics once per virtual batch, in order, each update rounded to the buffers'
  // dtype as batch_norm's would be.
  for (std::size_t j = 0; j < uK; ++j) {
    const Slab b = virtual_batch(g, vbs, static_cast<std::int64_t>(j));
    commit_training<T>(mean.subspan(j * uC, uC), var.subspan(j * uC, uC), invstd.subspan(j * uC, uC),
                       static_cast<double>(b.g.per_channel()), running, options, {});
  }
  write_channels<T>(save.mean, mean);
  write_channels<T>(save.invstd, invstd);
}

template <class T>
void ghost_backward_impl(const T* dy, const T* x, T* dx, const Geometry& g, std::int64_t vbs,
                         const ForwardState& forward, ParamGrads grads) {
  const std::int64_t C = g.C, k = ghost_batch_count(g.N, vbs);
  const auto uC = static_cast<std::size_t>(C), uK = static_cast<std::size_t>(k);
  Scope scope;
  const std::span<const double> mean = read_channels<T>(scope, forward.saved.mean, k * C, 0.0),
                                invstd = read_channels<T>(scope, forward.saved.invstd, k * C, 1.0),
                                gamma = read_channels<T>(scope, forward.weight, C, 1.0);
  const std::span<double> dgamma = scope.take<double>(uC, 0.0), dbeta = scope.take<double>(uC, 0.0);
  for (std::size_t j = 0; j < uK; ++j) {
    const Slab b = virtual_batch(g, vbs, static_cast<std::int64_t>(j));
    const std::span<const double> inv_j = invstd.subspan(j * uC, uC);
    Scope inner;
    const std::span<double> sum_dy = inner.take<double>(uC), sum_dy_xmu = inner.take<double>(uC);
    const SplitMeans<Compute<T>> means = split_means<Compute<T>>(inner, mean.subspan(j * uC, uC));
    reduce_sums(dy + b.offset, x + b.offset, nullptr, b.g, means, sum_dy.data(),
                sum_dy_xmu.data());
    if (dx != nullptr)
      apply_dx(dy + b.offset, x + b.offset, nullptr, dx + b.offset, b.g, means,
               {gamma, inv_j, sum_dy.data(), sum_dy_xmu.data(), static_cast<double>(b.g.per_channel())}, true);
    for (std::size_t c = 0; c < uC; ++c) {
      dgamma[c] += sum_dy_xmu[c] * inv_j[c];
      dbeta[c] += sum_dy[c];
    }
  }
  write_channels<T>(grads.weight, dgamma);
  write_channels<T>(grads.bias, dbeta);
}

template <class T>
void renorm_forward_impl(const T* x, T* y, const Geometry& g, RunningStats running, Affine affine,
                         const Options& options, RenormLimits limits, SavedStats save, RenormFactors factors) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  const double m = static_cast<double>(g.per_channel());
  Scope scope;
  const std::span<double> mean = scope.take<double>(uC), var = scope.take<double>(uC),
                          invstd = scope.take<double>(uC), m2 = scope.take<double>(uC), ws = reduce_workspace(scope, g);
  kernels::channel_moments(x, g, mean.data(), m2.data(), ws.data());
  const std::span<const double> rm = read_channels<T>(scope, running.mean, C, 0.0),
                                rv = read_channels<T>(scope, running.var, C, 1.0),
                                gamma = read_channels<T>(scope, affine.weight, C, 1.0),
                                beta = read_channels<T>(scope, affine.bias, C, 0.0);
  const std::span<double> r = scope.take<double>(uC), d = scope.take<double>(uC), scale = scope.take<double>(uC),
                          shift = scope.take<double>(uC);
  for (std::size_t c = 0; c < uC; ++c) {
    var[c] = m2[c] / m;
    invstd[c] = 1.0 / std::sqrt(var[c] + options.eps);
    const double sigma = std::sqrt(rv[c] + options.eps), sigma_b = std::sqrt(var[c] + options.eps);
    r[c] = std::clamp(sigma_b / sigma, 1.0 / limits.r_max, limits.r_max);
    d[c] = std::clamp((mean[c] - rm[c]) / sigma, -limits.d_max, limits.d_max);
    // y = (gamma r) xhat + (gamma d + beta): batch_norm's normalize with these parameters
    scale[c] = gamma[c] * r[c];
    shift[c] = gamma[c] * d[c] + beta[c];
  }
  normalize_with(x, y, g, mean, invstd, scale, shift, Activation::None);
  write_channels<T>(factors.r, r);
  write_channels<T>(factors.d, d);
  commit_training<T>(mean, var, invstd, m, running, options, save);
}

template <class T>
void renorm_backward_impl(const T* dy, const T* x, T* dx, const Geometry& g, const ForwardState& forward,
                          ConstRenormFactors factors, const Options& options, ParamGrads grads) {
  const std::int64_t C = g.C;
  const auto uC = static_cast<std::size_t>(C);
  Scope scope;
  const std::span<const double> r = read_channels<T>(scope, factors.r, C, 1.0),
                                d = read_channels<T>(scope, factors.d, C, 0.0);
  const std::span<double> gamma_r = read_channels<T>(scope, forward.weight, C, 1.0);
  for (std::size_t c = 0; c < uC; ++c) gamma_r[c] *= r[c];
  // batch_norm's backward with gamma * r: its grad_weight is sum(dy * xhat), its grad_bias sum(dy).
  const std::span<double> dw = scope.take<double>(uC), db = scope.take<double>(uC);
  ForwardState scaled = forward;
  scaled.weight = ConstVectorView(gamma_r);
  const bool want_params = grads.weight.present() || grads.bias.present();
  backward_impl(dy, x, nullptr, dx, g, scaled, options,
                want_params ? ParamGrads{VectorView(dw), VectorView(db)} : ParamGrads{});
  if (!want_params) return;
  for (std::size_t c = 0; c < uC; ++c) dw[c] = dw[c] * r[c] + db[c] * d[c];  // sum(dy * (xhat r + d))
  write_channels<T>(grads.weight, dw);
  write_channels<T>(grads.bias, db);
}

// A training call with virtual batches: at least 2 values per channel in each (the smallest is the last).
detail::Problem check_ghost_count(ConstTensorView input, const detail::TensorInfo& in, std::int64_t vbs) {
  const Geometry& g = in.geometry;
  if (g.C == 0 || g.N == 0) return detail::check_training_count(input, in);
  const std::int64_t last = g.N % vbs == 0 ? std::min(vbs, g.N) : g.N % vbs;
  if (last * g.S <= 1)
    return detail::Problem("input: expected more than 1 value per channel in every virtual batch when training, got " +
                           std::to_string(last * g.S) + " in the last one (input size " + input.shape().str() +
                           ", virtual_batch_size " + std::to_string(vbs) + ")");
  return {};
}

detail::Checked<detail::TensorInfo> check_ghost_forward(ConstTensorView input, TensorView output, std::int64_t vbs,
                                                        RunningStats running, Affine affine, const Options& options,
                                                        SavedStats save) {
  BNORM_CHECK(detail::check_virtual_batch_size(vbs));
  BNORM_CHECK(detail::check_no_activation(options.activation));
  const detail::Checked<detail::TensorInfo> in = detail::check_forward_args(input, output, running, affine, options, {});
  BNORM_CHECK(in.problem);
  if (!options.training) return in;
  BNORM_CHECK(check_ghost_count(input, in.value, vbs));
  const std::int64_t rows = ghost_batch_count(in.value.geometry.N, vbs) * in.value.geometry.C;
  if (save.mean.present()) BNORM_CHECK(check_vector("save_mean", save.mean, rows, input.dtype(), true));
  if (save.invstd.present()) BNORM_CHECK(check_vector("save_invstd", save.invstd, rows, input.dtype(), true));
  return in;
}

detail::Checked<detail::TensorInfo> check_ghost_backward(ConstTensorView grad_output, const ForwardState& forward,
                                                         std::int64_t vbs, const Options& options,
                                                         TensorView grad_input, ParamGrads grads) {
  BNORM_CHECK(detail::check_virtual_batch_size(vbs));
  BNORM_CHECK(detail::check_no_activation(options.activation));
  if (!options.training) return detail::check_backward_args(grad_output, forward, options, grad_input, grads);
  const detail::Checked<detail::TensorInfo> in = detail::check_tensor("input", forward.input);
  BNORM_CHECK(in.problem);
  const std::int64_t C = in.value.geometry.C, rows = ghost_batch_count(in.value.geometry.N, vbs) * C;
  const DType dt = forward.input.dtype();
  // The saved rows of every virtual batch; batch_norm_backward's checks then see the first row.
  ForwardState first = forward;
  if (forward.saved.mean.present()) {
    BNORM_CHECK(check_vector("save_mean", forward.saved.mean, rows, dt, true));
    first.saved.mean = ConstVectorView(forward.saved.mean.data(), forward.saved.mean.dtype(), C);
  }
  if (forward.saved.invstd.present()) {
    BNORM_CHECK(check_vector("save_invstd", forward.saved.invstd, rows, dt, true));
    first.saved.invstd = ConstVectorView(forward.saved.invstd.data(), forward.saved.invstd.dtype(), C);
  }
  return detail::check_backward_args(grad_output, first, options, grad_input, grads);
}

detail::Checked<detail::TensorInfo> check_renorm_forward(ConstTensorView input, TensorView output,
                                                         RunningStats running, Affine affine, const Options& options,
                                                         RenormLimits limits, SavedStats save, RenormFactors factors) {
  BNORM_CHECK(detail::check_no_activation(options.activation));
  const detail::Checked<detail::TensorInfo> in =
      detail::check_forward_args(input, output, running, affine, options, save);
  BNORM_CHECK(in.problem);
  if (!options.training) return in;
  if (!running.mean.present())
    return detail::Problem(
        "running_mean: expected running statistics when training=true (batch renormalization reads them), got none");
  BNORM_CHECK(detail::check_renorm_limits(limits.r_max, limits.d_max));
  BNORM_CHECK(detail::check_training_count(input, in.value));
  const std::int64_t C = in.value.geometry.C;
  if (factors.r.present()) BNORM_CHECK(check_vector("r", factors.r, C, input.dtype(), true));
  if (factors.d.present()) BNORM_CHECK(check_vector("d", factors.d, C, input.dtype(), true));
  return in;
}

detail::Checked<detail::TensorInfo> check_renorm_backward(ConstTensorView grad_output, const ForwardState& forward,
                                                          ConstRenormFactors factors, const Options& options,
                                                          TensorView grad_input, ParamGrads grads) {
  BNORM_CHECK(detail::check_no_activation(options.activation));
  const detail::Checked<detail::TensorInfo> in =
      detail::check_backward_args(grad_output, forward, options, grad_input, grads);
  BNORM_CHECK(in.problem);
  if (!options.training) return in;
  if (!factors.r.present() || !factors.d.present())
    return detail::Problem("r: expected the forward's r and d when training=true, got none");
  const std::int64_t C = in.value.geometry.C;
  BNORM_CHECK(check_vector("r", factors.r, C, forward.input.dtype(), true));
  BNORM_CHECK(check_vector("d", factors.d, C, forward.input.dtype(), true));
  return in;
}

}  // namespace

std::int64_t ghost_batch_count(std::int64_t N, std::int64_t virtual_batch_size) {
  detail::raise_if("ghost_batch_count", detail::check_virtual_batch_size(virtual_batch_size));
  return N <= 0 ? 0 : (N - 1) / virtual_batch_size + 1;
}

void ghost_batch_norm(ConstTensorView input, TensorView output, std::int64_t virtual_batch_size, RunningStats running,
                      Affine affine, Options options, SavedStats save) {
  const detail::Checked<detail::TensorInfo> in =
      check_ghost_forward(input, output, virtual_batch_size, running, affine, options, save);
  detail::raise_if("ghost_batch_norm", in.problem);
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = typed<T>(input);
    T* y = typed<T>(output);
    if (!options.training) return detail::run_forward<T>(in.value, x, y, running, running, affine, options, {}, nullptr);
    ghost_forward_impl(x, y, detail::output_geometry(in.value, options), virtual_batch_size, running, affine, options,
                       save);
  });
}

void ghost_batch_norm_backward(ConstTensorView grad_output, const ForwardState& forward,
                               std::int64_t virtual_batch_size, Options options, TensorView grad_input,
                               ParamGrads grads) {
  const detail::Checked<detail::TensorInfo> in =
      check_ghost_backward(grad_output, forward, virtual_batch_size, options, grad_input, grads);
  detail::raise_if("ghost_batch_norm_backward", in.problem);
  dispatch(forward.input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* dy = typed<T>(grad_output);
    T* dx = typed_or_null<T>(grad_input);
    if (!options.training) return detail::run_backward(in.value, dy, forward, options, dx, grads);
    ghost_backward_impl(dy, typed<T>(forward.input), dx, detail::output_geometry(in.value, options),
                        virtual_batch_size, forward, grads);
  });
}

void batch_renorm(ConstTensorView input, TensorView output, RunningStats running, Affine affine, Options options,
                  RenormLimits limits, SavedStats save, RenormFactors factors) {
  const detail::Checked<detail::TensorInfo> in =
      check_renorm_forward(input, output, running, affine, options, limits, save, factors);
  detail::raise_if("batch_renorm", in.problem);
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = typed<T>(input);
    T* y = typed<T>(output);
    if (!options.training) return detail::run_forward<T>(in.value, x, y, running, running, affine, options, {}, nullptr);
    renorm_forward_impl(x, y, detail::output_geometry(in.value, options), running, affine, options, limits, save,
                        factors);
  });
}

void batch_renorm_backward(ConstTensorView grad_output, const ForwardState& forward, ConstRenormFactors factors,
                           Options options, TensorView grad_input, ParamGrads grads) {
  const detail::Checked<detail::TensorInfo> in =
      check_renorm_backward(grad_output, forward, factors, options, grad_input, grads);
  detail::raise_if("batch_renorm_backward", in.problem);
  dispatch(forward.input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* dy = typed<T>(grad_output);
    T* dx = typed_or_null<T>(grad_input);
    if (!options.training) return detail::run_backward(in.value, dy, forward, options, dx, grads);
    renorm_backward_impl(dy, typed<T>(forward.input), dx, detail::output_geometry(in.value, options), forward,
                         factors, options, grads);
  });
}

}  // namespace bnorm
