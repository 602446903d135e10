// Statistics kernel family: per-channel mean and M2 with per-block two-pass sums, merged across
// blocks and threads with Chan's formula.
//
// Why two passes per block: the block (about kBlock values) is still in L1 for the second pass,
// so it costs no memory traffic, and sum((x - shift)^2) with shift = the block's own mean has no
// cancellation however large the offset |mean| / std is. The first-order term s1 = sum(x - shift)
// (~0) corrects both the mean and M2 for the rounding of the shift. Chan's merge is exact algebra
// on (count, mean, M2), so the result does not depend on where the block boundaries fall.
//
// Float input sums in float vectors within a block (kAccLanes independent lanes, so each lane
// adds at most 64 terms before the block's sums go to double): the deviations x - shift are exact
// for values near the mean (Sterbenz), so the float sums lose nothing that matters
// (docs/numerics.md gives the bound). A block whose float sums are not finite (an Inf or NaN in
// it, or values so large that a float sum or square overflows) is summed again in double, so
// finite input up to float's range gives finite statistics, and non-finite input gives torch's
// results (an Inf mean for same-signed infinities, NaN otherwise).
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "kernels/simd.hpp"
#include "parallel.hpp"

#include <type_traits>

// Compiled once per row of the ISA table (isas.cmake): BNORM_ISA names the namespace.
namespace bnorm::kernels::BNORM_ISA {
namespace {

// M2 of a block from its deviation sums; clamped so that rounding can never make it negative
// (the comparison keeps a NaN a NaN).
inline double block_m2(double s1, double s2, double count) {
  const double m2 = s2 - s1 * s1 / count;
  return m2 < 0 ? 0.0 : m2;
}

// ---- Channels-first: a block is `rows` segments of `len` contiguous values, `stride` apart.

// sum(x) over the segments, in Compute<S> vectors. `next` (null: none) is the next block the pass
// will read, of the same shape: its lines are asked for as this block's are read. The pass over a
// block waits for memory, and the second pass, from L1, leaves memory idle; without the hint each
// block's first pass started cold. A one-thread model of the pass on the AMD EPYC read faster with it
// (BENCHMARKS.md, "Channels-first statistics on AVX2").
template <class S>
double segments_sum(const S* p, std::int64_t rows, std::int64_t stride, std::int64_t len, const S* next) {
  using T = Compute<S>;
  constexpr int A = kAccVectors<T>;
  constexpr std::int64_t W = kWidth<T>;
  Vec<T> acc[A] = {};
  T tail = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const S* q = p + r * stride;
    constexpr std::int64_t kStep = A * W * static_cast<std::int64_t>(sizeof(S));  // bytes per iteration
    const std::uintptr_t q_next =
        next ? reinterpret_cast<std::uintptr_t>(next) + static_cast<std::uintptr_t>(r * stride * sizeof(S)) : 0;
    std::int64_t i = 0;
    for (; i + A * W <= len; i += A * W) {
      if (q_next) prefetch_lines(q_next + static_cast<std::uintptr_t>(i * sizeof(S)), kStep);
      for (int a = 0; a < A; a += 2) {  // a pair per load (simd.hpp: load_pair)
        const Pair<S> v = load_pair(q + i + a * W);
        acc[a] += v.first;
        acc[a + 1] += v.second;
      }
    }
    for (int a = 0; i + W <= len; i += W, ++a) acc[a] += load(q + i);  // fewer than A vectors left
    for (; i < len; ++i) tail += to_compute(q[i]);
  }
  return static_cast<double>(tail) + hsum<T>(acc, A);
}

// sum(x - shift) and sum((x - shift)^2) over the segments, in Compute<S> vectors.
template <class S, class T = Compute<S>>
void segments_deviations(const S* p, std::int64_t rows, std::int64_t stride, std::int64_t len, T shift, double& s1,
                         double& s2) {
  constexpr int A = kAccVectors<T>, P = kPairAccVectors<T>;
  constexpr std::int64_t W = kWidth<T>;
  const Vec<T> vs = splat(shift);
  Vec<T> a1[P] = {}, a2[P] = {};
  T t1 = 0, t2 = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const S* q = p + r * stride;
    std::int64_t i = 0;
    for (; i + A * W <= len; i += A * W)
      for (int a = 0; a < A; a += 2) {
        const Pair<S> v = load_pair(q + i + a * W);
        const Vec<T> d0 = v.first - vs, d1 = v.second - vs;
        add_pair<P, T>(a1, a, d0, d1);
        add_pair<P, T>(a2, a, d0 * d0, d1 * d1);
      }
    for (int a = 0; i + W <= len; i += W, ++a) {  // fewer than A vectors left: vector a to its pair's accumulator
      const Vec<T> d = load(q + i) - vs;
      a1[a * P / A] += d;
      a2[a * P / A] += d * d;
    }
    for (; i < len; ++i) {
      const T d = to_compute(q[i]) - shift;
      t1 += d;
      t2 += d * d;
    }
  }
  s1 = static_cast<double>(t1) + hsum<T>(a1, P);
  s2 = static_cast<double>(t2) + hsum<T>(a2, P);
}

