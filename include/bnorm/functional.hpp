// bnorm functional API: the shape of torch.nn.functional.batch_norm and its backward, over
// caller-owned memory. See docs/semantics.md for every rule and docs/backward.md for the gradients.
//
// The per-channel vectors travel in small named structs (RunningStats, Affine, SavedStats, ...), so
// that no two neighbouring parameters have the same type and a swap of, say, running_var and
// save_invstd does not compile. Inside a struct, designated initializers name each vector (a
// positional {var, mean} would compile), and they read well at the call site:
//   bnorm::batch_norm(x, y, {.mean = rm, .var = rv}, {.weight = w, .bias = b}, {.training = true},
//                     {.mean = save_mean, .invstd = save_invstd});
#pragma once

#include <bnorm/types.hpp>

namespace bnorm {

// Running statistics, read-only (inference with a const model, or the statistics an eval forward
// used, for its backward).
struct FrozenStats {
  ConstVectorView mean, var;
};
// torch's running_mean / running_var buffers: both present or both absent. Read in eval; in
// training, updated as running = (1 - momentum) * running + momentum * batch, with the unbiased batch
// variance for var. (The layer turns momentum=None into 1/num_batches.)
struct RunningStats {
  VectorView mean, var;
  operator FrozenStats() const { return {mean, var}; }
};

// gamma and beta: optional (absent means gamma = 1, beta = 0).
struct Affine {
  ConstVectorView weight, bias;
};

// What a training forward writes for backward (torch's save_mean / save_invstd): the batch mean and
// 1 / sqrt(var + eps). Optional outputs, float64 or the vectors' dtype.
struct ConstSavedStats {
  ConstVectorView mean, invstd;
};
struct SavedStats {
  VectorView mean, invstd;
  operator ConstSavedStats() const { return {mean, invstd}; }  // a forward's output feeds backward
};

// What the output tensors' memory is, which decides how the kernels store into it.
//   Reused: memory written before (a buffer kept between calls): outputs at least as large as this
//           machine's stream threshold (measured at first use: `bnorm info`; BENCHMARKS.md) are
//           written with non-temporal stores, which save the read of every destination line.
//   Fresh : memory just allocated and not yet touched (torch's at::empty, a new NumPy array): each
//           first write page-faults and the kernel zeroes the page through the cache, where ordinary
//           stores then find it; non-temporal stores measured slower there (BENCHMARKS.md,
//           "Non-temporal stores"). The bindings that allocate their outputs say Fresh.
enum class OutputMemory : std::uint8_t { Reused, Fresh };

// Whose rules decide the edge cases of batch_norm and batch_norm_backward.
//   Strict: momentum in [0, 1]; eps > 0; a training batch has more than one value per channel.
//   Torch : torch.nn.functional.batch_norm's, which the bindings take. Any momentum, with the same
//           update. eps >= 0 in eval; 0 runs as the smallest double, which changes running_var + eps
//           only where running_var is 0 or subnormal. A training batch of no values (N = 0 or a
//           spatial size 0) changes nothing: the output is empty, the saved statistics are zeros.
//   Both refuse a training batch of one value per channel, and the variants take Strict only.
enum class Policy : std::uint8_t { Strict, Torch };

// torch's momentum=None, a cumulative average: the momentum of the batch after `batches_seen`.
inline double cumulative_momentum(std::int64_t batches_seen) { return 1.0 / static_cast<double>(batches_seen + 1); }

// How to normalize; backward takes the forward's Options unchanged (momentum is unused there).
//   training   : true normalizes with the batch statistics (m = N * prod(spatial) values per
//                channel, biased variance); false with the running statistics.
//   activation : Relu fuses y = max(y, 0); backward then needs the output.
//   outputs    : the output's (backward: grad_input's) memory, above.
//   policy     : the edge cases' rules, above.
//   skip_nonfinite : training with running statistics: a batch that would make the updated running
//                mean or variance not finite in some channel (a NaN or Inf in the batch, or a
//                variance beyond the buffers' dtype) updates no running statistic at all; the
//                output and the saved statistics are computed as without it (torch's NaNs).
//                SyncBatchNorm decides on the global statistics, so every rank decides alike.
//   nonfinite_skips : with skip_nonfinite, incremented for each update skipped (optional).
struct Options {
  bool training = false;
  double momentum = 0.1;
  double eps = 1e-5;
  Activation activation = Activation::None;
  OutputMemory outputs = OutputMemory::Reused;
  Policy policy = Policy::Strict;
  bool skip_nonfinite = false;
  std::int64_t* nonfinite_skips = nullptr;
};

// Gradients of the parameters: either may be absent (not computed); overwritten, not accumulated.
struct ParamGrads {
  VectorView weight, bias;
};

// What backward needs from its forward.
//   input   : the forward's input.
//   output  : the forward's output; needed only with Activation::Relu (the gradient is masked where
//             it is not positive).
//   weight  : the forward's gamma (absent: 1).
//   saved   : training: the SavedStats the forward wrote.
//   running : eval (frozen statistics): the running statistics the forward read (and the same eps).
struct ForwardState {
  ConstTensorView input;
  ConstTensorView output = {};
  ConstVectorView weight = {};
  ConstSavedStats saved = {};
  FrozenStats running = {};
};

// Forward.
//   input, output : same shape, dtype and layout; rank >= 2; output may be the input (in place).
//   residual      : optional, like input: y = activation(normalized + residual) in the same pass
//                   (ResNet's BN -> add -> ReLU; torch's relu(bn(x) + z)). output may be the
//                   residual. Backward: batch_norm_backward with the same options and this output
//                   gives grad_input; the residual's gradient is grad_output masked by output > 0
//                   under Relu, grad_output itself without.
// Per-channel vectors have length C and the input's dtype (float32 for a bfloat16 input). Throws
// bnorm::Error on misuse, having changed nothing.
void batch_norm(ConstTensorView input, TensorView output, RunningStats running, Affine affine, Options options,
                SavedStats save = {}, ConstTensorView residual = {});

// torch.nn.functional.batch_norm's positional form (plus the output): the call above with
// Options{training, momentum, eps}.
void batch_norm(ConstTensorView input, TensorView output, VectorView running_mean, VectorView running_var,
                ConstVectorView weight, ConstVectorView bias, bool training, double momentum = 0.1,
                double eps = 1e-5);

// Inference with frozen statistics: batch_norm with training = false for read-only running
// statistics (an inference server's shared, const model state). running must be present.
void batch_norm_inference(ConstTensorView input, TensorView output, FrozenStats running, Affine affine = {},
                          double eps = 1e-5, Activation activation = Activation::None);

// Backward (torch's native_batch_norm_backward). options.training selects the batch-statistics
// gradient (forward.saved) or the frozen one (forward.running, options.eps). grad_input may be
// absent (not computed), alias grad_output or the input.
void batch_norm_backward(ConstTensorView grad_output, const ForwardState& forward, Options options,
                         TensorView grad_input, ParamGrads grads = {});

// Per-channel batch statistics alone: count m, mean and biased variance, accumulated in double
// with per-block two-pass sums merged by Chan's formula. mean and var have the input's dtype or
// float64 (the latter is what SyncBatchNorm merges across ranks).
void batch_stats(ConstTensorView input, VectorView mean, VectorView var);

// ---------------------------------------------------------------------------------------------
// Variants of the family (docs/semantics.md, "Ghost Batch Normalization", "Batch Renormalization").
// Both take batch_norm's arguments and rules (Options with activation None), and both are plain
// batch_norm / batch_norm_backward with training = false.

// Ghost Batch Normalization. In training the batch is split along N into virtual batches of
// virtual_batch_size samples (the last one may be smaller), each normalized with its own
// statistics; the running statistics are updated once per virtual batch, in order, exactly as
// batch_norm applied to each virtual batch in turn would. The statistics of all virtual batches
// come from one pass over the input. save (optional) gets ghost_batch_count(N, virtual_batch_size)
// rows of C values: row j = virtual batch j's mean and 1 / sqrt(var + eps).
std::int64_t ghost_batch_count(std::int64_t N, std::int64_t virtual_batch_size);
void ghost_batch_norm(ConstTensorView input, TensorView output, std::int64_t virtual_batch_size,
                      RunningStats running, Affine affine, Options options, SavedStats save = {});
// Its backward: per virtual batch, batch_norm_backward with that batch's saved row; the parameter
// gradients are summed over the virtual batches. forward.saved holds the forward's rows.
void ghost_batch_norm_backward(ConstTensorView grad_output, const ForwardState& forward,
                               std::int64_t virtual_batch_size, Options options, TensorView grad_input,
                               ParamGrads grads = {});

// Batch Renormalization (Ioffe 2017, Algorithm 1). With sigma = sqrt(running_var + eps) from the
// running statistics before this step's update and sigma_B = sqrt(var_B + eps) (var_B biased):
//   r = clip(sigma_B / sigma, 1 / r_max, r_max), d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
//   y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
// then the running statistics are updated as batch_norm's. Training needs running statistics.
// r_max >= 1 (inf: r unclipped), d_max >= 0 (inf: d unclipped).
struct RenormLimits {
  double r_max = 3.0;
  double d_max = 5.0;
};
// The r and d of a training forward (optional outputs, float64 or the vectors' dtype), which its
// backward needs: they are constants there.
struct ConstRenormFactors {
  ConstVectorView r, d;
};
struct RenormFactors {
  VectorView r, d;
  operator ConstRenormFactors() const { return {r, d}; }
};
void batch_renorm(ConstTensorView input, TensorView output, RunningStats running, Affine affine, Options options,
                  RenormLimits limits, SavedStats save = {}, RenormFactors factors = {});
// Its backward, r and d constant: grad_input is batch_norm_backward's with gamma * r for gamma,
// grad_weight = sum(dy * (xhat * r + d)), grad_bias = sum(dy). Training needs the forward's
// saved statistics and factors.
void batch_renorm_backward(ConstTensorView grad_output, const ForwardState& forward, ConstRenormFactors factors,
                           Options options, TensorView grad_input, ParamGrads grads = {});

}  // namespace bnorm
