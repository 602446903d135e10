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
struct Descriptor {
  std::int64_t failed = 0;         // 1: this rank's validation threw (its message follows separately)
  std::int64_t message_bytes = 0;  // length of that message
  std::int64_t channels = 0;
  std::int64_t dtype = 0;
  std::int64_t layout = 0;
  std::int64_t training = 0;
  std::int64_t activation = 0;
  std::int64_t has_running = 0;
  std::int64_t has_weight = 0;
  std::int64_t has_bias = 0;
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

// The message without its "bnorm::<fn>: " head, which the collective error puts back once.
std::string strip_head(const std::string& msg, const char* fn) {
  std::string head = "bnorm::";
  head += fn;
  head += ": ";
  return msg.rfind(head, 0) == 0 ? msg.substr(head.size()) : msg;
}

[[noreturn]] void fail_on_every_rank(const char* fn, int r, int R, const std::string& what) {
  std::string msg = rank_name(r, R);
  msg += ": ";
  msg += what;
  fail(fn, msg);
}

// The first field where rank r differs from rank 0, as "<field>: expected <rank 0's>, got <r's>".
std::string first_mismatch(const Descriptor& a, const Descriptor& b) {
  auto diff = [](const char* field, const std::string& want, const std::string& got) {
    std::string s = field;
    s += ": expected ";
    s += want;
    s += " (rank 0's), got ";
    s += got;
    return s;
  };
  auto flag = [](std::int64_t v) { return std::string(v ? "true" : "false"); };
  auto present = [](std::int64_t v) { return std::string(v ? "present" : "absent"); };
  auto act = [](std::int64_t v) { return std::string(v == static_cast<std::int64_t>(Activation::Relu) ? "Relu" : "None"); };
  if (a.channels != b.channels)
    return diff("input channels (dim 1)", std::to_string(a.channels), std::to_string(b.channels));
  if (a.dtype != b.dtype)
    return diff("dtype", to_string(static_cast<DType>(a.dtype)), to_string(static_cast<DType>(b.dtype)));
  if (a.layout != b.layout)
    return diff("layout", to_string(static_cast<Layout>(a.layout)), to_string(static_cast<Layout>(b.layout)));
  if (a.training != b.training) return diff("training", flag(a.training), flag(b.training));
  if (a.activation != b.activation) return diff("activation", act(a.activation), act(b.activation));
  if (a.has_running != b.has_running)
    return diff("running statistics", present(a.has_running), present(b.has_running));
  if (a.has_weight != b.has_weight) return diff("weight", present(a.has_weight), present(b.has_weight));
  if (a.has_bias != b.has_bias) return diff("bias", present(a.has_bias), present(b.has_bias));
  // Bitwise comparison: ranks must use the very same value, and NaN never passed validation.
  if (std::memcmp(&a.eps, &b.eps, sizeof(double)) != 0) return diff("eps", show(a.eps), show(b.eps));
  if (std::memcmp(&a.momentum, &b.momentum, sizeof(double)) != 0)
    return diff("momentum", show(a.momentum), show(b.momentum));
  return {};
}

// The collective check. Returns every rank's descriptor when every rank passed its validation and
// all agree; otherwise every rank throws the same Error (built only from gathered data), naming the
// first failing rank.
std::vector<Descriptor> agree(Communicator& comm, const char* fn, Descriptor mine, const std::string& local_error) {
  const int R = comm.size();
  const auto uR = static_cast<std::size_t>(R);
  std::string message = strip_head(local_error, fn);
  if (message.size() > kMaxMessage) message.resize(kMaxMessage);
  mine.failed = local_error.empty() ? 0 : 1;
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
    fail_on_every_rank(fn, first, R, what);
  }
  for (int r = 1; r < R; ++r) {
    const std::string m = first_mismatch(all[0], all[static_cast<std::size_t>(r)]);
    if (!m.empty()) fail_on_every_rank(fn, r, R, m);
  }
  return all;
}

Descriptor describe(const TensorInfo& in, DType dtype, bool training, Activation act, bool has_running,
                    bool has_weight, bool has_bias, double eps, double momentum) {
  Descriptor d;
  d.channels = in.geometry.C;
  d.dtype = static_cast<std::int64_t>(dtype);
  d.layout = static_cast<std::int64_t>(in.geometry.layout);
  d.training = training ? 1 : 0;
  d.activation = static_cast<std::int64_t>(act);
  d.has_running = has_running ? 1 : 0;
  d.has_weight = has_weight ? 1 : 0;
  d.has_bias = has_bias ? 1 : 0;
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

}  // namespace

