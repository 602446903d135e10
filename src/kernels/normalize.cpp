// Normalize kernel family: y = (x - mean_hi) * scale + shift, optionally ReLU'd (ChannelCoeffs).
//
// Why subtract the mean before scaling (not y = x * a + b with b = beta - mean * a): with a large
// offset, x * a and b are both huge and their sum cancels, losing the digits of y; and a constant
// channel would not come out as exactly beta. x - mean_hi is exact when x is near the mean
// (Sterbenz), so y keeps full precision.
#include "kernels/kernels.hpp"
#include "kernels/per_isa.hpp"
#include "kernels/simd.hpp"
#include "parallel.hpp"

#include <type_traits>

// Compiled once per row of the ISA table (isas.cmake): BNORM_ISA names the namespace.
namespace bnorm::kernels::BNORM_ISA {
namespace {


// y = (x - mean_hi) * scale + shift [+ z]; then max(y, 0) with Relu. z is the fused residual
// (ResNet's BN + add + ReLU): added before the activation, as torch's relu(bn(x) + z).
template <class T, bool Relu, bool Add>
inline Vec<T> normalize_vec(Vec<T> x, Vec<T> z, Vec<T> mh, Vec<T> sc, Vec<T> sh) {
  Vec<T> v = (x - mh) * sc + sh;
  if constexpr (Add) v += z;
  if constexpr (Relu) return relu<T>(v);
  else return v;
}

// The residual's vector at i (0 without one: never read).
template <class S, bool Add, class Load>
inline Vec<Compute<S>> residual_vec(const S* z, std::int64_t i, Load ld) {
  if constexpr (Add) return ld(z + i);
  else return Vec<Compute<S>>{};
}

// `len` contiguous values of one channel (channels-first); with `stream`, y is written with
// non-temporal stores (the caller fences).
template <class S, bool Relu, bool Add, class T = Compute<S>>
void normalize_row(const S* x, const S* z, S* y, std::int64_t len, T mh, T sc, T sh, bool stream) {
  const Vec<T> vh = splat(mh), vsc = splat(sc), vsh = splat(sh);
  // Captured by value: through references the compiler reloads them after every store to y, which
  // it cannot prove does not change them (a bfloat16 store is a byte copy, which may alias anything).
  store_row<LaneOrder::Any>(y, 0, len, stream, [x, z, vh, vsc, vsh](std::int64_t j, auto ld) {
    return normalize_vec<T, Relu, Add>(ld(x + j), residual_vec<S, Add>(z, j, ld), vh, vsc, vsh);
  });
}

// One row of C channels (channels-last); with `stream`, y is vector-aligned and so is every row.
template <class S, bool Relu, bool Add, class T = Compute<S>>
void normalize_channels_last_row(const S* x, const S* z, S* y, std::int64_t C, const ChannelCoeffs<T>& k, bool stream) {
  const T *mh = k.mean_hi, *sc = k.scale, *sh = k.shift;  // by value, as in normalize_row
  store_row(y, 0, C, stream, [x, z, mh, sc, sh](std::int64_t j, auto ld) {
    return normalize_vec<T, Relu, Add>(ld(x + j), residual_vec<S, Add>(z, j, ld), ld(mh + j), ld(sc + j), ld(sh + j));
  });
}

template <class S, bool Relu, bool Add, class T = Compute<S>>
void normalize_impl(const S* x, const S* z, S* y, const Geometry& g, const ChannelCoeffs<T>& k) {
  if (g.layout == Layout::ChannelsFirst) {
    const bool stream = stream_to(y, g);
    parallel_for_cf_rows(g, stream, [&](std::int64_t nc, std::int64_t c) {
      const std::int64_t off = nc * g.S;
      normalize_row<S, Relu, Add>(x + off, Add ? z + off : nullptr, y + off, g.S, k.mean_hi[c], k.scale[c],
                                  k.shift[c], stream);
    });
  } else {
    const bool stream = stream_to(y, g);
    parallel_for_streamed(g.rows(), g.numel(), stream, [&](std::int64_t r) {
      const std::int64_t off = r * g.C;
      normalize_channels_last_row<S, Relu, Add>(x + off, Add ? z + off : nullptr, y + off, g.C, k, stream);
    });
  }
}

// f(relu, add) with both as compile-time constants.
template <class F>
void with_epilogue(Activation act, bool add, F&& f) {
  if (act == Activation::Relu) {
    if (add) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (add) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

}  // namespace

template <class S>
void normalize(const S* x, S* y, const Geometry& g, ChannelCoeffs<Compute<S>> k, Activation act, const S* residual) {
  with_epilogue(act, residual != nullptr, [&](auto relu, auto add) {
    normalize_impl<S, decltype(relu)::value, decltype(add)::value>(x, residual, y, g, k);
  });
}

template <class S>
void fused_forward_cf(const S* x, S* y, const Geometry& g, const double* gamma, const double* beta, double eps,
                      Activation act, const S* residual, double* mean, double* var) {
  using T = Compute<S>;
  const double m = static_cast<double>(g.per_channel());
  const bool stream = stream_to(y, g);
  with_epilogue(act, residual != nullptr, [&](auto relu, auto add) {
    constexpr bool Relu = decltype(relu)::value, Add = decltype(add)::value;
    struct Coeffs {
      T hi, scale, shift;
    };
    fused_channel_passes<S>(
        g, fused_forward_cached<S>(g), stream, {x},
        [&](std::int64_t c) {
          double mu, m2;
          channel_moments_cf(x, g, c, mu, m2);  // first pass: from memory (or from L2 after a block's touch)
          const double v = m2 / m, invstd = 1.0 / std::sqrt(v + eps);
          mean[c] = mu;
          var[c] = v;
          Coeffs k;
          T lo;
          split_mean(mu, k.hi, lo);
          k.scale = static_cast<T>((gamma ? gamma[c] : 1.0) * invstd);
          k.shift = normalize_shift<T>(beta ? beta[c] : 0.0, lo, k.scale);
          return k;
        },
        [&](std::int64_t n, std::int64_t c, const Coeffs& k) {  // second pass: from L2
          const std::int64_t off = (n * g.C + c) * g.S;
          normalize_row<S, Relu, Add>(x + off, Add ? residual + off : nullptr, y + off, g.S, k.hi, k.scale, k.shift,
                                      stream);
        });
  });
}

BNORM_INSTANTIATE(normalize)
BNORM_INSTANTIATE(fused_forward_cf)

}  // namespace bnorm::kernels::BNORM_ISA
