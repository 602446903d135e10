// The kernels of the PUBLIC rows (op_table.hpp): `name_op<true>` for the Autograd key and
// `name_op<false>` for CompositeExplicitAutograd (below autograd: inference mode, or a redispatch).
//
// Each public operator calls its forward operator through the dispatcher, below autograd, so that
// AOTAutograd traces the forward and the backward operators into its graphs; the forward operators
// mutate nothing, and the running statistics are copied into the buffers here once the forward has
// succeeded. Where a graph is recorded, one template, OpFunction<Op, Self>, is the torch::autograd::Function
// of every operator: Op says how to call the forward, what to save (a struct of named fields) and how
// to call the backward.
#include "op_table.hpp"
#include "tensor_rules.hpp"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <tuple>
#include <vector>

namespace bnorm::torch_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------------------------
// What a graph node keeps: a struct whose `fields(v)` names each member once, v("name", member).
// Tensors go through save_for_backward (version checks, saved-tensor hooks), the rest into
// saved_data under their names.

struct Saver {
  AutogradContext* ctx;
  std::vector<Tensor> tensors;
  void operator()(const char*, const Tensor& t) { tensors.push_back(t); }
  template <class T>
  void operator()(const char* name, const T& value) {
    ctx->saved_data[name] = value;
  }
};

struct Loader {
  AutogradContext* ctx;
  variable_list tensors;
  std::size_t next = 0;
  void operator()(const char*, Tensor& t) { t = tensors[next++]; }
  template <class T>
  void operator()(const char* name, T& value) {
    value = ctx->saved_data[name].to<T>();
  }
};

template <class Saved>
void save(AutogradContext* ctx, Saved& s) {
  Saver v{ctx, {}};
  s.fields(v);
  ctx->save_for_backward(v.tensors);
}

template <class Saved>
Saved load(AutogradContext* ctx) {
  Saved s;
  Loader v{ctx, ctx->get_saved_variables()};
  s.fields(v);
  return s;
}

// What every operator's node keeps of its first three arguments: the input, the weight (undefined
// when absent) and whether there was a bias; backward returns gradients for the parameters given.
struct SavedInputs {
  Tensor input, weight;
  bool bias_given = false;
  template <class V>
  void fields(V& v) {
    v("input", input);
    v("weight", weight);
    v("bias_given", bias_given);
  }
  SavedInputs() = default;
  SavedInputs(const Tensor& in, const OptTensor& w, const OptTensor& b)
      : input(in), weight(w.value_or(Tensor())), bias_given(present(b) != nullptr) {}
  OptTensor opt_weight() const { return weight.defined() ? OptTensor(weight) : std::nullopt; }
  void set_grads(variable_list& result, const Triple& grads) const {
    result[0] = std::get<0>(grads);
    if (weight.defined()) result[1] = std::get<1>(grads);
    if (bias_given) result[2] = std::get<2>(grads);
  }
};

// The forward operator's results, after their new running statistics (its last two results) have
// been copied into the buffers: the operator has succeeded, so now the buffers change.
template <class Results>
Results commit_running(Results r, const OptTensor& running_mean, const OptTensor& running_var) {
  constexpr std::size_t n = std::tuple_size_v<Results>;
  if (const Tensor* t = present(running_mean)) t->copy_(std::get<n - 2>(r));
  if (const Tensor* t = present(running_var)) t->copy_(std::get<n - 1>(r));
  return r;
}

// The non-finite guard's counter, checked before anything runs: a 0-dim int64 tensor, or absent.
void check_counter(const OptTensor& nonfinite_skips) {
  const Tensor* t = present(nonfinite_skips);
  if (t == nullptr) return;
  TORCH_CHECK_VALUE(t->dim() == 0 && t->scalar_type() == at::kLong, kForwardName,
                    ": nonfinite_skips: expected a 0-dim int64 tensor (the non-finite guard's counter), got a ",
                    t->dim(), "-dim ", t->scalar_type(), " tensor");
}

// The same for a forward with the non-finite guard's result last (Sextet: `skipped`, 1 when the
// library kept the old statistics, which the new ones then equal), counted into `nonfinite_skips`.
Quint commit_guarded(const Sextet& r, const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& nonfinite_skips) {
  auto [out, sa, sb, rm, rv, skipped] = r;
  if (const Tensor* t = present(nonfinite_skips)) t->add_(skipped);
  return commit_running(Quint{out, sa, sb, rm, rv}, running_mean, running_var);
}

