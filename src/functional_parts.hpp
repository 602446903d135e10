// Internal: the pieces of the functional layer that the local path (functional.cpp) and the
// synchronized path (sync.cpp) share, so that SyncBatchNorm validates, normalizes, updates the
// running statistics and back-propagates with exactly the code of batch_norm. Each takes views that
// the matching check_* has accepted, and dispatches on the dtype.
#pragma once

#include <bnorm/functional.hpp>

#include "validate.hpp"

#include <span>

namespace bnorm::detail {

// Every check of batch_norm's arguments except the residual and the per-channel count in training
// (the caller checks that count: local for batch_norm, global for SyncBatchNorm).
Checked<TensorInfo> check_forward_args(ConstTensorView input, TensorView output, FrozenStats running, Affine affine,
                                       const Options& options, SavedStats save);

// The optional residual of batch_norm: like the input, the output's memory or disjoint from it.
Problem check_residual(ConstTensorView residual, ConstTensorView input, TensorView output, const TensorInfo& in);

// Every check of batch_norm_backward's arguments.
Checked<TensorInfo> check_backward_args(ConstTensorView grad_output, const ForwardState& forward,
                                        const Options& options, TensorView grad_input, ParamGrads grads);

// batch_norm and batch_norm_backward after their checks passed (in = the input's TensorInfo).
// The forward reads the running statistics from `frozen` in eval and updates `update` in training,
// so that read-only statistics (batch_norm_inference) need no cast.
void run_forward(const TensorInfo& in, ConstTensorView input, TensorView output, FrozenStats frozen,
                 RunningStats update, Affine affine, const Options& options, SavedStats save,
                 ConstTensorView residual);
void run_backward(const TensorInfo& in, ConstTensorView grad_output, const ForwardState& forward,
                  const Options& options, TensorView grad_input, ParamGrads grads);

// Per-channel mean and M2 = sum((x - mean)^2) of the input (the kernels' two-pass blocks merged
// with Chan's formula); mean = M2 = 0 for a channel with no values (an empty batch).
void local_moments(ConstTensorView input, const TensorInfo& in, double* mean, double* m2);

// Batch statistics from elsewhere (SyncBatchNorm's global batch): mean, biased variance, and the
// count of values per channel they were taken over.
struct BatchMoments {
  std::span<const double> mean, var;
  double count = 0;
};

// The second half of a forward: normalize with the given statistics, then, in training, write the
// saved statistics and update the running statistics with the unbiased variance of `stats.count`
// values.
void forward_with_stats(ConstTensorView input, TensorView output, const TensorInfo& in, BatchMoments stats,
                        RunningStats running, Affine affine, const Options& options, SavedStats save);

// Per-channel sum(dy') and sum(dy' * (x - mean)), dy' = dy masked by output > 0 under a fused ReLU.
struct ChannelSums {
  double* dy = nullptr;
  double* dy_xmu = nullptr;
};

// Training backward, first half: this input's sums (forward.output only with a fused ReLU).
void backward_sums(ConstTensorView grad_output, const ForwardState& forward, const TensorInfo& in, ChannelSums out);

// Training backward, second half: grad_input from the sums over all `count` values (global in
// SyncBatchNorm), the parameter gradients from this input's own sums. Absent outputs are skipped.
void backward_finish(ConstTensorView grad_output, const ForwardState& forward, const TensorInfo& in,
                     ChannelSums local, ChannelSums global, double count, TensorView grad_input, ParamGrads grads);

}  // namespace bnorm::detail
