// bnorm population statistics: the exact per-channel mean and variance of a whole dataset, for the
// running statistics that eval uses ("precise BN", docs/running-statistics.md).
//
// A layer's running statistics are a moving average of batch statistics taken under weights that
// kept changing; the statistics of the data itself under the final weights are what eval should
// normalize with. PopulationStats takes the batches one at a time and keeps, per channel, the count,
// mean and M2 = sum((x - mean)^2) of everything it has seen, merged with Chan's formula in float64:
// exact algebra, so that the result is the float64 two-pass statistics of the concatenated data
// (within 1e-12 relative, tests/test_population.cpp), whatever the batch sizes and their order. An
// average of batch variances (torch.optim.swa_utils.update_bn, fvcore's update_bn_stats) is not the
// variance of the data unless every batch has the same mean; this is.
#pragma once

#include <bnorm/layer.hpp>
#include <bnorm/types.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace bnorm {

class Communicator;  // distributed.hpp

class PopulationStats {
 public:
  // For inputs of `channels` channels (>= 1).
  explicit PopulationStats(std::int64_t channels);

  // Merges one batch (N, C, ...): any rank >= 2, layout and dtype (float32, float64, bfloat16), any
  // N (0 adds nothing). float32 and bfloat16 batches are widened to float64 first and go through the
  // library's float64 moments (per-block two-pass sums), whose error is ~1e-14 relative, where the
  // float32 kernels' is ~1e-7 (docs/numerics.md): this is offline work, where a copy of the batch
  // costs little. A batch whose mean or variance is not finite in some channel (a NaN or Inf in it)
  // is refused with an Error naming the channel, and nothing is merged.
  void add(ConstTensorView batch);

  // Merges moments computed elsewhere: `count` values per channel with these means and M2s (C each).
  // Refused (nothing merged) unless count >= 0, the lengths are C and every value is finite, M2 >= 0.
  void merge(double count, std::span<const double> mean, std::span<const double> m2);

  std::int64_t channels() const { return static_cast<std::int64_t>(mean_.size()); }
  double count() const { return count_; }  // values per channel so far (N * spatial, summed)
  std::span<const double> mean() const { return mean_; }
  std::span<const double> m2() const { return m2_; }
  void reset();

  // Writes the population mean and the unbiased variance M2 / (count - 1) into running (C values
  // each, float32 or float64): needs count > 1. With a communicator, the moments of every rank of
  // `comm` are gathered and merged in rank order, so every rank writes bitwise the same values,
  // those of one process that saw every rank's data (to the same 1e-12); ranks may have seen any
  // number of batches, none included. Collective then: every rank calls it, and when any rank's
  // arguments are wrong or the ranks' channel counts differ, every rank throws the same Error
  // naming the rank, and nothing is written anywhere. This object is not changed either way.
  void finalize(RunningStats running, Communicator* comm = nullptr) const;

  // The same into a layer's running buffers (it must track running statistics and have C
  // features). num_batches_tracked is left as it is.
  template <class P>
  void finalize(BasicBatchNorm<P>& layer, Communicator* comm = nullptr) const;

 private:
  double count_ = 0;
  std::vector<double> mean_, m2_;
  std::vector<double> widened_;  // a float32 / bfloat16 batch as float64, reused between calls
};

extern template void PopulationStats::finalize(BasicBatchNorm<float>&, Communicator*) const;
extern template void PopulationStats::finalize(BasicBatchNorm<double>&, Communicator*) const;

}  // namespace bnorm
