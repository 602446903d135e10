// The Meta kernels of the KERNEL rows (op_table.hpp): the CPU kernel's exact shapes, strides and
// dtypes without data (tensor_rules.cpp computes them for both), after the same torch-side checks,
// for the meta device and for FakeTensor (torch.compile, torch.export).
#include "op_table.hpp"
#include "tensor_rules.hpp"

namespace bnorm::torch_ops {
namespace {

ForwardResults forward_meta(const ForwardArgs& a) {
  check_forward_kinds(kForwardName, a);
  return forward_results(a.input, a, plan_for(a.input));
}

}  // namespace

Sextet batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                               bool training, double momentum, double eps, bool relu, bool) {
  return forward_meta({input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu})
      .tuple();
}

Tensor batch_norm_eval_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                            double eps, bool relu) {
  return forward_meta({input, weight, bias, running_mean, running_var, residual, false, 0.0, eps, relu}).out;
}

Triple batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                const Tensor&, const Tensor&, const OptTensor& output, bool, double, bool) {
  check_backward_kinds(kBackwardName, grad_output, input, weight, output);
  return backward_results(input, weight, plan_for(input));
}

Sextet sync_batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                                    double eps, c10::string_view, bool) {
  const OptTensor none;
  return forward_meta({input, weight, bias, running_mean, running_var, none, true, momentum, eps, false}).tuple();
}
Triple sync_batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                     const Tensor&, const Tensor&, double, c10::string_view) {
  check_backward_kinds(kBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

Quint ghost_batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                                    double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  check_forward_kinds(kGhostName, a);
  return variant_results(a, ghost_rows(input, vbs), 2).ghost_tuple();
}

Septet batch_renorm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var, double, double,
                                 double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  check_forward_kinds(kRenormName, a);
  return variant_results(a, channel_rows(input), 4).renorm_tuple();
}

Triple ghost_batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                      const Tensor&, const Tensor&, std::int64_t) {
  check_backward_kinds(kGhostBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

Triple batch_renorm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  check_backward_kinds(kRenormBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

}  // namespace bnorm::torch_ops
