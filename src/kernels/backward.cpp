// Backward kernel family (the derivation is in docs/backward.md):
//   reduce: sum(dy') and sum(dy' * (x - mean)) per channel;
//   apply:  dx = dy' * k_dy - (x - mean) * k_x - k_c,
// where dy' is dy masked by output > 0 under a fused ReLU.
//
// The reductions use the blocks of the statistics (stats.cpp): T vectors within a block, double
// across blocks, and a block whose float sums are not finite is summed again in double.
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "kernels/simd.hpp"
#include "parallel.hpp"

#include <type_traits>

// Compiled once per row of the ISA table (isas.cmake): BNORM_ISA names the namespace.
namespace bnorm::kernels::BNORM_ISA {
namespace {

// dy (stored as S, returned in Compute<S>), or 0 where the fused ReLU's output is not positive.
template <class S, bool Relu>
inline Compute<S> masked(S dy, const S* out, std::int64_t i) {
  using T = Compute<S>;
  if constexpr (Relu) return to_compute(out[i]) > T(0) ? to_compute(dy) : T(0);
  else return to_compute(dy);
}
template <class S, bool Relu, class Load = LoadAll>
inline Vec<Compute<S>> masked_vec(const S* dy, const S* out, std::int64_t i, Load ld = {}) {
  if constexpr (Relu) return keep_where_positive<Compute<S>>(ld(dy + i), ld(out + i));
  else return ld(dy + i);
}

// The block's two sums in double, element by element: the fallback for non-finite float sums.
template <class S, bool Relu, class T = Compute<S>>
void segments_sums_exact(const S* dy, const S* x, const S* out, std::int64_t rows, std::int64_t stride,
                         std::int64_t len, T mh, T ml, double& sdy, double& sdx) {
  sdy = sdx = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = r * stride; i < r * stride + len; ++i) {
      const double g = static_cast<double>(masked<S, Relu>(dy[i], out, i));
      sdy += g;
      sdx += g * static_cast<double>((to_compute(x[i]) - mh) - ml);
    }
}

// sum(dy') and sum(dy' * (x - mean)) over `rows` segments of `len` values, `stride` apart.
template <class S, bool Relu, class T = Compute<S>>
void segments_sums(const S* dy, const S* x, const S* out, std::int64_t rows, std::int64_t stride, std::int64_t len,
                   T mh, T ml, double& sdy, double& sdx) {
  constexpr int A = kAccVectors<T>, P = kPairAccVectors<T>;
  constexpr std::int64_t W = kWidth<T>;
  const Vec<T> vh = splat(mh), vl = splat(ml);
  Vec<T> a1[P] = {}, a2[P] = {};
  T t1 = 0, t2 = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t o = r * stride;
    const S* out_row = Relu ? out + o : nullptr;  // no arithmetic on a null pointer
    std::int64_t i = 0;
    for (; i + A * W <= len; i += A * W)
      for (int a = 0; a < A; a += 2) {  // a pair of vectors per load (simd.hpp: load_pair)
        const std::int64_t j = i + a * W;
        const Vec<T> g0 = masked_vec<S, Relu>(dy + o, out_row, j, LoadPairFirst<S>{});
        const Vec<T> g1 = masked_vec<S, Relu>(dy + o, out_row, j, LoadPairSecond<S>{});
        const Pair<S> xv = load_pair(x + o + j);
        add_pair<P, T>(a1, a, g0, g1);
        add_pair<P, T>(a2, a, g0 * ((xv.first - vh) - vl), g1 * ((xv.second - vh) - vl));
      }
    for (int a = 0; i + W <= len; i += W, ++a) {  // fewer than A vectors left: vector a to its pair's accumulator
      const Vec<T> g = masked_vec<S, Relu>(dy + o, out_row, i);
      a1[a * P / A] += g;
      a2[a * P / A] += g * ((load(x + o + i) - vh) - vl);
    }
    for (; i < len; ++i) {
      const T g = masked<S, Relu>(dy[o + i], out, o + i);
      t1 += g;
      t2 += g * ((to_compute(x[o + i]) - mh) - ml);
    }
  }
  sdy = static_cast<double>(t1) + hsum<T>(a1, P);
  sdx = static_cast<double>(t2) + hsum<T>(a2, P);
  if constexpr (std::is_same_v<T, float>) {
    if (!std::isfinite(sdy) || !std::isfinite(sdx))
      segments_sums_exact<S, Relu>(dy, x, out, rows, stride, len, mh, ml, sdy, sdx);
  }
}

