#include <bnorm/functional.hpp>
#include <bnorm/layer.hpp>

#include "reducer.hpp"
#include "safetensors.hpp"
#include "validate.hpp"
#include "workspace.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <set>
#include <span>
#include <type_traits>

namespace bnorm {
namespace {

// The largest num_features a layer accepts: far above any real network (a few thousand channels);
// a larger count is a bug, and refusing it keeps the constructor from bad_alloc or an OOM kill.
constexpr std::int64_t kMaxFeatures = std::int64_t{1} << 24;

const char* accepted_ranks(int spatial_dims) {
  switch (spatial_dims) {
    case 1: return "rank 2 (N, C) or 3 (N, C, L)";
    case 2: return "rank 4 (N, C, H, W)";
    case 3: return "rank 5 (N, C, D, H, W)";
    default: return "rank >= 2 (N, C, ...)";
  }
}

bool rank_ok(int spatial_dims, int rank) {
  switch (spatial_dims) {
    case 1: return rank == 2 || rank == 3;
    case 2: return rank == 4;
    case 3: return rank == 5;
    default: return rank >= 2;
  }
}

template <class P>
std::string dtype_tag() {
  return std::is_same_v<P, float> ? "F32" : "F64";
}

template <class P>
detail::SafeTensor vector_tensor(const std::vector<P>& v) {
  detail::SafeTensor t;
  t.dtype = dtype_tag<P>();
  t.shape = {static_cast<std::int64_t>(v.size())};
  t.bytes.resize(v.size() * sizeof(P));
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

// This process's batch: the layer's problem is raised at once, then the functional calls (whose own
// checks name batch_norm / batch_norm_backward).
class LocalReducer final : public detail::StatsReducer {
 public:
  const char* layer_name() const override { return "BatchNorm"; }
  const char* forward_name() const override { return "BatchNorm::forward"; }
  const char* backward_name() const override { return "BatchNorm::backward"; }
  void forward(const char* fn, const detail::Problem& prior, ConstTensorView x, TensorView y, RunningStats running,
               Affine affine, const Options& options, SavedStats save) const override {
    detail::raise_if(fn, prior);
    batch_norm(x, y, running, affine, options, save);
  }
  void backward(const char* fn, const detail::Problem& prior, ConstTensorView dy, const ForwardState& forward,
                const Options& options, TensorView dx, ParamGrads grads) const override {
    detail::raise_if(fn, prior);
    batch_norm_backward(dy, forward, options, dx, grads);
  }
};

// Ghost BN: the saved rows are one per virtual batch.
class GhostReducer final : public detail::StatsReducer {
 public:
  explicit GhostReducer(std::int64_t vbs) : vbs_(vbs) {}
  const char* layer_name() const override { return "GhostBatchNorm"; }
  const char* forward_name() const override { return "GhostBatchNorm::forward"; }
  const char* backward_name() const override { return "GhostBatchNorm::backward"; }
  void forward(const char* fn, const detail::Problem& prior, ConstTensorView x, TensorView y, RunningStats running,
               Affine affine, const Options& options, SavedStats save) const override {
    detail::raise_if(fn, prior);
    ghost_batch_norm(x, y, vbs_, running, affine, options, save);
  }
  void backward(const char* fn, const detail::Problem& prior, ConstTensorView dy, const ForwardState& forward,
                const Options& options, TensorView dx, ParamGrads grads) const override {
    detail::raise_if(fn, prior);
    ghost_batch_norm_backward(dy, forward, vbs_, options, dx, grads);
  }
  std::int64_t saved_rows(ConstTensorView x) const override {
    return std::max<std::int64_t>(1, ghost_batch_count(x.shape()[0], vbs_));
  }
  std::int64_t batches_counted(ConstTensorView x) const override { return ghost_batch_count(x.shape()[0], vbs_); }

 private:
  std::int64_t vbs_;
};

// Rows [C, 2C) of a saved vector of 2C doubles (where Batch Renorm's layer keeps r and d).
VectorView second_row(VectorView v) {
  if (!v.present()) return {};
  const std::int64_t C = v.size() / 2;
  return {static_cast<double*>(v.data()) + C, DType::Float64, C};
}
VectorView first_row(VectorView v) { return v.present() ? VectorView(v.data(), DType::Float64, v.size() / 2) : v; }

// Batch Renorm: the saved rows are the batch statistics, then r (in save.mean) and d (in save.invstd).
class RenormReducer final : public detail::StatsReducer {
 public:
  explicit RenormReducer(RenormLimits limits) : limits_(limits) {}
  const char* layer_name() const override { return "BatchRenorm"; }
  const char* forward_name() const override { return "BatchRenorm::forward"; }
  const char* backward_name() const override { return "BatchRenorm::backward"; }
  void forward(const char* fn, const detail::Problem& prior, ConstTensorView x, TensorView y, RunningStats running,
               Affine affine, const Options& options, SavedStats save) const override {
    detail::raise_if(fn, prior);
    batch_renorm(x, y, running, affine, options, limits_, {first_row(save.mean), first_row(save.invstd)},
                 {second_row(save.mean), second_row(save.invstd)});
  }
  void backward(const char* fn, const detail::Problem& prior, ConstTensorView dy, const ForwardState& forward,
                const Options& options, TensorView dx, ParamGrads grads) const override {
    detail::raise_if(fn, prior);
    auto row = [](ConstVectorView v, bool second) {
      if (!v.present()) return v;
      const std::int64_t C = v.size() / 2;
      return ConstVectorView(static_cast<const double*>(v.data()) + (second ? C : 0), DType::Float64, C);
    };
    ForwardState f = forward;
    f.saved = {row(forward.saved.mean, false), row(forward.saved.invstd, false)};
    batch_renorm_backward(dy, f, {row(forward.saved.mean, true), row(forward.saved.invstd, true)}, options, dx,
                          grads);
  }
  std::int64_t saved_rows(ConstTensorView) const override { return 2; }

 private:
  RenormLimits limits_;
};

}  // namespace

namespace detail {
std::shared_ptr<const StatsReducer> local_reducer() {
  static const std::shared_ptr<const StatsReducer> local = std::make_shared<const LocalReducer>();
  return local;
}
std::shared_ptr<const StatsReducer> ghost_reducer(std::int64_t virtual_batch_size) {
  raise_if("GhostBatchNorm", check_virtual_batch_size(virtual_batch_size));
  return std::make_shared<const GhostReducer>(virtual_batch_size);
}
std::shared_ptr<const StatsReducer> renorm_reducer(RenormLimits limits) {
  raise_if("BatchRenorm", check_renorm_limits(limits.r_max, limits.d_max));
  return std::make_shared<const RenormReducer>(limits);
}
}  // namespace detail

template <class P>
BasicBatchNorm<P>::BasicBatchNorm(std::int64_t num_features, BatchNormOptions options, int spatial_dims)
    : BasicBatchNorm(num_features, options, spatial_dims, detail::local_reducer()) {}

template <class P>
BasicBatchNorm<P>::BasicBatchNorm(std::int64_t num_features, BatchNormOptions options, int spatial_dims,
                                  std::shared_ptr<const detail::StatsReducer> reducer)
    : reducer_(std::move(reducer)), num_features_(num_features), options_(options), spatial_dims_(spatial_dims) {
  // The protected constructor is open to subclasses, which may pass null (Layer.NullReducerIsRefused).
  if (!reducer_) detail::fail("BatchNorm", "reducer: expected a source of batch statistics, got null");
  const char* fn = reducer_->layer_name();
  if (num_features < 1) detail::fail(fn, "num_features: expected >= 1, got " + std::to_string(num_features));
  // Refused before allocating: the layer's own state is ~(6 * sizeof(P) + 16) bytes per channel.
  if (num_features > kMaxFeatures)
    detail::fail(fn, "num_features: expected at most " + std::to_string(kMaxFeatures) + " (2^24), got " +
                         std::to_string(num_features));
  if (spatial_dims != -1 && (spatial_dims < 1 || spatial_dims > 3))
    detail::fail(fn, "spatial_dims: expected 1, 2, 3 or -1 (any), got " + std::to_string(spatial_dims));
  detail::raise_if(fn, detail::check_eps(options.eps));
  if (options.momentum) detail::raise_if(fn, detail::check_momentum(*options.momentum));
  detail::raise_if(fn, detail::check_activation(options.activation));
  const auto C = static_cast<std::size_t>(num_features);
  if (options.affine) {
    weight_.resize(C);
    bias_.resize(C);
    weight_grad_.assign(C, P(0));
    bias_grad_.assign(C, P(0));
  }
  if (options.track_running_stats) {
    running_mean_.resize(C);
    running_var_.resize(C);
  }
  save_mean_.resize(C);
  save_invstd_.resize(C);
  reset_parameters();
}

template <class P>
void BasicBatchNorm<P>::reset_running_stats() {
  std::fill(running_mean_.begin(), running_mean_.end(), P(0));
  std::fill(running_var_.begin(), running_var_.end(), P(1));
  num_batches_tracked_ = 0;
}

template <class P>
void BasicBatchNorm<P>::reset_parameters() {
  reset_running_stats();
  std::fill(weight_.begin(), weight_.end(), P(1));
  std::fill(bias_.begin(), bias_.end(), P(0));
}

template <class P>
void BasicBatchNorm<P>::zero_grad() {
  std::fill(weight_grad_.begin(), weight_grad_.end(), P(0));
  std::fill(bias_grad_.begin(), bias_grad_.end(), P(0));
}

template <class P>
detail::Problem BasicBatchNorm<P>::input_problem(ConstTensorView x) const {
  const int rank = x.shape().rank();
  if (!rank_ok(spatial_dims_, rank))
    return detail::Problem(std::string("input: expected ") + accepted_ranks(spatial_dims_) + ", got rank " +
                           std::to_string(rank) + " with shape " + x.shape().str());
  if (x.shape()[1] != num_features_)
    return detail::Problem("input: expected " + std::to_string(num_features_) +
                           " channels (num_features) in dim 1, got " + std::to_string(x.shape()[1]) + " in shape " +
                           x.shape().str());
  // A float32 layer also takes bfloat16 activations (its parameters and statistics stay float32).
  const bool mixed = std::is_same_v<P, float> && x.dtype() == DType::BFloat16;
  if (x.dtype() != dtype_of<P>() && !mixed)
    return detail::Problem("input: expected dtype " + to_string(dtype_of<P>()) +
                               (std::is_same_v<P, float> ? " or bfloat16" : "") + " (the layer's), got " +
                               to_string(x.dtype()),
                           ErrorKind::Type);
  return {};
}

template <class P>
detail::Problem BasicBatchNorm<P>::backward_problem(ConstTensorView x) const {
  if (!have_forward_) return detail::Problem("state: expected a forward call before backward, got none");
  BNORM_CHECK(input_problem(x));
  // The batch statistics belong to the last batch-statistics forward's input; frozen statistics fit any.
  if (forward_used_batch_stats_ && !(x.shape() == forward_shape_))
    return detail::Problem("x: expected the last forward's input shape " + forward_shape_.str() + ", got " +
                           x.shape().str());
  return {};
}

template <class P>
void BasicBatchNorm<P>::forward(ConstTensorView x, TensorView y) {
  const char* fn = reducer_->forward_name();
  const bool track = options_.track_running_stats;
  // torch: batch statistics in training, and in eval when no running statistics are kept.
  const bool use_batch = training_ || !track;
  const bool update = training_ && track;
  double factor = 0;
  if (update) factor = options_.momentum ? *options_.momentum : cumulative_momentum(num_batches_tracked_);
  RunningStats running;
  if (track) running = {VectorView(running_mean_), VectorView(running_var_)};
  // The rows of C values the reducer saves (1 for BN), sized only for an input the layer accepts.
  const detail::Problem problem = input_problem(x);
  const std::int64_t rows = use_batch && !problem ? reducer_->saved_rows(x) : 1;
  // This step's saved statistics, from the thread's workspace (no allocation once a step has needed
  // as much), copied into the layer's only when the step has succeeded.
  detail::Workspace::Scope scope;
  const std::span<double> sm = scope.take<double>(static_cast<std::size_t>(rows * num_features_)),
                          si = scope.take<double>(sm.size());
  const Affine affine = options_.affine ? Affine{weight_, bias_} : Affine{};
  const SavedStats save = use_batch ? SavedStats{sm, si} : SavedStats{};
  // A failed check of the layer's own goes to the reducer, which raises it (on every rank at once for
  // SyncBatchNorm, whose other ranks would otherwise wait in the collective).
  std::int64_t skipped = 0;  // updates skip_nonfinite refused (Ghost BN: one per virtual batch)
  reducer_->forward(fn, problem, x, y, running, affine,
                    {.training = use_batch,
                     .momentum = factor,
                     .eps = options_.eps,
                     .activation = options_.activation,
                     .skip_nonfinite = options_.skip_nonfinite,
                     .nonfinite_skips = &skipped},
                    save);
  // Only reached when the call succeeded: commit what backward needs.
  if (update) num_batches_tracked_ += reducer_->batches_counted(x) - skipped;
  if (skipped) nonfinite_skipped_ += skipped;  // an eval forward writes no member (thread safety, below)
  if (use_batch) {
    save_mean_.assign(sm.begin(), sm.end());  // reallocates only when the number of rows grows
    save_invstd_.assign(si.begin(), si.end());
    forward_shape_ = x.shape();
  }
  // An eval forward with running statistics writes no member (these two flags only when they
  // change, atomically), so one layer in eval mode may serve many threads at once
  // (docs/reliability.md, the thread-safety contract).
  std::atomic_ref<bool> have(have_forward_), batch(forward_used_batch_stats_);
  if (!have.load(std::memory_order_relaxed)) have.store(true, std::memory_order_relaxed);
  if (batch.load(std::memory_order_relaxed) != use_batch) batch.store(use_batch, std::memory_order_relaxed);
}

template <class P>
void BasicBatchNorm<P>::backward(ConstTensorView x, ConstTensorView dy, TensorView dx, ConstTensorView y) {
  const char* fn = reducer_->backward_name();
  const auto C = static_cast<std::size_t>(num_features_);
  // This step's parameter gradients, from the thread's workspace, added to the layer's on success.
  detail::Workspace::Scope scope;
  const std::span<P> gw = scope.take<P>(options_.affine ? C : 0), gb = scope.take<P>(gw.size());
  ForwardState forward{.input = x, .output = y};
  if (options_.affine) forward.weight = ConstVectorView(weight_);
  if (forward_used_batch_stats_)
    forward.saved = {ConstVectorView(save_mean_), ConstVectorView(save_invstd_)};
  else
    forward.running = {ConstVectorView(running_mean_), ConstVectorView(running_var_)};
  const ParamGrads grads = options_.affine ? ParamGrads{gw, gb} : ParamGrads{};
  reducer_->backward(fn, backward_problem(x), dy, forward,
                     {forward_used_batch_stats_, 0.0, options_.eps, options_.activation}, dx, grads);
  for (std::size_t c = 0; c < gw.size(); ++c) {
    weight_grad_[c] += gw[c];
    bias_grad_[c] += gb[c];
  }
}

template <class P>
void BasicBatchNorm<P>::save(const std::string& path, const std::string& prefix) const {
  detail::SafeTensorsFile f;
  f.metadata["format"] = "pt";
  if (options_.affine) {
    f.tensors[prefix + "weight"] = vector_tensor(weight_);
    f.tensors[prefix + "bias"] = vector_tensor(bias_);
  }
  if (options_.track_running_stats) {
    f.tensors[prefix + "running_mean"] = vector_tensor(running_mean_);
    f.tensors[prefix + "running_var"] = vector_tensor(running_var_);
    detail::SafeTensor n;
    n.dtype = "I64";
    n.bytes.resize(8);
    std::memcpy(n.bytes.data(), &num_batches_tracked_, 8);
    f.tensors[prefix + "num_batches_tracked"] = n;
  }
  const std::vector<unsigned char> image = detail::serialize_safetensors(f);
  detail::write_file_atomic(path, image);
}

template <class P>
void BasicBatchNorm<P>::load(const std::string& path, const std::string& prefix) {
  const std::string fn = std::string(reducer_->layer_name()) + "::load('" + path + "')";
  const detail::SafeTensorsFile f = detail::read_safetensors(path);
  std::set<std::string> expected;
  if (options_.affine) expected.insert({"weight", "bias"});
  if (options_.track_running_stats) expected.insert({"running_mean", "running_var", "num_batches_tracked"});
  for (const auto& [name, t] : f.tensors) {
    if (name.rfind(prefix, 0) != 0) continue;  // another module's state
    if (!expected.count(name.substr(prefix.size())))
      detail::fail(fn.c_str(), "key '" + name + "': unexpected for this layer (affine=" +
                                   (options_.affine ? "true" : "false") + ", track_running_stats=" +
                                   (options_.track_running_stats ? "true" : "false") + ")");
  }
  const auto C = static_cast<std::size_t>(num_features_);
  auto vec = [&](const std::string& key) {
    const auto it = f.tensors.find(prefix + key);
    if (it == f.tensors.end()) detail::fail(fn.c_str(), "key '" + prefix + key + "': expected in the file, missing");
    const detail::SafeTensor& t = it->second;
    if (t.shape.size() != 1 || t.shape[0] != num_features_) {
      std::string s = "[";
      for (std::size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
      detail::fail(fn.c_str(), "key '" + prefix + key + "': expected shape [" + std::to_string(num_features_) +
                                   "] (num_features), got " + s + "]");
    }
    const detail::Checked<std::vector<double>> values = detail::float_values(t);
    if (values.problem)
      detail::fail(fn.c_str(), "key '" + prefix + key + "': " + values.problem.what(), values.problem.kind());
    std::vector<P> out(C);
    for (std::size_t c = 0; c < C; ++c) out[c] = static_cast<P>(values.value[c]);
    return out;
  };
  // Read and check everything first; assign only when the whole file is good.
  std::vector<P> w, b, rm, rv;
  std::int64_t nbt = 0;
  if (options_.affine) {
    w = vec("weight");
    b = vec("bias");
  }
  if (options_.track_running_stats) {
    rm = vec("running_mean");
    rv = vec("running_var");
    for (std::size_t c = 0; c < C; ++c)
      if (!(rv[c] >= 0))
        detail::fail(fn.c_str(), "key '" + prefix + "running_var': expected values >= 0, got " + std::to_string(rv[c]) +
                                     " at index " + std::to_string(c));
    const auto it = f.tensors.find(prefix + "num_batches_tracked");
    if (it == f.tensors.end())
      detail::fail(fn.c_str(), "key '" + prefix + "num_batches_tracked': expected in the file, missing");
    if (it->second.dtype != "I64" || !it->second.shape.empty())
      detail::fail(fn.c_str(), "key '" + prefix + "num_batches_tracked': expected an I64 scalar (shape []), got " +
                                   it->second.dtype + " with " + std::to_string(it->second.shape.size()) + " dims");
    std::memcpy(&nbt, it->second.bytes.data(), 8);
    if (nbt < 0)
      detail::fail(fn.c_str(), "key '" + prefix + "num_batches_tracked': expected >= 0, got " + std::to_string(nbt));
  }
  weight_.swap(w);
  bias_.swap(b);
  if (options_.track_running_stats) {
    running_mean_.swap(rm);
    running_var_.swap(rv);
    num_batches_tracked_ = nbt;
  }
}

template <class P>
void BasicBatchNorm<P>::replace_reducer(std::shared_ptr<const detail::StatsReducer> reducer) {
  reducer_ = std::move(reducer);
}

template <class P>
GhostBatchNormT<P>::GhostBatchNormT(std::int64_t num_features, std::int64_t virtual_batch_size,
                                    BatchNormOptions options, int spatial_dims)
    : BasicBatchNorm<P>(num_features, options, spatial_dims, detail::ghost_reducer(virtual_batch_size)),
      virtual_batch_size_(virtual_batch_size) {
  if (!options.momentum)
    detail::fail("GhostBatchNorm",
                 "momentum: expected a value in [0, 1] (Ghost BN has no cumulative average), got none");
}

template <class P>
BatchRenormT<P>::BatchRenormT(std::int64_t num_features, RenormLimits limits, BatchNormOptions options,
                              int spatial_dims)
    : BasicBatchNorm<P>(num_features, options, spatial_dims, detail::renorm_reducer(limits)), limits_(limits) {
  if (!options.track_running_stats)
    detail::fail("BatchRenorm",
                 "track_running_stats: expected true (Batch Renormalization reads the running statistics), got "
                 "false");
}

template <class P>
void BatchRenormT<P>::set_limits(RenormLimits limits) {
  this->replace_reducer(detail::renorm_reducer(limits));
  limits_ = limits;
}

template class BasicBatchNorm<float>;
template class BasicBatchNorm<double>;
template class GhostBatchNormT<float>;
template class GhostBatchNormT<double>;
template class BatchRenormT<float>;
template class BatchRenormT<double>;

}  // namespace bnorm
