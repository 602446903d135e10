// bnorm layer: BatchNorm with the options and state of torch.nn.BatchNorm1d/2d/3d.
#pragma once

#include <bnorm/functional.hpp>
#include <bnorm/types.hpp>

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace bnorm {

namespace detail {
// Where a layer's batch statistics come from, injected at construction: this process's batch (the
// default) or the global batch over a Communicator (SyncBatchNorm, distributed.hpp). It runs the
// functional forward and backward; internal (src/reducer.hpp).
class StatsReducer;
class Problem;  // a failed check as a value (src/validate.hpp)
}  // namespace detail

struct BatchNormOptions {
  double eps = 1e-5;
  // torch's convention: running = (1 - momentum) * running + momentum * batch.
  // std::nullopt means a cumulative average (factor 1 / num_batches_tracked).
  std::optional<double> momentum = 0.1;
  bool affine = true;
  bool track_running_stats = true;
  Activation activation = Activation::None;  // fused into forward; backward then needs the output
  // A training batch that would make a running statistic not finite (Options::skip_nonfinite)
  // updates neither the running statistics nor num_batches_tracked; nonfinite_skipped() counts it.
  bool skip_nonfinite = false;
};

// P is the parameter dtype (float or double); inputs must have the same dtype.
// spatial_dims restricts the accepted input ranks like torch's classes: 1 -> (N,C) or (N,C,L),
// 2 -> (N,C,H,W), 3 -> (N,C,D,H,W); -1 accepts any rank >= 2 (the functional's rule).
template <class P>
class BasicBatchNorm {
 public:
  explicit BasicBatchNorm(std::int64_t num_features, BatchNormOptions options = {}, int spatial_dims = -1);

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  // Training mode: batch statistics, running statistics updated (when tracked).
  // Eval mode: running statistics (or batch statistics when they are not tracked).
  // y may be x (in place) unless backward will need x.
  void forward(ConstTensorView x, TensorView y);

  // Gradients of the last forward. x is that forward's input (the layer keeps only per-channel
  // statistics, not the tensor); y is its output, needed only with a fused activation.
  // dx may alias dy. Parameter gradients are accumulated (like torch's .grad): zero_grad() clears.
  void backward(ConstTensorView x, ConstTensorView dy, TensorView dx, ConstTensorView y = {});
  void zero_grad();

  void reset_parameters();     // gamma = 1, beta = 0, and reset_running_stats()
  void reset_running_stats();  // mean 0, var 1, num_batches_tracked 0

  std::int64_t num_features() const { return num_features_; }
  const BatchNormOptions& options() const { return options_; }
  int spatial_dims() const { return spatial_dims_; }

  // Empty spans when the layer has no such state (affine = false, track_running_stats = false).
  std::span<P> weight() { return weight_; }
  std::span<P> bias() { return bias_; }
  std::span<const P> weight() const { return weight_; }
  std::span<const P> bias() const { return bias_; }
  std::span<const P> weight_grad() const { return weight_grad_; }
  std::span<const P> bias_grad() const { return bias_grad_; }
  std::span<P> running_mean() { return running_mean_; }
  std::span<P> running_var() { return running_var_; }
  std::span<const P> running_mean() const { return running_mean_; }
  std::span<const P> running_var() const { return running_var_; }
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }
  // Training batches whose update skip_nonfinite skipped, since construction (not saved).
  std::int64_t nonfinite_skipped() const { return nonfinite_skipped_; }

  // State in the safetensors format with torch's state_dict keys (weight, bias, running_mean,
  // running_var, num_batches_tracked), each prefixed by `prefix` (e.g. "layer1.0.bn1.").
  // save writes atomically: a temporary file in the same folder, flushed, then renamed.
  // load validates the whole file (structure, dtypes, shapes against num_features, missing and
  // unexpected keys under the prefix) and changes the layer only when all of it is good.
  // float32 and float64 tensors load into either parameter dtype, as torch's load_state_dict does.
  void save(const std::string& path, const std::string& prefix = "") const;
  void load(const std::string& path, const std::string& prefix = "");

 protected:
  // SyncBatchNorm (distributed.hpp): the same layer with another source of batch statistics.
  BasicBatchNorm(std::int64_t num_features, BatchNormOptions options, int spatial_dims,
                 std::shared_ptr<const detail::StatsReducer> reducer);
  // Another source from now on (BatchRenorm's new limits); nothing else changes.
  void replace_reducer(std::shared_ptr<const detail::StatsReducer> reducer);

 private:
  // The layer's own checks (rank, channels, dtype; a forward before backward): what failed, or
  // empty. The reducer raises it, on every rank at once for SyncBatchNorm.
  detail::Problem input_problem(ConstTensorView x) const;
  detail::Problem backward_problem(ConstTensorView x) const;

  std::shared_ptr<const detail::StatsReducer> reducer_;

  std::int64_t num_features_;
  BatchNormOptions options_;
  int spatial_dims_;
  bool training_ = true;
  std::vector<P> weight_, bias_, weight_grad_, bias_grad_;
  std::vector<P> running_mean_, running_var_;
  std::int64_t num_batches_tracked_ = 0;
  std::int64_t nonfinite_skipped_ = 0;
  // What backward needs from the last forward, kept in double so that the gradient at a large
  // offset |mean| / std does not inherit the rounding of the mean to P.
  std::vector<double> save_mean_, save_invstd_;
  bool have_forward_ = false;
  bool forward_used_batch_stats_ = false;
  Shape forward_shape_;
};

