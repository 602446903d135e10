// PopulationStats' checks (population.hpp): the data set and its float64 reference, used by the
// single-process tests (test_population.cpp) and, written once against the Communicator interface,
// the collective ones: in-process threads (test_sync.cpp) and MPI ranks (test_sync_mpi.cpp).
#pragma once

#include <bnorm/distributed.hpp>
#include <bnorm/population.hpp>

#include "sync_check.hpp"

#include <cstring>

namespace bnorm::test {

// A data set in batches: the global data (logical, channels-first doubles per batch), sorted by class
// so that each batch has its own per-channel mean (the case where averaging batch variances is
// wrong), with an uneven last batch, and a large common offset (mean / std ~ 1e3) that a naive
// E[x^2] - E[x]^2 would lose digits to.
struct DataSet {
  std::vector<Dims> dims;                   // per batch
  std::vector<std::vector<double>> values;  // per batch, logical channels-first, rounded to the dtype
  std::int64_t C = 0;
};

template <class T>
inline DataSet class_sorted_batches(std::int64_t C, std::int64_t spatial, int batches, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  DataSet d;
  d.C = C;
  for (int b = 0; b < batches; ++b) {
    const std::int64_t N = b + 1 == batches ? 3 : 8;  // the last batch is smaller
    Dims dims{{N, C, spatial}};
    std::vector<double> x(static_cast<std::size_t>(dims.numel()));
    const double class_shift = 4.0 * (b % 5);  // 5 classes, one per batch in turn
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t s = 0; s < spatial; ++s) {
          const auto dc = static_cast<double>(c);
          const double v = 1000.0 + 3.0 * dc + class_shift + (0.5 + 0.25 * dc) * normal(rng);
          double stored = v;
          if constexpr (std::is_same_v<T, bfloat16>)
            stored = bfloat16::from_float(static_cast<float>(v)).to_float();
          else
            stored = static_cast<double>(static_cast<T>(v));
          x[static_cast<std::size_t>((n * C + c) * spatial + s)] = stored;
        }
    d.dims.push_back(dims);
    d.values.push_back(std::move(x));
  }
  return d;
}

// A batch in memory of type T and `layout` (bfloat16 through to_bf16).
template <class T>
inline std::vector<T> batch_memory(const DataSet& d, std::size_t b, Layout layout) {
  if constexpr (std::is_same_v<T, bfloat16>)
    return to_bf16(d.values[b], d.dims[b], layout);
  else
    return to_layout<T>(d.values[b], d.dims[b], layout);
}

template <class T>
inline void add_batch(PopulationStats& p, const DataSet& d, std::size_t b, Layout layout) {
  const std::vector<T> mem = batch_memory<T>(d, b, layout);
  p.add(ConstTensorView(mem.data(), d.dims[b].view_shape(), layout));
}

// The float64 two-pass over all the data at once (sums in long double, so that the reference's own
// rounding is far below the 1e-12 tolerance): per channel mean and unbiased variance.
struct Population {
  std::vector<double> mean, var;
};
inline Population two_pass_reference(const DataSet& d) {
  const auto uC = static_cast<std::size_t>(d.C);
  std::vector<long double> sum(uC, 0), sq(uC, 0);
  std::vector<double> count(uC, 0);
  auto each = [&](auto f) {
    for (std::size_t b = 0; b < d.values.size(); ++b)
      for (std::int64_t n = 0; n < d.dims[b].N(); ++n)
        for (std::int64_t c = 0; c < d.C; ++c)
          for (std::int64_t s = 0; s < d.dims[b].S(); ++s)
            f(static_cast<std::size_t>(c), d.values[b][static_cast<std::size_t>((n * d.C + c) * d.dims[b].S() + s)]);
  };
  each([&](std::size_t c, double v) {
    sum[c] += v;
    count[c] += 1;
  });
  Population p{std::vector<double>(uC), std::vector<double>(uC)};
  for (std::size_t c = 0; c < uC; ++c) p.mean[c] = static_cast<double>(sum[c] / count[c]);
  each([&](std::size_t c, double v) {
    const long double e = static_cast<long double>(v) - p.mean[c];
    sq[c] += e * e;
  });
  for (std::size_t c = 0; c < uC; ++c) p.var[c] = static_cast<double>(sq[c] / (count[c] - 1));
  return p;
}

// Within 1e-12 relative: the variance against itself, the mean against |mean| + std (a mean near 0
// has no relative digits of its own).
inline void expect_population_close(const std::vector<double>& mean, const std::vector<double>& var,
                                    const Population& want, const std::string& what) {
  ASSERT_EQ(mean.size(), want.mean.size());
  for (std::size_t c = 0; c < mean.size(); ++c) {
    EXPECT_LE(std::abs(var[c] - want.var[c]), 1e-12 * want.var[c]) << what << " var, channel " << c;
    EXPECT_LE(std::abs(mean[c] - want.mean[c]), 1e-12 * (std::abs(want.mean[c]) + std::sqrt(want.var[c])))
        << what << " mean, channel " << c;
  }
}

// Which rank holds batch b: uneven, and rank 1 of 3 or more holds none.
inline int owner_of(std::size_t b, int R) {
  if (R <= 2) return b % 3 == 0 ? 0 : R - 1;  // rank 0 a third, the last rank two thirds
  const int r = static_cast<int>(b % static_cast<std::size_t>(R - 1));
  return r == 0 ? 0 : r + 1;  // rank 1 gets nothing
}

