// bnorm_mpi: the MPI Communicator for SyncBatchNorm (link bnorm::mpi; needs an MPI such as Open MPI).
// The core library stays free of MPI: only this header and its library see <mpi.h>.
#pragma once

#include <bnorm/distributed.hpp>

#include <mpi.h>

namespace bnorm {

class MpiCommunicator : public Communicator {
 public:
  // Works on a duplicate of `comm` (MPI_Comm_dup), so that bnorm's collectives never match the
  // application's own messages. MPI must be initialized (MPI_Init) and stay so until destruction.
  // Collective over `comm`, like MPI_Comm_dup.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_gather(const void* in, std::size_t bytes, void* out) override;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace bnorm
