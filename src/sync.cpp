// SyncBatchNorm: the collective protocol around the shared functional pieces.
//
// Each call makes (1) one all-gather of a fixed-size descriptor, so that every rank learns whether
// every other rank's arguments passed validation and agree with its own before any exchange whose
// size depends on them, then, in training, (2) one exchange of 2 * C doubles: the per-channel
// (mean, M2) in forward, (sum(dy), sum(dy * (x - mean))) in backward. docs/distributed.md counts
// the bytes.
#include <bnorm/distributed.hpp>
#include <bnorm/functional.hpp>

#include "functional_parts.hpp"
#include "reducer.hpp"
#include "kernels/kernels.hpp"
#include "sync.hpp"
#include "validate.hpp"
#include "workspace.hpp"

#include <algorithm>
#include <cstring>
#include <span>
#include <sstream>
#include <vector>

namespace bnorm {

void Communicator::all_reduce_sum(double* data, std::size_t count) {
  const auto R = static_cast<std::size_t>(size());
  detail::Workspace::Scope scope;  // the calling thread's workspace (workspace.hpp), not the heap
  const std::span<double> all = scope.take<double>(R * count);
  all_gather(data, count * sizeof(double), all.data());
  for (std::size_t i = 0; i < count; ++i) {
    double s = 0;
    for (std::size_t r = 0; r < R; ++r) s += all[r * count + i];
    data[i] = s;
  }
}

namespace detail {
namespace {

// What every rank must agree on, and the outcome of its own validation. All fields are 8 bytes,
// so the struct has no padding and crosses the wire as raw bytes (every rank runs the same build).
// The memory layout is each rank's own: the exchanged per-channel statistics do not depend on it,
// and a framework may see one rank's batch of 1 or 0 samples in another layout than the others'.
struct Descriptor {
  std::int64_t failed = 0;         // 1 + its ErrorKind: this rank's validation failed (its message follows separately)
  std::int64_t message_bytes = 0;  // length of that message
  std::int64_t channels = 0;
  std::int64_t dtype = 0;
  std::int64_t training = 0;
  std::int64_t activation = 0;
  std::int64_t has_running = 0;
  std::int64_t has_weight = 0;
  std::int64_t has_bias = 0;
  std::int64_t skip_nonfinite = 0;  // every rank must make the same update decision
  double eps = 0;
  double momentum = 0;
  double count = 0;  // values per channel on this rank (N * spatial)
};
static_assert(sizeof(Descriptor) == 13 * 8, "Descriptor must have no padding");

// A failing rank's message is cut to this length, which bounds the second exchange.
constexpr std::size_t kMaxMessage = 2048;

std::string show(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

std::string rank_name(int r, int R) {
  std::string s = "rank ";
  s += std::to_string(r);
  s += " of ";
  s += std::to_string(R);
  return s;
}

[[noreturn]] void fail_on_every_rank(const char* fn, int r, int R, const std::string& what, ErrorKind kind) {
  std::string msg = rank_name(r, R);
  msg += ": ";
  msg += what;
  fail(fn, msg, kind);
}

// The first field where rank r differs from rank 0, as "<field>: expected <rank 0's>, got <r's>"
// (ErrorKind::Type for the dtype); empty when they agree.
Problem first_mismatch(const Descriptor& a, const Descriptor& b) {
  auto diff = [](const char* field, const std::string& want, const std::string& got,
                 ErrorKind kind = ErrorKind::Value) {
    std::string s = field;
    s += ": expected ";
    s += want;
    s += " (rank 0's), got ";
    s += got;
    return Problem(std::move(s), kind);
  };
  auto flag = [](std::int64_t v) { return std::string(v ? "true" : "false"); };
  auto present = [](std::int64_t v) { return std::string(v ? "present" : "absent"); };
  auto act = [](std::int64_t v) { return std::string(v == static_cast<std::int64_t>(Activation::Relu) ? "Relu" : "None"); };
  if (a.channels != b.channels)
    return diff("input channels (dim 1)", std::to_string(a.channels), std::to_string(b.channels));
  if (a.dtype != b.dtype)
    return diff("dtype", to_string(static_cast<DType>(a.dtype)), to_string(static_cast<DType>(b.dtype)),
                ErrorKind::Type);
  if (a.training != b.training) return diff("training", flag(a.training), flag(b.training));
  if (a.activation != b.activation) return diff("activation", act(a.activation), act(b.activation));
  if (a.has_running != b.has_running)
    return diff("running statistics", present(a.has_running), present(b.has_running));
  if (a.has_weight != b.has_weight) return diff("weight", present(a.has_weight), present(b.has_weight));
  if (a.has_bias != b.has_bias) return diff("bias", present(a.has_bias), present(b.has_bias));
  if (a.skip_nonfinite != b.skip_nonfinite)
    return diff("skip_nonfinite", flag(a.skip_nonfinite), flag(b.skip_nonfinite));
  // Bitwise comparison: ranks must use the very same value, and NaN never passed validation.
  if (std::memcmp(&a.eps, &b.eps, sizeof(double)) != 0) return diff("eps", show(a.eps), show(b.eps));
  if (std::memcmp(&a.momentum, &b.momentum, sizeof(double)) != 0)
    return diff("momentum", show(a.momentum), show(b.momentum));
  return {};
}

// The collective check. Returns every rank's descriptor when every rank passed its validation and
// all agree; otherwise every rank throws the same Error (built only from gathered data), naming the
// first failing rank.
std::vector<Descriptor> agree(Communicator& comm, const char* fn, Descriptor mine, const Problem& local) {
  const int R = comm.size();
  const auto uR = static_cast<std::size_t>(R);
  std::string message = local.what();
  if (message.size() > kMaxMessage) message.resize(kMaxMessage);
  mine.failed = local ? 1 + static_cast<std::int64_t>(local.kind()) : 0;
  mine.message_bytes = static_cast<std::int64_t>(message.size());
  std::vector<Descriptor> all(uR);
  comm.all_gather(&mine, sizeof(Descriptor), all.data());

  std::size_t longest = 0, failed = 0;
  int first = -1;
  for (int r = 0; r < R; ++r) {
    const Descriptor& d = all[static_cast<std::size_t>(r)];
    if (!d.failed) continue;
    ++failed;
    if (first < 0) first = r;
    longest = std::max(longest, static_cast<std::size_t>(d.message_bytes));
  }
  if (failed) {
    // Every rank knows a second exchange is needed and its size: the messages, padded alike.
    std::vector<char> out(longest, '\0'), in(uR * longest);
    std::copy(message.begin(), message.end(), out.begin());
    if (longest) comm.all_gather(out.data(), longest, in.data());
    const Descriptor& d = all[static_cast<std::size_t>(first)];
    const char* text = in.data() + static_cast<std::size_t>(first) * longest;
    std::string what(text, text + d.message_bytes);
    if (failed > 1) {
      what += " (and ";
      what += std::to_string(failed - 1);
      what += " more rank(s) failed their checks)";
    }
    fail_on_every_rank(fn, first, R, what, static_cast<ErrorKind>(d.failed - 1));
  }
  for (int r = 1; r < R; ++r) {
    const Problem m = first_mismatch(all[0], all[static_cast<std::size_t>(r)]);
    if (m) fail_on_every_rank(fn, r, R, m.what(), m.kind());
  }
  return all;
}

// Which per-channel vectors a call has (a descriptor field each).
struct Present {
  bool running = false, weight = false, bias = false;
};

// eps and momentum as the descriptor compares them: a field that does not matter to the call is 0.
Descriptor describe(const TensorInfo& in, DType dtype, const Options& o, Present present, double eps,
                    double momentum) {
  Descriptor d;
  d.channels = in.geometry.C;
  d.dtype = static_cast<std::int64_t>(dtype);
  d.training = o.training ? 1 : 0;
  d.activation = static_cast<std::int64_t>(o.activation);
  d.has_running = present.running ? 1 : 0;
  d.has_weight = present.weight ? 1 : 0;
  d.has_bias = present.bias ? 1 : 0;
  d.skip_nonfinite = o.skip_nonfinite && o.training && present.running ? 1 : 0;
  d.eps = eps;
  d.momentum = momentum;
  d.count = static_cast<double>(in.geometry.per_channel());
  return d;
}

// The global count, added in rank order (exact: counts are integers far below 2^53).
double global_count(const std::vector<Descriptor>& all) {
  double m = 0;
  for (const Descriptor& d : all) m += d.count;
  return m;
}

// The training forward after agree(): every rank's (mean, M2) per channel, gathered and merged in
// rank order, so that every rank computes bitwise the same statistics; then batch_norm's normalize
// and update with them. m is the global count of values per channel.
template <class T>
void exchange_forward(Communicator& comm, const std::vector<Descriptor>& all, double m, const TensorInfo& in,
                      const T* x, T* y, RunningStats running, Affine affine, const Options& options, SavedStats save) {
  const int R = comm.size();
  const auto uC = static_cast<std::size_t>(in.geometry.C);
  if (uC == 0) return;
  // The per-channel buffers come from the calling thread's workspace (workspace.hpp);
  // functional.cpp's pieces below take theirs after them.
  Workspace::Scope scope;
  const std::span<double> local = scope.take<double>(2 * uC),
                          gathered = scope.take<double>(static_cast<std::size_t>(R) * 2 * uC);
  local_moments(x, in, local.data(), local.data() + uC);
  comm.all_gather(local.data(), local.size() * sizeof(double), gathered.data());
  const std::span<double> mean = scope.take<double>(uC), var = scope.take<double>(uC);
  for (std::size_t c = 0; c < uC; ++c) {
    double n = 0, mu = 0, m2 = 0;
    for (std::size_t r = 0; r < static_cast<std::size_t>(R); ++r) {
      const double* part = gathered.data() + r * 2 * uC;
      kernels::chan_merge(n, mu, m2, all[r].count, part[c], part[uC + c]);
    }
    mean[c] = mu;
    var[c] = m2 / m;
  }
  forward_with_stats(x, y, in, {mean, var, m}, running, affine, options, save);
}

// The training backward after agree(): [sum(dy) | sum(dy * (x - mean))], this rank's, then their sum
// over the ranks in rank order; then batch_norm's dx with the global sums.
template <class T>
void exchange_backward(Communicator& comm, double count, const TensorInfo& in, const T* dy,
                       const ForwardState& forward, const Options& options, T* dx, ParamGrads grads) {
  const auto uC = static_cast<std::size_t>(in.geometry.C);
  if (uC == 0) return;
  ForwardState f = forward;
  if (options.activation != Activation::Relu) f.output = {};
  Workspace::Scope scope;
  const std::span<double> local = scope.take<double>(2 * uC), global = scope.take<double>(2 * uC);
  backward_sums(dy, f, in, {local.data(), local.data() + uC});
  std::copy(local.begin(), local.end(), global.begin());
  comm.all_reduce_sum(global.data(), global.size());
  backward_finish(dy, f, in, {local.data(), local.data() + uC}, {global.data(), global.data() + uC}, count, dx,
                  grads);
}

}  // namespace

void sync_forward(Communicator& comm, const char* fn, const Problem& prior, ConstTensorView input,
                  TensorView output, RunningStats running, Affine affine, const Options& options, SavedStats save) {
  // The layer's problem, or the outcome of this call's checks: either way a rank that failed still
  // takes part in agree(), which then throws on every rank.
  const Checked<TensorInfo> checked =
      prior ? Checked<TensorInfo>(prior) : check_forward_args(input, output, running, affine, options, save);
  const Problem& problem = checked.problem;
  Descriptor mine;
  if (!problem)
    mine = describe(checked.value, input.dtype(), options,
                    {running.mean.present(), affine.weight.present(), affine.bias.present()}, options.eps,
                    options.momentum);
  const std::vector<Descriptor> all = agree(comm, fn, mine, problem);
  const TensorInfo& in = checked.value;
  const double m = global_count(all);
  if (options.training && in.geometry.C > 0 && m <= 1) {
    std::string what = "input: Expected more than 1 value per channel when training, got ";
    what += show(m);
    what += " value(s) per channel over all ranks (N * spatial per rank:";
    for (const Descriptor& d : all) {
      what += ' ';
      what += show(d.count);
    }
    what += ")";
    fail(fn, what);  // the same on every rank: built from gathered data only
  }
  dispatch(input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = typed<T>(input);
    T* y = typed<T>(output);
    // Frozen statistics: nothing to exchange; the arguments passed the same checks as batch_norm's.
    if (!options.training) return run_forward<T>(in, x, y, running, {}, affine, options, {}, nullptr);
    exchange_forward(comm, all, m, in, x, y, running, affine, options, save);
  });
}

std::vector<double> agree_on_counts(Communicator& comm, const char* fn, const Problem& local, std::int64_t channels,
                                    double count) {
  Descriptor mine;  // only the channels and the count: the other fields agree as zeros
  mine.channels = channels;
  mine.count = count;
  const std::vector<Descriptor> all = agree(comm, fn, mine, local);
  std::vector<double> counts(all.size());
  for (std::size_t r = 0; r < all.size(); ++r) counts[r] = all[r].count;
  return counts;
}

void sync_backward(Communicator& comm, const char* fn, const Problem& prior, ConstTensorView grad_output,
                   const ForwardState& forward, const Options& options, TensorView grad_input, ParamGrads grads) {
  const Checked<TensorInfo> checked =
      prior ? Checked<TensorInfo>(prior) : check_backward_args(grad_output, forward, options, grad_input, grads);
  const Problem& problem = checked.problem;
  Descriptor mine;
  // eps matters only with frozen statistics; momentum not at all.
  if (!problem)
    mine = describe(checked.value, forward.input.dtype(), options, {!options.training, forward.weight.present(), false},
                    options.training ? 0.0 : options.eps, 0.0);
  const std::vector<Descriptor> all = agree(comm, fn, mine, problem);
  const TensorInfo& in = checked.value;
  dispatch(forward.input.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* dy = typed<T>(grad_output);
    T* dx = typed_or_null<T>(grad_input);
    // Frozen statistics: dx = gamma * invstd * dy needs nothing from the other ranks.
    if (!options.training) return run_backward(in, dy, forward, options, dx, grads);
    exchange_backward(comm, global_count(all), in, dy, forward, options, dx, grads);
  });
}

namespace {

// The layer's collective source of batch statistics (SyncBatchNorm): the communicator is the
// caller's and must outlive the layer.
class CollectiveReducer final : public StatsReducer {
 public:
  explicit CollectiveReducer(Communicator& comm) : comm_(comm) {}
  const char* layer_name() const override { return "SyncBatchNorm"; }
  const char* forward_name() const override { return "SyncBatchNorm::forward"; }
  const char* backward_name() const override { return "SyncBatchNorm::backward"; }
  void forward(const char* fn, const Problem& prior, ConstTensorView x, TensorView y, RunningStats running,
               Affine affine, const Options& options, SavedStats save) const override {
    sync_forward(comm_, fn, prior, x, y, running, affine, options, save);
  }
  void backward(const char* fn, const Problem& prior, ConstTensorView dy, const ForwardState& forward,
                const Options& options, TensorView dx, ParamGrads grads) const override {
    sync_backward(comm_, fn, prior, dy, forward, options, dx, grads);
  }

