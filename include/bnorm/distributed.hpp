// bnorm distributed: SyncBatchNorm, batch statistics over the global batch of every process.
//
// The library talks to the other processes only through `Communicator`, a small abstract class, so
// the core library has no MPI (or any transport) dependency: the MPI implementation is the separate
// component bnorm_mpi (<bnorm/mpi.hpp>), and a test or another transport implements the same two
// calls. See docs/distributed.md for the protocol, what crosses the wire and how much.
#pragma once

#include <bnorm/functional.hpp>
#include <bnorm/layer.hpp>
#include <bnorm/types.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace bnorm {

// A fixed group of `size()` processes (ranks). Every call is collective: every rank of the group
// makes the same sequence of calls with the same sizes.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Every rank contributes `bytes` bytes at `in`; `out` receives size() * bytes bytes, rank r's at
  // offset r * bytes, on every rank.
  virtual void all_gather(const void* in, std::size_t bytes, void* out) = 0;

  // Element-wise sum over the ranks, in place. The default gathers every rank's vector and adds
  // them in rank order, so that every rank gets the bitwise-same result whatever the transport's
  // reduction algorithm (replicated parameters then never drift apart); a transport may override it
  // only with something that keeps that guarantee.
  virtual void all_reduce_sum(double* data, std::size_t count);
};

// The functional SyncBatchNorm: batch_norm (functional.hpp) with the batch statistics of the
// concatenation of every rank's input. Collective: every rank of `comm` calls it. Each rank's input
// may hold any number of samples, 0 and 1 included (only the global count must exceed 1 in
// training); shapes beyond dim 1 may differ between ranks too.
//   Forward: every rank's per-channel (count, mean, M2) is all-gathered and merged in rank order
//   with Chan's formula, so all ranks get bitwise-identical statistics, as exact as one process's.
//   running_var gets the unbiased variance of the global count m: var * m / (m - 1).
// Before any exchange whose size depends on the arguments, the ranks exchange a descriptor (channels,
// dtype, layout, training, activation, eps, momentum, which vectors are present) and the outcome of
// their local validation; when any rank's validation failed or the descriptors differ, every rank
// throws the same bnorm::Error naming the rank and the problem, and nothing is written anywhere.
// With training = false no statistics are exchanged (only the descriptor).
void sync_batch_norm(Communicator& comm, ConstTensorView input, TensorView output, RunningStats running,
                     Affine affine, Options options, SavedStats save = {});

// Its backward: with training = true the per-channel sum(dy) and sum(dy * (x - mean)) are
// all-reduced (in double, rank order) and grad_input uses the global count. grad_weight and
// grad_bias are this rank's contribution (as in torch.nn.SyncBatchNorm): summed over the ranks,
// as the data-parallel gradient all-reduce does, they are the single-process gradients.
// Arguments as batch_norm_backward; collective with the same descriptor check as the forward.
void sync_batch_norm_backward(Communicator& comm, ConstTensorView grad_output, const ForwardState& forward,
                              Options options, TensorView grad_input, ParamGrads grads = {});

// For a binding whose own checks (those the library cannot see: a framework's device, dtype or
// tensor kind) failed on this rank before it could make the call's views. Takes part in the
// collective check of the sync_batch_norm (backward = false) or sync_batch_norm_backward (true) call
// that the other ranks are making, so that every rank throws this rank's error together and none
// waits for it. `what` reads "<argument>: expected ..., got ...". Always throws bnorm::Error.
[[noreturn]] void sync_batch_norm_refuse(Communicator& comm, bool backward, const std::string& what,
                                         ErrorKind kind = ErrorKind::Value);

namespace detail {
// The layer's StatsReducer (layer.hpp) for the global batch over every rank of `comm`.
std::shared_ptr<const StatsReducer> collective_reducer(Communicator& comm);
}  // namespace detail

// torch.nn.SyncBatchNorm: BatchNorm whose batch statistics (training, or eval without running
// statistics) are those of the global batch over every rank of `comm`, which must outlive the layer.
// Accepts any rank >= 2 like torch's. forward and backward are collective: every rank calls them,
// each with its own part of the batch (any size, 0 included). weight_grad() / bias_grad() accumulate
// this rank's contribution: all-reduce (sum) them with the other gradients to get the global ones.
template <class P = float>
class SyncBatchNormT : public BasicBatchNorm<P> {
 public:
  SyncBatchNormT(std::int64_t num_features, Communicator& comm, BatchNormOptions o = {})
      : BasicBatchNorm<P>(num_features, o, -1, detail::collective_reducer(comm)) {}
};
using SyncBatchNorm = SyncBatchNormT<float>;
using SyncBatchNorm64 = SyncBatchNormT<double>;

}  // namespace bnorm
