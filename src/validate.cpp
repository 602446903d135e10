#include "validate.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>

namespace bnorm::detail {
namespace {
bool valid_dtype(DType d) { return d == DType::Float32 || d == DType::Float64 || d == DType::BFloat16; }
bool valid_layout(Layout l) { return l == Layout::ChannelsFirst || l == Layout::ChannelsLast; }
// The kernels read through float* / double*: a pointer off the element's alignment is undefined
// behaviour there (and a fault with aligned vector loads), so it is refused up front.
Problem check_aligned(const std::string& arg, const void* p, DType dtype) {
  const auto align = static_cast<std::uintptr_t>(size_of(dtype));
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  if (align > 1 && addr % align != 0) {
    std::ostringstream got;
    got << p;
    return Problem(arg + ": expected a data pointer aligned to " + std::to_string(align) + " bytes (" +
                   to_string(dtype) + "), got " + got.str());
  }
  return {};
}
}  // namespace

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

Problem check_dtype(const std::string& arg, DType dtype) {
  if (!valid_dtype(dtype))
    return Problem(arg + ": expected dtype float32, float64 or bfloat16, got unsupported " + to_string(dtype),
                   ErrorKind::Type);
  return {};
}

Problem check_data(const std::string& arg, const void* p, DType dtype, std::int64_t n) {
  if (n > 0 && p == nullptr)
    return Problem(arg + ": expected a data pointer, got null for " + std::to_string(n) + " values");
  return check_aligned(arg, p, dtype);
}

Problem check_count(const std::string& arg, std::int64_t n, std::int64_t count) {
  if (n != count)
    return Problem(arg + ": expected " + std::to_string(count) + " values (one per channel), got " + std::to_string(n));
  return {};
}

bool overlaps(const void* a, std::int64_t a_bytes, const void* b, std::int64_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  const auto pa = reinterpret_cast<std::uintptr_t>(a), pb = reinterpret_cast<std::uintptr_t>(b);
  return !(pa + static_cast<std::uintptr_t>(a_bytes) <= pb || pb + static_cast<std::uintptr_t>(b_bytes) <= pa);
}

Checked<ShapeSize> check_shape(const std::string& arg, const Shape& s, DType dtype) {
  ShapeSize size;
  bool overflow = false;
  for (int i = 0; i < s.rank(); ++i) {
    if (s[i] < 0)
      return Problem(arg + ": expected non-negative sizes, got " + std::to_string(s[i]) + " in dim " + std::to_string(i) +
                   " of shape " + s.str());
    overflow = overflow || __builtin_mul_overflow(size.numel, s[i], &size.numel);
    if (i >= 2) overflow = overflow || __builtin_mul_overflow(size.inner, s[i], &size.inner);
  }
  overflow = overflow || __builtin_mul_overflow(size.numel, static_cast<std::int64_t>(size_of(dtype)), &size.bytes);
  if (overflow)
    return Problem(arg + ": expected a shape whose size in bytes fits in int64, got " + s.str() + " of " +
                 to_string(dtype));
  return size;
}

void fail(const char* fn, const std::string& what, ErrorKind kind) {
  throw Error(std::string("bnorm::") + fn + ": " + what, kind);
}

Checked<TensorInfo> check_tensor(const char* name, const ConstTensorView& t) {
  const std::string arg = name;
  const Shape& s = t.shape();
  if (s.rank() < 2)
    return Problem(arg + ": expected a tensor of rank >= 2 (N, C, ...), got rank " + std::to_string(s.rank()) +
                 " with shape " + s.str());
  BNORM_CHECK(check_dtype(arg, t.dtype()));
  if (!valid_layout(t.layout()))
    return Problem(arg + ": expected layout channels_first or channels_last, got unsupported " + to_string(t.layout()));
  const Checked<ShapeSize> size = check_shape(arg, s, t.dtype());
  BNORM_CHECK(size.problem);
  const std::int64_t numel = size.value.numel, spatial = size.value.inner;
  if (numel > 0 && t.data() == nullptr)
    return Problem(arg + ": expected a data pointer, got null for a tensor of shape " + s.str());
  BNORM_CHECK(check_aligned(arg, t.data(), t.dtype()));
  TensorInfo info;
  info.geometry = {s[0], s[1], spatial, spatial == 1 ? Layout::ChannelsLast : t.layout()};
  info.geometry.reduce_threads = kernels::reduce_threads(info.geometry);  // read num_threads() once
  info.numel = numel;
  info.bytes = size.value.bytes;
  return info;
}

Problem check_like(const char* name, const ConstTensorView& t, const char* like_name, const ConstTensorView& like) {
  const std::string arg = name;
  if (!(t.shape() == like.shape()))
    return Problem(arg + ": expected the shape of " + like_name + " " + like.shape().str() + ", got " + t.shape().str());
  if (t.dtype() != like.dtype())
    return Problem(arg + ": expected the dtype of " + like_name + " (" + to_string(like.dtype()) + "), got " +
                       to_string(t.dtype()),
                   ErrorKind::Type);
  // With one spatial element (or none) both layouts are the same memory, so either is fine.
  std::int64_t spatial = 1;
  for (int i = 2; i < t.shape().rank(); ++i) spatial *= t.shape()[i];
  if (spatial != 1 && t.layout() != like.layout())
    return Problem(arg + ": expected the layout of " + like_name + " (" + to_string(like.layout()) + "), got " +
                 to_string(t.layout()));
  return {};
}

Problem check_vector(const char* name, const ConstVectorView& v, std::int64_t C, DType tensor_dtype,
                     bool also_float64) {
  const std::string arg = name;
  // The per-channel vectors of a bfloat16 tensor are float32 (torch's mixed-precision rule).
  const DType dtype = tensor_dtype == DType::BFloat16 ? DType::Float32 : tensor_dtype;
  BNORM_CHECK(check_count(arg, v.size(), C));
  if (v.dtype() != dtype && !(also_float64 && v.dtype() == DType::Float64))
    return Problem(arg + ": expected dtype " + to_string(dtype) +
                       (also_float64 && dtype != DType::Float64 ? " or float64" : "") + ", got " + to_string(v.dtype()),
                   ErrorKind::Type);
  return check_data(arg, v.data(), v.dtype(), C);
}

Problem check_alias(const char* a_name, const void* a, std::int64_t a_bytes, const char* b_name, const void* b,
                    std::int64_t b_bytes) {
  if (a != b && overlaps(a, a_bytes, b, b_bytes))
    return Problem(std::string(a_name) + ": expected the same memory as " + b_name +
                 " or memory disjoint from it, got a partial overlap");
  return {};
}

Problem check_eps(double eps) {
  if (!(std::isfinite(eps) && eps > 0)) return Problem("eps: expected a finite value > 0, got " + num(eps));
  return {};
}

Problem check_momentum(double momentum) {
  if (!(momentum >= 0 && momentum <= 1)) return Problem("momentum: expected a value in [0, 1], got " + num(momentum));
  return {};
}

Problem check_eps(const Options& options) {
  if (options.policy == Policy::Strict || options.training) return check_eps(options.eps);
  if (!(std::isfinite(options.eps) && options.eps >= 0))
    return Problem("eps: expected a finite value >= 0 in eval, got " + num(options.eps));
  return {};
}

Problem check_momentum(const Options& options) {
  return options.policy == Policy::Strict ? check_momentum(options.momentum) : Problem();
}

double kernel_eps(const Options& options) {
  const bool zero_allowed = options.policy == Policy::Torch && !options.training;
  return zero_allowed && options.eps == 0 ? std::numeric_limits<double>::denorm_min() : options.eps;
}

bool torch_empty_batch(const Options& options, const TensorInfo& info) {
  return options.policy == Policy::Torch && options.training && info.geometry.C > 0 && info.numel == 0;
}

Problem check_activation(Activation activation) {
  if (activation != Activation::None && activation != Activation::Relu)
    return Problem("activation: expected None or Relu, got unsupported value " +
                   std::to_string(static_cast<int>(activation)));
  return {};
}

Problem check_training_count(const ConstTensorView& input, const TensorInfo& info) {
  if (info.geometry.C > 0 && info.geometry.per_channel() <= 1)
    return Problem("input: Expected more than 1 value per channel when training, got input size " + input.shape().str() +
                 " (N * spatial = " + std::to_string(info.geometry.per_channel()) + " value(s) per channel)");
  return {};
}

Problem check_virtual_batch_size(std::int64_t virtual_batch_size) {
  if (virtual_batch_size < 1)
    return Problem("virtual_batch_size: expected >= 1, got " + std::to_string(virtual_batch_size));
  return {};
}

Problem check_renorm_limits(double r_max, double d_max) {
  if (!(r_max >= 1)) return Problem("r_max: expected a value >= 1 (inf: r unclipped), got " + num(r_max));
  if (!(d_max >= 0)) return Problem("d_max: expected a value >= 0 (inf: d unclipped), got " + num(d_max));
  return {};
}

Problem check_no_activation(Activation activation) {
  if (activation != Activation::None)
    return Problem("activation: expected None (the variants fuse no activation), got " +
                   std::string(activation == Activation::Relu ? "Relu" : "an unsupported value"));
  return {};
}

}  // namespace bnorm::detail
