// Folding an eval-mode BatchNorm into the layer next to it (include/bnorm/fold.hpp, docs/folding.md).
#include <bnorm/fold.hpp>

#include "validate.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace bnorm {

std::string to_string(WeightLayout l) {
  switch (l) {
    case WeightLayout::OutIn: return "out_in";
    case WeightLayout::InOut: return "in_out";
  }
  return "weight_layout(" + std::to_string(static_cast<int>(l)) + ")";
}

namespace {

using detail::check_count;
using detail::check_data;
using detail::check_dtype;
using detail::num;
using detail::overlaps;
using detail::Problem;

// A per-channel vector of length C (or absent, when it may be).
Problem check_channels(const char* name, const ConstVectorView& v, std::int64_t C, bool required) {
  const std::string arg = name;
  if (!v.present()) {
    if (required) return Problem(arg + ": expected " + std::to_string(C) + " values (one per channel), got none");
    return {};
  }
  BNORM_CHECK(check_dtype(arg, v.dtype()));
  BNORM_CHECK(check_count(arg, v.size(), C));
  return check_data(arg, v.data(), v.dtype(), C);
}

// The bfloat16 nearest to a float64, rounded once. float32 keeps 16
// more bits than bfloat16, so rounding to float32 to odd (toward zero, then the last bit set when
// inexact) and then to bfloat16 to nearest even is the one correct rounding.
bfloat16 bfloat16_from_double(double v) {
  float f = static_cast<float>(v);
  if (std::isnan(v) || static_cast<double>(f) == v) return bfloat16::from_float(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  const std::uint32_t odd = std::bit_cast<std::uint32_t>(f) | 1u;
  return bfloat16::from_float(std::bit_cast<float>(odd));
}

double load(const void* p, DType t, std::int64_t i) {
  const auto k = static_cast<std::size_t>(i);
  switch (t) {
    case DType::Float32: return static_cast<const float*>(p)[k];
    case DType::Float64: return static_cast<const double*>(p)[k];
    case DType::BFloat16: return static_cast<const bfloat16*>(p)[k].to_float();
  }
  return 0.0;
}

void store(void* p, DType t, std::int64_t i, double v) {
  const auto k = static_cast<std::size_t>(i);
  switch (t) {
    case DType::Float32: static_cast<float*>(p)[k] = static_cast<float>(v); break;
    case DType::Float64: static_cast<double*>(p)[k] = v; break;
    case DType::BFloat16: static_cast<bfloat16*>(p)[k] = bfloat16_from_double(v); break;
  }
}

double load_or(const ConstVectorView& v, std::int64_t i, double absent) {
  return v.present() ? load(v.data(), v.dtype(), i) : absent;
}

std::int64_t bytes_of(const ConstVectorView& v) {
  return v.present() ? v.size() * static_cast<std::int64_t>(size_of(v.dtype())) : 0;
}

// Memory that must not be written through an output: disjoint, or (allowed) the very same buffer.
Problem check_disjoint(const char* a_name, const void* a, std::int64_t a_bytes, const char* b_name, const void* b,
                       std::int64_t b_bytes) {
  if (!overlaps(a, a_bytes, b, b_bytes)) return {};
  return Problem(std::string(a_name) + ": expected memory disjoint from " + b_name + ", got an overlap");
}

// The weight's shape (A, B, k...) read as channels: element (a, b, k) of the flattened weight.
struct Geometry {
  std::int64_t A = 0, B = 0, K = 1, groups = 1, numel = 0;
  WeightLayout layout = WeightLayout::OutIn;
  std::int64_t c_out() const { return layout == WeightLayout::OutIn ? A : B * groups; }
  std::int64_t c_in() const { return layout == WeightLayout::OutIn ? B * groups : A; }
  // The channel that dim 0 indexes is a; the one dim 1 indexes is (a's group) * B + b.
  std::int64_t grouped(std::int64_t a, std::int64_t b) const { return a / (A / groups) * B + b; }
  std::int64_t out_channel(std::int64_t a, std::int64_t b) const { return layout == WeightLayout::OutIn ? a : grouped(a, b); }
  std::int64_t in_channel(std::int64_t a, std::int64_t b) const { return layout == WeightLayout::OutIn ? grouped(a, b) : a; }
};

detail::Checked<Geometry> check_layer(const FoldLayer& layer) {
  const ConstTensorView& w = layer.weight;
  const Shape& s = w.shape();
  if (s.rank() < 2)
    return Problem("layer.weight: expected a weight of rank >= 2 ((C_out, C_in / groups, k...) or (C_in, C_out / groups, k...)), "
                   "got rank " + std::to_string(s.rank()) + " with shape " + s.str());
  BNORM_CHECK(check_dtype("layer.weight", w.dtype()));
  if (layer.layout != WeightLayout::OutIn && layer.layout != WeightLayout::InOut)
    return Problem("layer.layout: expected WeightLayout::OutIn or InOut, got " + to_string(layer.layout));
  Geometry g;
  g.A = s[0];
  g.B = s[1];
  g.layout = layer.layout;
  g.groups = layer.groups;
  const detail::Checked<detail::ShapeSize> size = detail::check_shape("layer.weight", s, w.dtype());
  BNORM_CHECK(size.problem);
  g.numel = size.value.numel;
  g.K = size.value.inner;
  if (w.layout() != Layout::ChannelsFirst && g.K != 1)
    return Problem("layer.weight: expected layout channels_first (contiguous), got " + to_string(w.layout()));
  BNORM_CHECK(check_data("layer.weight", w.data(), w.dtype(), g.numel));
  if (layer.groups < 1) return Problem("layer.groups: expected a value >= 1, got " + std::to_string(layer.groups));
  if (g.A % layer.groups != 0)
    return Problem("layer.groups: expected a divisor of the weight's dim 0 (" + std::to_string(g.A) + "), got " +
                   std::to_string(layer.groups));
  // The channels of the weight's dim 1 side are dim 1 * groups (an empty weight's dim 1 may be any size).
  if (std::int64_t channels = 0; __builtin_mul_overflow(g.B, g.groups, &channels))
    return Problem("layer.groups: expected a value whose product with the weight's dim 1 (" + std::to_string(g.B) +
                   ") fits in int64, got " + std::to_string(layer.groups));
  BNORM_CHECK(check_channels("layer.bias", layer.bias, g.c_out(), false));
  return g;
}

// s and t of the BN, per channel, in float64.
detail::Checked<std::vector<double>> check_batch_norm(const FoldBatchNorm& bn, std::int64_t C) {
  BNORM_CHECK(check_channels("bn.running_mean", bn.running_mean, C, true));
  BNORM_CHECK(check_channels("bn.running_var", bn.running_var, C, true));
  BNORM_CHECK(check_channels("bn.weight", bn.weight, C, false));
  BNORM_CHECK(check_channels("bn.bias", bn.bias, C, false));
  if (!(std::isfinite(bn.eps) && bn.eps >= 0)) return Problem("bn.eps: expected a finite value >= 0, got " + num(bn.eps));
  std::vector<double> st(static_cast<std::size_t>(2 * C));
  for (std::int64_t c = 0; c < C; ++c) {
    const double v = load(bn.running_var.data(), bn.running_var.dtype(), c) + bn.eps;
    if (!(v > 0))
      return Problem("bn.running_var: expected running_var + eps > 0 in every channel, got " + num(v) + " in channel " +
                     std::to_string(c));
    const double s = load_or(bn.weight, c, 1.0) / std::sqrt(v);
    st[static_cast<std::size_t>(2 * c)] = s;
    st[static_cast<std::size_t>(2 * c + 1)] = load_or(bn.bias, c, 0.0) - load(bn.running_mean.data(), bn.running_mean.dtype(), c) * s;
  }
  return st;
}

Problem check_outputs(const FoldLayer& layer, const FoldBatchNorm& bn, const Geometry& g, const TensorView& out_weight,
                      const VectorView& out_bias) {
  if (!(out_weight.shape() == layer.weight.shape()))
    return Problem("out_weight: expected layer.weight's shape " + layer.weight.shape().str() + ", got " +
                   out_weight.shape().str());
  BNORM_CHECK(check_dtype("out_weight", out_weight.dtype()));
  if (out_weight.layout() != Layout::ChannelsFirst && g.K != 1)
    return Problem("out_weight: expected layout channels_first (contiguous), got " + to_string(out_weight.layout()));
  BNORM_CHECK(check_data("out_weight", out_weight.data(), out_weight.dtype(), g.numel));
  BNORM_CHECK(check_channels("out_bias", out_bias, g.c_out(), true));
  const std::int64_t wb = g.numel * static_cast<std::int64_t>(size_of(layer.weight.dtype()));
  const std::int64_t owb = g.numel * static_cast<std::int64_t>(size_of(out_weight.dtype()));
  const ConstVectorView ob = out_bias;
  // In place: the output is the input itself, same dtype.
  const bool weight_in_place = out_weight.data() == layer.weight.data() && out_weight.dtype() == layer.weight.dtype();
  const bool bias_in_place = layer.bias.present() && out_bias.data() == layer.bias.data() &&
                             out_bias.dtype() == layer.bias.dtype();
  if (!weight_in_place) BNORM_CHECK(check_disjoint("out_weight", out_weight.data(), owb, "layer.weight", layer.weight.data(), wb));
  if (!bias_in_place)
    BNORM_CHECK(check_disjoint("out_bias", ob.data(), bytes_of(ob), "layer.bias", layer.bias.data(), bytes_of(layer.bias)));
  BNORM_CHECK(check_disjoint("out_weight", out_weight.data(), owb, "out_bias", ob.data(), bytes_of(ob)));
  BNORM_CHECK(check_disjoint("out_weight", out_weight.data(), owb, "layer.bias", layer.bias.data(), bytes_of(layer.bias)));
  BNORM_CHECK(check_disjoint("out_bias", ob.data(), bytes_of(ob), "layer.weight", layer.weight.data(), wb));
  const std::pair<const char*, ConstVectorView> vectors[] = {
      {"bn.running_mean", bn.running_mean}, {"bn.running_var", bn.running_var}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias}};
  for (const auto& [name, v] : vectors) {
    BNORM_CHECK(check_disjoint("out_weight", out_weight.data(), owb, name, v.data(), bytes_of(v)));
    BNORM_CHECK(check_disjoint("out_bias", ob.data(), bytes_of(ob), name, v.data(), bytes_of(v)));
  }
  return {};
}

// Calls f(index, a, b) for every element of the flattened weight.
template <class F>
void for_each_weight(const Geometry& g, F f) {
  std::int64_t i = 0;
  for (std::int64_t a = 0; a < g.A; ++a)
    for (std::int64_t b = 0; b < g.B; ++b)
      for (std::int64_t k = 0; k < g.K; ++k, ++i) f(i, a, b);
}

enum class Side { Producer, Consumer };

void fold(const char* fn, Side side, const FoldLayer& layer, const FoldBatchNorm& bn, TensorView out_weight,
          VectorView out_bias) {
  const detail::Checked<Geometry> checked = check_layer(layer);
  detail::raise_if(fn, checked.problem);
  const Geometry& g = checked.value;
  if (side == Side::Consumer && g.layout == WeightLayout::InOut && layer.weight.shape().rank() != 2)
    detail::fail(fn, "layer.weight: expected a WeightLayout::InOut weight of rank 2 (Gemm, MatMul): a transposed convolution "
                     "cannot absorb the BatchNorm in front of it exactly, got rank " +
                         std::to_string(layer.weight.shape().rank()));
  const detail::Checked<std::vector<double>> st = check_batch_norm(bn, side == Side::Producer ? g.c_out() : g.c_in());
  detail::raise_if(fn, st.problem);
  detail::raise_if(fn, check_outputs(layer, bn, g, out_weight, out_bias));
  const auto s = [&](std::int64_t c) { return st.value[static_cast<std::size_t>(2 * c)]; };
  const auto t = [&](std::int64_t c) { return st.value[static_cast<std::size_t>(2 * c + 1)]; };
  const void* w = layer.weight.data();
  const DType wt = layer.weight.dtype();
  // The bias first, from the unmodified weight (which out_weight may be).
  std::vector<double> bias(static_cast<std::size_t>(g.c_out()));
  for (std::int64_t o = 0; o < g.c_out(); ++o) bias[static_cast<std::size_t>(o)] = load_or(layer.bias, o, 0.0);
  if (side == Side::Producer) {
    for (std::int64_t o = 0; o < g.c_out(); ++o) {
      double& b = bias[static_cast<std::size_t>(o)];
      b = s(o) * (b - load(bn.running_mean.data(), bn.running_mean.dtype(), o)) + load_or(bn.bias, o, 0.0);
    }
  } else {
    for_each_weight(g, [&](std::int64_t i, std::int64_t a, std::int64_t b) {
      bias[static_cast<std::size_t>(g.out_channel(a, b))] += load(w, wt, i) * t(g.in_channel(a, b));
    });
  }
  for_each_weight(g, [&](std::int64_t i, std::int64_t a, std::int64_t b) {
    const std::int64_t c = side == Side::Producer ? g.out_channel(a, b) : g.in_channel(a, b);
    store(out_weight.data(), out_weight.dtype(), i, load(w, wt, i) * s(c));
  });
  for (std::int64_t o = 0; o < g.c_out(); ++o) store(out_bias.data(), out_bias.dtype(), o, bias[static_cast<std::size_t>(o)]);
}

}  // namespace

void fold_into_producer(const FoldLayer& layer, const FoldBatchNorm& bn, TensorView out_weight, VectorView out_bias) {
  fold("fold_into_producer", Side::Producer, layer, bn, out_weight, out_bias);
}

void fold_into_consumer(const FoldLayer& layer, const FoldBatchNorm& bn, TensorView out_weight, VectorView out_bias) {
  fold("fold_into_consumer", Side::Consumer, layer, bn, out_weight, out_bias);
}

}  // namespace bnorm
