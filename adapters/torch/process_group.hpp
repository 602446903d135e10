// bnorm's Communicator over a torch.distributed process group (process_group.cpp), which the
// SyncBatchNorm operators run their collectives through.
#pragma once

#include <bnorm/distributed.hpp>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstddef>
#include <string>

namespace bnorm::torch_ops {

// The process group is found by its name (what Python's ProcessGroup.group_name gives, as torch's
// functional collectives take it). Gloo, and any backend whose allgather takes CPU tensors. Each
// exchange waits for its result: a rank that died, or a collective that outlives the group's
// timeout, raises here (torch's DistBackendError) instead of waiting forever.
class ProcessGroupCommunicator final : public bnorm::Communicator {
 public:
  explicit ProcessGroupCommunicator(const std::string& group_name);
  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  void all_gather(const void* in, std::size_t bytes, void* out) override;

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
};

}  // namespace bnorm::torch_ops
