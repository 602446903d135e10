// Internal: the SyncBatchNorm entry points with a validation failure found before them. The layer
// checks its own state and input first; when that fails on one rank, the rank must still take part
// in the collective check (or the others would wait for it forever), so the failure is handed in as
// `prior_error` and every rank throws it together.
#pragma once

#include <bnorm/distributed.hpp>

#include <string>

namespace bnorm::detail {

void sync_forward(Communicator& comm, const char* fn, const std::string& prior_error, ConstTensorView input,
                  TensorView output, VectorView running_mean, VectorView running_var, ConstVectorView weight,
                  ConstVectorView bias, bool training, double momentum, double eps, VectorView save_mean,
                  VectorView save_invstd, Activation activation);

void sync_backward(Communicator& comm, const char* fn, const std::string& prior_error, ConstTensorView grad_output,
                   ConstTensorView input, ConstVectorView weight, ConstVectorView running_mean,
                   ConstVectorView running_var, ConstVectorView save_mean, ConstVectorView save_invstd, bool training,
                   double eps, TensorView grad_input, VectorView grad_weight, VectorView grad_bias,
                   Activation activation, ConstTensorView output);

}  // namespace bnorm::detail