using BatchNorm = BasicBatchNorm<float>;
using BatchNorm64 = BasicBatchNorm<double>;

// torch.nn.BatchNorm1d/2d/3d: the same layer with torch's accepted ranks.
template <class P = float>
class BatchNorm1dT : public BasicBatchNorm<P> {
 public:
  explicit BatchNorm1dT(std::int64_t num_features, BatchNormOptions o = {}) : BasicBatchNorm<P>(num_features, o, 1) {}
};
template <class P = float>
class BatchNorm2dT : public BasicBatchNorm<P> {
 public:
  explicit BatchNorm2dT(std::int64_t num_features, BatchNormOptions o = {}) : BasicBatchNorm<P>(num_features, o, 2) {}
};
template <class P = float>
class BatchNorm3dT : public BasicBatchNorm<P> {
 public:
  explicit BatchNorm3dT(std::int64_t num_features, BatchNormOptions o = {}) : BasicBatchNorm<P>(num_features, o, 3) {}
};
using BatchNorm1d = BatchNorm1dT<float>;
using BatchNorm2d = BatchNorm2dT<float>;
using BatchNorm3d = BatchNorm3dT<float>;

// Ghost Batch Normalization (functional.hpp's ghost_batch_norm; docs/semantics.md): BatchNorm's
// options, state, save/load and checks, with the batch split along N into virtual batches of
// virtual_batch_size in training (and in eval without running statistics); num_batches_tracked
// counts each virtual batch. options.momentum must be a value (no cumulative average).
template <class P = float>
class GhostBatchNormT : public BasicBatchNorm<P> {
 public:
  GhostBatchNormT(std::int64_t num_features, std::int64_t virtual_batch_size, BatchNormOptions options = {},
                  int spatial_dims = -1);
  std::int64_t virtual_batch_size() const { return virtual_batch_size_; }

 private:
  std::int64_t virtual_batch_size_;
};

// Batch Renormalization (functional.hpp's batch_renorm; Ioffe 2017, Algorithm 1): BatchNorm's
// options, state, save/load and checks; r and d from the running statistics, clipped by the limits,
// which set_limits changes between steps. options.track_running_stats must be true.
template <class P = float>
class BatchRenormT : public BasicBatchNorm<P> {
 public:
  explicit BatchRenormT(std::int64_t num_features, RenormLimits limits = {}, BatchNormOptions options = {},
                        int spatial_dims = -1);
  void set_limits(RenormLimits limits);  // checked: r_max >= 1, d_max >= 0; a failed call changes nothing
  RenormLimits limits() const { return limits_; }

 private:
  RenormLimits limits_;
};

extern template class BasicBatchNorm<float>;
extern template class BasicBatchNorm<double>;
extern template class GhostBatchNormT<float>;
extern template class GhostBatchNormT<double>;
extern template class BatchRenormT<float>;
extern template class BatchRenormT<double>;

}  // namespace bnorm
