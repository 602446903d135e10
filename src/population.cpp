// PopulationStats: exact per-channel statistics of many batches (population.hpp). The moments of a
// batch are the library's own (functional_parts.hpp's local_moments: the kernels' per-block
// two-pass sums merged with Chan's formula); batches and ranks are merged with the same formula
// (kernels::chan_merge), and the collective check is SyncBatchNorm's (sync.hpp).
#include <bnorm/distributed.hpp>
#include <bnorm/population.hpp>

#include "functional_parts.hpp"
#include "kernels/kernels.hpp"
#include "sync.hpp"
#include "validate.hpp"

#include <cmath>
#include <sstream>

namespace bnorm {
namespace {

std::string show(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

// The first channel whose (mean, M2) is not finite, or -1.
std::int64_t first_nonfinite(std::span<const double> mean, std::span<const double> m2) {
  for (std::size_t c = 0; c < mean.size(); ++c)
    if (!std::isfinite(mean[c]) || !std::isfinite(m2[c])) return static_cast<std::int64_t>(c);
  return -1;
}

// A running buffer that finalize writes: C values, float32 or float64.
detail::Problem check_running(const RunningStats& running, std::int64_t C) {
  if (!running.mean.present() || !running.var.present())
    return detail::Problem("running_mean: expected running_mean and running_var to write into, got none");
  BNORM_CHECK(detail::check_vector("running_mean", running.mean, C, DType::Float32, true));
  return detail::check_vector("running_var", running.var, C, DType::Float32, true);
}

// The value as `v`'s dtype stores it.
double stored(const VectorView& v, double x) {
  return v.dtype() == DType::Float64 ? x : static_cast<double>(static_cast<float>(x));
}
void store(const VectorView& v, std::size_t c, double x) {
  if (v.dtype() == DType::Float64)
    static_cast<double*>(v.data())[c] = x;
  else
    static_cast<float*>(v.data())[c] = static_cast<float>(x);
}

// finalize's body, with a problem found before it (a layer without running statistics): locally it
// throws at once; collectively it goes through the ranks' agreement first, so that every rank throws.
void finalize_impl(const PopulationStats& stats, RunningStats running, Communicator* comm,
                   const detail::Problem& prior) {
  const char* fn = "PopulationStats::finalize";
  const std::int64_t C = stats.channels();
  const auto uC = static_cast<std::size_t>(C);
  const detail::Problem local = prior ? prior : check_running(running, C);
  std::vector<double> counts{stats.count()};
  if (comm != nullptr)
    counts = detail::agree_on_counts(*comm, fn, local, C, stats.count());
  else
    detail::raise_if(fn, local);
  double total = 0;
  for (double n : counts) total += n;  // integers far below 2^53: exact in any order
  if (!(total > 1)) {
    std::string what = "count: expected more than 1 value per channel to take an unbiased variance of, got " +
                       show(total);
    if (comm != nullptr) {
      what += " over all ranks (per rank:";
      for (double n : counts) {
        what += ' ';
        what += show(n);
      }
      what += ")";
    }
    detail::fail(fn, what);  // built from gathered data only: the same on every rank
  }
  // Every rank's (mean, M2), merged in rank order from nothing, so that every rank computes the same
  // bits; one process merges its own.
  std::vector<double> mean(uC, 0.0), m2(uC, 0.0);
  std::vector<double> parts(2 * uC * counts.size());
  std::copy(stats.mean().begin(), stats.mean().end(), parts.begin());
  std::copy(stats.m2().begin(), stats.m2().end(), parts.begin() + static_cast<std::ptrdiff_t>(uC));
  if (comm != nullptr) {
    const std::vector<double> mine(parts.begin(), parts.begin() + static_cast<std::ptrdiff_t>(2 * uC));
    comm->all_gather(mine.data(), mine.size() * sizeof(double), parts.data());
  }
  for (std::size_t c = 0; c < uC; ++c) {
    double n = 0;
    for (std::size_t r = 0; r < counts.size(); ++r)
      kernels::chan_merge(n, mean[c], m2[c], counts[r], parts[r * 2 * uC + c], parts[r * 2 * uC + uC + c]);
  }
  // What would be stored must be finite (a variance beyond float32's range would not be): checked on
  // the same bits everywhere, so every rank decides alike, before anything is written.
  for (std::size_t c = 0; c < uC; ++c) {
    const double var = m2[c] / (total - 1);
    if (!std::isfinite(stored(running.mean, mean[c])) || !std::isfinite(stored(running.var, var)))
      detail::fail(fn, "running_var: expected a population mean and variance that the buffers' dtype holds, got mean " +
                           show(mean[c]) + " and variance " + show(var) + " in channel " + std::to_string(c));
  }
  for (std::size_t c = 0; c < uC; ++c) {
    store(running.mean, c, mean[c]);
    store(running.var, c, m2[c] / (total - 1));
  }
}

}  // namespace

PopulationStats::PopulationStats(std::int64_t channels) {
  if (channels < 1 || channels > (std::int64_t{1} << 24))
    detail::fail("PopulationStats", "channels: expected 1 to 2^24, got " + std::to_string(channels));
  mean_.assign(static_cast<std::size_t>(channels), 0.0);
  m2_.assign(mean_.size(), 0.0);
}

void PopulationStats::reset() {
  count_ = 0;
  std::fill(mean_.begin(), mean_.end(), 0.0);
  std::fill(m2_.begin(), m2_.end(), 0.0);
}

void PopulationStats::add(ConstTensorView batch) {
  const char* fn = "PopulationStats::add";
  const detail::Checked<detail::TensorInfo> in = detail::check_tensor("batch", batch);
  detail::raise_if(fn, in.problem);
  const std::int64_t C = channels();
  if (batch.shape()[1] != C)
    detail::fail(fn, "batch: expected " + std::to_string(C) + " channels in dim 1, got " +
                         std::to_string(batch.shape()[1]) + " in shape " + batch.shape().str());
  const double m = static_cast<double>(in.value.geometry.per_channel());
  if (m == 0) return;
  ConstTensorView x = batch;
  detail::TensorInfo info = in.value;
  if (batch.dtype() != DType::Float64) {
    const auto n = static_cast<std::size_t>(in.value.numel);
    widened_.resize(n);
    if (batch.dtype() == DType::Float32) {
      const auto* p = static_cast<const float*>(batch.data());
      for (std::size_t i = 0; i < n; ++i) widened_[i] = p[i];
    } else {
      const auto* p = static_cast<const bfloat16*>(batch.data());
      for (std::size_t i = 0; i < n; ++i) widened_[i] = p[i].to_float();
    }
    x = ConstTensorView(widened_.data(), batch.shape(), batch.layout());
    info = detail::check_tensor("batch", x).value;  // the same geometry, float64 bytes
  }
  const auto uC = static_cast<std::size_t>(C);
  std::vector<double> mean(uC), m2(uC);
  detail::local_moments(detail::typed<double>(x), info, mean.data(), m2.data());  // x holds float64
  if (const std::int64_t c = first_nonfinite(mean, m2); c >= 0)
    detail::fail(fn, "batch: expected finite values, got mean " + show(mean[static_cast<std::size_t>(c)]) +
                         " and M2 " + show(m2[static_cast<std::size_t>(c)]) + " in channel " + std::to_string(c) +
                         " (a NaN or Inf in the batch); nothing was merged");
  merge(m, mean, m2);
}

void PopulationStats::merge(double count, std::span<const double> mean, std::span<const double> m2) {
  const char* fn = "PopulationStats::merge";
  const std::int64_t C = channels();
  if (!(count >= 0) || !std::isfinite(count))
    detail::fail(fn, "count: expected a finite count >= 0, got " + show(count));
  if (static_cast<std::int64_t>(mean.size()) != C || static_cast<std::int64_t>(m2.size()) != C)
    detail::fail(fn, "mean: expected " + std::to_string(C) + " values for mean and M2, got " +
                         std::to_string(mean.size()) + " and " + std::to_string(m2.size()));
  if (const std::int64_t c = first_nonfinite(mean, m2); c >= 0)
    detail::fail(fn, "mean: expected finite values, got mean " + show(mean[static_cast<std::size_t>(c)]) +
                         " and M2 " + show(m2[static_cast<std::size_t>(c)]) + " in channel " + std::to_string(c));
  for (std::size_t c = 0; c < m2.size(); ++c)
    if (m2[c] < 0) detail::fail(fn, "m2: expected values >= 0, got " + show(m2[c]) + " in channel " + std::to_string(c));
  if (count == 0) return;
  for (std::size_t c = 0; c < mean_.size(); ++c) {
    double n = count_;
    kernels::chan_merge(n, mean_[c], m2_[c], count, mean[c], m2[c]);
  }
  count_ += count;
}

void PopulationStats::finalize(RunningStats running, Communicator* comm) const {
  finalize_impl(*this, running, comm, {});
}

template <class P>
void PopulationStats::finalize(BasicBatchNorm<P>& layer, Communicator* comm) const {
  detail::Problem prior;
  if (!layer.options().track_running_stats)
    prior = detail::Problem("layer: expected a layer that tracks running statistics, got track_running_stats=false");
  else if (layer.num_features() != channels())
    prior = detail::Problem("layer: expected " + std::to_string(channels()) + " features (the statistics'), got " +
                            std::to_string(layer.num_features()));
  finalize_impl(*this, prior ? RunningStats{} : RunningStats{VectorView(layer.running_mean()), VectorView(layer.running_var())},
                comm, prior);
}

template void PopulationStats::finalize(BasicBatchNorm<float>&, Communicator*) const;
template void PopulationStats::finalize(BasicBatchNorm<double>&, Communicator*) const;

}  // namespace bnorm
