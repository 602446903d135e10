// The CPU kernels of the KERNEL rows (op_table.hpp): torch's checks of what only torch knows, dense
// copies in the plan's memory format and dtype, the library call, and the copies into the results.
//
//  - The library (bnorm::batch_norm and the others) runs with no Python in the path. It makes its own
//    argument checks and throws before it writes; its bnorm::Error becomes torch's ValueError or
//    TypeError (ErrorKind) with the library's message (call_library). Here are only the rules that the
//    library cannot see (device, sparse layout, dtypes it has no kernels for: tensor_rules.cpp). What
//    torch rules differently (eps = 0 in eval, any momentum, an empty batch in training) is the
//    library's Policy::Torch.
//  - Outputs are allocated by torch in the input's memory format (torch's suggest_memory_format, which
//    the Meta kernel reads too) and are never views, so in-place ops after BN (ReLU(inplace),
//    `out += identity`) work in both layouts.
//  - float16 runs in float32 (torch's CPU BN computes float16 in float32 too); bfloat16 and float16
//    per-channel vectors are computed in float32 copies that are written back after success.
//  - With a communicator, SyncBatchNorm's: a collective operator's torch-side check failure goes into
//    the library's collective check (check_collectively), so that every rank raises it together.
#include "op_table.hpp"
#include "process_group.hpp"
#include "tensor_rules.hpp"

#include <bnorm/distributed.hpp>
#include <bnorm/functional.hpp>

#include <ATen/ATen.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <string>
#include <vector>

namespace bnorm::torch_ops {
namespace {

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
  std::int64_t skipped = 0;  // the library's decision (Options::skip_nonfinite); the work copies then hold the old values
  // torch's rules (any momentum, eps = 0 in eval, a training batch of no values) are the library's
  // Policy::Torch. SyncBatchNorm's are its own: every rank's batch counts, momentum in [0, 1].
  const Options options{.training = a.training,
                        .momentum = a.momentum,
                        .eps = a.eps,
                        .activation = a.relu ? Activation::Relu : Activation::None,
                        // torch allocated the output just now (forward_results)
                        .outputs = OutputMemory::Fresh,
                        .policy = comm != nullptr ? Policy::Strict : Policy::Torch,
                        .skip_nonfinite = a.skip_nonfinite,
                        .nonfinite_skips = &skipped};
  const Affine affine{vview(w.defined() ? &w : nullptr), vview(b.defined() ? &b : nullptr)};
  const RunningStats running{vview(rm.defined() ? &rm : nullptr), vview(rv.defined() ? &rv : nullptr)};
  const SavedStats save = a.training ? SavedStats{vview(&sa), vview(&sb)} : SavedStats{};
  call_library([&] {
    if (comm != nullptr) {
      bnorm::sync_batch_norm(*comm, view(x, p.layout), view(out, p.layout), running, affine, options, save);
      return;
    }
    bnorm::batch_norm(view(x, p.layout), view(out, p.layout), running, affine, options, save,
                      res.defined() ? ConstTensorView(view(res, p.layout)) : ConstTensorView{});
  });
  if (a.training) {  // the work copies into the results, and the guard's decision
    copy_back(rm, r.running_mean);
    copy_back(rv, r.running_var);
    r.skipped = new_tensor({}, a.input.options().dtype(at::kLong));
    *r.skipped.data_ptr<std::int64_t>() = skipped;
  }
  if (a.input.scalar_type() == at::kHalf) r.out.copy_(out);
  return r;
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
  const Options options{.training = training, .eps = eps,
                        .activation = relu ? Activation::Relu : Activation::None,
                        .outputs = OutputMemory::Fresh,
                        .policy = Policy::Torch};
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

constexpr Options kVariantBackward{.training = true, .outputs = OutputMemory::Fresh};
}  // namespace

Sextet batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                              bool training, double momentum, double eps, bool relu, bool skip_nonfinite) {
  return forward_cpu(
             {input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu, skip_nonfinite})
      .tuple();
}

// The eval forward: the same kernel with training=false, under a schema that mutates nothing.
Tensor batch_norm_eval_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                           double eps, bool relu) {
  return forward_cpu({input, weight, bias, running_mean, running_var, residual, false, 0.0, eps, relu}).out;
}
Triple batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                               const Tensor& stat_a, const Tensor& stat_b, const OptTensor& output, bool training,
                               double eps, bool relu) {
  return backward_cpu(grad_output, input, weight, stat_a, stat_b, output, training, eps, relu);
}

// SyncBatchNorm's forward and backward (training only: its eval, with running statistics, is
// batch_norm_eval, which needs no other rank). Collective: every rank of the group calls them.
Sextet sync_batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                                   double eps, c10::string_view group_name, bool skip_nonfinite) {
  ProcessGroupCommunicator comm{std::string(group_name)};
  const OptTensor none;
  return forward_cpu(
             {input, weight, bias, running_mean, running_var, none, true, momentum, eps, false, skip_nonfinite}, &comm)
      .tuple();
}
Triple sync_batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
                                    const Tensor& mean, const Tensor& invstd, double eps, c10::string_view group_name) {
  ProcessGroupCommunicator comm{std::string(group_name)};
  return backward_cpu(grad_output, input, weight, mean, invstd, std::nullopt, true, eps, false, &comm);
}
Quint ghost_batch_norm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, std::int64_t vbs,
                                   double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  return variant_forward(
      kGhostName, a, ghost_rows(input, vbs), 2,
      [&](ConstTensorView x, TensorView out, RunningStats running, Affine affine, const Options& options,
          std::vector<Tensor>& rows) {
        bnorm::ghost_batch_norm(x, out, vbs, running, affine, options, {vview(&rows[0]), vview(&rows[1])});
      }).ghost_tuple();
}
Septet batch_renorm_forward_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var, double r_max,
                                double d_max, double momentum, double eps) {
  const ForwardArgs a = variant_args(input, weight, bias, running_mean, running_var, momentum, eps);
  return variant_forward(
      kRenormName, a, channel_rows(input), 4,
      [&](ConstTensorView x, TensorView out, RunningStats running, Affine affine, const Options& options,
          std::vector<Tensor>& rows) {
        bnorm::batch_renorm(x, out, running, affine, options, {r_max, d_max}, {vview(&rows[0]), vview(&rows[1])},
                            {vview(&rows[2]), vview(&rows[3])});
      }).renorm_tuple();
}
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
}  // namespace bnorm::torch_ops
