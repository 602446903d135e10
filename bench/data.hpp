// bnorm-bench's data: the harness's buffers of one (shape, dtype), filled once with deterministic
// inputs and handed to every implementation, and the float64 reference results each one is checked
// against. data.cpp makes the inputs and resets the state between rows; check.cpp computes the
// reference and the errors.
#pragma once

#include "bench.hpp"

#include <bnorm/bnorm.hpp>

#include "kernels/reference.hpp"

#include <cstdlib>
#include <new>
#include <optional>
#include <utility>
#include <vector>

namespace bench {

// Memory: 64-byte aligned, first-touched by the thread split used for filling.
struct Buffer {
  void* p = nullptr;
  std::size_t bytes = 0;
  Buffer() = default;
  explicit Buffer(std::size_t n) : bytes(n) {
    p = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Buffer() { std::free(p); }
  template <class T>
  T* as() const { return static_cast<T*>(p); }
};

// bf16: rounded to nearest even by bnorm::bfloat16 (through float32: a value between two bf16
// values may round twice, which only moves an input by one bf16 step; the reference reads back
// what was stored, so it sees exactly what the libraries see).
inline void store(DType dt, void* p, std::size_t i, double v) {
  if (dt == DType::BF16) static_cast<bnorm::bfloat16*>(p)[i] = bnorm::bfloat16::from_float(static_cast<float>(v));
  else static_cast<float*>(p)[i] = static_cast<float>(v);
}
inline double load(DType dt, const void* p, std::size_t i) {
  if (dt == DType::BF16) return static_cast<const bnorm::bfloat16*>(p)[i].to_float();
  return static_cast<const float*>(p)[i];
}

// Per-shape state: the harness's buffers and the float64 reference results.
struct ShapeData {
  Case shape;  // dims and dtype only
  std::size_t numel = 0, bytes = 0;
  Buffer x[2], dy[2];  // indexed by Layout
  Buffer y, dx;
  std::vector<float> weight, bias, running_mean, running_var, train_rm, train_rv, save_mean, save_invstd, batch_mean,
      batch_var, dweight, dbias;
  // Reference, on logical channels-first data.
  std::vector<double> xd, dyd, wd, bd, rmd, rvd;
  std::optional<bnorm::reference::Forward> ref_train, ref_eval;
  std::optional<bnorm::reference::Backward> ref_bwd;
  double ref_seconds = 0;
};

// data.cpp
ShapeData make_shape_data(const std::vector<std::int64_t>& dims, DType dtype);
// Before each group: inputs of the op set to the same state for every implementation.
void reset_state(ShapeData& sd);
Data data_for(ShapeData& sd, Layout layout);
// The outputs set to NaN before a check, so that an output left unwritten fails it.
void fill_nan(ShapeData& sd);

// check.cpp
// The training statistics every backward starts from: the reference's (rounded to float32); with
// `check`, also the reference results of `op`.
void ensure_reference(ShapeData& sd, Op op, bool check);
// max |out - ref| / max(1, max |ref|) of the op's outputs, in `layout`, against the reference.
double check_error(const ShapeData& sd, Layout layout, Op op);
// The largest error check_error() may return for a row to pass.
double tolerance(DType dt);

}  // namespace bench
