// bnorm: the vocabulary shared by every public header.
//
// Tensors are caller-owned memory described by a view: a data pointer, an element type, a logical
// shape in PyTorch's order (N, C, d1, d2, ...) and a memory layout. The shape is always logical:
// a channels-last view of shape {N, C, H, W} lies in memory as N, H, W, C, exactly like a torch
// tensor made with memory_format=torch.channels_last. Per-channel vectors (weight, bias, running
// statistics, gradients of the parameters) are one-dimensional views of length C.
#pragma once

#include <array>
#include <cstddef>
#include <bit>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnorm {

// What an Error reports, for bindings whose languages tell the two apart (Python: TypeError for
// Type, ValueError for Value) without reading the message.
enum class ErrorKind : std::uint8_t {
  Value,  // a wrong size, shape, value, pointer or combination of arguments
  Type,   // a wrong element type (dtype) of a tensor or vector
};

// The one exception type of the library. Every misuse throws it, with a message that names the
// function, the argument, what was expected and what was given, and a kind. A call that throws has
// changed nothing: no output, running statistic or parameter is half-written.
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what, ErrorKind kind = ErrorKind::Value)
      : std::invalid_argument(what), kind_(kind) {}
  explicit Error(const char* what, ErrorKind kind = ErrorKind::Value) : std::invalid_argument(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// Tensor element types. BFloat16 is a storage type: the kernels compute in float32, and the
// per-channel vectors that go with a bfloat16 tensor are float32 (or float64), as in torch's
// mixed-precision BatchNorm.
enum class DType : std::uint8_t { Float32, Float64, BFloat16 };
enum class Layout : std::uint8_t { ChannelsFirst, ChannelsLast };
// An activation fused into the forward pass (and undone in backward through the saved output).
enum class Activation : std::uint8_t { None, Relu };

std::string to_string(DType);
std::string to_string(Layout);
std::size_t size_of(DType);

// The layout of memory that holds a tensor of logical shape `shape` (N, C, d1, ...) at `strides`
// (in elements, one per dim, as torch's stride() and DLPack give them): ChannelsFirst when it is
// dense in the order N, C, d1, ... (C-contiguous), ChannelsLast when dense in the order N, d1, ...,
// C (rank >= 3), nullopt when neither (a slice with steps, transposed or negative strides) or a
// size is negative. Dims of size 1 may have any stride, and a tensor with no elements is dense in
// both. Both layouts hold exactly when they are the same memory (C == 1, every spatial size 1,
// rank 2, or no elements): then ChannelsFirst. The bindings build their views with it, so the
// answer is also "are these values contiguous" (== ChannelsFirst) for a per-channel vector of any
// shape. Any rank (no kMaxRank limit); strides of another length than shape throw Error.
std::optional<Layout> layout_of(std::span<const std::int64_t> shape, std::span<const std::int64_t> strides);

// bfloat16: the upper 16 bits of a float32 (sign, 8 exponent bits, 7 mantissa bits).
struct bfloat16 {
  std::uint16_t bits;  // trivial, so that arrays of it can be copied as bytes; bfloat16{} is 0
  // Rounds to nearest, ties to even; a NaN stays a (quiet) NaN, +-Inf stays +-Inf.
  static bfloat16 from_float(float f) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};
    return {static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
  }
  float to_float() const { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }
};

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::Float32; }
template <>
constexpr DType dtype_of<double>() { return DType::Float64; }
template <>
constexpr DType dtype_of<bfloat16>() { return DType::BFloat16; }

// Shapes up to this rank are accepted (torch's BatchNorm3d needs 5).
inline constexpr int kMaxRank = 8;

// A logical shape of at most kMaxRank dims (more throws bnorm::Error).
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims);
  explicit Shape(std::span<const std::int64_t> dims);

  int rank() const { return rank_; }
  std::int64_t operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }
  std::span<const std::int64_t> dims() const { return {dims_.data(), static_cast<std::size_t>(rank_)}; }
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[32, 64, 68, 68]"

 private:
  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

