// The torch-side rules and the shapes of the results, shared by the CPU and Meta kernels
// (tensor_rules.hpp).
#include "tensor_rules.hpp"

#include <ATen/MemoryOverlap.h>

#include <string>
#include <utility>

namespace bnorm::torch_ops {

namespace {

// fn is the operator's name, or empty for a collective operator's checks, whose message is handed
// to the library's collective check (cpu.cpp) and gets its prefix and rank there.
[[noreturn]] void fail_value(const char* fn, const std::string& what) {
  if (*fn == '\0') TORCH_CHECK_VALUE(false, what);
  TORCH_CHECK_VALUE(false, fn, ": ", what);
}
[[noreturn]] void fail_type(const char* fn, const std::string& what) {
  if (*fn == '\0') TORCH_CHECK_TYPE(false, what);
  TORCH_CHECK_TYPE(false, fn, ": ", what);
}

// torch's Python name of a dtype (float32, int64, ...), which users read in their code.
std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(s);
  }
}

// The rules of a tensor argument that only torch knows: a CPU, dense, floating tensor of a dtype
// bnorm computes (float32, float64, bfloat16; float16 in float32).
void check_tensor_kind(const char* fn, const char* name, const Tensor& t) {
  if (t.layout() != at::kStrided)
    fail_type(fn, std::string(name) + ": expected a dense (strided) tensor, got layout " + c10::str(t.layout()));
  if (!t.device().is_cpu() && !t.device().is_meta())
    fail_type(fn, std::string(name) + ": expected a CPU tensor, got one on " + t.device().str() +
                      " (bnorm's kernels run on the CPU)");
  const auto s = t.scalar_type();
  if (s != at::kFloat && s != at::kDouble && s != at::kBFloat16 && s != at::kHalf)
    fail_type(fn, std::string(name) + ": expected float32, float64, bfloat16 or float16, got " + dtype_name(s));
}

// A tensor argument besides the input: its kind, and the input's device (a CPU input with a meta or
// CUDA weight would otherwise be dispatched by the weight's device).
void check_optional_kind(const char* fn, const char* name, const OptTensor& t, const Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  check_tensor_kind(fn, name, *t);
  if (t->device() != input.device())
    fail_type(fn, std::string(name) + ": expected a tensor on " + input.device().str() + " like input, got one on " +
                      t->device().str());
}

}  // namespace

void check_forward_kinds(const char* fn, const ForwardArgs& a) {
  check_tensor_kind(fn, "input", a.input);
  check_optional_kind(fn, "weight", a.weight, a.input);
  check_optional_kind(fn, "bias", a.bias, a.input);
  check_optional_kind(fn, "running_mean", a.running_mean, a.input);
  check_optional_kind(fn, "running_var", a.running_var, a.input);
  check_optional_kind(fn, "residual", a.residual, a.input);
  // The residual is added in the input's dtype: another dtype would be promoted by torch's eager
  // `bn(x) + t`, which one pass in one dtype cannot match, so it is refused.
  if (const Tensor* r = present(a.residual); r != nullptr && r->scalar_type() != a.input.scalar_type())
    fail_type(fn, "residual: expected dtype " + dtype_name(a.input.scalar_type()) + " (the input's), got " +
                      dtype_name(r->scalar_type()));
  for (const auto& [name, t] : {std::pair{"running_mean", present(a.running_mean)}, {"running_var", present(a.running_var)}})
    if (t != nullptr && t->requires_grad())
      fail_value(fn, std::string(name) +
                         ": expected a tensor that does not require grad (batch_norm is not differentiable with "
                         "respect to the running statistics), got one that does");
  // The buffers a training call writes (the Autograd kernel copies into both once the operator has
  // succeeded): checked here, so that the second copy cannot fail after the first has written.
  if (a.training)
    for (const auto& [name, t] : {std::pair{"running_mean", present(a.running_mean)}, {"running_var", present(a.running_var)}}) {
      if (t == nullptr) continue;
      if (t->is_inference() && !c10::InferenceMode::is_enabled())
        fail_value(fn, std::string(name) +
                           ": expected a tensor that can be updated in place, got an inference tensor outside "
                           "InferenceMode");
      if (at::has_internal_overlap(*t) == at::MemOverlap::Yes)
        fail_value(fn, std::string(name) +
                           ": expected a tensor that can be updated in place, got one whose elements share memory");
    }
}