void sync_forward(Communicator& comm, const char* fn, const std::string& prior_error, ConstTensorView input,
                  TensorView output, VectorView running_mean, VectorView running_var, ConstVectorView weight,
                  ConstVectorView bias, bool training, double momentum, double eps, VectorView save_mean,
                  VectorView save_invstd, Activation activation) {
  std::string error = prior_error;
  TensorInfo in;
  Descriptor mine;
  if (error.empty()) {
    try {
      in = check_forward_args(fn, input, output, running_mean, running_var, weight, bias, training, momentum, eps,
                              save_mean, save_invstd, activation);
      mine = describe(in, input.dtype(), training, activation, running_mean.present(), weight.present(),
                      bias.present(), eps, momentum);
    } catch (const Error& e) {
      error = e.what();
    }
  }
  const std::vector<Descriptor> all = agree(comm, fn, mine, error);
  if (!training) {
    // Frozen statistics: nothing to exchange; the arguments passed the same checks as batch_norm's.
    batch_norm(input, output, running_mean, running_var, weight, bias, false, momentum, eps, {}, {}, activation);
    return;
  }
  const int R = comm.size();
  const double m = global_count(all);
  const std::int64_t C = in.geometry.C;
  if (C > 0 && m <= 1) {
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
  const auto uC = static_cast<std::size_t>(C);
  if (uC == 0) return;
  // This rank's (mean, M2) per channel, gathered from every rank and merged in rank order, so that
  // every rank computes bitwise the same statistics. The per-channel buffers come from the calling
  // thread's workspace (workspace.hpp); functional.cpp's pieces below take theirs after them.
  Workspace::Scope scope;
  const std::span<double> local = scope.take<double>(2 * uC),
                          gathered = scope.take<double>(static_cast<std::size_t>(R) * 2 * uC);
  local_moments(input, in, local.data(), local.data() + uC);
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
  forward_with_stats(input, output, in, mean, var, m, running_mean, running_var, weight, bias, true, momentum, eps,
                     save_mean, save_invstd, activation);
}

void sync_backward(Communicator& comm, const char* fn, const std::string& prior_error, ConstTensorView grad_output,
                   ConstTensorView input, ConstVectorView weight, ConstVectorView running_mean,
                   ConstVectorView running_var, ConstVectorView save_mean, ConstVectorView save_invstd, bool training,
                   double eps, TensorView grad_input, VectorView grad_weight, VectorView grad_bias,
                   Activation activation, ConstTensorView output) {
  std::string error = prior_error;
  TensorInfo in;
  Descriptor mine;
  if (error.empty()) {
    try {
      in = check_backward_args(fn, grad_output, input, weight, running_mean, running_var, save_mean, save_invstd,
                               training, eps, grad_input, grad_weight, grad_bias, activation, output);
      // eps matters only with frozen statistics; momentum not at all.
      mine = describe(in, input.dtype(), training, activation, !training, weight.present(), false,
                      training ? 0.0 : eps, 0.0);
    } catch (const Error& e) {
      error = e.what();
    }
  }
  const std::vector<Descriptor> all = agree(comm, fn, mine, error);
  if (!training) {
    // Frozen statistics: dx = gamma * invstd * dy needs nothing from the other ranks.
    batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd, false, eps,
                        grad_input, grad_weight, grad_bias, activation, output);
    return;
  }
  const auto uC = static_cast<std::size_t>(in.geometry.C);
  if (uC == 0) return;
  const ConstTensorView out = activation == Activation::Relu ? output : ConstTensorView();
  // [sum(dy) | sum(dy * (x - mean))]: this rank's, then their sum over the ranks in rank order.
  Workspace::Scope scope;
  const std::span<double> local = scope.take<double>(2 * uC), global = scope.take<double>(2 * uC);
  backward_sums(grad_output, input, out, in, save_mean, local.data(), local.data() + uC);
  std::copy(local.begin(), local.end(), global.begin());
  comm.all_reduce_sum(global.data(), global.size());
  backward_finish(grad_output, input, out, in, weight, save_mean, save_invstd, local.data(), local.data() + uC,
                  global.data(), global.data() + uC, global_count(all), grad_input, grad_weight, grad_bias);
}

}  // namespace detail

void sync_batch_norm(Communicator& comm, ConstTensorView input, TensorView output, VectorView running_mean,
                     VectorView running_var, ConstVectorView weight, ConstVectorView bias, bool training,
                     double momentum, double eps, VectorView save_mean, VectorView save_invstd, Activation activation) {
  detail::sync_forward(comm, "sync_batch_norm", {}, input, output, running_mean, running_var, weight, bias, training,
                       momentum, eps, save_mean, save_invstd, activation);
}

void sync_batch_norm_backward(Communicator& comm, ConstTensorView grad_output, ConstTensorView input,
                              ConstVectorView weight, ConstVectorView running_mean, ConstVectorView running_var,
                              ConstVectorView save_mean, ConstVectorView save_invstd, bool training, double eps,
                              TensorView grad_input, VectorView grad_weight, VectorView grad_bias,
                              Activation activation, ConstTensorView output) {
  detail::sync_backward(comm, "sync_batch_norm_backward", {}, grad_output, input, weight, running_mean, running_var,
                        save_mean, save_invstd, training, eps, grad_input, grad_weight, grad_bias, activation, output);
}

}  // namespace bnorm