// Double backward: bnorm computes first derivatives. A backward run with create_graph=True gives
// gradients whose own backward raises this message when it is reached (torch's once_differentiable
// behaviour), instead of torch's unclear "element 0 of tensors does not require grad".
constexpr const char* kDoubleBackward =
    "bnorm::batch_norm: double backward is not supported (bnorm computes first derivatives only); "
    "for higher-order gradients use torch.nn.functional.batch_norm";

void attach_double_backward_error(variable_list& grads, const Tensor& grad_output, const Tensor& input,
                                  const Tensor& weight) {
  using namespace torch::autograd;
  if (!GradMode::is_enabled() || !compute_requires_grad(grad_output, input, weight)) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(kDoubleBackward);
  node->set_next_edges(collect_next_edges(grad_output, input, weight));
  for (auto& g : grads)
    if (g.defined()) set_history(g, node);
}

template <class R, class... A>
constexpr std::size_t arity(R (*)(A...)) {
  return sizeof...(A);
}

// The torch::autograd::Function of an operator. Op provides:
//   call(args...)             the forward through the dispatcher (results, output first), buffers updated
//   Saved                     a struct of named fields (fields(v)) with `SavedInputs in`
//   save(results, args...)    the Saved of this call
//   backward(saved, g, grads) the backward operator's gradients into grads (one per argument of call)
//   kCollective               every rank must run the backward, also one whose output got no gradient
// Each operator's Function is a named subclass (struct BatchNormFunction : OpFunction<BatchNormOp,
// BatchNormFunction>), whose name its graph nodes carry (grad_fn.name()).
template <class Op, class Self>
struct OpFunction : public torch::autograd::Function<Self> {
  using OpType = Op;
  static constexpr std::size_t kArgs = arity(&Op::call);

  template <class... Args>
  static Tensor forward(AutogradContext* ctx, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto results = Op::call(args...);
    typename Op::Saved saved = Op::save(results, args...);
    torch_ops::save(ctx, saved);
    return std::get<0>(results);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = load<typename Op::Saved>(ctx);
    variable_list result(kArgs);
    Tensor g = grads[0];
    if (!g.defined()) {
      if (!Op::kCollective) return result;
      g = at::zeros_like(saved.in.input);
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      Op::backward(saved, g, result);
    }
    attach_double_backward_error(result, g, saved.in.input, saved.in.weight);
    return result;
  }
};

bool wants_graph(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  auto req = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return input.requires_grad() || req(weight) || req(bias) || req(residual);
}

