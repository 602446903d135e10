// Internal: where a layer's batch statistics come from (layer.hpp's StatsReducer), injected into
// BasicBatchNorm at construction. The layer owns its state and its own checks; the reducer runs the
// functional forward and backward over this process's batch (local_reducer, the default) or over
// the global batch of every rank of a Communicator (collective_reducer, distributed.hpp), and raises
// the layer's problem in the way that suits it: at once locally, on every rank together collectively.
#pragma once

#include <bnorm/functional.hpp>
#include <bnorm/layer.hpp>

#include "validate.hpp"

#include <memory>

namespace bnorm::detail {

class StatsReducer {
 public:
  virtual ~StatsReducer() = default;
  // The layer's names in messages: "BatchNorm" or "SyncBatchNorm", and its "::forward", "::backward".
  virtual const char* layer_name() const = 0;
  virtual const char* forward_name() const = 0;
  virtual const char* backward_name() const = 0;
  // batch_norm (or its collective form) after the layer's own checks found `prior` (empty: none).
  virtual void forward(const char* fn, const Problem& prior, ConstTensorView x, TensorView y, RunningStats running,
                       Affine affine, const Options& options, SavedStats save) const = 0;
  virtual void backward(const char* fn, const Problem& prior, ConstTensorView dy, const ForwardState& forward,
                        const Options& options, TensorView dx, ParamGrads grads) const = 0;
};

// This process's batch alone (batch_norm, batch_norm_backward). Shared by every layer.
std::shared_ptr<const StatsReducer> local_reducer();

}  // namespace bnorm::detail