 private:
  Communicator& comm_;
};

}  // namespace

std::shared_ptr<const StatsReducer> collective_reducer(Communicator& comm) {
  return std::make_shared<const CollectiveReducer>(comm);
}

}  // namespace detail

void sync_batch_norm(Communicator& comm, ConstTensorView input, TensorView output, RunningStats running,
                     Affine affine, Options options, SavedStats save) {
  detail::sync_forward(comm, "sync_batch_norm", {}, input, output, running, affine, options, save);
}

void sync_batch_norm_backward(Communicator& comm, ConstTensorView grad_output, const ForwardState& forward,
                              Options options, TensorView grad_input, ParamGrads grads) {
  detail::sync_backward(comm, "sync_batch_norm_backward", {}, grad_output, forward, options, grad_input, grads);
}

void sync_batch_norm_refuse(Communicator& comm, bool backward, const std::string& what, ErrorKind kind) {
  const detail::Problem problem(what, kind);
  if (backward)
    detail::sync_backward(comm, "sync_batch_norm_backward", problem, {}, {}, {}, {}, {});
  else
    detail::sync_forward(comm, "sync_batch_norm", problem, {}, {}, {}, {}, {}, {});
  // agree() has thrown on every rank; this is never reached.
  detail::raise(backward ? "sync_batch_norm_backward" : "sync_batch_norm", problem);
}

}  // namespace bnorm
