// bnorm's operators in torch's dispatcher: TORCH_LIBRARY(bnorm), its CPU, Meta and Autograd kernels.
//
// The public operators (what users and bnorm.torch's modules call):
//   bnorm::batch_norm(input, weight, bias, running_mean!, running_var!, training, momentum, eps)
//   bnorm::batch_norm_relu(...)                    the same, then ReLU, in one pass
//   bnorm::batch_norm_add_relu(input, residual, ...)   relu(batch_norm(input) + residual), in one pass
// and the ones they are made of, which the Autograd kernel calls and which torch.compile's graphs hold
// (none of them mutates an argument: ForwardResults):
//   bnorm::batch_norm_forward(...) -> (output, stat_a, stat_b, new_running_mean, new_running_var)
//   bnorm::batch_norm_eval(input, weight, bias, running_mean, running_var, residual, eps, relu) -> output
//   bnorm::batch_norm_backward(grad_output, input, weight, stat_a, stat_b, output, training, eps, relu)
//       -> (grad_input, grad_weight, grad_bias)
// stat_a and stat_b are what backward needs of its forward: in training the batch mean and
// 1/sqrt(var + eps) in float64, which the forward computes. In eval they are the running mean and
// variance, and the forward returns empty tensors for them (an inference call then pays for no
// copies); the Autograd kernel saves copies of the running statistics instead (frozen: a later
// training step may update the buffers before this backward runs).
//
// Why each piece is where it is (docs/torch-adapter.md):
//  - The CPU kernel calls the library (bnorm::batch_norm) with no Python in the path; the library
//    makes its own argument checks and throws before it writes, and its bnorm::Error becomes torch's
//    ValueError or TypeError (ErrorKind) with the library's message. Here are only the rules the
//    library cannot see (device, sparse layout, dtypes it has no kernels for) or that torch rules
//    differently (eps = 0 in eval, any momentum, an empty batch in training).
//  - The Meta kernel gives the CPU kernel's exact shapes, strides and dtypes without data, for the
//    meta device and for FakeTensor (torch.compile, torch.export).
//  - The Autograd kernel is a torch::autograd::Function that calls the forward and backward
//    operators through the dispatcher below autograd, so that AOTAutograd traces both into its graphs.
//  - Outputs are allocated by torch in the input's memory format (torch's suggest_memory_format,
//    which the Meta kernel reads too) and are never views, so in-place ops after BN (ReLU(inplace),
//    `out += identity`) work in both layouts.
//  - float16 runs in float32 (torch's CPU BN computes float16 in float32 too); bfloat16 and float16
//    per-channel vectors are computed in float32 copies that are written back after success.
#include "ops.hpp"

#include <bnorm/distributed.hpp>
#include <bnorm/functional.hpp>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace bnorm::torch_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

constexpr const char* kForwardName = "bnorm::batch_norm";
constexpr const char* kBackwardName = "bnorm::batch_norm_backward";

// torch accepts eps = 0 in eval (it divides by sqrt(running_var)); the library wants eps > 0, and the
// smallest double changes running_var + eps only where running_var is 0 or subnormal.
constexpr double kSmallestEps = std::numeric_limits<double>::denorm_min();

// fn is the operator's name, or empty for a collective operator's checks, whose message is handed
// to the library's collective check (local_problem) and gets its prefix and rank there.
[[noreturn]] void fail_value(const char* fn, const std::string& what) {
  if (*fn == '\0') TORCH_CHECK_VALUE(false, what);
  TORCH_CHECK_VALUE(false, fn, ": ", what);
}
[[noreturn]] void fail_type(const char* fn, const std::string& what) {
  if (*fn == '\0') TORCH_CHECK_TYPE(false, what);
  TORCH_CHECK_TYPE(false, fn, ": ", what);
}

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

bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The library's storage type of a tensor (float16 is computed as float32 and never reaches it).
DType library_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "bnorm: internal: no library dtype for ", t.scalar_type());
  }
}

// The rules of a tensor argument that only torch knows: a CPU, dense, floating tensor of a dtype
// bnorm computes (float32, float64, bfloat16; float16 in float32). `vector`: a per-channel vector,
// which may also be reduced when the input is not (torch's CPU BN takes them).
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

const Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// How the kernels see the input: its memory format (torch's choice, which the Meta kernel repeats),
// the dtype computed in, and the dtype of the per-channel vectors the library takes with it.
struct Plan {
  at::MemoryFormat format;
  Layout layout;
  at::ScalarType compute;  // the input's, float32 for float16
  at::ScalarType vectors;  // compute's, float32 for bfloat16
};

Plan plan_for(const Tensor& input) {
  Plan p{};
  p.format = input.dim() >= 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  p.layout = p.format == at::MemoryFormat::Contiguous ? Layout::ChannelsFirst : Layout::ChannelsLast;
  p.compute = input.scalar_type() == at::kHalf ? at::kFloat : input.scalar_type();
  p.vectors = p.compute == at::kBFloat16 ? at::kFloat : p.compute;
  return p;
}

// A dense tensor in the plan's format and compute dtype (the tensor itself when it already is).
Tensor dense(const Tensor& t, const Plan& p) {
  Tensor c = t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t;
  return c.contiguous(p.format);
}

// A per-channel vector as the library takes it: contiguous, in the plan's vector dtype when it is
// reduced (bfloat16 or float16); any other dtype goes as it is, for the library to judge.
Tensor vector_for(const Tensor& v, const Plan& p) {
  Tensor c = is_reduced(v.scalar_type()) ? v.to(p.vectors) : v;
  return c.contiguous();
}

// The memory of a tensor as the library reads it. An empty tensor's data_ptr() may be null, which
// the library reads as "absent"; a present empty one gets a valid address that is never read.
void* address(const Tensor& t) {
  alignas(64) static double nothing[8];
  return t.numel() == 0 ? static_cast<void*>(nothing) : t.data_ptr();
}

