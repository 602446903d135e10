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
  // Rows of C values that a forward with batch statistics saves in each of save.mean and save.invstd
  // (the layer keeps them for backward, which gets them back as forward.saved): 1 for batch
  // normalization; Ghost BN one per virtual batch of x; Batch Renorm 2 (its r and d in the second
  // rows). x has passed the layer's own checks.
  virtual std::int64_t saved_rows(ConstTensorView /*x*/) const { return 1; }
  // What a training forward adds to num_batches_tracked: 1; Ghost BN one per virtual batch.
  virtual std::int64_t batches_counted(ConstTensorView /*x*/) const { return 1; }
};

// This process's batch alone (batch_norm, batch_norm_backward). Shared by every layer.
std::shared_ptr<const StatsReducer> local_reducer();

// Ghost BN's and Batch Renorm's (ghost_batch_norm, batch_renorm) over this process's batch; they
// check their argument and raise as `layer` ("GhostBatchNorm", "BatchRenorm").
std::shared_ptr<const StatsReducer> ghost_reducer(std::int64_t virtual_batch_size);
std::shared_ptr<const StatsReducer> renorm_reducer(RenormLimits limits);

}  // namespace bnorm::detail
