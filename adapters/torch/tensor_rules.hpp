// What the CPU and the Meta kernels share (tensor_rules.cpp): the rules of tensor arguments that only
// torch knows, how the library sees a tensor, and the shapes of every result, computed from metadata
// alone so that the CPU kernel (which allocates with them) and the Meta kernel (which returns them)
// cannot disagree.
#pragma once

#include "op_table.hpp"

#include <bnorm/functional.hpp>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace bnorm::torch_ops {

// Runs a library call; its bnorm::Error (already "bnorm::<fn>: <argument>: expected ..., got ...")
// becomes torch's TypeError or ValueError, which reach Python as TypeError / ValueError.
template <class F>
void call_library(F&& f) {
  try {
    f();
  } catch (const bnorm::Error& e) {
    if (e.kind() == ErrorKind::Type) TORCH_CHECK_TYPE(false, e.what());
    TORCH_CHECK_VALUE(false, e.what());
  }
}

// The operators' names in their messages.
inline constexpr const char* kForwardName = "bnorm::batch_norm";
inline constexpr const char* kBackwardName = "bnorm::batch_norm_backward";
inline constexpr const char* kGhostName = "bnorm::ghost_batch_norm";
inline constexpr const char* kGhostBackwardName = "bnorm::ghost_batch_norm_backward";
inline constexpr const char* kRenormName = "bnorm::batch_renorm";
inline constexpr const char* kRenormBackwardName = "bnorm::batch_renorm_backward";

inline const Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }
inline bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// ----------------------------------------------------------------------------------------------
// Torch-side checks. fn is the operator's name, or empty for a collective operator's checks, whose
// message is handed to the library's collective check (cpu.cpp) and gets its prefix and rank there.

// Every operator's arguments, in the forward kernels' terms.
struct ForwardArgs {
  const Tensor& input;
  const OptTensor& weight;
  const OptTensor& bias;
  const OptTensor& running_mean;
  const OptTensor& running_var;
  const OptTensor& residual;
  bool training;
  double momentum;
  double eps;
  bool relu;
  bool skip_nonfinite = false;  // the non-finite guard (training with running statistics)
};

// A variant's training forward (no residual, no ReLU).
ForwardArgs variant_args(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps);

// A CPU (or meta), dense tensor of a dtype bnorm computes, on the input's device, for every tensor
// argument; the residual in the input's dtype; running statistics that do not require grad and, in
// training, can be updated in place. The rest is the library's (Policy::Torch: cpu.cpp).
void check_forward_kinds(const char* fn, const ForwardArgs& a);
void check_backward_kinds(const char* fn, const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                          const OptTensor& output);

// ----------------------------------------------------------------------------------------------
// How the kernels see the input: its memory format (torch's choice, which the Meta kernel repeats),
// the dtype computed in, and the dtype of the per-channel vectors the library takes with it.
struct Plan {
  at::MemoryFormat format;
  Layout layout;
  at::ScalarType compute;  // the input's, float32 for float16
  at::ScalarType vectors;  // compute's, float32 for bfloat16
};

inline Plan plan_for(const Tensor& input) {
  Plan p{};
  p.format = input.dim() >= 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  p.layout = p.format == at::MemoryFormat::Contiguous ? Layout::ChannelsFirst : Layout::ChannelsLast;
  p.compute = input.scalar_type() == at::kHalf ? at::kFloat : input.scalar_type();
  p.vectors = p.compute == at::kBFloat16 ? at::kFloat : p.compute;
  return p;
}

// A dense tensor in the plan's format and compute dtype (the tensor itself when it already is).
inline Tensor dense(const Tensor& t, const Plan& p) {
  Tensor c = t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t;
  return c.contiguous(p.format);
}

// A per-channel vector as the library takes it: contiguous, in the plan's vector dtype when it is
// reduced (bfloat16 or float16); any other dtype goes as it is, for the library to judge.
inline Tensor vector_for(const Tensor& v, const Plan& p) {
  Tensor c = is_reduced(v.scalar_type()) ? v.to(p.vectors) : v;
  return c.contiguous();
}

// The library's storage type of a tensor (float16 is computed as float32 and never reaches it).
inline DType library_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "bnorm: internal: no library dtype for ", t.scalar_type());
  }
}

// The memory of a tensor as the library reads it. An empty tensor's data_ptr() may be null, which
// the library reads as "absent"; a present empty one gets a valid address that is never read.
inline void* address(const Tensor& t) {
  alignas(64) static double nothing[8];
  return t.numel() == 0 ? static_cast<void*>(nothing) : t.data_ptr();
}

inline TensorView view(const Tensor& t, Layout layout) {
  return {address(t), library_dtype(t), Shape(std::span<const std::int64_t>(t.sizes().data(), t.sizes().size())),
          layout};
}
inline VectorView vview(const Tensor* t) {
  return t == nullptr || !t->defined() ? VectorView{} : VectorView{address(*t), library_dtype(*t), t->numel()};
}

// ----------------------------------------------------------------------------------------------
// Results

// A new tensor: on the CPU straight from its allocator (at::detail::empty_cpu: the dispatcher's
// at::empty adds a cost that shows at small shapes), elsewhere (meta, FakeTensor,
// symbolic sizes) through at::empty.
inline Tensor new_tensor(c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) return at::detail::empty_cpu(C10_AS_INTARRAYREF_SLOW(sizes), options);
  return at::empty_symint(sizes, options);
}

// What the forward returns: the output, the statistics backward needs (stat_a, stat_b), and in
// training the updated running statistics as new tensors (each of its buffer's shape and dtype;
// empty without running statistics, and in eval). The operator mutates none of its arguments: the
// Autograd kernel copies the new statistics into the buffers (autograd.cpp), an aten copy_ that
// torch.compile's functionalization handles as it handles torch's own BatchNorm, where a mutating
// custom operator would make inductor copy its input to the traced layout around every call.
// `skipped` (0-dim int64) is 1 when the non-finite guard kept the old running statistics: set by the CPU
// training forward; elsewhere (eval, meta) a 0 made here, so that batch_norm_eval allocates none.
struct ForwardResults {
  Tensor out, stat_a, stat_b, running_mean, running_var, skipped;
  Sextet tuple() const {
    return {out, stat_a, stat_b, running_mean, running_var,
            skipped.defined() ? skipped : at::zeros({}, out.options().dtype(at::kLong))};
  }
};
ForwardResults forward_results(const Tensor& input, const ForwardArgs& a, const Plan& p);

// grad_input, grad_weight and grad_bias. The last two are computed whether or not the forward had
// weight or bias (they are per-channel sums the library makes anyway); autograd hands on those that
// were inputs.
Triple backward_results(const Tensor& input, const OptTensor& weight, const Plan& p);

// A variant's training forward: the output, `n_rows` float64 vectors of `rows` values (the saved
// statistics, r and d), and the new running statistics.
struct VariantResults {
  Tensor out;
  std::vector<Tensor> rows;
  Tensor running_mean, running_var;
  Quint ghost_tuple() const { return {out, rows[0], rows[1], running_mean, running_var}; }
  Septet renorm_tuple() const { return {out, rows[0], rows[1], rows[2], rows[3], running_mean, running_var}; }
};
VariantResults variant_results(const ForwardArgs& a, const c10::SymInt& rows, int n_rows);

// Ghost BN's saved rows: one of C per virtual batch (ghost_batch_count, from metadata alone).
c10::SymInt ghost_rows(const Tensor& input, std::int64_t vbs);
// Batch Renorm's: one of C.
c10::SymInt channel_rows(const Tensor& input);

}  // namespace bnorm::torch_ops
