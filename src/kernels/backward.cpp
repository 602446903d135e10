// Backward kernel family (the derivation is in docs/backward.md):
//   reduce: sum(dy') and sum(dy' * (x - mean)) per channel, in double;
//   apply:  dx = dy' * k_dy - (x - mean) * k_x - k_c,
// where dy' is dy masked by output > 0 under a fused ReLU.
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "parallel.hpp"

// Compiled once per instruction set: BNORM_ISA names the namespace (see dispatch.cpp).
namespace bnorm::kernels::BNORM_ISA {
namespace {


template <class T, bool Relu>
inline T masked(T dy, const T* out, std::int64_t i) {
  if constexpr (Relu) return out[i] > T(0) ? dy : T(0);
  else return dy;
}

constexpr int kLanes = 8;

template <class T, bool Relu>
void reduce_row(const T* dy, const T* x, const T* out, std::int64_t len, T mh, T ml, double& sdy, double& sdx) {
  double a[kLanes] = {}, b[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double g = static_cast<double>(masked<T, Relu>(dy[i + j], out, i + j));
      a[j] += g;
      b[j] += g * static_cast<double>((x[i + j] - mh) - ml);
    }
  for (; i < len; ++i) {
    const double g = static_cast<double>(masked<T, Relu>(dy[i], out, i));
    sdy += g;
    sdx += g * static_cast<double>((x[i] - mh) - ml);
  }
  for (int j = 0; j < kLanes; ++j) {
    sdy += a[j];
    sdx += b[j];
  }
}

template <class T, bool Relu>
void reduce_impl(const T* dy, const T* x, const T* out, const Geometry& g, const T* mh, const T* ml, double* sum_dy,
                 double* sum_dy_xmu, double* ws) {
  const std::int64_t C = g.C, S = g.S;
  if (g.layout == Layout::ChannelsFirst) {
    detail::parallel_for(C, [&](std::int64_t c) {
      double sdy = 0, sdx = 0;
      for (std::int64_t n = 0; n < g.N; ++n) {
        const std::int64_t off = (n * C + c) * S;
        reduce_row<T, Relu>(dy + off, x + off, Relu ? out + off : nullptr, S, mh[c], ml[c], sdy, sdx);
      }
      sum_dy[c] = sdy;
      sum_dy_xmu[c] = sdx;
    });
    return;
  }
  const int parts = reduce_threads(g);
  detail::parallel_ranges(g.rows(), 1, parts, [&](int p, std::int64_t b, std::int64_t e) {
    double* a = ws + static_cast<std::int64_t>(p) * 2 * C;
    double* d = a + C;
    zero(a, 2 * C);
    for (std::int64_t r = b; r < e; ++r) {
      const std::int64_t off = r * C;
      for (std::int64_t c = 0; c < C; ++c) {
        const double gr = static_cast<double>(masked<T, Relu>(dy[off + c], out, off + c));
        a[c] += gr;
        d[c] += gr * static_cast<double>((x[off + c] - mh[c]) - ml[c]);
      }
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

template <class T, bool Relu>
inline T apply_one(T dy, T x, const T* out, std::int64_t i, T mh, T ml, T kdy, T kx, T kc) {
  return masked<T, Relu>(dy, out, i) * kdy - ((x - mh) - ml) * kx - kc;
}

template <class T, bool Relu>
void apply_impl(const T* dy, const T* x, const T* out, T* dx, const Geometry& g, const BackwardCoeffs<T>& k) {
  if (g.layout == Layout::ChannelsFirst) {
    detail::parallel_for(g.N * g.C, [&](std::int64_t nc) {
      const std::int64_t c = nc % g.C, off = nc * g.S;
      const T mh = k.mean_hi[c], ml = k.mean_lo[c], kdy = k.k_dy[c], kx = k.k_x[c], kc = k.k_c[c];
      for (std::int64_t i = off; i < off + g.S; ++i) dx[i] = apply_one<T, Relu>(dy[i], x[i], out, i, mh, ml, kdy, kx, kc);
    });
  } else {
    detail::parallel_for(g.rows(), [&](std::int64_t r) {
      const std::int64_t off = r * g.C;
      for (std::int64_t c = 0; c < g.C; ++c)
        dx[off + c] = apply_one<T, Relu>(dy[off + c], x[off + c], out, off + c, k.mean_hi[c], k.mean_lo[c], k.k_dy[c],
                                         k.k_x[c], k.k_c[c]);
    });
  }
}

}  // namespace

template <class T>
void backward_reduce(const T* dy, const T* x, const T* output, const Geometry& g, const T* mean_hi, const T* mean_lo,
                     double* sum_dy, double* sum_dy_xmu, double* workspace) {
  if (output)
    reduce_impl<T, true>(dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace);
  else
    reduce_impl<T, false>(dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace);
}

template <class T>
void backward_apply(const T* dy, const T* x, const T* output, T* dx, const Geometry& g, BackwardCoeffs<T> k) {
  if (output)
    apply_impl<T, true>(dy, x, output, dx, g, k);
  else
    apply_impl<T, false>(dy, x, output, dx, g, k);
}

template <class T>
void fused_backward_cf(const T* dy, const T* x, const T* output, T* dx, const Geometry& g, const double* mean,
                       const double* invstd, const double* gamma, bool training, double* sum_dy, double* sum_dy_xmu) {
  const double m = static_cast<double>(g.per_channel());
  detail::parallel_for(g.C, [&](std::int64_t c) {
    T hi, lo;
    split_mean(mean[c], hi, lo);
    double sdy = 0, sdx = 0;
    for (std::int64_t n = 0; n < g.N; ++n) {  // first pass: from memory
      const std::int64_t off = (n * g.C + c) * g.S;
      if (output)
        reduce_row<T, true>(dy + off, x + off, output + off, g.S, hi, lo, sdy, sdx);
      else
        reduce_row<T, false>(dy + off, x + off, nullptr, g.S, hi, lo, sdy, sdx);
    }
    sum_dy[c] = sdy;
    sum_dy_xmu[c] = sdx;
    if (!dx) return;
    T kdy, kx, kc;
    backward_coeffs(gamma ? gamma[c] : 1.0, invstd[c], sdy, sdx, m, training, kdy, kx, kc);
    for (std::int64_t n = 0; n < g.N; ++n) {  // second pass: from L2
      const std::int64_t off = (n * g.C + c) * g.S;
      for (std::int64_t i = off; i < off + g.S; ++i)
        dx[i] = output ? apply_one<T, true>(dy[i], x[i], output, i, hi, lo, kdy, kx, kc)
                       : apply_one<T, false>(dy[i], x[i], output, i, hi, lo, kdy, kx, kc);
    }
  });
}

template void fused_backward_cf<float>(const float*, const float*, const float*, float*, const Geometry&, const double*,
                                       const double*, const double*, bool, double*, double*);
template void fused_backward_cf<double>(const double*, const double*, const double*, double*, const Geometry&,
                                        const double*, const double*, const double*, bool, double*, double*);
template void backward_reduce<float>(const float*, const float*, const float*, const Geometry&, const float*,
                                     const float*, double*, double*, double*);
template void backward_reduce<double>(const double*, const double*, const double*, const Geometry&, const double*,
                                      const double*, double*, double*, double*);
template void backward_apply<float>(const float*, const float*, const float*, float*, const Geometry&,
                                    BackwardCoeffs<float>);
template void backward_apply<double>(const double*, const double*, const double*, double*, const Geometry&,
                                     BackwardCoeffs<double>);

}  // namespace bnorm::kernels::BNORM_ISA