// The same two passes with every value converted to double: the fallback for float blocks whose
// float sums are not finite.
template <class S>
void segments_moments_exact(const S* p, std::int64_t rows, std::int64_t stride, std::int64_t len, double& mean,
                            double& m2) {
  const double count = static_cast<double>(rows * len);
  double s = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < len; ++i) s += static_cast<double>(to_compute(p[r * stride + i]));
  mean = s / count;  // an Inf stays an Inf here (torch's mean); s1 below may be NaN
  double s1 = 0, s2 = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < len; ++i) {
      const double d = static_cast<double>(to_compute(p[r * stride + i])) - mean;
      s1 += d;
      s2 += d * d;
    }
  m2 = block_m2(s1, s2, count);
}

template <class S>
void segments_moments(const S* p, std::int64_t rows, std::int64_t stride, std::int64_t len, const S* next,
                      double& mean, double& m2) {
  using T = Compute<S>;
  const double count = static_cast<double>(rows * len);
  const double sum = segments_sum(p, rows, stride, len, next);
  const T shift = static_cast<T>(sum / count);
  double s1, s2;
  segments_deviations(p, rows, stride, len, shift, s1, s2);
  if constexpr (std::is_same_v<T, float>) {
    if (!std::isfinite(sum) || !std::isfinite(s2)) return segments_moments_exact(p, rows, stride, len, mean, m2);
  }
  mean = static_cast<double>(shift) + s1 / count;
  m2 = block_m2(s1, s2, count);
}

// Chan's merge of block (bm, bm2) of `count` values into channel c, after `before` values.
inline void merge_block(double before, double& mean, double& m2, double count, double bm, double bm2) {
  double n = before;
  chan_merge(n, mean, m2, count, bm, bm2);
}

// Mean and M2 of channels [c0, c1) into mean[c - c0], m2[c - c0].
template <class S>
void moments_cf_blocks(const S* x, const Geometry& g, std::int64_t c0, std::int64_t c1, double* mean, double* m2) {
  for (std::int64_t c = 0; c < c1 - c0; ++c) mean[c] = m2[c] = 0;
  for_each_cf_block(g, c0, c1, [&](const CfBlock& b) {
    double bm, bm2;
    segments_moments(x + b.offset, b.rows, g.C * g.S, b.len, b.next < 0 ? nullptr : x + b.next, bm, bm2);
    merge_block(static_cast<double>(b.before), mean[b.c - c0], m2[b.c - c0], static_cast<double>(b.rows * b.len), bm,
                bm2);
  });
}

// Each thread a contiguous range of channels, read in memory order (for_each_cf_block).
template <class S>
void moments_channels_first(const S* x, const Geometry& g, double* mean, double* m2) {
  detail::parallel_ranges(g.C, 1, detail::threads_for(g.C, g.numel()), [&](int, std::int64_t c0, std::int64_t c1) {
    moments_cf_blocks(x, g, c0, c1, mean + c0, m2 + c0);
  });
}

// ---- Channels-last: rows of C values. A block is cl_rows_per_block rows; within it, tiles of at
// most kTileChannels channels (a tile's rows x channels values stay in L1 for the second pass), the
// per-channel sums running along the row so that the loops over c are the vector loops.

// Per-column sums of NV vectors of columns at p over `rows` rows (row stride C), into out.
// `next` (0: none) is the address of the same columns in the next tile the pass will read, with the
// same row stride: its lines are asked for as this tile's are read (segments_sum says why).
template <class S, int NV>
void column_sums(const S* p, std::int64_t rows, std::int64_t C, Compute<S>* out, std::uintptr_t next) {
  using T = Compute<S>;
  constexpr std::int64_t W = kWidth<T>;
  constexpr std::int64_t kRowBytes = NV * W * static_cast<std::int64_t>(sizeof(S));
  const std::uintptr_t row_stride = static_cast<std::uintptr_t>(C) * sizeof(S);
  Vec<T> acc[NV] = {};
  for (std::int64_t r = 0; r < rows; ++r) {
    if (next) prefetch_lines(next + static_cast<std::uintptr_t>(r) * row_stride, kRowBytes);
    for (int v = 0; v < NV; ++v) acc[v] += load(p + r * C + v * W);
  }
  for (int v = 0; v < NV; ++v) store(out + v * W, acc[v]);
}