TensorView view(const Tensor& t, Layout layout) {
  return {address(t), library_dtype(t), Shape(std::span<const std::int64_t>(t.sizes().data(), t.sizes().size())),
          layout};
}
VectorView vview(const Tensor* t) { return t == nullptr || !t->defined() ? VectorView{} : VectorView{address(*t), library_dtype(*t), t->numel()}; }

std::int64_t channels(const Tensor& input) { return input.dim() >= 2 ? input.size(1) : 0; }

// ----------------------------------------------------------------------------------------------
// Collectives (SyncBatchNorm)

// bnorm's Communicator over a torch.distributed process group, found by its name (what Python's
// ProcessGroup.group_name gives, as torch's functional collectives take it). Gloo, and any backend
// whose allgather takes CPU tensors. Each exchange waits for its result: a rank that died, or a
// collective that outlives the group's timeout, raises here (torch's DistBackendError) instead of
// waiting forever.
class ProcessGroupCommunicator final : public bnorm::Communicator {
 public:
  explicit ProcessGroupCommunicator(const std::string& group_name) : pg_(c10d::resolve_process_group(group_name)) {}
  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  void all_gather(const void* in, std::size_t bytes, void* out) override {
    const auto n = static_cast<std::int64_t>(bytes);
    const auto opts = at::TensorOptions().dtype(at::kByte);
    // Gloo reads the input and writes the outputs where they are: no copies.
    std::vector<Tensor> input{at::from_blob(const_cast<void*>(in), {n}, opts)};
    std::vector<std::vector<Tensor>> output(1);
    for (int r = 0; r < size(); ++r)
      output[0].push_back(at::from_blob(static_cast<char*>(out) + static_cast<std::size_t>(r) * bytes, {n}, opts));
    pg_->allgather(output, input)->wait();
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
};

// Runs torch-side checks (made with fn = "", so their messages are bare "<argument>: ..."). For a
// collective operator a failure must not raise here: the other ranks would wait for this one in the
// library's collective check. It is handed to that check instead (sync_batch_norm_refuse), which
// raises it on every rank.
template <class F>
void check_collectively(bnorm::Communicator& comm, bool backward, F&& checks) {
  std::string what;
  ErrorKind kind = ErrorKind::Value;
  try {
    checks();
    return;
  } catch (const c10::TypeError& e) {
    what = e.what_without_backtrace();
    kind = ErrorKind::Type;
  } catch (const c10::Error& e) {
    what = e.what_without_backtrace();
  }
  call_library([&] { bnorm::sync_batch_norm_refuse(comm, backward, what, kind); });
}

// ----------------------------------------------------------------------------------------------
// Forward

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
};

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
  // The buffers a training call writes (call_forward copies into both once the operator has
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
  // torch's rule in eval is eps >= 0 (0 reaches the library, whose rule is eps > 0, as kSmallestEps);
  // in training the two agree and the library checks.
  if (!a.training && !(std::isfinite(a.eps) && a.eps >= 0.0))
    fail_value(fn, "eps: expected a finite value >= 0 in eval, got " + c10::str(a.eps));
}

// A new tensor: on the CPU straight from its allocator (at::detail::empty_cpu: the dispatcher's
// at::empty costs some 0.3 us a call, measurable at small shapes), elsewhere (meta, FakeTensor,
// symbolic sizes) through at::empty.
Tensor new_tensor(c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) return at::detail::empty_cpu(C10_AS_INTARRAYREF_SLOW(sizes), options);
  return at::empty_symint(sizes, options);
}

// What the forward returns: the output, the statistics backward needs (stat_a, stat_b), and in
// training the updated running statistics as new tensors (each of its buffer's shape and dtype;
// empty without running statistics, and in eval). The operator mutates none of its arguments: the
// Autograd kernel copies the new statistics into the buffers (call_forward), an aten copy_ that
// torch.compile's functionalization handles as it handles torch's own BatchNorm, where a mutating
// custom operator would make inductor copy its input to the traced layout around every call.
struct ForwardResults {
  Tensor out, stat_a, stat_b, running_mean, running_var;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tuple() const {
    return {out, stat_a, stat_b, running_mean, running_var};
  }
};

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

// The running statistic a training call updates in place: the new result tensor `updated`, holding
// the old values first, or a float32 work copy of a reduced-precision one (as vector_for: any other
// dtype as it is, for the library to judge); copy_back puts it into `updated` after success.
Tensor training_copy(const Tensor& old, const Tensor& updated, const Plan& p) {
  const auto dtype = is_reduced(old.scalar_type()) ? p.vectors : old.scalar_type();
  Tensor t = updated.scalar_type() == dtype ? updated : at::empty_like(updated, updated.options().dtype(dtype));
  if (old.scalar_type() == dtype && old.is_contiguous())  // the common case, without a dispatched copy_
    std::memcpy(t.data_ptr(), old.data_ptr(), static_cast<std::size_t>(old.nbytes()));
  else
    t.copy_(old);
  return t;
}
void copy_back(const Tensor& work, const Tensor& result) {
  if (work.defined() && !work.is_same(result)) result.copy_(work);
}

// torch takes any momentum; the library's running update takes [0, 1]. Outside it the library runs
// with momentum 0 and this applies torch's update from the saved float64 statistics.
void update_running_outside_range(const Tensor& rm, const Tensor& rv, const Tensor& mean, const Tensor& invstd,
                                  double momentum, double eps, std::int64_t m) {
  at::NoGradGuard no_grad;
  const Tensor var = (invstd.pow(-2) - eps).clamp_min(0) * (static_cast<double>(m) / static_cast<double>(m - 1));
  rm.copy_(rm.to(at::kDouble) * (1.0 - momentum) + mean * momentum);
  rv.copy_(rv.to(at::kDouble) * (1.0 - momentum) + var * momentum);
}

