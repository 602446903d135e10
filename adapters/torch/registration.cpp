// bnorm's operators in torch's dispatcher: every schema and every registration, generated from the
// op table (op_table.hpp), and the C++ entry (ops.hpp). The entry's use from bnorm_torch.cpp pulls
// this file, and with it the kernels it registers, into every program that links the adapter.
#include "op_table.hpp"
#include "ops.hpp"
#include "tensor_rules.hpp"

#include <bnorm/types.hpp>

#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

namespace bnorm::torch_ops {

void _set_num_threads_impl(std::int64_t n) {
  call_library([&] {
    if (n < 1 || n > std::numeric_limits<int>::max())
      throw bnorm::Error("bnorm::set_num_threads: n: expected >= 1, got " + std::to_string(n));
    bnorm::set_num_threads(static_cast<int>(n));
  });
}
std::int64_t _num_threads_impl() { return bnorm::num_threads(); }

Tensor batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, bool training, double momentum, double eps) {
  return dispatch::batch_norm().call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                     std::nullopt);
}

}  // namespace bnorm::torch_ops

namespace ops = bnorm::torch_ops;

TORCH_LIBRARY(bnorm, m) {
  // flexible_layout: the kernels take either dense layout, so inductor may hand them its own choice
  // (channels_last after its convolutions) instead of copying to the eager strides around every call.
  const std::vector<at::Tag> kLayout{at::Tag::flexible_layout};
#define BNORM_DEFINE(name, Ret, Params, schema) m.def(schema, kLayout);
#define BNORM_DEFINE_PLAIN(name, Ret, Params, schema) m.def(schema, &ops::name##_impl);
  BNORM_TORCH_OPS(BNORM_DEFINE, BNORM_DEFINE, BNORM_DEFINE_PLAIN)
#undef BNORM_DEFINE
#undef BNORM_DEFINE_PLAIN
}

// The forward and backward pieces on the CPU. Tensors that are not dense CPU ones (CUDA, sparse)
// reach the same kernel, whose first check names them (instead of torch's "Could not run ... with
// arguments from the 'CUDA' backend").
#define BNORM_IMPL_CPU(name, Ret, Params, schema) m.impl(#name, &ops::name##_cpu);
TORCH_LIBRARY_IMPL(bnorm, CPU, m) { BNORM_TORCH_OPS(BNORM_TORCH_IGNORE, BNORM_IMPL_CPU, BNORM_TORCH_IGNORE) }
TORCH_LIBRARY_IMPL(bnorm, CUDA, m) { BNORM_TORCH_OPS(BNORM_TORCH_IGNORE, BNORM_IMPL_CPU, BNORM_TORCH_IGNORE) }
TORCH_LIBRARY_IMPL(bnorm, SparseCPU, m) { BNORM_TORCH_OPS(BNORM_TORCH_IGNORE, BNORM_IMPL_CPU, BNORM_TORCH_IGNORE) }
TORCH_LIBRARY_IMPL(bnorm, SparseCUDA, m) { BNORM_TORCH_OPS(BNORM_TORCH_IGNORE, BNORM_IMPL_CPU, BNORM_TORCH_IGNORE) }
#undef BNORM_IMPL_CPU

#define BNORM_IMPL_META(name, Ret, Params, schema) m.impl(#name, &ops::name##_meta);
TORCH_LIBRARY_IMPL(bnorm, Meta, m) { BNORM_TORCH_OPS(BNORM_TORCH_IGNORE, BNORM_IMPL_META, BNORM_TORCH_IGNORE) }
#undef BNORM_IMPL_META

// The public operators: their Function where autograd records a graph, and below autograd
// (inference mode, or a redispatch) their forward's output, for any backend the forward has a kernel for.
#define BNORM_IMPL_AUTOGRAD(name, Ret, Params, schema) m.impl(#name, &ops::name##_op<true>);
#define BNORM_IMPL_COMPOSITE(name, Ret, Params, schema) m.impl(#name, &ops::name##_op<false>);
TORCH_LIBRARY_IMPL(bnorm, Autograd, m) { BNORM_TORCH_OPS(BNORM_IMPL_AUTOGRAD, BNORM_TORCH_IGNORE, BNORM_TORCH_IGNORE) }
TORCH_LIBRARY_IMPL(bnorm, CompositeExplicitAutograd, m) {
  BNORM_TORCH_OPS(BNORM_IMPL_COMPOSITE, BNORM_TORCH_IGNORE, BNORM_TORCH_IGNORE)
}
#undef BNORM_IMPL_AUTOGRAD
#undef BNORM_IMPL_COMPOSITE