// A public operator's kernel: with autograd and a graph to record, its Function; otherwise straight
// to the forward operator. `residual`: the argument besides input, weight and bias that takes a gradient.
template <class Function, bool Autograd, class... Args>
Tensor run(const OptTensor& residual, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
           const Args&... rest) {
  if (Autograd && wants_graph(input, weight, bias, residual)) return Function::apply(input, weight, bias, rest...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::get<0>(Function::OpType::call(input, weight, bias, rest...));
}

// ----------------------------------------------------------------------------------------------
// The operators

// BatchNorm and its fused forms. stat_a and stat_b are what backward needs of its forward: in training
// the batch mean and 1/sqrt(var + eps) in float64, which the forward computes. In eval they are the
// running mean and variance, and the forward returns empty tensors for them (an inference call then
// pays for no copies); the node saves copies of the running statistics instead (frozen: a later
// training step may update the buffers before this backward runs).
struct BatchNormOp {
  static constexpr bool kCollective = false;
  static Triple call(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                     bool training, double momentum, double eps, bool relu, const OptTensor& nonfinite_skips) {
    check_counter(nonfinite_skips);
    if (!training)
      return {dispatch::batch_norm_eval().call(input, weight, bias, running_mean, running_var, residual, eps, relu),
              Tensor(), Tensor()};
    auto [out, sa, sb, rm, rv] = commit_guarded(
        dispatch::batch_norm_forward().call(input, weight, bias, running_mean, running_var, residual, true, momentum,
                                            eps, relu, present(nonfinite_skips) != nullptr),
        running_mean, running_var, nonfinite_skips);
    return {out, sa, sb};
  }
  struct Saved {
    SavedInputs in;
    Tensor stat_a, stat_b, output;
    bool training = false, relu = false, residual = false;
    double eps = 0.0;
    template <class V>
    void fields(V& v) {
      in.fields(v);
      v("stat_a", stat_a);
      v("stat_b", stat_b);
      v("output", output);
      v("training", training);
      v("relu", relu);
      v("residual", residual);
      v("eps", eps);
    }
  };
  static Saved save(const Triple& r, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                    bool training, double, double eps, bool relu, const OptTensor&) {
    // In eval, backward reads the running statistics as they are now. The output is saved only where
    // backward reads it (ReLU's mask): an unsaved output may be changed in place afterwards, as
    // `out += identity` does.
    return {.in = {input, weight, bias},
            .stat_a = training ? std::get<1>(r) : running_mean.value().clone(),
            .stat_b = training ? std::get<2>(r) : running_var.value().clone(),
            .output = relu ? std::get<0>(r) : Tensor(),
            .training = training,
            .relu = relu,
            .residual = present(residual) != nullptr,
            .eps = eps};
  }
  static void backward(const Saved& s, const Tensor& g, variable_list& result) {
    s.in.set_grads(result, dispatch::batch_norm_backward().call(
                               g, s.in.input, s.in.opt_weight(), s.stat_a, s.stat_b,
                               s.relu ? OptTensor(s.output) : std::nullopt, s.training, s.eps, s.relu));
    // The residual enters before the ReLU: its gradient is grad_output where the output is > 0.
    if (s.residual) result[5] = at::threshold_backward(g, s.output, 0);
  }
};
struct BatchNormFunction final : OpFunction<BatchNormOp, BatchNormFunction> {};

// batch_norm and its fused forms: relu(bn(input) + residual), residual and relu optional.
template <bool Autograd>
Tensor run_batch_norm(const Tensor& input, const OptTensor& residual, bool relu, BNORM_BN_PARAMS) {
  return run<BatchNormFunction, Autograd>(residual, input, weight, bias, running_mean, running_var, residual, training,
                                          momentum, eps, relu, nonfinite_skips);
}

// SyncBatchNorm: always with batch statistics (those of every rank's batch together). Collective:
// every rank of the group calls the forward and the backward.
struct SyncBatchNormOp {
  static constexpr bool kCollective = true;
  static Triple call(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
                     c10::string_view group, const OptTensor& nonfinite_skips) {
    auto [out, mean, invstd, rm, rv] = commit_guarded(
        dispatch::sync_batch_norm_forward().call(input, weight, bias, running_mean, running_var, momentum, eps, group,
                                                 present(nonfinite_skips) != nullptr),
        running_mean, running_var, nonfinite_skips);
    return {out, mean, invstd};
  }
  struct Saved {
    SavedInputs in;
    Tensor mean, invstd;
    double eps = 0.0;
    std::string group;
    template <class V>
    void fields(V& v) {
      in.fields(v);
      v("mean", mean);
      v("invstd", invstd);
      v("eps", eps);
      v("group", group);
    }
  };
  static Saved save(const Triple& r, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor&, const OptTensor&, double, double eps, c10::string_view group,
                    const OptTensor&) {
    return {.in = {input, weight, bias},
            .mean = std::get<1>(r),
            .invstd = std::get<2>(r),
            .eps = eps,
            .group = std::string(group)};
  }
  static void backward(const Saved& s, const Tensor& g, variable_list& result) {
    s.in.set_grads(result, dispatch::sync_batch_norm_backward().call(g, s.in.input, s.in.opt_weight(), s.mean,
                                                                     s.invstd, s.eps, s.group));
  }
};
struct SyncBatchNormFunction final : OpFunction<SyncBatchNormOp, SyncBatchNormFunction> {};

// Ghost Batch Normalization and Batch Renormalization: in eval batch_norm's (with its autograd), in
// training their own forward and backward.
struct GhostOp {
  static constexpr bool kCollective = false;
  static Quint call(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs, double momentum,
                    double eps) {
    return commit_running(
        dispatch::ghost_batch_norm_forward().call(input, weight, bias, running_mean, running_var, vbs, momentum, eps),
        running_mean, running_var);
  }
  struct Saved {
    SavedInputs in;
    Tensor mean, invstd;
    std::int64_t vbs = 0;
    template <class V>
    void fields(V& v) {
      in.fields(v);
      v("mean", mean);
      v("invstd", invstd);
      v("vbs", vbs);
    }
  };
  static Saved save(const Quint& r, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor&, const OptTensor&, std::int64_t vbs, double, double) {
    return {.in = {input, weight, bias}, .mean = std::get<1>(r), .invstd = std::get<2>(r), .vbs = vbs};
  }
  static void backward(const Saved& s, const Tensor& g, variable_list& result) {
    s.in.set_grads(result, dispatch::ghost_batch_norm_backward().call(g, s.in.input, s.in.opt_weight(), s.mean,
                                                                      s.invstd, s.vbs));
  }
};
struct GhostFunction final : OpFunction<GhostOp, GhostFunction> {};

struct RenormOp {
  static constexpr bool kCollective = false;
  static Septet call(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& running_mean, const OptTensor& running_var, double r_max, double d_max,
                     double momentum, double eps) {
    return commit_running(dispatch::batch_renorm_forward().call(input, weight, bias, running_mean, running_var, r_max,
                                                                d_max, momentum, eps),
                          running_mean, running_var);
  }
  struct Saved {
    SavedInputs in;
    Tensor mean, invstd, r, d;
    template <class V>
    void fields(V& v) {
      in.fields(v);
      v("mean", mean);
      v("invstd", invstd);
      v("r", r);
      v("d", d);
    }
  };
  static Saved save(const Septet& res, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor&, const OptTensor&, double, double, double, double) {
    return {.in = {input, weight, bias},
            .mean = std::get<1>(res),
            .invstd = std::get<2>(res),
            .r = std::get<3>(res),
            .d = std::get<4>(res)};
  }
  static void backward(const Saved& s, const Tensor& g, variable_list& result) {
    s.in.set_grads(result, dispatch::batch_renorm_backward().call(g, s.in.input, s.in.opt_weight(), s.mean,
                                                                  s.invstd, s.r, s.d));
  }
};
struct RenormFunction final : OpFunction<RenormOp, RenormFunction> {};

// A variant's public operator: batch_norm's in eval, Op's in training (`rest`: Op::call's arguments
// after the running statistics).
template <class Function, bool Autograd, class... Rest>
Tensor variant(bool training, double momentum, double eps, const Tensor& input, const OptTensor& weight,
               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
               const Rest&... rest) {
  if (!training)
    return run_batch_norm<Autograd>(input, std::nullopt, false, weight, bias, running_mean, running_var, false,
                                    momentum, eps, std::nullopt);
  return run<Function, Autograd>(std::nullopt, input, weight, bias, running_mean, running_var, rest...);
}

}  // namespace