// The CPU forward; with a communicator, SyncBatchNorm's (training, batch statistics of every rank's
// batch together: bnorm::sync_batch_norm, which also takes each rank's empty batch and momentum as
// they come, with the same rules on every rank).
ForwardResults forward_cpu(const ForwardArgs& a, bnorm::Communicator* comm = nullptr) {
  if (comm != nullptr)
    check_collectively(*comm, false, [&] { check_forward_kinds("", a); });
  else
    check_forward_kinds(kForwardName, a);
  const Plan p = plan_for(a.input);
  const Tensor x = dense(a.input, p);
  ForwardResults r = forward_results(a.input, a, p);
  Tensor &sa = r.stat_a, &sb = r.stat_b;
  // The library writes the compute dtype; a float16 output is converted once it is done.
  Tensor out = a.input.scalar_type() == at::kHalf ? at::empty_like(x) : r.out;
  Tensor w = present(a.weight) ? vector_for(*a.weight, p) : Tensor();
  Tensor b = present(a.bias) ? vector_for(*a.bias, p) : Tensor();
  Tensor res = present(a.residual) ? dense(*a.residual, p) : Tensor();
  // The running statistics the library reads (eval) or updates in place (training: the new tensors
  // of the results, holding the old values first, or float32 work copies of reduced-precision ones).
  const Tensor* rm0 = present(a.running_mean);
  const Tensor* rv0 = present(a.running_var);
  auto working = [&](const Tensor* old, Tensor& updated) {
    if (old == nullptr) return Tensor();
    return a.training ? training_copy(*old, updated, p) : vector_for(*old, p);
  };
  Tensor rm = working(rm0, r.running_mean);
  Tensor rv = working(rv0, r.running_var);
  const bool in_range = comm != nullptr || (a.momentum >= 0.0 && a.momentum <= 1.0);
  const bool empty_batch = comm == nullptr && a.training && x.dim() >= 2 && channels(x) > 0 && x.numel() == 0;
  // Outside [0, 1] the library runs momentum 0 and the update is made below; a batch of no values
  // changes nothing whatever the momentum (torch's behaviour).
  const bool update_here = a.training && !in_range && rm0 && rv0 && !empty_batch;
  const double eps = !a.training && a.eps == 0.0 ? kSmallestEps : a.eps;
  const Options options{.training = a.training,
                        .momentum = in_range ? a.momentum : 0.0,
                        .eps = eps,
                        .activation = a.relu ? Activation::Relu : Activation::None,
                        // torch allocated the output just now (forward_results)
                        .outputs = OutputMemory::Fresh};
  const Affine affine{vview(w.defined() ? &w : nullptr), vview(b.defined() ? &b : nullptr)};
  const RunningStats running{vview(rm.defined() ? &rm : nullptr), vview(rv.defined() ? &rv : nullptr)};
  call_library([&] {
    if (empty_batch) {
      // torch returns an empty output and changes nothing; the library refuses a training batch of
      // no values (its more-than-one-value rule). Its eval form makes every other check, with
      // stand-ins for running statistics that training may go without, and has nothing to compute.
      const bool stand_ins = !rm.defined() && !rv.defined();
      Tensor zm = stand_ins ? at::zeros({channels(x)}, x.options().dtype(p.vectors)) : rm;
      Tensor zv = stand_ins ? at::ones({channels(x)}, x.options().dtype(p.vectors)) : rv;
      bnorm::batch_norm(view(x, p.layout), view(out, p.layout), RunningStats{vview(&zm), vview(&zv)}, affine,
                        Options{.training = false, .eps = eps, .activation = options.activation},
                        SavedStats{}, res.defined() ? ConstTensorView(view(res, p.layout)) : ConstTensorView{});
      return;
    }
    const SavedStats save = a.training ? SavedStats{vview(&sa), vview(&sb)} : SavedStats{};
    if (comm != nullptr) {
      bnorm::sync_batch_norm(*comm, view(x, p.layout), view(out, p.layout), running, affine, options, save);
      return;
    }
    bnorm::batch_norm(view(x, p.layout), view(out, p.layout), running, affine, options, save,
                      res.defined() ? ConstTensorView(view(res, p.layout)) : ConstTensorView{});
  });
  if (empty_batch) {
    sa.zero_();
    sb.zero_();
  }
  if (update_here) {
    std::int64_t m = x.size(0);
    for (std::int64_t d = 2; d < x.dim(); ++d) m *= x.size(d);
    update_running_outside_range(rm, rv, sa, sb, a.momentum, eps, m);
  }
  if (a.training) {  // the work copies into the results
    copy_back(rm, r.running_mean);
    copy_back(rv, r.running_var);
  }
  if (a.input.scalar_type() == at::kHalf) r.out.copy_(out);
  return r;
}

ForwardResults forward_meta(const ForwardArgs& a) {
  check_forward_kinds(kForwardName, a);
  return forward_results(a.input, a, plan_for(a.input));
}

using Quint = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Quint batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                             bool training, double momentum, double eps, bool relu) {
  return forward_cpu({input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu}).tuple();
}

Quint batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                              bool training, double momentum, double eps, bool relu) {
  return forward_meta({input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu})
      .tuple();
}

// The eval forward: the same kernel with training=false, under a schema that mutates nothing.
Tensor batch_norm_eval_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                           double eps, bool relu) {
  return forward_cpu({input, weight, bias, running_mean, running_var, residual, false, 0.0, eps, relu}).out;
}
Tensor batch_norm_eval_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                            double eps, bool relu) {
  return forward_meta({input, weight, bias, running_mean, running_var, residual, false, 0.0, eps, relu}).out;
}

// ----------------------------------------------------------------------------------------------
// Backward

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

