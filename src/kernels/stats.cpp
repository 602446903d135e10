// Statistics kernel family: per-channel mean and M2 with per-block two-pass sums in double,
// merged across blocks and threads with Chan's formula.
//
// Why two passes per block: the block (at most kBlock values) is still in L1 for the second pass,
// so it costs no memory traffic, and sum((x - block_mean)^2) has no cancellation however large the
// offset |mean| / std is. The compensation term s1 (the sum of deviations, ~0) removes the effect of
// the block mean's own rounding. Chan's merge is exact algebra on (count, mean, M2), so the result
// does not depend on where the block boundaries fall.
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "parallel.hpp"

// Compiled once per instruction set: BNORM_ISA names the namespace (see dispatch.cpp).
namespace bnorm::kernels::BNORM_ISA {
namespace {


constexpr int kLanes = 8;  // independent accumulators: lets the compiler vectorize the double sums

template <class T>
double sum_lanes(const T* p, std::int64_t len) {
  double acc[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(p[i + j]);
  double s = 0;
  for (; i < len; ++i) s += static_cast<double>(p[i]);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <class T>
void deviation_sums(const T* p, std::int64_t len, double mean, double& s1, double& s2) {
  double a1[kLanes] = {}, a2[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(p[i + j]) - mean;
      a1[j] += d;
      a2[j] += d * d;
    }
  for (; i < len; ++i) {
    const double d = static_cast<double>(p[i]) - mean;
    s1 += d;
    s2 += d * d;
  }
  for (int j = 0; j < kLanes; ++j) {
    s1 += a1[j];
    s2 += a2[j];
  }
}

// M2 of a block from its deviation sums; clamped so that rounding can never make it negative
// (the comparison keeps a NaN a NaN).
inline double block_m2(double s1, double s2, double count) {
  const double m2 = s2 - s1 * s1 / count;
  return m2 < 0 ? 0.0 : m2;
}

// Channels-first: a block is `rows` segments of `len` contiguous values, `stride` apart.
template <class T>
void segments_moments(const T* p, std::int64_t rows, std::int64_t stride, std::int64_t len, double& mean,
                      double& m2) {
  const double count = static_cast<double>(rows * len);
  double s = 0;
  for (std::int64_t r = 0; r < rows; ++r) s += sum_lanes(p + r * stride, len);
  mean = s / count;
  double s1 = 0, s2 = 0;
  for (std::int64_t r = 0; r < rows; ++r) deviation_sums(p + r * stride, len, mean, s1, s2);
  m2 = block_m2(s1, s2, count);
}

template <class T>
void moments_channels_first(const T* x, const Geometry& g, double* mean, double* m2) {
  detail::parallel_for(g.C, [&](std::int64_t c) { channel_moments_cf(x, g, c, mean[c], m2[c]); });
}

// Channels-last: rows of C values; a block is `rows_per_block` rows, the per-channel sums run
// across the row so that the loops over c vectorize.

template <class T>
void moments_channels_last(const T* x, const Geometry& g, double* mean, double* m2, double* ws) {
  const std::int64_t C = g.C, R = cl_rows_per_block(g);
  const int parts = reduce_threads(g);
  detail::parallel_ranges(g.rows(), R, parts, [&](int p, std::int64_t b, std::int64_t e) {
    double* acc_mean = ws + static_cast<std::int64_t>(p) * 5 * C;
    double* acc_m2 = acc_mean + C;
    double* bmean = acc_m2 + C;
    double* s1 = bmean + C;
    double* s2 = s1 + C;
    zero(acc_mean, 2 * C);
    double n = 0;
    for (std::int64_t r0 = b; r0 < e; r0 += R) {
      const std::int64_t rows = lesser(R, e - r0);
      const T* blk = x + r0 * C;
      zero(bmean, 3 * C);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < C; ++c) bmean[c] += static_cast<double>(blk[r * C + c]);
      const double count = static_cast<double>(rows);
      for (std::int64_t c = 0; c < C; ++c) bmean[c] /= count;
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(blk[r * C + c]) - bmean[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      for (std::int64_t c = 0; c < C; ++c) {
        double nc = n;  // every channel has the same count; merge each with its own copy
        chan_merge(nc, acc_mean[c], acc_m2[c], count, bmean[c], block_m2(s1[c], s2[c], count));
      }
      n += count;
    }
  });
  // Merge the threads' partial moments in a fixed order.
  zero(mean, C);
  zero(m2, C);
  double n = 0;
  for (int p = 0; p < parts; ++p) {
    const double* acc_mean = ws + static_cast<std::int64_t>(p) * 5 * C;
    const double* acc_m2 = acc_mean + C;
    const detail::Range part = detail::range_of(g.rows(), R, parts, p);
    const double np = static_cast<double>(part.end - part.begin);
    for (std::int64_t c = 0; c < C; ++c) {
      double nc = n;
      chan_merge(nc, mean[c], m2[c], np, acc_mean[c], acc_m2[c]);
    }
    n += np;
  }
}

}  // namespace

template <class T>
void channel_moments_cf(const T* x, const Geometry& g, std::int64_t c, double& mean, double& m2) {
  const std::int64_t N = g.N, C = g.C, S = g.S;
  // Blocks of whole rows (n, c) when a row is short, pieces of a row when it is long.
  const std::int64_t rows_per_block = S >= kBlock ? 1 : greater(1, kBlock / greater(S, 1));
  const std::int64_t piece = S >= kBlock ? kBlock : S;
  double n = 0, mu = 0, M2 = 0;
  for (std::int64_t n0 = 0; n0 < N; n0 += rows_per_block) {
    const std::int64_t rows = lesser(rows_per_block, N - n0);
    for (std::int64_t s0 = 0; s0 < S; s0 += piece) {
      const std::int64_t len = lesser(piece, S - s0);
      double bm, bm2;
      segments_moments(x + (n0 * C + c) * S + s0, rows, C * S, len, bm, bm2);
      chan_merge(n, mu, M2, static_cast<double>(rows * len), bm, bm2);
    }
  }
  mean = mu;
  m2 = M2;
}

template void channel_moments_cf<float>(const float*, const Geometry&, std::int64_t, double&, double&);
template void channel_moments_cf<double>(const double*, const Geometry&, std::int64_t, double&, double&);

template <class T>
void channel_moments(const T* x, const Geometry& g, double* mean, double* m2, double* workspace) {
  if (g.layout == Layout::ChannelsFirst)
    moments_channels_first(x, g, mean, m2);
  else
    moments_channels_last(x, g, mean, m2, workspace);
}

template void channel_moments<float>(const float*, const Geometry&, double*, double*, double*);
template void channel_moments<double>(const double*, const Geometry&, double*, double*, double*);

}  // namespace bnorm::kernels::BNORM_ISA