// The collective finalize: every rank adds its own batches; the result is bitwise the same on every
// rank and within 1e-12 of the float64 reference over all the data (which one process gets too).
template <class T>
inline void check_population_collective(Communicator& comm, Layout layout) {
  const int R = comm.size(), me = comm.rank();
  const DataSet d = class_sorted_batches<T>(4, 6, 23, 11);
  PopulationStats mine(d.C), all(d.C);
  for (std::size_t b = 0; b < d.values.size(); ++b) {
    if (owner_of(b, R) == me) add_batch<T>(mine, d, b, layout);
    add_batch<T>(all, d, b, layout);
  }
  std::vector<double> rm(4, -1.0), rv(4, -1.0);
  mine.finalize({VectorView(rm), VectorView(rv)}, &comm);
  const Population want = two_pass_reference(d);
  expect_population_close(rm, rv, want, "collective, rank " + std::to_string(me));
  std::vector<double> rm1(4), rv1(4);
  all.finalize({VectorView(rm1), VectorView(rv1)});
  expect_population_close(rm1, rv1, want, "one process");
  // Bitwise the same on every rank.
  std::vector<double> bits(8), gathered(8 * static_cast<std::size_t>(R));
  std::copy(rm.begin(), rm.end(), bits.begin());
  std::copy(rv.begin(), rv.end(), bits.begin() + 4);
  comm.all_gather(bits.data(), bits.size() * sizeof(double), gathered.data());
  for (int r = 0; r < R; ++r)
    EXPECT_EQ(std::memcmp(gathered.data() + 8 * r, bits.data(), 8 * sizeof(double)), 0)
        << "rank " << r << "'s statistics differ from rank " << me << "'s";
  // Into a layer: the same values, rounded to its float32 buffers.
  BatchNorm layer(4);
  mine.finalize(layer, &comm);
  for (std::size_t c = 0; c < 4; ++c) {
    EXPECT_EQ(layer.running_mean()[c], static_cast<float>(rm[c]));
    EXPECT_EQ(layer.running_var()[c], static_cast<float>(rv[c]));
  }
}

// Bad arguments on one rank, channel counts that differ, and too few values over all ranks: every
// rank throws the same error, nothing is written anywhere, and the group stays usable.
inline void check_population_errors(Communicator& comm) {
  const int R = comm.size(), me = comm.rank(), last = R - 1;
  const std::string lastname = "rank " + std::to_string(last) + " of " + std::to_string(R);
  const DataSet d = class_sorted_batches<double>(3, 2, 4, 5);
  PopulationStats p(3);
  for (std::size_t b = 0; b < d.values.size(); ++b)
    if (b % static_cast<std::size_t>(R) == static_cast<std::size_t>(me)) add_batch<double>(p, d, b, Layout::ChannelsFirst);
  std::vector<float> rm(3, 0.25f), rv(3, 4.f), short_rm(2, 0.25f);
  const std::vector<float> rm0 = rm, rv0 = rv;
  expect_error_everywhere(
      comm,
      [&] {
        p.finalize({me == last ? VectorView(short_rm) : VectorView(rm), VectorView(rv)}, &comm);
      },
      {"bnorm::PopulationStats::finalize: " + lastname, "running_mean: expected 3 values (one per channel), got 2"});
  EXPECT_EQ(rm, rm0);
  EXPECT_EQ(rv, rv0);
  EXPECT_EQ(short_rm, std::vector<float>(2, 0.25f));

  PopulationStats five(5);
  std::vector<float> rm5(5, 0.f), rv5(5, 1.f);
  expect_error_everywhere(
      comm,
      [&] {
        if (me == last)
          five.finalize({VectorView(rm5), VectorView(rv5)}, &comm);
        else
          p.finalize({VectorView(rm), VectorView(rv)}, &comm);
      },
      {"bnorm::PopulationStats::finalize: " + lastname, "input channels (dim 1): expected 3 (rank 0's), got 5"});
  EXPECT_EQ(rm, rm0);

  // A layer without running statistics on the last rank.
  BatchNorm tracked(3), untracked(3, {.track_running_stats = false});
  expect_error_everywhere(
      comm, [&] { p.finalize(me == last ? untracked : tracked, &comm); },
      {"bnorm::PopulationStats::finalize: " + lastname, "layer: expected a layer that tracks running statistics"});
  EXPECT_EQ(tracked.running_var()[0], 1.f);

  // One value over all ranks: rank 0 has a single value, the others none.
  PopulationStats one(1);
  std::vector<double> x{2.5};
  if (me == 0) one.add(ConstTensorView(x.data(), {1, 1}));
  std::vector<double> m1(1, 9.0), v1(1, 9.0);
  expect_error_everywhere(
      comm, [&] { one.finalize({VectorView(m1), VectorView(v1)}, &comm); },
      {"bnorm::PopulationStats::finalize: count: expected more than 1 value per channel", "got 1 over all ranks"});
  EXPECT_EQ(m1[0], 9.0);

  // The group is still usable.
  p.finalize({VectorView(rm), VectorView(rv)}, &comm);
  EXPECT_NE(rm, rm0);
}

}  // namespace bnorm::test