// The CPU backward; with a communicator, SyncBatchNorm's (training: the per-channel sums are
// all-reduced, and grad_weight / grad_bias are this rank's part).
// The body of every backward operator after its torch-side checks: dense copies in the plan's
// format, the results, the library call `call(dy, state, options, grad_input, grads, plan)` with
// the state's input, output (relu) and weight filled in, and the copies into the results.
template <class Call>
Triple backward_common(const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const OptTensor& output,
                       bool relu, Call&& call) {
  const Plan p = plan_for(input);
  const Tensor x = dense(input, p);
  const Tensor dy = dense(grad_output.scalar_type() == input.scalar_type() ? grad_output : grad_output.to(input.scalar_type()), p);
  const Tensor y = present(output) && relu ? dense(*output, p) : Tensor();
  auto [gi_t, gw_t, gb_t] = backward_results(input, weight, p);
  Tensor gi = input.scalar_type() == at::kHalf ? at::empty_like(x) : gi_t;
  Tensor w = present(weight) ? vector_for(*weight, p) : Tensor();
  Tensor gw = gw_t.scalar_type() == p.vectors ? gw_t : at::empty_like(gw_t, gw_t.options().dtype(p.vectors));
  Tensor gb = gb_t.scalar_type() == p.vectors ? gb_t : at::empty_like(gb_t, gb_t.options().dtype(p.vectors));
  ForwardState state{.input = view(x, p.layout),
                     .output = y.defined() ? ConstTensorView(view(y, p.layout)) : ConstTensorView{},
                     .weight = vview(w.defined() ? &w : nullptr)};
  call_library([&] { call(view(dy, p.layout), state, view(gi, p.layout), ParamGrads{vview(&gw), vview(&gb)}, p); });
  if (x.numel() == 0) {  // torch's zeros (this rank's part, for SyncBatchNorm), where the library's would be 0 * invstd
    gw.zero_();
    gb.zero_();
  }
  copy_back(gi, gi_t);
  copy_back(gw, gw_t);
  copy_back(gb, gb_t);
  return {gi_t, gw_t, gb_t};
}

Triple backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& stat_a,
                    const Tensor& stat_b, const OptTensor& output, bool training, double eps, bool relu,
                    bnorm::Communicator* comm = nullptr) {
  if (comm != nullptr)
    check_collectively(*comm, true, [&] { check_backward_kinds("", grad_output, input, weight, output); });
  else
    check_backward_kinds(kBackwardName, grad_output, input, weight, output);
  const double kernel_eps = !training && eps == 0.0 ? kSmallestEps : eps;
  const Options options{.training = training, .eps = kernel_eps,
                        .activation = relu ? Activation::Relu : Activation::None,
                        .outputs = OutputMemory::Fresh};
  return backward_common(grad_output, input, weight, output, relu,
                         [&](ConstTensorView dy, ForwardState& state, TensorView gi, ParamGrads grads, const Plan& p) {
                           const Tensor sa = vector_for(stat_a, p), sb = vector_for(stat_b, p);
                           if (training)
                             state.saved = {vview(&sa), vview(&sb)};
                           else
                             state.running = {vview(&sa), vview(&sb)};
                           if (comm != nullptr)
                             bnorm::sync_batch_norm_backward(*comm, dy, state, options, gi, grads);
                           else
                             bnorm::batch_norm_backward(dy, state, options, gi, grads);
                         });
}

Triple batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                               const Tensor& stat_a, const Tensor& stat_b, const OptTensor& output, bool training,
                               double eps, bool relu) {
  return backward_cpu(grad_output, input, weight, stat_a, stat_b, output, training, eps, relu);
}

Triple batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                const Tensor&, const Tensor&, const OptTensor& output, bool, double, bool) {
  check_backward_kinds(kBackwardName, grad_output, input, weight, output);
  return backward_results(input, weight, plan_for(input));
}

// SyncBatchNorm's forward and backward (training only: its eval, with running statistics, is
// batch_norm_eval, which needs no other rank). Collective: every rank of the group calls them.
Quint sync_batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                                  double eps, c10::string_view group_name) {
  ProcessGroupCommunicator comm{std::string(group_name)};
  const OptTensor none;
  return forward_cpu({input, weight, bias, running_mean, running_var, none, true, momentum, eps, false}, &comm)
      .tuple();
}
Quint sync_batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                                   double eps, c10::string_view) {
  const OptTensor none;
  return forward_meta({input, weight, bias, running_mean, running_var, none, true, momentum, eps, false}).tuple();
}
Triple sync_batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                    const Tensor& mean, const Tensor& invstd, double eps, c10::string_view group_name) {
  ProcessGroupCommunicator comm{std::string(group_name)};
  return backward_cpu(grad_output, input, weight, mean, invstd, std::nullopt, true, eps, false, &comm);
}
Triple sync_batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                     const Tensor&, const Tensor&, double, c10::string_view) {
  check_backward_kinds(kBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

// ----------------------------------------------------------------------------------------------
// Autograd

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::batch_norm_forward", "")
                             .typed<Quint(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&, bool, double, double, bool)>();
  return op;
}

const auto& eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::batch_norm_eval", "")
                             .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, const OptTensor&, double, bool)>();
  return op;
}

// The forward through the dispatcher, then the running statistics' update in training (the operators
// mutate nothing: ForwardResults). In eval the operator with one result (the statistics results are
// then undefined).
Triple call_forward(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                    const OptTensor& running_var, const OptTensor& residual, bool training, double momentum,
                    double eps, bool relu) {
  if (!training)
    return {eval_op().call(input, weight, bias, running_mean, running_var, residual, eps, relu), Tensor(), Tensor()};
  auto [out, sa, sb, rm, rv] =
      forward_op().call(input, weight, bias, running_mean, running_var, residual, true, momentum, eps, relu);
  // The operator has succeeded: now the buffers change.
  if (const Tensor* t = present(running_mean)) t->copy_(rm);
  if (const Tensor* t = present(running_var)) t->copy_(rv);
  return {out, sa, sb};
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::batch_norm_backward", "")
                             .typed<Triple(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                           const Tensor&, const OptTensor&, bool, double, bool)>();
  return op;
}

// Double backward: bnorm computes first derivatives. A backward run with create_graph=True gives
// gradients whose own backward raises this message when it is reached (torch's once_differentiable
// behaviour), instead of torch's unclear "element 0 of tensors does not require grad".
constexpr const char* kDoubleBackward =
    "bnorm::batch_norm: double backward is not supported (bnorm computes first derivatives only); "
    "for higher-order gradients use torch.nn.functional.batch_norm";

void attach_double_backward_error(torch::autograd::variable_list& grads, const Tensor& grad_output,
                                  const Tensor& input, const Tensor& weight) {
  using namespace torch::autograd;
  if (!GradMode::is_enabled() || !compute_requires_grad(grad_output, input, weight)) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(kDoubleBackward);
  node->set_next_edges(collect_next_edges(grad_output, input, weight));
  for (auto& g : grads)
    if (g.defined()) set_history(g, node);
}

