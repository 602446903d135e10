// Internal: argument checks shared by the functional API, SyncBatchNorm and the layer.
//
// A check returns what it found as a value: a Problem, empty when the check passed, otherwise
// "<argument>: expected ..., got ...". Only the public entry points throw (raise), as bnorm::Error
// "bnorm::<function>: <argument>: expected ..., got ...", and they do so before anything is written,
// so a failed call changes nothing. Internal code passes problems around: SyncBatchNorm sends a
// rank's problem to every other rank before all of them throw it together.
#pragma once

#include <bnorm/functional.hpp>
#include <bnorm/types.hpp>

#include "kernels/kernels.hpp"

#include <string>
#include <utility>

namespace bnorm::detail {

class [[nodiscard]] Problem {
 public:
  Problem() = default;  // no problem (and no allocation)
  explicit Problem(std::string what, ErrorKind kind = ErrorKind::Value) : what_(std::move(what)), kind_(kind) {}
  explicit operator bool() const { return !what_.empty(); }  // true when the check failed
  const std::string& what() const { return what_; }
  ErrorKind kind() const { return kind_; }  // Type: a wrong dtype; Value: everything else

 private:
  std::string what_;
  ErrorKind kind_ = ErrorKind::Value;
};

// A value, or the problem that kept it from being computed.
template <class T>
struct [[nodiscard]] Checked {
  Checked(T v) : value(std::move(v)) {}             // NOLINT: a check's result converts implicitly
  Checked(Problem p) : problem(std::move(p)) {}     // NOLINT: so does its failure
  T value{};
  Problem problem;
};

// Returns the problem of a check from the enclosing function (a Problem or Checked<T>) when it failed.
#define BNORM_CHECK(...)                                                    \
  do {                                                                      \
    if (::bnorm::detail::Problem bnorm_problem_ = (__VA_ARGS__)) return bnorm_problem_; \
  } while (0)

// The entry point `fn` throws bnorm::Error "bnorm::<fn>: <what>" of that kind.
[[noreturn]] void fail(const char* fn, const std::string& what, ErrorKind kind = ErrorKind::Value);
[[noreturn]] inline void raise(const char* fn, const Problem& p) { fail(fn, p.what(), p.kind()); }
inline void raise_if(const char* fn, const Problem& p) {
  if (p) raise(fn, p);
}

struct TensorInfo {
  kernels::Geometry geometry;  // layout normalized: with S == 1 both layouts are the same memory
  std::int64_t numel = 0;
  std::int64_t bytes = 0;
};

// Rank >= 2 (and <= kMaxRank), non-negative dims whose product and byte size fit in int64,
// a supported dtype and layout, and a data pointer unless the tensor is empty.
Checked<TensorInfo> check_tensor(const char* name, const ConstTensorView& t);

// `t` must have the shape, dtype and (effective) layout of `like`.
Problem check_like(const char* name, const ConstTensorView& t, const char* like_name, const ConstTensorView& like);

// A per-channel vector that goes with a tensor of dtype `dtype`: length C, that dtype (float32 for a
// bfloat16 tensor) or, with also_float64, float64; a data pointer when C > 0.
Problem check_vector(const char* name, const ConstVectorView& v, std::int64_t C, DType dtype,
                     bool also_float64 = false);

// Two buffers may be the same memory or disjoint, never partly overlapping.
Problem check_alias(const char* a_name, const void* a, std::int64_t a_bytes, const char* b_name, const void* b,
                    std::int64_t b_bytes);

// The pieces that other checks are made of (fold.cpp's too): a number as messages print it; a
// supported dtype (float32, float64, bfloat16); a data pointer for n > 0 values, aligned to its dtype;
// n values where `count` are expected (one per channel); whether two buffers share a byte.
std::string num(double v);
Problem check_dtype(const std::string& arg, DType dtype);
Problem check_data(const std::string& arg, const void* p, DType dtype, std::int64_t n);
Problem check_count(const std::string& arg, std::int64_t n, std::int64_t count);
bool overlaps(const void* a, std::int64_t a_bytes, const void* b, std::int64_t b_bytes);

// Non-negative dims whose product, and its size in bytes as dtype, fit in int64: numel, bytes and
// the product of the dims after the first two (the spatial size, a weight's kernel size).
struct ShapeSize {
  std::int64_t numel = 1, bytes = 0, inner = 1;
};
Checked<ShapeSize> check_shape(const std::string& arg, const Shape& s, DType dtype);

Problem check_eps(double eps);
Problem check_momentum(double momentum);
// eps and momentum under the options' policy (functional.hpp, Policy), and the eps the kernels take.
Problem check_eps(const Options& options);
Problem check_momentum(const Options& options);
double kernel_eps(const Options& options);
// Policy::Torch's training batch of no values (which changes nothing; Strict refuses it).
bool torch_empty_batch(const Options& options, const TensorInfo& info);
Problem check_activation(Activation activation);
Problem check_training_count(const ConstTensorView& input, const TensorInfo& info);

// The variants (ghost_batch_norm, batch_renorm): virtual_batch_size >= 1; r_max >= 1, d_max >= 0
// (inf allowed: no clipping); their fused activation, None only.
Problem check_virtual_batch_size(std::int64_t virtual_batch_size);
Problem check_renorm_limits(double r_max, double d_max);
Problem check_no_activation(Activation activation);

}  // namespace bnorm::detail