// The shapes and dtypes of the forward's results, computed from metadata alone: the CPU kernel
// allocates with this and the Meta kernel returns it, so the two cannot disagree.
ForwardResults forward_results(const Tensor& input, const ForwardArgs& a, const Plan& p) {
  ForwardResults r;
  auto out_opts = input.options().dtype(input.scalar_type());
  r.out = new_tensor(input.sym_sizes(), out_opts.memory_format(p.format));
  const auto stat_dtype = a.training ? at::kDouble : p.vectors;
  const auto C = a.training && input.dim() >= 2 ? input.sym_size(1) : c10::SymInt(0);
  r.stat_a = new_tensor({C}, input.options().dtype(stat_dtype));
  r.stat_b = new_tensor({C}, input.options().dtype(stat_dtype));
  auto updated = [&](const OptTensor& t) {
    const Tensor* v = present(t);
    if (a.training && v != nullptr) return new_tensor(v->sym_sizes(), v->options().memory_format(at::MemoryFormat::Contiguous));
    return new_tensor({c10::SymInt(0)}, input.options().dtype(p.vectors));
  };
  r.running_mean = updated(a.running_mean);
  r.running_var = updated(a.running_var);
  return r;
}

// grad_weight and grad_bias are computed whether or not the forward had weight or bias (they are
// per-channel sums the library makes anyway); autograd hands on those that were inputs.
Triple backward_results(const Tensor& input, const OptTensor& weight, const Plan& p) {
  Tensor gi = new_tensor(input.sym_sizes(), input.options().memory_format(p.format));
  const Tensor* w = present(weight);
  // Both in weight's dtype (or the vectors' without weight); autograd casts grad_bias to bias's dtype
  // where it differs, as it casts every gradient to its input's.
  auto wopts = w ? w->options() : input.options().dtype(p.vectors);
  const auto C = input.dim() >= 2 ? input.sym_size(1) : c10::SymInt(0);
  return {gi, new_tensor({C}, wopts), new_tensor({C}, wopts)};
}

void check_backward_kinds(const char* fn, const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                          const OptTensor& output) {
  check_tensor_kind(fn, "input", input);
  check_optional_kind(fn, "weight", weight, input);
  check_optional_kind(fn, "output", output, input);
  check_optional_kind(fn, "grad_output", grad_output, input);
}

// Ghost BN's saved rows: one of C per virtual batch (ghost_batch_count, from metadata alone).
c10::SymInt ghost_rows(const Tensor& input, std::int64_t vbs) {
  if (input.dim() < 2 || vbs < 1) return c10::SymInt(0);  // the library refuses it, naming the argument
  return (input.sym_size(0) + (vbs - 1)) / vbs * input.sym_size(1);
}
c10::SymInt channel_rows(const Tensor& input) { return input.dim() >= 2 ? input.sym_size(1) : c10::SymInt(0); }

VariantResults variant_results(const ForwardArgs& a, const c10::SymInt& rows, int n_rows) {
  const ForwardResults fr = forward_results(a.input, a, plan_for(a.input));
  VariantResults r{fr.out, {}, fr.running_mean, fr.running_var};
  for (int i = 0; i < n_rows; ++i) r.rows.push_back(new_tensor({rows}, a.input.options().dtype(at::kDouble)));
  return r;
}

ForwardArgs variant_args(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  static const OptTensor none;
  return {input, weight, bias, running_mean, running_var, none, true, momentum, eps, false};
}

}  // namespace bnorm::torch_ops
