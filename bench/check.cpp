// bnorm-bench's check: the float64 reference (bnorm::reference, src/kernels/reference.hpp) on the
// inputs as stored, and each output's error against it (see data.hpp).
#include "data.hpp"
#include "timing.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

namespace bench {
namespace {

bnorm::reference::Problem problem(const Case& c, bool training) {
  bnorm::reference::Problem p;
  p.N = c.N();
  p.C = c.C();
  p.S = c.S();
  p.training = training;
  p.momentum = c.momentum;
  p.eps = c.eps;
  return p;
}

// Offset of logical (n, c, s) in a layout.
inline std::size_t offset(const Case& c, Layout layout, std::int64_t n, std::int64_t ch, std::int64_t s) {
  return static_cast<std::size_t>(layout == Layout::NHWC ? (n * c.S() + s) * c.C() + ch : (n * c.C() + ch) * c.S() + s);
}

// max |got - ref| / max(1, max |ref|) over a tensor in `layout` (NaN counts as infinite error).
double tensor_error(const ShapeData& sd, Layout layout, const void* got, const std::vector<double>& ref) {
  const Case& c = sd.shape;
  const std::int64_t N = c.N(), Cn = c.C(), S = c.S();
  double err = 0, scale = 1;
#pragma omp parallel for collapse(2) reduction(max : err, scale) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t ch = 0; ch < Cn; ++ch)
      for (std::int64_t s = 0; s < S; ++s) {
        const double r = ref[static_cast<std::size_t>((n * Cn + ch) * S + s)];
        const double g = load(c.dtype, got, offset(c, layout, n, ch, s));
        const double e = std::abs(g - r);
        err = std::max(err, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
        scale = std::max(scale, std::abs(r));
      }
  return err / scale;
}

double vector_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = std::abs(static_cast<double>(got[i]) - ref[i]);
    err = std::max(err, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
    scale = std::max(scale, std::abs(ref[i]));
  }
  return err / scale;
}

}  // namespace

void ensure_reference(ShapeData& sd, Op op, bool check) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!sd.ref_train) {
    sd.ref_train = bnorm::reference::forward(problem(sd.shape, true), sd.xd, sd.wd, sd.bd, sd.rmd, sd.rvd);
    for (std::size_t c = 0; c < sd.save_mean.size(); ++c) {
      sd.batch_mean[c] = static_cast<float>(sd.ref_train->mean[c]);
      sd.batch_var[c] = static_cast<float>(sd.ref_train->var[c]);
    }
  }
  if (check && op == Op::InferFwd && !sd.ref_eval)
    sd.ref_eval = bnorm::reference::forward(problem(sd.shape, false), sd.xd, sd.wd, sd.bd, sd.rmd, sd.rvd);
  if (check && op == Op::Backward && !sd.ref_bwd)
    sd.ref_bwd = bnorm::reference::backward(problem(sd.shape, true), sd.xd, sd.wd, *sd.ref_train, sd.dyd);
  sd.ref_seconds += seconds_since(t0);
}

double check_error(const ShapeData& sd, Layout layout, Op op) {
  switch (op) {
    case Op::TrainFwd: return tensor_error(sd, layout, sd.y.p, sd.ref_train->y);
    case Op::InferFwd: return tensor_error(sd, layout, sd.y.p, sd.ref_eval->y);
    case Op::Backward:
      return std::max({tensor_error(sd, layout, sd.dx.p, sd.ref_bwd->dx), vector_error(sd.dweight, sd.ref_bwd->dweight),
                       vector_error(sd.dbias, sd.ref_bwd->dbias)});
  }
  return 0;
}

// Relative to the largest reference value; float32 rounding of a BatchNorm output is ~1e-7, and
// float32 accumulation over 400k values per channel costs a few 1e-6 at most. A bf16 output is
// rounded once to 8 significant bits (2^-9 relative); 2^-7 (~1/128) leaves room for float32
// arithmetic and for an implementation that rounds an intermediate to bf16. The reference runs on
// the bf16-rounded inputs, so input rounding is not counted as error.
double tolerance(DType dt) { return dt == DType::BF16 ? 0x1.0p-7 : 1e-4; }

}  // namespace bench
