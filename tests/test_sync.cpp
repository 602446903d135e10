// SyncBatchNorm without MPI: the ranks are threads of this process joined by an in-process
// Communicator, so the merge, the collective checks and the layer are tested on every build.
// tests/test_sync_mpi.cpp runs the same checks (sync_check.hpp) across processes under mpirun.
#include "population_check.hpp"
#include "sync_check.hpp"

#include <barrier>
#include <functional>
#include <limits>
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

// The non-finite guard under SyncBatchNorm decides on the global statistics: a NaN on one rank makes
// every rank skip its update and count it; ranks that disagree on the option are refused together.
TEST(SyncThreads, NonfiniteGuardIsGlobal) {
  ThreadScope one(1);
  ThreadGroup(3).run([](Communicator& c) {
    SyncBatchNorm bn(2, c, {.skip_nonfinite = true});
    std::vector<float> x{1.f, 2.f, 3.f, 4.f, 5.f, 6.f}, y(x.size());
    if (c.rank() == 2) x[4] = std::numeric_limits<float>::quiet_NaN();
    bn.forward(ConstTensorView(x.data(), {1, 2, 3}), TensorView(y.data(), {1, 2, 3}));
    EXPECT_EQ(bn.nonfinite_skipped(), 1) << "rank " << c.rank();
    EXPECT_EQ(bn.num_batches_tracked(), 0);
    EXPECT_EQ(bn.running_mean()[0], 0.f);
    EXPECT_EQ(bn.running_var()[1], 1.f);
    x[4] = 5.f;
    bn.forward(ConstTensorView(x.data(), {1, 2, 3}), TensorView(y.data(), {1, 2, 3}));
    EXPECT_EQ(bn.num_batches_tracked(), 1);
    EXPECT_NE(bn.running_mean()[0], 0.f);
    std::vector<float> rm(2, 0.f), rv(2, 1.f);
    expect_error_everywhere(
        c,
        [&] {
          sync_batch_norm(c, ConstTensorView(x.data(), {1, 2, 3}), TensorView(y.data(), {1, 2, 3}), {rm, rv}, {},
                          {.training = true, .skip_nonfinite = c.rank() != 1});
        },
        {"rank 1 of 3", "skip_nonfinite: expected true (rank 0's), got false"});
    EXPECT_EQ(rm[0], 0.f);
  });
}

// PopulationStats::finalize over a communicator (population_check.hpp): uneven and empty ranks.
TEST(SyncThreads, PopulationStatsEqualOnEveryRankAndToOneProcess) {
  ThreadScope one(1);
  for (int R : {1, 2, 3, 4})
    ThreadGroup(R).run([](Communicator& c) {
      for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
        check_population_collective<double>(c, layout);
        check_population_collective<float>(c, layout);
        check_population_collective<bfloat16>(c, layout);
      }
    });
}

TEST(SyncThreads, PopulationStatsErrorsOnEveryRank) {
  ThreadScope one(1);
  for (int R : {2, 3}) ThreadGroup(R).run([](Communicator& c) { check_population_errors(c); });
}

}  // namespace
}  // namespace bnorm::test