// Which of weight and bias the forward had: backward returns gradients for those only (the
// operators' first three arguments in both Functions below).
void save_which_params(torch::autograd::AutogradContext* ctx, const OptTensor& weight, const OptTensor& bias) {
  ctx->saved_data["weight"] = present(weight) != nullptr;
  ctx->saved_data["bias"] = present(bias) != nullptr;
}
void set_grads(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list& result, const Tensor& gi,
               const Tensor& gw, const Tensor& gb) {
  result[0] = gi;
  if (ctx->saved_data["weight"].toBool()) result[1] = gw;
  if (ctx->saved_data["bias"].toBool()) result[2] = gb;
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& residual, bool training, double momentum, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sa, sb] = call_forward(input, weight, bias, running_mean, running_var, residual, training, momentum,
                                      eps, relu);
    // In eval, backward reads the running statistics as they are now (see the top of the file).
    if (!training) {
      sa = running_mean.value().clone();
      sb = running_var.value().clone();
    }
    // The output is saved only where backward reads it (ReLU's mask): an unsaved output may be
    // changed in place afterwards, as `out += identity` does.
    ctx->save_for_backward({input, weight.value_or(Tensor()), sa, sb, relu ? out : Tensor()});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = present(residual) != nullptr;
    save_which_params(ctx, weight, bias);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& out = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const Tensor& g = grads[0];
    torch::autograd::variable_list result(10);
    if (!g.defined()) return result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gi, gw, gb] = backward_op().call(g, input, weight.defined() ? OptTensor(weight) : std::nullopt, saved[2], saved[3],
                                             relu ? OptTensor(out) : std::nullopt, ctx->saved_data["training"].toBool(),
                                             ctx->saved_data["eps"].toDouble(), relu);
      set_grads(ctx, result, gi, gw, gb);
      // The residual enters before the ReLU: its gradient is grad_output where the output is > 0.
      if (ctx->saved_data["residual"].toBool()) result[5] = at::threshold_backward(g, out, 0);
    }
    attach_double_backward_error(result, g, input, weight);
    return result;
  }
};

bool wants_graph(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  auto req = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return input.requires_grad() || req(weight) || req(bias) || req(residual);
}

Tensor fused_autograd(const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                      double eps, bool relu) {
  if (!wants_graph(input, weight, bias, residual)) {  // no graph to record: straight to the kernels
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(
        call_forward(input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu));
  }
  return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                                  relu);
}

Tensor fused_composite(const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                       double eps, bool relu) {
  return std::get<0>(
      call_forward(input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu));
}

// The three public operators, for each kernel (autograd or below it).
template <bool Autograd>
Tensor batch_norm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                     const OptTensor& running_var, bool training, double momentum, double eps) {
  return (Autograd ? fused_autograd : fused_composite)(input, std::nullopt, weight, bias, running_mean, running_var,
                                                       training, momentum, eps, false);
}
template <bool Autograd>
Tensor batch_norm_relu_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                          double eps) {
  return (Autograd ? fused_autograd : fused_composite)(input, std::nullopt, weight, bias, running_mean, running_var,
                                                       training, momentum, eps, true);
}
template <bool Autograd>
Tensor batch_norm_add_relu_op(const Tensor& input, const Tensor& residual, const OptTensor& weight,
                              const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                              bool training, double momentum, double eps) {
  return (Autograd ? fused_autograd : fused_composite)(input, residual, weight, bias, running_mean, running_var,
                                                       training, momentum, eps, true);
}

// SyncBatchNorm: bnorm::sync_batch_norm(input, weight, bias, running_mean!, running_var!, momentum,
// eps, group_name), always with batch statistics (those of every rank's batch together).
const auto& sync_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::sync_batch_norm_forward", "")
                             .typed<Quint(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, double, double, c10::string_view)>();
  return op;
}
const auto& sync_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::sync_batch_norm_backward", "")
                             .typed<Triple(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                           const Tensor&, double, c10::string_view)>();
  return op;
}

// The forward, then the buffers' update once every rank's call has succeeded (as call_forward).
std::tuple<Tensor, Tensor, Tensor> call_sync_forward(const Tensor& input, const OptTensor& weight,
                                                     const OptTensor& bias, const OptTensor& running_mean,
                                                     const OptTensor& running_var, double momentum, double eps,
                                                     c10::string_view group) {
  auto [out, mean, invstd, rm, rv] =
      sync_forward_op().call(input, weight, bias, running_mean, running_var, momentum, eps, group);
  if (const Tensor* t = present(running_mean)) t->copy_(rm);
  if (const Tensor* t = present(running_var)) t->copy_(rv);
  return {out, mean, invstd};
}

struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        double momentum, double eps, c10::string_view group) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd] = call_sync_forward(input, weight, bias, running_mean, running_var, momentum, eps, group);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["group"] = std::string(group);
    save_which_params(ctx, weight, bias);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& weight = saved[1];
    torch::autograd::variable_list result(8);
    // Every rank must take part in the backward's collective, also one whose output got no gradient.
    const Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(input);
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      const std::string group = ctx->saved_data["group"].toStringRef();
      auto [gi, gw, gb] = sync_backward_op().call(g, input, weight.defined() ? OptTensor(weight) : std::nullopt,
                                                  saved[2], saved[3], ctx->saved_data["eps"].toDouble(), group);
      set_grads(ctx, result, gi, gw, gb);
    }
    attach_double_backward_error(result, g, input, weight);
    return result;
  }
};

template <bool Autograd>
Tensor sync_batch_norm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
                          c10::string_view group) {
  if (Autograd && wants_graph(input, weight, bias, std::nullopt))
    return SyncBatchNormFunction::apply(input, weight, bias, running_mean, running_var, momentum, eps, group);
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::get<0>(call_sync_forward(input, weight, bias, running_mean, running_var, momentum, eps, group));
}

