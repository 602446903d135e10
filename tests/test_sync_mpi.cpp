// SyncBatchNorm across processes: run under mpirun (tests/CMakeLists.txt adds it with 2 and 4
// ranks). Each process is one rank; the checks are those of the thread test (sync_check.hpp).
#include <bnorm/mpi.hpp>

#include "population_check.hpp"
#include "sync_check.hpp"

namespace bnorm::test {
namespace {

Communicator& world() {
  // Made after MPI_Init (main); destroyed after MPI_Finalize, where its destructor skips the free.
  static MpiCommunicator comm;
  return comm;
}

TEST(SyncMpi, MatchesSingleProcessOnUnevenSplits) { check_sync_all(world()); }

TEST(SyncMpi, ErrorsOnEveryRankAndNoHang) { check_sync_errors(world()); }

TEST(SyncMpi, PopulationStatsEqualOnEveryRankAndToOneProcess) {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    check_population_collective<double>(world(), layout);
    check_population_collective<float>(world(), layout);
    check_population_collective<bfloat16>(world(), layout);
  }
}

TEST(SyncMpi, PopulationStatsErrorsOnEveryRank) { check_population_errors(world()); }

}  // namespace
}  // namespace bnorm::test

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
  // A failure on any rank fails every rank's exit status, so mpirun reports it whichever rank it was.
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
