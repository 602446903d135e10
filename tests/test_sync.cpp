// SyncBatchNorm without MPI: the ranks are threads of this process joined by an in-process
// Communicator, so the merge, the collective checks and the layer are tested on every build.
// tests/test_sync_mpi.cpp runs the same checks (sync_check.hpp) across processes under mpirun.
#include "sync_check.hpp"

#include <barrier>
#include <functional>
#include <thread>

namespace bnorm::test {
namespace {

// R threads, each holding a Member: all_gather publishes this rank's bytes, waits for every rank,
// copies all of them, and waits again so that no slot is overwritten while another rank reads it.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : slots_(static_cast<std::size_t>(size)), barrier_(size) {}

  class Member : public Communicator {
   public:
    Member(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
    int rank() const override { return rank_; }
    int size() const override { return static_cast<int>(g_.slots_.size()); }
    void all_gather(const void* in, std::size_t bytes, void* out) override {
      const auto* p = static_cast<const unsigned char*>(in);
      g_.slots_[static_cast<std::size_t>(rank_)].assign(p, p + bytes);
      g_.barrier_.arrive_and_wait();
      for (std::size_t r = 0; r < g_.slots_.size(); ++r) {
        // Every rank must gather the same size: a protocol bug shows here, not as a hang.
        EXPECT_EQ(g_.slots_[r].size(), bytes) << "rank " << r << " gathered a different size than rank " << rank_;
        std::memcpy(static_cast<unsigned char*>(out) + r * bytes, g_.slots_[r].data(), std::min(bytes, g_.slots_[r].size()));
      }
      g_.barrier_.arrive_and_wait();
    }

   private:
    ThreadGroup& g_;
    int rank_;
  };

  // Runs f(member) on `size` threads and joins them.
  void run(const std::function<void(Communicator&)>& f) {
    std::vector<std::thread> threads;
    for (int r = 0; r < static_cast<int>(slots_.size()); ++r)
      threads.emplace_back([this, r, &f] {
        Member m(*this, r);
        f(m);
      });
    for (std::thread& t : threads) t.join();
  }

 private:
  std::vector<std::vector<unsigned char>> slots_;
  std::barrier<> barrier_;
};

TEST(SyncThreads, MatchesSingleProcessOnUnevenSplits) {
  ThreadScope one(1);  // the ranks are the parallelism here
  for (int R : {1, 2, 3, 4}) ThreadGroup(R).run([](Communicator& c) { check_sync_all(c); });
}

TEST(SyncThreads, ErrorsOnEveryRankAndNoHang) {
  ThreadScope one(1);
  for (int R : {2, 3}) ThreadGroup(R).run([](Communicator& c) { check_sync_errors(c); });
}

TEST(SyncThreads, AllReduceSumIsInRankOrderOnEveryRank) {
  ThreadGroup(3).run([](Communicator& c) {
    // 1e16 + 1 - 1e16: rank order gives (1e16 + 1) - 1e16 = 0 exactly (1 is lost), on every rank.
    const double mine[3] = {1e16, 1.0, -1e16};
    double v[2] = {mine[c.rank()], static_cast<double>(c.rank())};
    c.all_reduce_sum(v, 2);
    EXPECT_EQ(v[0], 0.0);
    EXPECT_EQ(v[1], 3.0);
  });
}

}  // namespace
}  // namespace bnorm::test