// batch_norm, batch_norm_relu and batch_norm_add_relu: run_batch_norm with their ReLU flag and residual.
template <bool Autograd>
Tensor batch_norm_op(const Tensor& input, BNORM_BN_PARAMS) {
  return run_batch_norm<Autograd>(input, std::nullopt, false, BNORM_BN_ARGS);
}
template <bool Autograd>
Tensor batch_norm_relu_op(const Tensor& input, BNORM_BN_PARAMS) {
  return run_batch_norm<Autograd>(input, std::nullopt, true, BNORM_BN_ARGS);
}
template <bool Autograd>
Tensor batch_norm_add_relu_op(const Tensor& input, const Tensor& residual, BNORM_BN_PARAMS) {
  return run_batch_norm<Autograd>(input, residual, true, BNORM_BN_ARGS);
}

template <bool Autograd>
Tensor sync_batch_norm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
                          c10::string_view group_name, const OptTensor& nonfinite_skips) {
  return run<SyncBatchNormFunction, Autograd>(std::nullopt, input, weight, bias, running_mean, running_var,
                                              momentum, eps, group_name, nonfinite_skips);
}

template <bool Autograd>
Tensor ghost_batch_norm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var,
                           std::int64_t virtual_batch_size, bool training, double momentum, double eps) {
  return variant<GhostFunction, Autograd>(training, momentum, eps, input, weight, bias, running_mean, running_var,
                                    virtual_batch_size, momentum, eps);
}

template <bool Autograd>
Tensor batch_renorm_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var, bool training, double r_max,
                       double d_max, double momentum, double eps) {
  return variant<RenormFunction, Autograd>(training, momentum, eps, input, weight, bias, running_mean, running_var, r_max,
                                     d_max, momentum, eps);
}

// Each public operator's two kernels.
#define BNORM_INSTANTIATE_PUBLIC(name, Ret, Params, schema) \
  template Ret name##_op<true> Params;                      \
  template Ret name##_op<false> Params;
BNORM_TORCH_OPS(BNORM_INSTANTIATE_PUBLIC, BNORM_TORCH_IGNORE, BNORM_TORCH_IGNORE)
#undef BNORM_INSTANTIATE_PUBLIC

}  // namespace bnorm::torch_ops
