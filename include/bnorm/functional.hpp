// bnorm functional API: the shape of torch.nn.functional.batch_norm and its backward, over
// caller-owned memory. See docs/semantics.md for every rule and docs/backward.md for the gradients.
#pragma once

#include <bnorm/types.hpp>

namespace bnorm {

// Forward.
//   input, output : same shape, dtype and layout; rank >= 2; output may be the input (in place).
//   running_mean, running_var : both present or both absent. Read in eval; in training, updated as
//                   running = (1 - momentum) * running + momentum * batch, with the unbiased batch
//                   variance for running_var. (The layer turns momentum=None into 1/num_batches.)
//   weight, bias  : optional (absent means gamma = 1, beta = 0).
//   training      : true normalizes with the batch statistics (m = N * prod(spatial) values per
//                   channel, biased variance); false with the running statistics.
//   save_mean, save_invstd : optional outputs, written in training only: the batch mean and
//                   1 / sqrt(var + eps), which batch_norm_backward needs.
//   activation    : Relu fuses y = max(y, 0); backward then needs the output.
//   residual      : optional, like input: y = activation(normalized + residual) in the same pass
//                   (ResNet's BN -> add -> ReLU; torch's relu(bn(x) + z)). output may be the
//                   residual. Backward: batch_norm_backward with the same activation and this
//                   output gives grad_input; the residual's gradient is grad_output masked by
//                   output > 0 under Relu, grad_output itself without.
// Per-channel vectors have length C and the input's dtype. Throws bnorm::Error on misuse.
void batch_norm(ConstTensorView input, TensorView output, VectorView running_mean, VectorView running_var,
                ConstVectorView weight, ConstVectorView bias, bool training, double momentum = 0.1,
                double eps = 1e-5, VectorView save_mean = {}, VectorView save_invstd = {},
                Activation activation = Activation::None, ConstTensorView residual = {});

// Inference with frozen statistics: batch_norm(..., training = false) for read-only running
// statistics (an inference server's shared, const model state).
void batch_norm_inference(ConstTensorView input, TensorView output, ConstVectorView running_mean,
                          ConstVectorView running_var, ConstVectorView weight = {}, ConstVectorView bias = {},
                          double eps = 1e-5, Activation activation = Activation::None);

// Backward (torch's native_batch_norm_backward). With training = true the forward used batch
// statistics: pass save_mean and save_invstd from it. With training = false the statistics were
// frozen: pass running_mean and running_var (and the same eps). Any of grad_input, grad_weight,
// grad_bias may be absent (not computed). With activation = Relu pass the forward's output too;
// the gradient is masked where the output is not positive. grad_input may alias grad_output or
// input. grad_weight and grad_bias are overwritten (not accumulated).
void batch_norm_backward(ConstTensorView grad_output, ConstTensorView input, ConstVectorView weight,
                         ConstVectorView running_mean, ConstVectorView running_var, ConstVectorView save_mean,
                         ConstVectorView save_invstd, bool training, double eps, TensorView grad_input,
                         VectorView grad_weight, VectorView grad_bias, Activation activation = Activation::None,
                         ConstTensorView output = {});

// Per-channel batch statistics alone: count m, mean and biased variance, accumulated in double
// with per-block two-pass sums merged by Chan's formula. mean and var have the input's dtype or
// float64 (the latter is what SyncBatchNorm merges across ranks).
void batch_stats(ConstTensorView input, VectorView mean, VectorView var);

}  // namespace bnorm