// Per-column sum(x - shift) and sum((x - shift)^2) of NV vectors of columns, into s1 and s2.
template <class S, int NV>
void column_deviations(const S* p, std::int64_t rows, std::int64_t C, const Compute<S>* shift, Compute<S>* s1,
                       Compute<S>* s2) {
  using T = Compute<S>;
  constexpr std::int64_t W = kWidth<T>;
  Vec<T> sh[NV], a1[NV] = {}, a2[NV] = {};
  for (int v = 0; v < NV; ++v) sh[v] = load(shift + v * W);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const Vec<T> d = load(p + r * C + v * W) - sh[v];
      a1[v] += d;
      a2[v] += d * d;
    }
  for (int v = 0; v < NV; ++v) {
    store(s1 + v * W, a1[v]);
    store(s2 + v * W, a2[v]);
  }
}

// Per-channel moments of `rows` rows of a tile of `ct` channels (row stride C). `next` (0: none): the
// address of the next tile the pass will read (column_sums).
template <class S>
void tile_moments(const S* p, std::int64_t rows, std::int64_t C, std::int64_t ct, double* bmean, double* bm2,
                  std::uintptr_t next) {
  using T = Compute<S>;
  constexpr std::int64_t W = kWidth<T>;
  const double count = static_cast<double>(rows);
  T sum[kTileChannels], shift[kTileChannels], s1[kTileChannels], s2[kTileChannels];
  // The vector part of the tile in column chunks, each summed down the rows in registers (an
  // accumulator kept in memory would make every row wait for the previous row's store); the last
  // ct % W channels in scalars. The sums take chunks of up to 8 vectors (one accumulator each and
  // nothing else live), so that a tile of up to 8 vectors, the first pass's, which comes from memory,
  // is read in memory order: in chunks of 4, each pass over the rows took every other pair of lines,
  // which the hardware prefetchers followed worse (BENCHMARKS.md, "Channels-last statistics"). The
  // deviations, from L1, keep chunks of 4 (3 vectors per column).
  const std::int64_t cv = ct / W * W;
  for (std::int64_t c0 = 0; c0 < cv; c0 += 8 * W) {
    const int nv = static_cast<int>(lesser(8, (cv - c0) / W));
    const std::uintptr_t next_c0 = next ? next + static_cast<std::uintptr_t>(c0) * sizeof(S) : 0;
    with_count<8>(nv, [&](auto n) { column_sums<S, decltype(n)::value>(p + c0, rows, C, sum + c0, next_c0); });
  }
  for (std::int64_t c = cv; c < ct; ++c) sum[c] = s1[c] = s2[c] = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = cv; c < ct; ++c) sum[c] += to_compute(p[r * C + c]);
  const double inv_count = 1.0 / count;
  for (std::int64_t c = 0; c < ct; ++c) shift[c] = static_cast<T>(static_cast<double>(sum[c]) * inv_count);
  for (std::int64_t c0 = 0; c0 < cv; c0 += 4 * W) {
    const int nv = static_cast<int>(lesser(4, (cv - c0) / W));
    with_count(nv, [&](auto n) {
      column_deviations<S, decltype(n)::value>(p + c0, rows, C, shift + c0, s1 + c0, s2 + c0);
    });
  }
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = cv; c < ct; ++c) {
      const T d = to_compute(p[r * C + c]) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  if (all_finite(sum, s2, ct)) {  // the common case, as one vector loop
    for (std::int64_t c = 0; c < ct; ++c) {
      const double d1 = static_cast<double>(s1[c]), m2 = static_cast<double>(s2[c]) - d1 * d1 * inv_count;
      bmean[c] = static_cast<double>(shift[c]) + d1 * inv_count;
      bm2[c] = m2 < 0 ? 0.0 : m2;
    }
    return;
  }
  for (std::int64_t c = 0; c < ct; ++c) {
    if (std::isfinite(sum[c]) && std::isfinite(s2[c])) {
      const double d1 = static_cast<double>(s1[c]);
      bmean[c] = static_cast<double>(shift[c]) + d1 * inv_count;
      bm2[c] = block_m2(d1, static_cast<double>(s2[c]), count);
    } else {
      segments_moments_exact(p + c, rows, C, 1, bmean[c], bm2[c]);  // column c: rows values, stride C
    }
  }
}

