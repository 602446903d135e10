// Internal: the pieces of the functional layer that the local path (functional.cpp) and the
// synchronized path (sync.cpp) share, so that SyncBatchNorm validates, normalizes, updates the
// running statistics and back-propagates with exactly the code of batch_norm; and the one dtype
// switch. Each public entry point validates, dispatches on the dtype once (dispatch), and runs typed
// code below it: the pieces that touch the tensors are templates on the storage type T, entered with
// the tensors as T (typed), and instantiated in functional.cpp for float, double and bfloat16.
#pragma once

#include <bnorm/functional.hpp>

#include "validate.hpp"

#include <span>

namespace bnorm::detail {

// Calls f(T{}) with T the storage type of dtype (float, double or bfloat16); validation has
// already refused any other dtype.
template <class F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(bfloat16{});
    case DType::Float32: break;
  }
  f(float{});
}

// A tensor's memory as T, the type that dispatch gave for its dtype (check_like made every tensor of
// a call share it); the optional form gives null for an absent tensor.
template <class T>
const T* typed(ConstTensorView t) {
  return static_cast<const T*>(t.data());
}
template <class T>
T* typed(TensorView t) {
  return static_cast<T*>(t.data());
}
template <class T>
const T* typed_or_null(ConstTensorView t) {
  return t.empty() ? nullptr : typed<T>(t);
}
template <class T>
T* typed_or_null(TensorView t) {
  return t.empty() ? nullptr : typed<T>(t);
}

// Every check of batch_norm's arguments except the residual and the per-channel count in training
// (the caller checks that count: local for batch_norm, global for SyncBatchNorm).
Checked<TensorInfo> check_forward_args(ConstTensorView input, TensorView output, FrozenStats running, Affine affine,
                                       const Options& options, SavedStats save);

// The optional residual of batch_norm: like the input, the output's memory or disjoint from it.
Problem check_residual(ConstTensorView residual, ConstTensorView input, TensorView output, const TensorInfo& in);

// Every check of batch_norm_backward's arguments.
Checked<TensorInfo> check_backward_args(ConstTensorView grad_output, const ForwardState& forward,
                                        const Options& options, TensorView grad_input, ParamGrads grads);

// batch_norm and batch_norm_backward after their checks passed (in = the input's TensorInfo; x the
// input, y the output, residual and dx null when absent). The forward reads the running statistics
// from `frozen` in eval and updates `update` in training, so that read-only statistics
// (batch_norm_inference) need no cast. The backward reads the input (and, with a fused ReLU, the
// output) from `forward`.
template <class T>
void run_forward(const TensorInfo& in, const T* x, T* y, FrozenStats frozen, RunningStats update, Affine affine,
                 const Options& options, SavedStats save, const T* residual);
template <class T>
void run_backward(const TensorInfo& in, const T* dy, const ForwardState& forward, const Options& options, T* dx,
                  ParamGrads grads);

// Per-channel mean and M2 = sum((x - mean)^2) of the input x (the kernels' two-pass blocks merged
// with Chan's formula); mean = M2 = 0 for a channel with no values (an empty batch).
template <class T>
void local_moments(const T* x, const TensorInfo& in, double* mean, double* m2);

// Batch statistics from elsewhere (SyncBatchNorm's global batch): mean, biased variance, and the
// count of values per channel they were taken over.
struct BatchMoments {
  std::span<const double> mean, var;
  double count = 0;
};

// The second half of a forward: normalize with the given statistics, then, in training, write the
// saved statistics and update the running statistics with the unbiased variance of `stats.count`
// values.
template <class T>
void forward_with_stats(const T* x, T* y, const TensorInfo& in, BatchMoments stats, RunningStats running,
                        Affine affine, const Options& options, SavedStats save);

// Per-channel sum(dy') and sum(dy' * (x - mean)), dy' = dy masked by output > 0 under a fused ReLU.
struct ChannelSums {
  double* dy = nullptr;
  double* dy_xmu = nullptr;
};

// Training backward, first half: this input's sums (forward.output only with a fused ReLU).
template <class T>
void backward_sums(const T* dy, const ForwardState& forward, const TensorInfo& in, ChannelSums out);

// Training backward, second half: grad_input from the sums over all `count` values (global in
// SyncBatchNorm), the parameter gradients from this input's own sums. Absent outputs (dx null) are
// skipped.
template <class T>
void backward_finish(const T* dy, const ForwardState& forward, const TensorInfo& in, ChannelSums local,
                     ChannelSums global, double count, T* dx, ParamGrads grads);

}  // namespace bnorm::detail
