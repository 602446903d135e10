#include "bnorm_torch.hpp"

#include "ops.hpp"

#include <c10/util/Exception.h>
#include <torch/nn/init.h>

#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnorm::torch {

at::Tensor batch_norm(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                      const at::Tensor& weight, const at::Tensor& bias, bool training, double momentum, double eps) {
  // This functional form's own rule (the library takes either alone): the affine pair travels
  // through autograd, and comes back as gradients, together.
  if (weight.defined() != bias.defined())
    throw std::invalid_argument("bnorm::torch::batch_norm: weight and bias: give both or neither");
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  // The operator (cpu.cpp) makes the checks and the computation; this C++ API keeps its documented
  // exception type, std::invalid_argument, with the operator's message.
  try {
    return torch_ops::batch_norm(input, opt(weight), opt(bias), opt(running_mean), opt(running_var), training,
                                 momentum, eps);
  } catch (const c10::ValueError& e) {
    throw std::invalid_argument(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw std::invalid_argument(e.what_without_backtrace());
  }
}

template <std::size_t D, class Derived>
void BatchNormImplBase<D, Derived>::reset() {
  if (options.affine()) {
    weight = this->register_parameter("weight", ::torch::empty({options.num_features()}));
    bias = this->register_parameter("bias", ::torch::empty({options.num_features()}));
  } else {
    weight = this->register_parameter("weight", at::Tensor(), /*requires_grad=*/false);
    bias = this->register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", ::torch::zeros({options.num_features()}));
    running_var = this->register_buffer("running_var", ::torch::ones({options.num_features()}));
    num_batches_tracked = this->register_buffer("num_batches_tracked", ::torch::tensor(0, ::torch::dtype(::torch::kLong)));
  } else {
    running_mean = this->register_buffer("running_mean", at::Tensor());
    running_var = this->register_buffer("running_var", at::Tensor());
    num_batches_tracked = this->register_buffer("num_batches_tracked", at::Tensor());
  }
  reset_parameters();
}

template <std::size_t D, class Derived>
void BatchNormImplBase<D, Derived>::reset_running_stats() {
  if (options.track_running_stats()) {
    ::torch::NoGradGuard no_grad;
    running_mean.zero_();
    running_var.fill_(1);
    num_batches_tracked.zero_();
  }
}

template <std::size_t D, class Derived>
void BatchNormImplBase<D, Derived>::reset_parameters() {
  reset_running_stats();
  if (options.affine()) {
    ::torch::nn::init::ones_(weight);
    ::torch::nn::init::zeros_(bias);
  }
}

template <std::size_t D, class Derived>
at::Tensor BatchNormImplBase<D, Derived>::forward(const at::Tensor& input) {
  const auto dim = input.dim();
  const bool ok = D == 1 ? (dim == 2 || dim == 3) : dim == static_cast<std::int64_t>(D) + 2;
  if (!ok)
    throw std::invalid_argument("bnorm::torch::BatchNorm" + std::to_string(D) + "d: expected " +
                                (D == 1 ? std::string("2D or 3D") : std::to_string(D + 2) + "D") + " input, got " +
                                std::to_string(dim) + "D");
  double factor = options.momentum().has_value() ? *options.momentum() : 0.0;
  const bool counting = this->is_training() && options.track_running_stats();
  if (counting && !options.momentum().has_value())  // cumulative average, this batch included
    factor = 1.0 / static_cast<double>(num_batches_tracked.item<std::int64_t>() + 1);
  const bool use_batch = this->is_training() || !running_mean.defined();
  // In training with tracking the running statistics are updated; otherwise they are read (or absent).
  const bool update = this->is_training();
  at::Tensor output = batch_norm(input, update || !use_batch ? running_mean : at::Tensor(),
                                 update || !use_batch ? running_var : at::Tensor(), weight, bias, use_batch, factor,
                                 options.eps());
  if (counting) {  // only once the library has accepted the batch (torch counts it before checking)
    ::torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  return output;
}

template <std::size_t D, class Derived>
void BatchNormImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << "bnorm::torch::BatchNorm" << D << "d(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=";
  if (options.momentum().has_value())
    stream << *options.momentum();
  else
    stream << "None";
  stream << ", affine=" << std::boolalpha << options.affine() << ", track_running_stats=" << options.track_running_stats()
         << ")";
}

template class BatchNormImplBase<1, BatchNorm1dImpl>;
template class BatchNormImplBase<2, BatchNorm2dImpl>;
template class BatchNormImplBase<3, BatchNorm3dImpl>;

void copy_state(const ::torch::nn::Module& from, ::torch::nn::Module& to) {
  ::torch::NoGradGuard no_grad;
  auto dst_params = to.named_parameters(/*recurse=*/true);
  auto dst_buffers = to.named_buffers(/*recurse=*/true);
  auto copy = [](const std::string& name, const at::Tensor& src, at::Tensor* dst) {
    if (dst == nullptr) throw std::invalid_argument("bnorm::torch::copy_state: '" + name + "' is missing in the target");
    if (!dst->sizes().equals(src.sizes()))
      throw std::invalid_argument("bnorm::torch::copy_state: '" + name + "': shapes differ");
    dst->copy_(src);
  };
  for (const auto& p : from.named_parameters(true)) copy(p.key(), p.value(), dst_params.find(p.key()));
  for (const auto& b : from.named_buffers(true)) copy(b.key(), b.value(), dst_buffers.find(b.key()));
}

}  // namespace bnorm::torch
