#include <bnorm/types.hpp>

#include <string>

namespace bnorm {

std::string to_string(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
  }
  return "dtype(" + std::to_string(static_cast<int>(t)) + ")";
}

std::string to_string(Layout l) {
  switch (l) {
    case Layout::ChannelsFirst: return "channels_first";
    case Layout::ChannelsLast: return "channels_last";
  }
  return "layout(" + std::to_string(static_cast<int>(l)) + ")";
}

std::size_t size_of(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::BFloat16: return 2;
  }
  return 0;
}

namespace {
// True when memory of these sizes and strides is dense in the axis order that axis(0), axis(1),
// ... give, innermost first. Dims of size 1 are skipped (any stride). A dense extent that
// overflows int64 only matters if a further dim has to be checked against it.
template <class AxisOrder>
bool dense_in(std::span<const std::int64_t> shape, std::span<const std::int64_t> strides, AxisOrder axis) {
  std::int64_t expected = 1;
  bool overflow = false;
  for (std::size_t k = 0; k < shape.size(); ++k) {
    const std::size_t a = axis(k);
    if (shape[a] == 1) continue;
    if (overflow || strides[a] != expected) return false;
    overflow = __builtin_mul_overflow(expected, shape[a], &expected);
  }
  return true;
}
}  // namespace

std::optional<Layout> layout_of(std::span<const std::int64_t> shape, std::span<const std::int64_t> strides) {
  if (strides.size() != shape.size())
    throw Error("bnorm::layout_of: strides: expected " + std::to_string(shape.size()) + " values (one per dim), got " +
                std::to_string(strides.size()));
  bool empty = false;
  for (const std::int64_t d : shape) {
    if (d < 0) return std::nullopt;
    empty = empty || d == 0;
  }
  if (empty) return Layout::ChannelsFirst;
  const std::size_t n = shape.size();
  if (dense_in(shape, strides, [n](std::size_t k) { return n - 1 - k; })) return Layout::ChannelsFirst;
  // Channels-last, innermost first: C, the spatial dims from the last one, N.
  if (n >= 3 && dense_in(shape, strides, [n](std::size_t k) { return k == 0 ? 1 : k == n - 1 ? 0 : n - k; }))
    return Layout::ChannelsLast;
  return std::nullopt;
}

Shape::Shape(std::initializer_list<std::int64_t> dims) : Shape(std::span<const std::int64_t>(dims.begin(), dims.size())) {}

Shape::Shape(std::span<const std::int64_t> dims) {
  if (dims.size() > static_cast<std::size_t>(kMaxRank))
    throw Error("bnorm::Shape: expected at most " + std::to_string(kMaxRank) + " dims, got " +
                std::to_string(dims.size()));
  rank_ = static_cast<int>(dims.size());
  for (std::size_t i = 0; i < dims.size(); ++i) dims_[i] = dims[i];
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[static_cast<std::size_t>(i)] != o.dims_[static_cast<std::size_t>(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) {
    if (i) s += ", ";
    s += std::to_string(dims_[static_cast<std::size_t>(i)]);
  }
  return s + "]";
}

}  // namespace bnorm
