// Normalize kernel family: y = ((x - mean_hi) - mean_lo) * scale + shift, optionally ReLU'd.
//
// Why subtract the mean before scaling (not y = x * a + b with b = beta - mean * a): with a large
// offset, x * a and b are both huge and their sum cancels, losing the digits of y; and a constant
// channel would not come out as exactly beta. x - mean_hi is exact when x is near the mean
// (Sterbenz), so y keeps full precision.
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "kernels/simd.hpp"
#include "parallel.hpp"

// Compiled once per instruction set: BNORM_ISA names the namespace (see dispatch.cpp).
namespace bnorm::kernels::BNORM_ISA {
namespace {


template <class T, bool Relu>
inline T normalize_one(T x, T mh, T ml, T sc, T sh) {
  T v = ((x - mh) - ml) * sc + sh;
  if constexpr (Relu) v = v < T(0) ? T(0) : v;  // keeps NaN a NaN, like torch.relu
  return v;
}
template <class T, bool Relu>
inline Vec<T> normalize_vec(Vec<T> x, Vec<T> mh, Vec<T> ml, Vec<T> sc, Vec<T> sh) {
  const Vec<T> v = ((x - mh) - ml) * sc + sh;
  if constexpr (Relu) return relu<T>(v);
  else return v;
}

// `len` contiguous values of one channel (channels-first); with `stream`, y is written with
// non-temporal stores (the caller fences).
template <class S, bool Relu, class T = Compute<S>>
void normalize_row(const S* x, S* y, std::int64_t len, T mh, T ml, T sc, T sh, bool stream) {
  constexpr std::int64_t W = kWidth<T>;
  const Vec<T> vh = splat(mh), vl = splat(ml), vsc = splat(sc), vsh = splat(sh);
  std::int64_t i = 0;
  if (stream) {
    for (const std::int64_t head = elements_to_alignment(y, len); i < head; ++i)
      y[i] = from_compute<S>(normalize_one<T, Relu>(to_compute(x[i]), mh, ml, sc, sh));
    for (; i + W <= len; i += W) store_stream(y + i, normalize_vec<T, Relu>(load(x + i), vh, vl, vsc, vsh));
  }
  for (; i + W <= len; i += W) store(y + i, normalize_vec<T, Relu>(load(x + i), vh, vl, vsc, vsh));
  for (; i < len; ++i) y[i] = from_compute<S>(normalize_one<T, Relu>(to_compute(x[i]), mh, ml, sc, sh));
}

// One row of C channels (channels-last); with `stream`, y is vector-aligned and so is every row.
template <class S, bool Relu, class T = Compute<S>>
void normalize_channels_last_row(const S* x, S* y, std::int64_t C, const ChannelCoeffs<T>& k, bool stream) {
  constexpr std::int64_t W = kWidth<T>;
  std::int64_t c = 0;
  for (; c + W <= C; c += W) {
    const Vec<T> v =
        normalize_vec<T, Relu>(load(x + c), load(k.mean_hi + c), load(k.mean_lo + c), load(k.scale + c), load(k.shift + c));
    if (stream)
      store_stream(y + c, v);
    else
      store(y + c, v);
  }
  for (; c < C; ++c)
    y[c] = from_compute<S>(normalize_one<T, Relu>(to_compute(x[c]), k.mean_hi[c], k.mean_lo[c], k.scale[c], k.shift[c]));
}

template <class S, bool Relu, class T = Compute<S>>
void normalize_impl(const S* x, S* y, const Geometry& g, const ChannelCoeffs<T>& k) {
  if (g.layout == Layout::ChannelsFirst) {
    const bool stream = stream_output<S>(g);
    detail::parallel_for(g.N * g.C, [&](std::int64_t nc) {
      const std::int64_t c = nc % g.C;
      normalize_row<S, Relu>(x + nc * g.S, y + nc * g.S, g.S, k.mean_hi[c], k.mean_lo[c], k.scale[c], k.shift[c],
                             stream);
      if (stream) stream_fence();  // this thread's streamed lines are visible before the region's barrier
    });
  } else {
    const bool stream = stream_output<S>(g) && rows_stay_aligned(y, g.C);
    detail::parallel_for(g.rows(), [&](std::int64_t r) {
      normalize_channels_last_row<S, Relu>(x + r * g.C, y + r * g.C, g.C, k, stream);
      if (stream) stream_fence();
    });
  }
}

}  // namespace

template <class S>
void normalize(const S* x, S* y, const Geometry& g, ChannelCoeffs<Compute<S>> k, Activation act) {
  if (act == Activation::Relu)
    normalize_impl<S, true>(x, y, g, k);
  else
    normalize_impl<S, false>(x, y, g, k);
}

template <class S>
void fused_forward_cf(const S* x, S* y, const Geometry& g, const double* gamma, const double* beta, double eps,
                      Activation act, double* mean, double* var) {
  using T = Compute<S>;
  const double m = static_cast<double>(g.per_channel());
  const bool stream = stream_output<S>(g);
  detail::parallel_for(g.C, [&](std::int64_t c) {
    double mu, m2;
    channel_moments_cf(x, g, c, mu, m2);  // first pass: from memory
    const double v = m2 / m, invstd = 1.0 / std::sqrt(v + eps);
    mean[c] = mu;
    var[c] = v;
    T hi, lo;
    split_mean(mu, hi, lo);
    const T scale = static_cast<T>((gamma ? gamma[c] : 1.0) * invstd), shift = static_cast<T>(beta ? beta[c] : 0.0);
    for (std::int64_t n = 0; n < g.N; ++n) {  // second pass: from L2
      const std::int64_t off = (n * g.C + c) * g.S;
      if (act == Activation::Relu)
        normalize_row<S, true>(x + off, y + off, g.S, hi, lo, scale, shift, stream);
      else
        normalize_row<S, false>(x + off, y + off, g.S, hi, lo, scale, shift, stream);
    }
    if (stream) stream_fence();
  });
}

template void fused_forward_cf<float>(const float*, float*, const Geometry&, const double*, const double*, double,
                                      Activation, double*, double*);
template void fused_forward_cf<double>(const double*, double*, const Geometry&, const double*, const double*, double,
                                       Activation, double*, double*);
template void normalize<float>(const float*, float*, const Geometry&, ChannelCoeffs<float>, Activation);
template void normalize<double>(const double*, double*, const Geometry&, ChannelCoeffs<double>, Activation);
template void fused_forward_cf<bfloat16>(const bfloat16*, bfloat16*, const Geometry&, const double*, const double*,
                                         double, Activation, double*, double*);
template void normalize<bfloat16>(const bfloat16*, bfloat16*, const Geometry&, ChannelCoeffs<float>, Activation);

}  // namespace bnorm::kernels::BNORM_ISA
