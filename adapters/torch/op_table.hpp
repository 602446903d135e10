// The torch operators of bnorm, one row each: the one list that registration.cpp turns into every
// schema and every dispatch-key registration, and that declares each operator's kernels here.
//
// A row is KIND(name, return type, (C++ parameters), "schema"):
//   PUBLIC  what users and bnorm.torch's modules call. Its kernels are `name##_op<Autograd>`
//           (autograd.cpp), registered for the Autograd key (true) and CompositeExplicitAutograd (false).
//   KERNEL  a forward or backward piece that the public operators call through the dispatcher and
//           that torch.compile's graphs hold; it mutates no argument. Its kernels are `name##_cpu`
//           (cpu.cpp), registered for CPU and, to refuse them with a clear message, for CUDA and the
//           sparse keys, and `name##_meta` (meta.cpp), registered for Meta.
//   PLAIN   a helper of the Python package, `name##_impl` (registration.cpp), for every key.
// The C++ parameters and the schema are written side by side: torch infers a schema from each kernel
// and refuses to load the library when it differs from the row's.
//
// Adding an operator: one row here, its kernels under their names (docs/architecture.md, "Adding a
// torch operator").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace bnorm::torch_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;
using Quint = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Sextet = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Septet = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The arguments shared by batch_norm's public operators, in C++ and in the schema. The running
// statistics are declared mutated ((a!), (b!)), which torch.compile and torch.export functionalize.
//
// nonfinite_skips, the non-finite guard (docs/running-statistics.md): absent, every training batch
// updates the running statistics, as torch's BatchNorm does. Given (a 0-dim int64 counter), the
// library decides (Options::skip_nonfinite): a batch that would make a running statistic not finite
// updates none of them and adds 1 to the counter. Defaulted, so callers and graphs from before it
// keep working.
#define BNORM_BN_PARAMS                                                                                     \
  const OptTensor &weight, const OptTensor &bias, const OptTensor &running_mean, const OptTensor &running_var, \
      bool training, double momentum, double eps, const OptTensor &nonfinite_skips
#define BNORM_BN_ARGS weight, bias, running_mean, running_var, training, momentum, eps, nonfinite_skips
#define BNORM_BN_SCHEMA                                                                                 \
  "Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, " \
  "float momentum, float eps, Tensor(c!)? nonfinite_skips=None"

