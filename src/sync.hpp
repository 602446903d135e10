// Internal: the SyncBatchNorm entry points with a problem found before them. The layer checks its
// own state and input first; when that fails on one rank, the rank must still take part in the
// collective check (or the others would wait for it forever), so the problem is handed in as
// `prior` and every rank throws it together.
#pragma once

#include <bnorm/distributed.hpp>

#include "validate.hpp"

#include <vector>

namespace bnorm::detail {

void sync_forward(Communicator& comm, const char* fn, const Problem& prior, ConstTensorView input,
                  TensorView output, RunningStats running, Affine affine, const Options& options, SavedStats save);

void sync_backward(Communicator& comm, const char* fn, const Problem& prior, ConstTensorView grad_output,
                   const ForwardState& forward, const Options& options, TensorView grad_input, ParamGrads grads);

// The collective check alone, for other collectives than batch normalization (PopulationStats'
// finalize): every rank's problem (empty: none), channel count and values per channel. When any
// rank's problem is set or the channel counts differ, every rank throws the same Error naming the
// first such rank; otherwise every rank gets every rank's count, in rank order.
std::vector<double> agree_on_counts(Communicator& comm, const char* fn, const Problem& local, std::int64_t channels,
                                    double count);

}  // namespace bnorm::detail