// The thread count of this copy of the library. The Python package holds two (the extension's and
// this one's), so bnorm.set_num_threads sets both through these.
// ----------------------------------------------------------------------------------------------
// The variants: Ghost Batch Normalization and Batch Renormalization (bnorm::ghost_batch_norm,
// bnorm::batch_renorm). Their training forwards and backwards are operators of their own, built as
// batch_norm's are (no mutation: the Autograd kernel copies the new running statistics); their eval
// is batch_norm's. Unlike batch_norm's, their momentum is the library's, in [0, 1].

constexpr const char* kGhostName = "bnorm::ghost_batch_norm";
constexpr const char* kGhostBackwardName = "bnorm::ghost_batch_norm_backward";
constexpr const char* kRenormName = "bnorm::batch_renorm";
constexpr const char* kRenormBackwardName = "bnorm::batch_renorm_backward";

// A variant's training forward: the output, `n_rows` float64 vectors of `rows` values (the saved
// statistics, r and d), and the new running statistics.
struct VariantResults {
  Tensor out;
  std::vector<Tensor> rows;
  Tensor running_mean, running_var;
};

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

// The CPU body of a variant's training forward: torch-side checks, dense copies, the library call
// `call(x, out, running, affine, options, rows)`, then the work copies into the results.
template <class Call>
VariantResults variant_forward(const char* fn, const ForwardArgs& a, const c10::SymInt& rows, int n_rows,
                               Call&& call) {
  check_forward_kinds(fn, a);
  const Plan p = plan_for(a.input);
  const Tensor x = dense(a.input, p);
  VariantResults r = variant_results(a, rows, n_rows);
  Tensor out = a.input.scalar_type() == at::kHalf ? at::empty_like(x) : r.out;
  const Tensor w = present(a.weight) ? vector_for(*a.weight, p) : Tensor();
  const Tensor b = present(a.bias) ? vector_for(*a.bias, p) : Tensor();
  const Tensor* rm0 = present(a.running_mean);
  const Tensor* rv0 = present(a.running_var);
  const Tensor rm = rm0 != nullptr ? training_copy(*rm0, r.running_mean, p) : Tensor();
  const Tensor rv = rv0 != nullptr ? training_copy(*rv0, r.running_var, p) : Tensor();
  const Options options{.training = true, .momentum = a.momentum, .eps = a.eps, .outputs = OutputMemory::Fresh};
  const Affine affine{vview(w.defined() ? &w : nullptr), vview(b.defined() ? &b : nullptr)};
  const RunningStats running{vview(rm.defined() ? &rm : nullptr), vview(rv.defined() ? &rv : nullptr)};
  call_library([&] { call(view(x, p.layout), view(out, p.layout), running, affine, options, r.rows); });
  copy_back(rm, r.running_mean);
  copy_back(rv, r.running_var);
  if (a.input.scalar_type() == at::kHalf) r.out.copy_(out);
  return r;
}

ForwardArgs variant_args(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  static const OptTensor none;
  return {input, weight, bias, running_mean, running_var, none, true, momentum, eps, false};
}

Quint ghost_forward_tuple(const VariantResults& r) {
  return {r.out, r.rows[0], r.rows[1], r.running_mean, r.running_var};
}

Quint ghost_batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                                   double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  return ghost_forward_tuple(variant_forward(
      kGhostName, a, ghost_rows(input, vbs), 2,
      [&](ConstTensorView x, TensorView out, RunningStats running, Affine affine, const Options& options,
          std::vector<Tensor>& rows) {
        bnorm::ghost_batch_norm(x, out, vbs, running, affine, options, {vview(&rows[0]), vview(&rows[1])});
      }));
}
Quint ghost_batch_norm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                                    double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  check_forward_kinds(kGhostName, a);
  return ghost_forward_tuple(variant_results(a, ghost_rows(input, vbs), 2));
}

using Septet = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
Septet renorm_forward_tuple(const VariantResults& r) {
  return {r.out, r.rows[0], r.rows[1], r.rows[2], r.rows[3], r.running_mean, r.running_var};
}

Septet batch_renorm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var, double r_max,
                                double d_max, double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  return renorm_forward_tuple(variant_forward(
      kRenormName, a, channel_rows(input), 4,
      [&](ConstTensorView x, TensorView out, RunningStats running, Affine affine, const Options& options,
          std::vector<Tensor>& rows) {
        bnorm::batch_renorm(x, out, running, affine, options, {r_max, d_max}, {vview(&rows[0]), vview(&rows[1])},
                            {vview(&rows[2]), vview(&rows[3])});
      }));
}
Septet batch_renorm_forward_meta(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var, double, double,
                                 double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  check_forward_kinds(kRenormName, a);
  return renorm_forward_tuple(variant_results(a, channel_rows(input), 4));
}

constexpr Options kVariantBackward{.training = true, .outputs = OutputMemory::Fresh};