// clang-format off
#define BNORM_TORCH_OPS(PUBLIC, KERNEL, PLAIN)                                                                 \
  /* BatchNorm, and BN -> ReLU and BN -> add -> ReLU in one pass */                                           \
  PUBLIC(batch_norm, Tensor, (const Tensor& input, BNORM_BN_PARAMS),                                           \
         "batch_norm(Tensor input, " BNORM_BN_SCHEMA ") -> Tensor")                                            \
  PUBLIC(batch_norm_relu, Tensor, (const Tensor& input, BNORM_BN_PARAMS),                                      \
         "batch_norm_relu(Tensor input, " BNORM_BN_SCHEMA ") -> Tensor")                                       \
  PUBLIC(batch_norm_add_relu, Tensor, (const Tensor& input, const Tensor& residual, BNORM_BN_PARAMS),          \
         "batch_norm_add_relu(Tensor input, Tensor residual, " BNORM_BN_SCHEMA ") -> Tensor")                  \
  /* stat_a, stat_b: training: the batch mean and 1/sqrt(var + eps) in float64; eval: empty (cpu.cpp). */    \
  /* skipped: 0-dim int64, 1 when skip_nonfinite kept the running statistics (new_running_* = the old) */     \
  KERNEL(batch_norm_forward, Sextet,                                                                           \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, const OptTensor& residual, bool training, double momentum, double eps, \
          bool relu, bool skip_nonfinite),                                                                     \
         "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "               \
         "Tensor? running_var, Tensor? residual, bool training, float momentum, float eps, bool relu, "        \
         "bool skip_nonfinite=False) -> (Tensor output, Tensor stat_a, Tensor stat_b, "                        \
         "Tensor new_running_mean, Tensor new_running_var, Tensor skipped)")                                   \
  KERNEL(batch_norm_eval, Tensor,                                                                              \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, const OptTensor& residual, double eps, bool relu),                     \
         "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "                  \
         "Tensor? running_var, Tensor? residual, float eps, bool relu) -> Tensor")                             \
  KERNEL(batch_norm_backward, Triple,                                                                          \
         (const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& stat_a,        \
          const Tensor& stat_b, const OptTensor& output, bool training, double eps, bool relu),                \
         "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor stat_a, Tensor stat_b, " \
         "Tensor? output, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)")                   \
  /* SyncBatchNorm over a torch.distributed process group, named as ProcessGroup.group_name gives it */      \
  /* (the guard decides on the global statistics: every rank skips, or none does) */                        \
  PUBLIC(sync_batch_norm, Tensor,                                                                              \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, double momentum, double eps, c10::string_view group_name,              \
          const OptTensor& nonfinite_skips),                                                                   \
         "sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "              \
         "Tensor(b!)? running_var, float momentum, float eps, str group_name, "                                \
         "Tensor(c!)? nonfinite_skips=None) -> Tensor")                                                        \
  KERNEL(sync_batch_norm_forward, Sextet,                                                                      \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, double momentum, double eps, c10::string_view group_name,              \
          bool skip_nonfinite),                                                                                \
         "sync_batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "          \
         "Tensor? running_var, float momentum, float eps, str group_name, bool skip_nonfinite=False) "         \
         "-> (Tensor output, Tensor mean, Tensor invstd, Tensor new_running_mean, Tensor new_running_var, "    \
         "Tensor skipped)")                                                                                    \
  KERNEL(sync_batch_norm_backward, Triple,                                                                     \
         (const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,          \
          const Tensor& invstd, double eps, c10::string_view group_name),                                      \
         "sync_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "             \
         "Tensor invstd, float eps, str group_name) -> (Tensor, Tensor, Tensor)")                              \
  /* Ghost Batch Normalization: training forward and backward of its own, batch_norm's eval */               \
  PUBLIC(ghost_batch_norm, Tensor,                                                                             \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, std::int64_t virtual_batch_size, bool training, double momentum,       \
          double eps),                                                                                         \
         "ghost_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "             \
         "Tensor(b!)? running_var, int virtual_batch_size, bool training, float momentum, float eps) -> Tensor") \
  KERNEL(ghost_batch_norm_forward, Quint,                                                                      \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, std::int64_t virtual_batch_size, double momentum, double eps),         \
         "ghost_batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "         \
         "Tensor? running_var, int virtual_batch_size, float momentum, float eps) "                            \
         "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, "                  \
         "Tensor new_running_var)")                                                                            \
  KERNEL(ghost_batch_norm_backward, Triple,                                                                    \
         (const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& save_mean,    \
          const Tensor& save_invstd, std::int64_t virtual_batch_size),                                         \
         "ghost_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "      \
         "Tensor save_invstd, int virtual_batch_size) -> (Tensor, Tensor, Tensor)")                            \
  /* Batch Renormalization: likewise */                                                                       \
  PUBLIC(batch_renorm, Tensor,                                                                                 \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, bool training, double r_max, double d_max, double momentum,            \
          double eps),                                                                                         \
         "batch_renorm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "                 \
         "Tensor(b!)? running_var, bool training, float r_max, float d_max, float momentum, float eps) "       \
         "-> Tensor")                                                                                          \
  KERNEL(batch_renorm_forward, Septet,                                                                         \
         (const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,  \
          const OptTensor& running_var, double r_max, double d_max, double momentum, double eps),              \
         "batch_renorm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "             \
         "Tensor? running_var, float r_max, float d_max, float momentum, float eps) -> (Tensor output, "       \
         "Tensor save_mean, Tensor save_invstd, Tensor r, Tensor d, Tensor new_running_mean, "                 \
         "Tensor new_running_var)")                                                                            \
  KERNEL(batch_renorm_backward, Triple,                                                                        \
         (const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& save_mean,    \
          const Tensor& save_invstd, const Tensor& r, const Tensor& d),                                        \
         "batch_renorm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "          \
         "Tensor save_invstd, Tensor r, Tensor d) -> (Tensor, Tensor, Tensor)")                                \
  /* The thread count of this copy of the library (bnorm.set_num_threads sets the extension's and this) */   \
  PLAIN(_set_num_threads, void, (std::int64_t n), "_set_num_threads(int n) -> ()")                             \
  PLAIN(_num_threads, std::int64_t, (), "_num_threads() -> int")
// clang-format on

#define BNORM_TORCH_IGNORE(...)

// The kernels of each row, declared here and defined where the row's kind says.
#define BNORM_DECLARE_PUBLIC(name, Ret, Params, schema) \
  template <bool Autograd>                              \
  Ret name##_op Params;
#define BNORM_DECLARE_KERNEL(name, Ret, Params, schema) \
  Ret name##_cpu Params;                                \
  Ret name##_meta Params;
#define BNORM_DECLARE_PLAIN(name, Ret, Params, schema) Ret name##_impl Params;
BNORM_TORCH_OPS(BNORM_DECLARE_PUBLIC, BNORM_DECLARE_KERNEL, BNORM_DECLARE_PLAIN)
#undef BNORM_DECLARE_PUBLIC
#undef BNORM_DECLARE_KERNEL
#undef BNORM_DECLARE_PLAIN

// dispatch::<name>(): the operator's handle in torch's dispatcher, typed by its row, for the kernels
// that call other operators (`dispatch::batch_norm_forward().call(...)`: below autograd, every
// backend and tracer sees the call).
namespace dispatch {
#define BNORM_DISPATCH_HANDLE(name, Ret, Params, schema)                              \
  inline const c10::TypedOperatorHandle<Ret Params>& name() {                          \
    static const auto op =                                                             \
        c10::Dispatcher::singleton().findSchemaOrThrow("bnorm::" #name, "").typed<Ret Params>(); \
    return op;                                                                         \
  }
BNORM_TORCH_OPS(BNORM_DISPATCH_HANDLE, BNORM_DISPATCH_HANDLE, BNORM_TORCH_IGNORE)
#undef BNORM_DISPATCH_HANDLE
}  // namespace dispatch

}  // namespace bnorm::torch_ops
