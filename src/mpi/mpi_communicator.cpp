#include <bnorm/mpi.hpp>

#include <climits>
#include <string>

namespace bnorm {
namespace {

[[noreturn]] void fail(const std::string& what) { throw Error("bnorm::MpiCommunicator: " + what); }

// MPI reports errors through its handler; with MPI_ERRORS_RETURN on our duplicate, a failed call
// becomes a bnorm::Error naming the call instead of an abort without context.
void check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  std::string msg = call;
  msg += ": expected MPI_SUCCESS, got ";
  msg += std::string(text, static_cast<std::size_t>(len));
  fail(msg);
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    fail(std::string("MPI: expected an initialized MPI (call MPI_Init first), got ") +
         (finalized ? "a finalized one" : "none"));
  if (comm == MPI_COMM_NULL) fail("comm: expected a communicator, got MPI_COMM_NULL");
  check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  // Freeing after MPI_Finalize is an error in MPI; the communicator died with MPI then anyway.
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_gather(const void* in, std::size_t bytes, void* out) {
  // MPI counts are int: SyncBatchNorm sends 16 bytes per channel, far below this.
  if (bytes > static_cast<std::size_t>(INT_MAX))
    fail("bytes: expected at most " + std::to_string(INT_MAX) + " per rank, got " + std::to_string(bytes));
  const int n = static_cast<int>(bytes);
  check(MPI_Allgather(in, n, MPI_BYTE, out, n, MPI_BYTE, comm_), "MPI_Allgather");
}

}  // namespace bnorm