// Channels [c0, c1) of channels-first data: both sums over their blocks, into sdy[c - c0] and
// sdx[c - c0], in memory order (per_isa.hpp: for_each_cf_block); channel c's mean is mh[c - c0] +
// ml[c - c0].
template <class S, bool Relu, class T = Compute<S>>
void channel_sums_cf(const S* dy, const S* x, const S* out, const Geometry& g, std::int64_t c0, std::int64_t c1,
                     const T* mh, const T* ml, double* sdy, double* sdx) {
  for (std::int64_t c = 0; c < c1 - c0; ++c) sdy[c] = sdx[c] = 0;
  for_each_cf_block(g, c0, c1, [&](const CfBlock& b) {
    const std::int64_t o = b.offset, c = b.c - c0;
    double bdy, bdx;
    segments_sums<S, Relu>(dy + o, x + o, Relu ? out + o : nullptr, b.rows, g.C * g.S, b.len, mh[c], ml[c], bdy, bdx);
    sdy[c] += bdy;
    sdx[c] += bdx;
  });
}

// Per-column sum(dy') and sum(dy' * (x - mean)) of NV vectors of columns over `rows` rows (row
// stride C), into s1 and s2.
template <class S, bool Relu, int NV, class T = Compute<S>>
void column_backward_sums(const S* dy, const S* x, const S* out, std::int64_t rows, std::int64_t C, const T* mh,
                          const T* ml, T* s1, T* s2) {
  constexpr std::int64_t W = kWidth<T>;
  Vec<T> h[NV], l[NV], a1[NV] = {}, a2[NV] = {};
  for (int v = 0; v < NV; ++v) {
    h[v] = load(mh + v * W);
    l[v] = load(ml + v * W);
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t o = r * C;
    const S* out_row = Relu ? out + o : nullptr;
    for (int v = 0; v < NV; ++v) {
      const Vec<T> g = masked_vec<S, Relu>(dy + o, out_row, v * W);
      a1[v] += g;
      a2[v] += g * ((load(x + o + v * W) - h[v]) - l[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    store(s1 + v * W, a1[v]);
    store(s2 + v * W, a2[v]);
  }
}

// Channels-last: rows [r0, r0 + rows) of a tile of ct channels at c0, both sums added to the
// per-channel double accumulators acc_dy, acc_dx (tile-relative).
template <class S, bool Relu, class T = Compute<S>>
void tile_sums(const S* dy, const S* x, const S* out, std::int64_t C, std::int64_t rows, std::int64_t ct,
               const T* mh, const T* ml, double* acc_dy, double* acc_dx) {
  constexpr std::int64_t W = kWidth<T>;
  T s1[kTileChannels], s2[kTileChannels];
  // Column chunks of up to 4 vectors summed down the rows in registers (stats.cpp says why), then
  // the last ct % W channels in scalars.
  const std::int64_t cv = ct / W * W;
  for (std::int64_t c0 = 0; c0 < cv; c0 += 4 * W) {
    const int nv = static_cast<int>(lesser(4, (cv - c0) / W));
    with_count(nv, [&](auto n) {
      column_backward_sums<S, Relu, decltype(n)::value>(dy + c0, x + c0, Relu ? out + c0 : nullptr, rows, C, mh + c0,
                                                        ml + c0, s1 + c0, s2 + c0);
    });
  }
  for (std::int64_t c = cv; c < ct; ++c) s1[c] = s2[c] = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = cv; c < ct; ++c) {
      const std::int64_t i = r * C + c;
      const T gs = masked<S, Relu>(dy[i], out, i);
      s1[c] += gs;
      s2[c] += gs * ((to_compute(x[i]) - mh[c]) - ml[c]);
    }
  if (std::is_same_v<T, double> || all_finite(s1, s2, ct)) {  // the common case, as one vector loop
    for (std::int64_t c = 0; c < ct; ++c) {
      acc_dy[c] += static_cast<double>(s1[c]);
      acc_dx[c] += static_cast<double>(s2[c]);
    }
    return;
  }
  for (std::int64_t c = 0; c < ct; ++c) {
    double b1 = static_cast<double>(s1[c]), b2 = static_cast<double>(s2[c]);
    if (!std::isfinite(b1) || !std::isfinite(b2))  // column c: rows values, stride C
      segments_sums_exact<S, Relu>(dy + c, x + c, Relu ? out + c : nullptr, rows, C, 1, mh[c], ml[c], b1, b2);
    acc_dy[c] += b1;
    acc_dx[c] += b2;
  }
}

template <class S, bool Relu, class T = Compute<S>>
void reduce_impl(const S* dy, const S* x, const S* out, const Geometry& g, const T* mh, const T* ml, double* sum_dy,
                 double* sum_dy_xmu, double* ws) {
  const std::int64_t C = g.C;
  if (g.layout == Layout::ChannelsFirst) {
    detail::parallel_ranges(C, 1, detail::threads_for(C, g.numel()), [&](int, std::int64_t c0, std::int64_t c1) {
      channel_sums_cf<S, Relu>(dy, x, out, g, c0, c1, mh + c0, ml + c0, sum_dy + c0, sum_dy_xmu + c0);
    });
    return;
  }
  const std::int64_t R = cl_rows_per_block(g);
  const int parts = reduce_threads(g);
  detail::parallel_ranges(g.rows(), R, parts, [&](int p, std::int64_t b, std::int64_t e) {
    double* a = ws + static_cast<std::int64_t>(p) * 2 * C;
    zero(a, 2 * C);
    for (std::int64_t r0 = b; r0 < e; r0 += R)
      for (std::int64_t c0 = 0; c0 < C; c0 += kTileChannels) {
        const std::int64_t o = r0 * C + c0;
        tile_sums<S, Relu>(dy + o, x + o, Relu ? out + o : nullptr, C, lesser(R, e - r0), lesser(kTileChannels, C - c0),
                           mh + c0, ml + c0, a + c0, a + C + c0);
      }
  });
  zero(sum_dy, C);
  zero(sum_dy_xmu, C);
  for (int p = 0; p < parts; ++p) {
    const double* a = ws + static_cast<std::int64_t>(p) * 2 * C;
    for (std::int64_t c = 0; c < C; ++c) {
      sum_dy[c] += a[c];
      sum_dy_xmu[c] += a[C + c];
    }
  }
}

template <class T>
struct RowCoeffs {
  T hi, kdy, kx, kc;  // the mean's high part, then dx = dy' * kdy - (x - hi) * kx - kc (backward_coeffs)
};

// dx over `len` contiguous values of one channel (channels-first); with `stream`, non-temporal
// stores (the caller fences). dx may be dy or x: each vector is read before it is written.

template <class S, bool Relu, class T = Compute<S>>
void apply_row(const S* dy, const S* x, const S* out, S* dx, std::int64_t len, const RowCoeffs<T>& k, bool stream) {
  const Vec<T> vh = splat(k.hi), vdy = splat(k.kdy), vx = splat(k.kx), vc = splat(k.kc);
  // Captured by value (normalize.cpp's normalize_row says why).
  store_row<LaneOrder::Any>(dx, 0, len, stream, [dy, x, out, vh, vdy, vx, vc](std::int64_t j, auto ld) {
    return masked_vec<S, Relu>(dy, out, j, ld) * vdy - (ld(x + j) - vh) * vx - vc;
  });
}

// dx over one row of C channels (channels-last); with `stream`, every row is vector-aligned.
template <class S, bool Relu, class T = Compute<S>>
void apply_channels_last_row(const S* dy, const S* x, const S* out, S* dx, std::int64_t C, const BackwardCoeffs<T>& k,
                             bool stream) {
  const T *kdy = k.k_dy, *mh = k.mean_hi, *kx = k.k_x, *kc = k.k_c;  // by value, as in apply_row
  store_row(dx, 0, C, stream, [dy, x, out, kdy, mh, kx, kc](std::int64_t j, auto ld) {
    return masked_vec<S, Relu>(dy, out, j, ld) * ld(kdy + j) - (ld(x + j) - ld(mh + j)) * ld(kx + j) - ld(kc + j);
  });
}

template <class S, bool Relu, class T = Compute<S>>
void apply_impl(const S* dy, const S* x, const S* out, S* dx, const Geometry& g, const BackwardCoeffs<T>& k) {
  if (g.layout == Layout::ChannelsFirst) {
    const bool stream = stream_to(dx, g);
    parallel_for_cf_rows(g, stream, [&](std::int64_t nc, std::int64_t c) {
      const std::int64_t off = nc * g.S;
      apply_row<S, Relu>(dy + off, x + off, Relu ? out + off : nullptr, dx + off, g.S,
                         RowCoeffs<T>{k.mean_hi[c], k.k_dy[c], k.k_x[c], k.k_c[c]}, stream);
    });
  } else {
    const bool stream = stream_to(dx, g);
    parallel_for_streamed(g.rows(), g.numel(), stream, [&](std::int64_t r) {
      const std::int64_t off = r * g.C;
      apply_channels_last_row<S, Relu>(dy + off, x + off, Relu ? out + off : nullptr, dx + off, g.C, k, stream);
    });
  }
}

template <class S, bool Relu>
void fused_impl(const S* dy, const S* x, const S* out, S* dx, const Geometry& g, ForwardChannels f, bool training,
                double* sum_dy, double* sum_dy_xmu) {
  using T = Compute<S>;
  using Coeffs = RowCoeffs<T>;
  const double m = static_cast<double>(g.per_channel());
  const bool stream = dx != nullptr && stream_to(dx, g);
  const double *mean = f.mean, *invstd = f.invstd, *gamma = f.gamma;
  fused_channel_passes<S>(
      g, fused_backward_cached<S>(g, Relu, dx != nullptr), stream, {dy, x, out},
      [&](std::int64_t c) {
        Coeffs k{};
        T lo;
        split_mean(mean[c], k.hi, lo);
        double sdy, sdx;
        channel_sums_cf<S, Relu>(dy, x, out, g, c, c + 1, &k.hi, &lo, &sdy, &sdx);  // first pass: from memory (or L2)
        sum_dy[c] = sdy;
        sum_dy_xmu[c] = sdx;
        if (dx) backward_coeffs(gamma ? gamma[c] : 1.0, invstd[c], sdy, sdx, m, training, lo, k.kdy, k.kx, k.kc);
        return k;
      },
      [&](std::int64_t n, std::int64_t c, const Coeffs& k) {  // second pass: from L2
        if (!dx) return;
        const std::int64_t off = (n * g.C + c) * g.S;
        apply_row<S, Relu>(dy + off, x + off, Relu ? out + off : nullptr, dx + off, g.S, k, stream);
      });
}

}  // namespace

template <class S>
void backward_reduce(const S* dy, const S* x, const S* output, const Geometry& g, const Compute<S>* mean_hi,
                     const Compute<S>* mean_lo, double* sum_dy, double* sum_dy_xmu, double* workspace) {
  if (output)
    reduce_impl<S, true>(dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace);
  else
    reduce_impl<S, false>(dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace);
}

template <class S>
void backward_apply(const S* dy, const S* x, const S* output, S* dx, const Geometry& g, BackwardCoeffs<Compute<S>> k) {
  if (output)
    apply_impl<S, true>(dy, x, output, dx, g, k);
  else
    apply_impl<S, false>(dy, x, output, dx, g, k);
}

template <class S>
void fused_backward_cf(const S* dy, const S* x, const S* output, S* dx, const Geometry& g, ForwardChannels f,
                       bool training, double* sum_dy, double* sum_dy_xmu) {
  if (output)
    fused_impl<S, true>(dy, x, output, dx, g, f, training, sum_dy, sum_dy_xmu);
  else
    fused_impl<S, false>(dy, x, output, dx, g, f, training, sum_dy, sum_dy_xmu);
}

BNORM_INSTANTIATE(backward_reduce)
BNORM_INSTANTIATE(backward_apply)
BNORM_INSTANTIATE(fused_backward_cf)

}  // namespace bnorm::kernels::BNORM_ISA
