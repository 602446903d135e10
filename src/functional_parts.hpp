// Internal: the pieces of the functional layer that the local path (functional.cpp) and the
// synchronized path (sync.cpp) share, so that SyncBatchNorm validates, normalizes, updates the
// running statistics and back-propagates with exactly the code of batch_norm. Each takes views that
// the matching check_* has accepted, and dispatches on the dtype.
#pragma once

#include <bnorm/types.hpp>

#include "validate.hpp"

#include <span>

namespace bnorm::detail {

// Every check of batch_norm's arguments except the per-channel count in training (the caller
// checks that count: local for batch_norm, global for SyncBatchNorm). Messages name `fn`.
TensorInfo check_forward_args(const char* fn, ConstTensorView input, TensorView output, VectorView running_mean,
                              VectorView running_var, ConstVectorView weight, ConstVectorView bias, bool training,
                              double momentum, double eps, VectorView save_mean, VectorView save_invstd,
                              Activation activation);

// Every check of batch_norm_backward's arguments.
TensorInfo check_backward_args(const char* fn, ConstTensorView grad_output, ConstTensorView input,
                               ConstVectorView weight, ConstVectorView running_mean, ConstVectorView running_var,
                               ConstVectorView save_mean, ConstVectorView save_invstd, bool training, double eps,
                               TensorView grad_input, VectorView grad_weight, VectorView grad_bias,
                               Activation activation, ConstTensorView output);

// Per-channel mean and M2 = sum((x - mean)^2) of the input (the kernels' two-pass blocks merged
// with Chan's formula); mean = M2 = 0 for a channel with no values (an empty batch).
void local_moments(ConstTensorView input, const TensorInfo& in, double* mean, double* m2);

// The second half of a forward: normalize with the given per-channel statistics (biased var), then,
// in training, write save_mean / save_invstd and update the running statistics with the unbiased
// variance of `count` values (the global count in SyncBatchNorm).
void forward_with_stats(ConstTensorView input, TensorView output, const TensorInfo& in, std::span<const double> mean,
                        std::span<const double> var, double count, VectorView running_mean, VectorView running_var,
                        ConstVectorView weight, ConstVectorView bias, bool training, double momentum, double eps,
                        VectorView save_mean, VectorView save_invstd, Activation activation);

// Training backward, first half: this input's sum(dy') and sum(dy' * (x - save_mean)), where dy'
// is dy masked by output > 0 when `output` is given (fused ReLU).
void backward_sums(ConstTensorView grad_output, ConstTensorView input, ConstTensorView output, const TensorInfo& in,
                   ConstVectorView save_mean, double* sum_dy, double* sum_dy_xmu);

// Training backward, second half: grad_input from the sums over all `count` values (global in
// SyncBatchNorm), grad_weight / grad_bias from this input's own sums. Absent outputs are skipped.
void backward_finish(ConstTensorView grad_output, ConstTensorView input, ConstTensorView output, const TensorInfo& in,
                     ConstVectorView weight, ConstVectorView save_mean, ConstVectorView save_invstd,
                     const double* local_sum_dy, const double* local_sum_dy_xmu, const double* sum_dy,
                     const double* sum_dy_xmu, double count, TensorView grad_input, VectorView grad_weight,
                     VectorView grad_bias);

}  // namespace bnorm::detail
