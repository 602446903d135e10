#include "bnorm_torch.hpp"

#include <bnorm/functional.hpp>

#include <torch/autograd.h>
#include <torch/nn/init.h>

#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnorm::torch {
namespace {

using ::torch::autograd::AutogradContext;
using ::torch::autograd::tensor_list;

// The bnorm::DType of a torch dtype; one the library has none for (Half, integers) cannot even be
// described to it, so it is refused here. Every other argument check is the library's (shapes,
// lengths, dtype agreement, running statistics, eps, momentum, values per channel), made by the
// bnorm::batch_norm call before anything is written; its bnorm::Error is a std::invalid_argument.
DType dtype_of_tensor(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kFloat) return DType::Float32;
  if (t.scalar_type() == at::kDouble) return DType::Float64;
  if (t.scalar_type() == at::kBFloat16) return DType::BFloat16;
  std::string msg = "bnorm::torch::batch_norm: ";
  msg += what;
  msg += ": expected float32, float64 or bfloat16, got ";
  msg += c10::toString(t.scalar_type());
  throw std::invalid_argument(msg);
}

Shape shape_of(const at::Tensor& t) { return Shape(std::span<const std::int64_t>(t.sizes().data(), t.sizes().size())); }

// The layout of a tensor's memory as the library reads it (bnorm::layout_of), or nullopt for memory
// in neither dense layout.
std::optional<Layout> memory_layout(const at::Tensor& t) {
  return layout_of({t.sizes().data(), t.sizes().size()}, {t.strides().data(), t.strides().size()});
}

// The permutation (0, 2, ..., rank-1, 1): memory order of a channels-last tensor.
std::vector<std::int64_t> channels_last_order(std::int64_t rank) {
  std::vector<std::int64_t> p{0};
  for (std::int64_t d = 2; d < rank; ++d) p.push_back(d);
  p.push_back(1);
  return p;
}
std::vector<std::int64_t> channels_last_inverse(std::int64_t rank) {
  std::vector<std::int64_t> p{0, rank - 1};
  for (std::int64_t d = 1; d < rank - 1; ++d) p.push_back(d);
  return p;
}

// A tensor with the given layout's dense memory (itself when it already has it).
at::Tensor to_layout(const at::Tensor& t, Layout layout) {
  if (memory_layout(t) == layout) return t;
  if (layout == Layout::ChannelsFirst) return t.contiguous();
  return t.permute(channels_last_order(t.dim())).contiguous().permute(channels_last_inverse(t.dim()));
}

ConstTensorView cview(const at::Tensor& t, Layout layout) {
  return {t.data_ptr(), dtype_of_tensor(t, "tensor"), shape_of(t), layout};
}
TensorView view(at::Tensor& t, Layout layout) { return {t.data_ptr(), dtype_of_tensor(t, "tensor"), shape_of(t), layout}; }
VectorView vview(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr(), dtype_of_tensor(t, "vector"), t.numel()};
}
ConstVectorView cvview(const at::Tensor& t) { return vview(t); }

struct BatchNormFunction : public ::torch::autograd::Function<BatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input_, const at::Tensor& weight_,
                            const at::Tensor& bias_, const at::Tensor& running_mean_, const at::Tensor& running_var_,
                            bool has_affine, bool has_running_mean, bool has_running_var, bool training,
                            double momentum, double eps) {
    // Absent tensors travel as empty placeholders (autograd cannot take undefined arguments).
    at::Tensor running_mean = has_running_mean ? running_mean_ : at::Tensor();
    at::Tensor running_var = has_running_var ? running_var_ : at::Tensor();
    // The library reads memory it is given a pointer to: a CUDA or meta tensor cannot be viewed.
    if (!input_.device().is_cpu()) throw std::invalid_argument("bnorm::torch::batch_norm: input: expected a CPU tensor");
    dtype_of_tensor(input_, "input");
    // Channels-first where both layouts hold; memory in neither is copied to contiguous.
    const Layout layout = memory_layout(input_).value_or(Layout::ChannelsFirst);
    at::Tensor input = to_layout(input_, layout);
    at::Tensor weight = has_affine ? weight_.contiguous() : at::Tensor();
    at::Tensor bias = has_affine ? bias_.contiguous() : at::Tensor();
    // The library's views of vectors are contiguous; a copy would not receive the update.
    for (const at::Tensor* rs : {&running_mean, &running_var})
      if (rs->defined() && !rs->is_contiguous())
        throw std::invalid_argument("bnorm::torch::batch_norm: running statistics must be contiguous (updated in place)");
    at::Tensor output = at::empty_like(input);
    const std::int64_t C = input.dim() >= 2 ? input.size(1) : 0;
    at::Tensor save_mean, save_invstd;
    auto f64 = input.options().dtype(at::kDouble);
    if (training) {
      save_mean = at::empty({C}, f64);
      save_invstd = at::empty({C}, f64);
    }
    {
      at::NoGradGuard no_grad;
      bnorm::batch_norm(cview(input, layout), view(output, layout), {vview(running_mean), vview(running_var)},
                        {cvview(weight), cvview(bias)}, {.training = training, .momentum = momentum, .eps = eps},
                        {vview(save_mean), vview(save_invstd)});
    }
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["layout"] = static_cast<std::int64_t>(layout);
    // In eval, backward needs the running statistics as they were now; they are only C values.
    at::Tensor rm = training || !running_mean.defined() ? at::Tensor() : running_mean.clone();
    at::Tensor rv = training || !running_var.defined() ? at::Tensor() : running_var.clone();
    ctx->save_for_backward({input, weight, save_mean, save_invstd, rm, rv});
    return output;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto layout = static_cast<Layout>(ctx->saved_data["layout"].toInt());
    // grad_output has the output's dtype (the input's: bfloat16 for a bfloat16 input).
    at::Tensor grad_output = to_layout(grads[0].to(input.scalar_type()), layout);
    at::Tensor grad_input = at::empty_like(input);
    at::Tensor grad_weight, grad_bias;
    if (weight.defined()) {  // float32 for a bfloat16 input, like weight
      grad_weight = at::zeros_like(weight);
      grad_bias = at::zeros_like(weight);
    }
    bnorm::batch_norm_backward(cview(grad_output, layout),
                               {.input = cview(input, layout),
                                .weight = cvview(weight),
                                .saved = {cvview(saved[2]), cvview(saved[3])},
                                .running = {cvview(saved[4]), cvview(saved[5])}},
                               {.training = training, .eps = eps}, view(grad_input, layout),
                               {vview(grad_weight), vview(grad_bias)});
    // One gradient per forward argument: input, weight, bias, running_mean, running_var, has_affine,
    // has_running_mean, has_running_var, training, momentum, eps.
    return {grad_input,   grad_weight,  grad_bias,    at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor batch_norm(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                      const at::Tensor& weight, const at::Tensor& bias, bool training, double momentum, double eps) {
  // This functional form's own rule (the library takes either alone): the affine pair travels
  // through the autograd function, and comes back as gradients, together.
  if (weight.defined() != bias.defined())
    throw std::invalid_argument("bnorm::torch::batch_norm: weight and bias: give both or neither");
  const bool has_affine = weight.defined();
  const at::Tensor placeholder = at::empty({0}, input.options());
  // The running statistics go as given: the library decides on both or neither, and on eval.
  return BatchNormFunction::apply(input, has_affine ? weight : placeholder, has_affine ? bias : placeholder,
                                  running_mean.defined() ? running_mean : placeholder,
                                  running_var.defined() ? running_var : placeholder, has_affine, running_mean.defined(),
                                  running_var.defined(), training, momentum, eps);
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