Triple ghost_batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                     const Tensor& save_mean, const Tensor& save_invstd, std::int64_t vbs) {
  check_backward_kinds(kGhostBackwardName, grad_output, input, weight, std::nullopt);
  return backward_common(grad_output, input, weight, std::nullopt, false,
                         [&](ConstTensorView dy, ForwardState& state, TensorView gi, ParamGrads grads, const Plan& p) {
                           const Tensor sm = vector_for(save_mean, p), si = vector_for(save_invstd, p);
                           state.saved = {vview(&sm), vview(&si)};
                           bnorm::ghost_batch_norm_backward(dy, state, vbs, kVariantBackward, gi, grads);
                         });
}
Triple ghost_batch_norm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                      const Tensor&, const Tensor&, std::int64_t) {
  check_backward_kinds(kGhostBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

Triple batch_renorm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                 const Tensor& save_mean, const Tensor& save_invstd, const Tensor& r,
                                 const Tensor& d) {
  check_backward_kinds(kRenormBackwardName, grad_output, input, weight, std::nullopt);
  return backward_common(grad_output, input, weight, std::nullopt, false,
                         [&](ConstTensorView dy, ForwardState& state, TensorView gi, ParamGrads grads, const Plan& p) {
                           const Tensor sm = vector_for(save_mean, p), si = vector_for(save_invstd, p),
                                        rc = vector_for(r, p), dc = vector_for(d, p);
                           state.saved = {vview(&sm), vview(&si)};
                           bnorm::batch_renorm_backward(dy, state, {vview(&rc), vview(&dc)}, kVariantBackward, gi,
                                                        grads);
                         });
}
Triple batch_renorm_backward_meta(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  check_backward_kinds(kRenormBackwardName, grad_output, input, weight, std::nullopt);
  return backward_results(input, weight, plan_for(input));
}

// The training forward through the dispatcher, then the new running statistics into the buffers.
Quint call_ghost_forward(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                         double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::ghost_batch_norm_forward", "")
                             .typed<Quint(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, std::int64_t, double, double)>();
  Quint r = op.call(input, weight, bias, running_mean, running_var, vbs, momentum, eps);
  if (const Tensor* t = present(running_mean)) t->copy_(std::get<3>(r));
  if (const Tensor* t = present(running_var)) t->copy_(std::get<4>(r));
  return r;
}
Septet call_renorm_forward(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, double r_max, double d_max,
                           double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::batch_renorm_forward", "")
                             .typed<Septet(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, double, double, double, double)>();
  Septet r = op.call(input, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps);
  if (const Tensor* t = present(running_mean)) t->copy_(std::get<5>(r));
  if (const Tensor* t = present(running_var)) t->copy_(std::get<6>(r));
  return r;
}

struct GhostFunction : public torch::autograd::Function<GhostFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        std::int64_t vbs, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd, rm, rv] = call_ghost_forward(input, weight, bias, running_mean, running_var, vbs,
                                                          momentum, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["vbs"] = vbs;
    save_which_params(ctx, weight, bias);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnorm::ghost_batch_norm_backward", "")
                               .typed<Triple(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                             const Tensor&, std::int64_t)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    torch::autograd::variable_list result(8);
    const Tensor& g = grads[0];
    if (!g.defined()) return result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gi, gw, gb] = op.call(g, saved[0], weight.defined() ? OptTensor(weight) : std::nullopt, saved[2],
                                  saved[3], ctx->saved_data["vbs"].toInt());
      set_grads(ctx, result, gi, gw, gb);
    }
    attach_double_backward_error(result, g, saved[0], weight);
    return result;
  }
};

struct RenormFunction : public torch::autograd::Function<RenormFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        double r_max, double d_max, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd, r, d, rm, rv] =
        call_renorm_forward(input, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd, r, d});
    save_which_params(ctx, weight, bias);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnorm::batch_renorm_backward", "")
                               .typed<Triple(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    torch::autograd::variable_list result(9);
    const Tensor& g = grads[0];
    if (!g.defined()) return result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gi, gw, gb] = op.call(g, saved[0], weight.defined() ? OptTensor(weight) : std::nullopt, saved[2],
                                  saved[3], saved[4], saved[5]);
      set_grads(ctx, result, gi, gw, gb);
    }
    attach_double_backward_error(result, g, saved[0], weight);
    return result;
  }
};

// The public operators: in eval batch_norm's (with its autograd), in training their own.
template <bool Autograd>
Tensor ghost_batch_norm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                           bool training, double momentum, double eps) {
  if (!training)
    return (Autograd ? fused_autograd : fused_composite)(input, std::nullopt, weight, bias, running_mean, running_var,
                                                         false, momentum, eps, false);
  if (Autograd && wants_graph(input, weight, bias, std::nullopt))
    return GhostFunction::apply(input, weight, bias, running_mean, running_var, vbs, momentum, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::get<0>(call_ghost_forward(input, weight, bias, running_mean, running_var, vbs, momentum, eps));
}

template <bool Autograd>
Tensor batch_renorm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var, bool training, double r_max,
                       double d_max, double momentum, double eps) {
  if (!training)
    return (Autograd ? fused_autograd : fused_composite)(input, std::nullopt, weight, bias, running_mean, running_var,
                                                         false, momentum, eps, false);
  if (Autograd && wants_graph(input, weight, bias, std::nullopt))
    return RenormFunction::apply(input, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::get<0>(
      call_renorm_forward(input, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps));
}

void set_threads(std::int64_t n) {
  call_library([&] {
    if (n < 1 || n > std::numeric_limits<int>::max())
      throw bnorm::Error("bnorm::set_num_threads: n: expected >= 1, got " + std::to_string(n));
    bnorm::set_num_threads(static_cast<int>(n));
  });
}
std::int64_t threads() { return bnorm::num_threads(); }

}  // namespace

Tensor batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, bool training, double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnorm::batch_norm", "")
                             .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, bool, double, double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

}  // namespace bnorm::torch_ops

