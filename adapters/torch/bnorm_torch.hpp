// bnorm::torch — BatchNorm1d/2d/3d modules for libtorch whose computation is bnorm's kernels.
//
// They are interchangeable with torch::nn::BatchNorm1d/2d/3d: same options (torch::nn::BatchNormOptions),
// same parameters and buffers (weight, bias, running_mean, running_var, num_batches_tracked), same
// train()/eval() behaviour, and autograd through bnorm::batch_norm_backward. See docs/torch-adapter.md.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

namespace bnorm::torch {

// The functional form, like torch::nn::functional::batch_norm, differentiable (input, weight, bias).
// running_mean / running_var may be undefined (then training must be true); weight / bias may be undefined.
// Float32 or Float64 CPU tensors, with vectors of the input's dtype; or a BFloat16 input with Float32
// vectors (torch's CPU mixed precision: the output and grad_input are BFloat16, the running statistics
// and the gradients of weight and bias Float32). Channels-first (contiguous) or channels-last memory is
// used in place, any other striding is copied first.
at::Tensor batch_norm(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                      const at::Tensor& weight, const at::Tensor& bias, bool training, double momentum,
                      double eps);

template <std::size_t D, class Derived>
class BatchNormImplBase : public ::torch::nn::Cloneable<Derived> {
 public:
  explicit BatchNormImplBase(const ::torch::nn::BatchNormOptions& options_) : options(options_) { reset(); }

  void reset() override;
  void reset_running_stats();
  void reset_parameters();
  at::Tensor forward(const at::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  ::torch::nn::BatchNormOptions options;
  at::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
};

class BatchNorm1dImpl : public BatchNormImplBase<1, BatchNorm1dImpl> {
 public:
  using BatchNormImplBase<1, BatchNorm1dImpl>::BatchNormImplBase;
};
class BatchNorm2dImpl : public BatchNormImplBase<2, BatchNorm2dImpl> {
 public:
  using BatchNormImplBase<2, BatchNorm2dImpl>::BatchNormImplBase;
};
class BatchNorm3dImpl : public BatchNormImplBase<3, BatchNorm3dImpl> {
 public:
  using BatchNormImplBase<3, BatchNorm3dImpl>::BatchNormImplBase;
};

// The module holders (what TORCH_MODULE writes, spelled out: inside namespace bnorm::torch the macro's
// unqualified torch:: would name this namespace).
#define BNORM_TORCH_HOLDER(Name)                                   \
  class Name : public ::torch::nn::ModuleHolder<Name##Impl> {      \
   public:                                                         \
    using ::torch::nn::ModuleHolder<Name##Impl>::ModuleHolder;     \
    using Impl = Name##Impl;                                       \
  }
BNORM_TORCH_HOLDER(BatchNorm1d);
BNORM_TORCH_HOLDER(BatchNorm2d);
BNORM_TORCH_HOLDER(BatchNorm3d);
#undef BNORM_TORCH_HOLDER

// Copies every parameter and buffer of `from` into the one of the same name in `to` (e.g. from a
// torch::nn::BatchNorm2d into a bnorm::torch::BatchNorm2d, or back). Throws std::invalid_argument when a
// name is missing in `to` or a shape differs.
void copy_state(const ::torch::nn::Module& from, ::torch::nn::Module& to);

}  // namespace bnorm::torch
