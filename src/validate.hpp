// Internal: argument checks shared by the functional API and the layer. Each throws bnorm::Error
// with "bnorm::<function>: <argument>: expected ..., got ..." and is called before anything is
// written, so a failed call changes nothing.
#pragma once

#include <bnorm/types.hpp>

#include "kernels/kernels.hpp"

#include <string>

namespace bnorm::detail {

[[noreturn]] void fail(const char* fn, const std::string& what);

struct TensorInfo {
  kernels::Geometry geometry;  // layout normalized: with S == 1 both layouts are the same memory
  std::int64_t numel = 0;
  std::int64_t bytes = 0;
};

// Rank >= 2 (and <= kMaxRank), non-negative dims whose product and byte size fit in int64,
// a supported dtype and layout, and a data pointer unless the tensor is empty.
TensorInfo check_tensor(const char* fn, const char* name, const ConstTensorView& t);

// `t` must have the shape, dtype and (effective) layout of `like`.
void check_like(const char* fn, const char* name, const ConstTensorView& t, const char* like_name,
                const ConstTensorView& like);

// A per-channel vector that goes with a tensor of dtype `dtype`: length C, that dtype (float32 for a
// bfloat16 tensor) or, with also_float64, float64; a data pointer when C > 0.
void check_vector(const char* fn, const char* name, const ConstVectorView& v, std::int64_t C, DType dtype,
                  bool also_float64 = false);

// Two buffers may be the same memory or disjoint, never partly overlapping.
void check_alias(const char* fn, const char* a_name, const void* a, std::int64_t a_bytes, const char* b_name,
                 const void* b, std::int64_t b_bytes);

void check_eps(const char* fn, double eps);
void check_momentum(const char* fn, double momentum);
void check_training_count(const char* fn, const ConstTensorView& input, const TensorInfo& info);

}  // namespace bnorm::detail