// The schemas. The running statistics are declared mutated ((a!), (b!)), which torch.compile and
// torch.export functionalize; every result is a new tensor (no aliasing of inputs).
TORCH_LIBRARY(bnorm, m) {
  // flexible_layout: the kernels take either dense layout, so inductor may hand them its own choice
  // (channels_last after its convolutions) instead of copying to the eager strides around every call.
  const std::vector<at::Tag> kLayout{at::Tag::flexible_layout};
#define BNORM_COMMON_ARGS \
  "Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps"
  m.def("batch_norm(Tensor input, " BNORM_COMMON_ARGS ") -> Tensor", kLayout);
  m.def("batch_norm_relu(Tensor input, " BNORM_COMMON_ARGS ") -> Tensor", kLayout);
  m.def("batch_norm_add_relu(Tensor input, Tensor residual, " BNORM_COMMON_ARGS ") -> Tensor", kLayout);
#undef BNORM_COMMON_ARGS
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? residual, bool training, float momentum, float eps, bool relu) "
      "-> (Tensor output, Tensor stat_a, Tensor stat_b, Tensor new_running_mean, Tensor new_running_var)",
      kLayout);
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? residual, float eps, bool relu) -> Tensor",
      kLayout);
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor stat_a, Tensor stat_b, "
      "Tensor? output, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
      kLayout);
  // SyncBatchNorm over a torch.distributed process group, named as ProcessGroup.group_name gives it.
  m.def(
      "sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, str group_name) -> Tensor",
      kLayout);
  m.def(
      "sync_batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, float momentum, float eps, str group_name) "
      "-> (Tensor output, Tensor mean, Tensor invstd, Tensor new_running_mean, Tensor new_running_var)",
      kLayout);
  m.def(
      "sync_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "float eps, str group_name) -> (Tensor, Tensor, Tensor)",
      kLayout);
  // Ghost Batch Normalization and Batch Renormalization (training forwards and backwards of their own).
  m.def(
      "ghost_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, int virtual_batch_size, bool training, float momentum, float eps) -> Tensor",
      kLayout);
  m.def(
      "ghost_batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, int virtual_batch_size, float momentum, float eps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, Tensor new_running_var)",
      kLayout);
  m.def(
      "ghost_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, int virtual_batch_size) -> (Tensor, Tensor, Tensor)",
      kLayout);
  m.def(
      "batch_renorm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float r_max, float d_max, float momentum, float eps) -> Tensor",
      kLayout);
  m.def(
      "batch_renorm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "float r_max, float d_max, float momentum, float eps) -> (Tensor output, Tensor save_mean, Tensor save_invstd, "
      "Tensor r, Tensor d, Tensor new_running_mean, Tensor new_running_var)",
      kLayout);
  m.def(
      "batch_renorm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "Tensor r, Tensor d) -> (Tensor, Tensor, Tensor)",
      kLayout);
  m.def("_set_num_threads(int n) -> ()", &bnorm::torch_ops::set_threads);
  m.def("_num_threads() -> int", &bnorm::torch_ops::threads);
}

namespace ops = bnorm::torch_ops;

TORCH_LIBRARY_IMPL(bnorm, CPU, m) {
  m.impl("batch_norm_forward", &ops::batch_norm_forward_cpu);
  m.impl("batch_norm_eval", &ops::batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &ops::batch_norm_backward_cpu);
  m.impl("sync_batch_norm_forward", &ops::sync_batch_norm_forward_cpu);
  m.impl("sync_batch_norm_backward", &ops::sync_batch_norm_backward_cpu);
  m.impl("ghost_batch_norm_forward", &ops::ghost_batch_norm_forward_cpu);
  m.impl("ghost_batch_norm_backward", &ops::ghost_batch_norm_backward_cpu);
  m.impl("batch_renorm_forward", &ops::batch_renorm_forward_cpu);
  m.impl("batch_renorm_backward", &ops::batch_renorm_backward_cpu);
}

// Tensors that are not dense CPU ones reach the CPU kernel's first check, which names them (instead
// of torch's "Could not run ... with arguments from the 'CUDA' backend").
#define BNORM_REFUSE_ON(Key)                                        \
  TORCH_LIBRARY_IMPL(bnorm, Key, m) {                               \
    m.impl("batch_norm_forward", &ops::batch_norm_forward_cpu);     \
    m.impl("batch_norm_eval", &ops::batch_norm_eval_cpu);           \
    m.impl("batch_norm_backward", &ops::batch_norm_backward_cpu);   \
    m.impl("sync_batch_norm_forward", &ops::sync_batch_norm_forward_cpu);   \
    m.impl("sync_batch_norm_backward", &ops::sync_batch_norm_backward_cpu); \
    m.impl("ghost_batch_norm_forward", &ops::ghost_batch_norm_forward_cpu); \
    m.impl("ghost_batch_norm_backward", &ops::ghost_batch_norm_backward_cpu); \
    m.impl("batch_renorm_forward", &ops::batch_renorm_forward_cpu);         \
    m.impl("batch_renorm_backward", &ops::batch_renorm_backward_cpu);       \
  }
BNORM_REFUSE_ON(CUDA)
BNORM_REFUSE_ON(SparseCPU)
BNORM_REFUSE_ON(SparseCUDA)
#undef BNORM_REFUSE_ON

TORCH_LIBRARY_IMPL(bnorm, Meta, m) {
  m.impl("batch_norm_forward", &ops::batch_norm_forward_meta);
  m.impl("batch_norm_eval", &ops::batch_norm_eval_meta);
  m.impl("batch_norm_backward", &ops::batch_norm_backward_meta);
  m.impl("sync_batch_norm_forward", &ops::sync_batch_norm_forward_meta);
  m.impl("sync_batch_norm_backward", &ops::sync_batch_norm_backward_meta);
  m.impl("ghost_batch_norm_forward", &ops::ghost_batch_norm_forward_meta);
  m.impl("ghost_batch_norm_backward", &ops::ghost_batch_norm_backward_meta);
  m.impl("batch_renorm_forward", &ops::batch_renorm_forward_meta);
  m.impl("batch_renorm_backward", &ops::batch_renorm_backward_meta);
}

// Below autograd (inference mode, or inside the autograd kernel's redispatch), the public operators
// are their forward's first result, for any backend the forward has a kernel for.
TORCH_LIBRARY_IMPL(bnorm, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &ops::batch_norm_op<false>);
  m.impl("batch_norm_relu", &ops::batch_norm_relu_op<false>);
  m.impl("batch_norm_add_relu", &ops::batch_norm_add_relu_op<false>);
  m.impl("sync_batch_norm", &ops::sync_batch_norm_op<false>);
  m.impl("ghost_batch_norm", &ops::ghost_batch_norm_op<false>);
  m.impl("batch_renorm", &ops::batch_renorm_op<false>);
}

TORCH_LIBRARY_IMPL(bnorm, Autograd, m) {
  m.impl("batch_norm", &ops::batch_norm_op<true>);
  m.impl("batch_norm_relu", &ops::batch_norm_relu_op<true>);
  m.impl("batch_norm_add_relu", &ops::batch_norm_add_relu_op<true>);
  m.impl("sync_batch_norm", &ops::sync_batch_norm_op<true>);
  m.impl("ghost_batch_norm", &ops::ghost_batch_norm_op<true>);
  m.impl("batch_renorm", &ops::batch_renorm_op<true>);
}