// Read-only view of a tensor (an input).
class ConstTensorView {
 public:
  ConstTensorView() = default;
  ConstTensorView(const void* data, DType dtype, Shape shape, Layout layout = Layout::ChannelsFirst)
      : data_(data), dtype_(dtype), shape_(shape), layout_(layout) {}
  template <class T>
  ConstTensorView(const T* data, Shape shape, Layout layout = Layout::ChannelsFirst)
      : ConstTensorView(static_cast<const void*>(data), dtype_of<T>(), shape, layout) {}

  const void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  Layout layout() const { return layout_; }
  bool empty() const { return data_ == nullptr && shape_.rank() == 0; }

 private:
  const void* data_ = nullptr;
  DType dtype_ = DType::Float32;
  Shape shape_;
  Layout layout_ = Layout::ChannelsFirst;
};

// Writable view of a tensor (an output); converts to a ConstTensorView.
class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, DType dtype, Shape shape, Layout layout = Layout::ChannelsFirst)
      : data_(data), dtype_(dtype), shape_(shape), layout_(layout) {}
  template <class T>
  TensorView(T* data, Shape shape, Layout layout = Layout::ChannelsFirst)
      : TensorView(static_cast<void*>(data), dtype_of<T>(), shape, layout) {}

  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  Layout layout() const { return layout_; }
  bool empty() const { return data_ == nullptr && shape_.rank() == 0; }
  operator ConstTensorView() const { return {data_, dtype_, shape_, layout_}; }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::Float32;
  Shape shape_;
  Layout layout_ = Layout::ChannelsFirst;
};

// Read-only per-channel vector; default-constructed means "absent" (torch's None).
class ConstVectorView {
 public:
  ConstVectorView() = default;
  ConstVectorView(const void* data, DType dtype, std::int64_t size) : data_(data), size_(size), dtype_(dtype) {}
  template <class T>
  ConstVectorView(const T* data, std::int64_t size) : ConstVectorView(static_cast<const void*>(data), dtype_of<T>(), size) {}
  template <class T>
  ConstVectorView(std::span<const T> s) : ConstVectorView(s.data(), static_cast<std::int64_t>(s.size())) {}
  template <class T>
  ConstVectorView(std::span<T> s) : ConstVectorView(s.data(), static_cast<std::int64_t>(s.size())) {}
  template <class T>
  ConstVectorView(const std::vector<T>& v) : ConstVectorView(v.data(), static_cast<std::int64_t>(v.size())) {}

  const void* data() const { return data_; }
  std::int64_t size() const { return size_; }
  DType dtype() const { return dtype_; }
  bool present() const { return data_ != nullptr || size_ != 0; }

 private:
  const void* data_ = nullptr;
  std::int64_t size_ = 0;
  DType dtype_ = DType::Float32;
};

// Writable per-channel vector; default-constructed means "absent".
class VectorView {
 public:
  VectorView() = default;
  VectorView(void* data, DType dtype, std::int64_t size) : data_(data), size_(size), dtype_(dtype) {}
  template <class T>
  VectorView(T* data, std::int64_t size) : VectorView(static_cast<void*>(data), dtype_of<T>(), size) {}
  template <class T>
  VectorView(std::span<T> s) : VectorView(s.data(), static_cast<std::int64_t>(s.size())) {}
  template <class T>
  VectorView(std::vector<T>& v) : VectorView(v.data(), static_cast<std::int64_t>(v.size())) {}

  void* data() const { return data_; }
  std::int64_t size() const { return size_; }
  DType dtype() const { return dtype_; }
  bool present() const { return data_ != nullptr || size_ != 0; }
  operator ConstVectorView() const { return {data_, dtype_, size_}; }

 private:
  void* data_ = nullptr;
  std::int64_t size_ = 0;
  DType dtype_ = DType::Float32;
};

// The library's threads: one setting for every kernel. Defaults to OpenMP's maximum.
void set_num_threads(int n);
int num_threads();

// What this process detected (CPU, instruction sets, caches, threads) and which kernel variant
// each operation and layout takes for a few shapes, as text: `bnorm info`, bnorm.info().
std::string runtime_info();

}  // namespace bnorm
