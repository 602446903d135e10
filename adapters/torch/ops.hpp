// bnorm's operators in torch's dispatcher (op_table.hpp): the C++ entry for code linked with libtorch.
// Python reaches the same operators as torch.ops.bnorm.* (bnorm.torch loads the library that holds
// them). See docs/torch-adapter.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bnorm::torch_ops {

// torch.ops.bnorm.batch_norm through the dispatcher: autograd for input, weight and bias, the running
// statistics updated in place in training. Errors are torch's c10::ValueError / c10::TypeError with
// the library's message.
at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps);

}  // namespace bnorm::torch_ops