// One lane of merge_tile, for a double or a vector of them: merged_mean and chan_merge (kernels.hpp)
// with the weights computed once. Where delta is not finite, the weighted mean; both sides are
// computed and one is picked by a mask, so that the vector form has no branch.
inline double pick(bool finite, double chan, double weighted) { return finite ? chan : weighted; }
inline Vec<double> pick(Mask<double> finite, Vec<double> chan, Vec<double> weighted) {
  return reinterpret_cast<Vec<double>>((reinterpret_cast<Mask<double>>(chan) & finite) |
                                       (reinterpret_cast<Mask<double>>(weighted) & ~finite));
}
template <class V>
inline void merge_lanes(V& mean, V& m2, V bmean, V bm2, double n, double count, double total, double w_mean,
                        double w_m2) {
  const V delta = bmean - mean;
  m2 += bm2 + delta * delta * w_m2;
  mean = pick(delta - delta == 0, mean + delta * w_mean, (mean * n + bmean * count) / total);
}

// Chan's merge of `count` new values per channel into (n, mean, m2) of every channel of a tile:
// every channel has the same counts, so the weights are computed once. Written with vectors: the
// compiler left the loop scalar, with a branch per channel, a visible share of the channels-last
// statistics pass in a profile on the AMD EPYC.
inline void merge_tile(double n, double count, double* mean, double* m2, const double* bmean, const double* bm2,
                       std::int64_t ct) {
  constexpr std::int64_t W = kWidth<double>;
  const double total = n + count, w_mean = count / total, w_m2 = n * count / total;
  std::int64_t c = 0;
  for (; c + W <= ct; c += W) {
    Vec<double> vm = load(mean + c), vm2 = load(m2 + c);
    merge_lanes(vm, vm2, load(bmean + c), load(bm2 + c), n, count, total, w_mean, w_m2);
    store(mean + c, vm);
    store(m2 + c, vm2);
  }
  for (; c < ct; ++c) merge_lanes(mean[c], m2[c], bmean[c], bm2[c], n, count, total, w_mean, w_m2);
}

template <class S>
void moments_channels_last(const S* x, const Geometry& g, double* mean, double* m2, double* ws) {
  const std::int64_t C = g.C, R = cl_rows_per_block(g);
  const int parts = reduce_threads(g);
  detail::parallel_ranges(g.rows(), R, parts, [&](int p, std::int64_t b, std::int64_t e) {
    double* acc_mean = ws + static_cast<std::int64_t>(p) * 2 * C;
    double* acc_m2 = acc_mean + C;
    zero(acc_mean, 2 * C);
    double n = 0;
    for (std::int64_t r0 = b; r0 < e; r0 += R) {
      const std::int64_t rows = lesser(R, e - r0);
      for (std::int64_t c0 = 0; c0 < C; c0 += kTileChannels) {
        const std::int64_t ct = lesser(kTileChannels, C - c0);
        // The next tile: the next channels of these rows, else the first channels of the next rows.
        const std::int64_t next_offset = c0 + ct < C ? r0 * C + c0 + ct : (r0 + rows < e ? (r0 + rows) * C : -1);
        const std::uintptr_t next =
            next_offset < 0 ? 0 : reinterpret_cast<std::uintptr_t>(x) + static_cast<std::uintptr_t>(next_offset) * sizeof(S);
        double bmean[kTileChannels], bm2[kTileChannels];
        tile_moments(x + r0 * C + c0, rows, C, ct, bmean, bm2, next);
        merge_tile(n, static_cast<double>(rows), acc_mean + c0, acc_m2 + c0, bmean, bm2, ct);
      }
      n += static_cast<double>(rows);
    }
  });
  // Merge the threads' partial moments in a fixed order.
  zero(mean, C);
  zero(m2, C);
  double n = 0;
  for (int p = 0; p < parts; ++p) {
    const double* acc_mean = ws + static_cast<std::int64_t>(p) * 2 * C;
    const detail::Range part = detail::range_of(g.rows(), R, parts, p);
    const double np = static_cast<double>(part.end - part.begin);
    if (np == 0) continue;
    merge_tile(n, np, mean, m2, acc_mean, acc_mean + C, C);
    n += np;
  }
}

}  // namespace

template <class S>
void channel_moments_cf(const S* x, const Geometry& g, std::int64_t c, double& mean, double& m2) {
  moments_cf_blocks(x, g, c, c + 1, &mean, &m2);
}

BNORM_INSTANTIATE(channel_moments_cf)

template <class S>
void channel_moments(const S* x, const Geometry& g, double* mean, double* m2, double* workspace) {
  if (g.layout == Layout::ChannelsFirst)
    moments_channels_first(x, g, mean, m2);
  else
    moments_channels_last(x, g, mean, m2, workspace);
}

BNORM_INSTANTIATE(channel_moments)

}  // namespace bnorm::kernels::BNORM_ISA
