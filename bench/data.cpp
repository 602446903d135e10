// bnorm-bench's inputs: deterministic values in the harness's buffers (see data.hpp).
#include "data.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

namespace bench {
namespace {

// Deterministic values in [-1, 1) from an index (a hash, so that filling is parallel).
double noise(std::uint64_t i, std::uint64_t seed) {
  std::uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
}

// x and dy in both layouts, and their values as stored (the reference's inputs).
void fill_tensors(ShapeData& sd) {
  const DType dtype = sd.shape.dtype;
  const std::int64_t N = sd.shape.N(), S = sd.shape.S(), Cn = sd.shape.C();
  // x: per-channel offset and scale, so that the statistics differ between channels.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t ch = 0; ch < Cn; ++ch)
      for (std::int64_t s = 0; s < S; ++s) {
        const std::size_t i = static_cast<std::size_t>((n * Cn + ch) * S + s);
        const double xv = 0.25 * static_cast<double>(ch % 7 - 3) + (1.0 + 0.5 * static_cast<double>(ch % 3)) * noise(i, 1);
        const double dv = noise(i, 2);
        // Round to the storage type so that the reference sees exactly what the libraries see.
        store(dtype, sd.x[0].p, i, xv);
        store(dtype, sd.dy[0].p, i, dv);
        sd.xd[i] = load(dtype, sd.x[0].p, i);
        sd.dyd[i] = load(dtype, sd.dy[0].p, i);
      }
  // The channels-last copies, first-touched by the threads that write them.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t ch = 0; ch < Cn; ++ch) {
        const std::size_t i = static_cast<std::size_t>((n * Cn + ch) * S + s);
        const std::size_t j = static_cast<std::size_t>((n * S + s) * Cn + ch);
        store(dtype, sd.x[1].p, j, sd.xd[i]);
        store(dtype, sd.dy[1].p, j, sd.dyd[i]);
      }
}

// The outputs, first-touched by the threads in parts of 64 KiB.
void zero_outputs(ShapeData& sd) {
  const std::size_t chunk = 1 << 16;
  const auto nchunks = static_cast<std::int64_t>((sd.bytes + chunk - 1) / chunk);
#pragma omp parallel for schedule(static)
  for (std::int64_t k = 0; k < nchunks; ++k) {
    const std::size_t b = static_cast<std::size_t>(k) * chunk, e = std::min(sd.bytes, b + chunk);
    std::memset(static_cast<char*>(sd.y.p) + b, 0, e - b);
    std::memset(static_cast<char*>(sd.dx.p) + b, 0, e - b);
  }
}

void fill_vectors(ShapeData& sd) {
  const auto C = static_cast<std::size_t>(sd.shape.C());
  auto vec = [&](std::uint64_t seed, double lo, double hi) {
    std::vector<float> v(C);
    for (std::size_t i = 0; i < C; ++i)
      v[i] = static_cast<float>(lo + (hi - lo) * 0.5 * (noise(i, seed) + 1.0));
    return v;
  };
  sd.weight = vec(3, 0.5, 1.5);
  sd.bias = vec(4, -0.5, 0.5);
  sd.running_mean = vec(5, -0.5, 0.5);
  sd.running_var = vec(6, 0.5, 2.0);
  sd.train_rm = sd.running_mean;
  sd.train_rv = sd.running_var;
  sd.save_mean.assign(C, 0.f);
  sd.save_invstd.assign(C, 1.f);
  sd.batch_mean.assign(C, 0.f);
  sd.batch_var.assign(C, 1.f);
  sd.dweight.assign(C, 0.f);
  sd.dbias.assign(C, 0.f);
  auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  sd.wd = widen(sd.weight);
  sd.bd = widen(sd.bias);
  sd.rmd = widen(sd.running_mean);
  sd.rvd = widen(sd.running_var);
}

}  // namespace

ShapeData make_shape_data(const std::vector<std::int64_t>& dims, DType dtype) {
  ShapeData sd;
  sd.shape.dims = dims;
  sd.shape.dtype = dtype;
  sd.numel = static_cast<std::size_t>(sd.shape.numel());
  sd.bytes = sd.numel * size_of(dtype);
  for (int l = 0; l < 2; ++l) {
    sd.x[l] = Buffer(sd.bytes);
    sd.dy[l] = Buffer(sd.bytes);
  }
  sd.y = Buffer(sd.bytes);
  sd.dx = Buffer(sd.bytes);
  sd.xd.resize(sd.numel);
  sd.dyd.resize(sd.numel);
  fill_tensors(sd);
  zero_outputs(sd);
  fill_vectors(sd);
  return sd;
}

void reset_state(ShapeData& sd) {
  for (std::size_t c = 0; c < sd.save_mean.size(); ++c) {
    sd.save_mean[c] = static_cast<float>(sd.ref_train->mean[c]);
    sd.save_invstd[c] = static_cast<float>(sd.ref_train->invstd[c]);
  }
  sd.train_rm = sd.running_mean;
  sd.train_rv = sd.running_var;
}

Data data_for(ShapeData& sd, Layout layout) {
  Data d;
  d.x = sd.x[static_cast<int>(layout)].p;
  d.dy = sd.dy[static_cast<int>(layout)].p;
  d.y = sd.y.p;
  d.dx = sd.dx.p;
  d.weight = sd.weight.data();
  d.bias = sd.bias.data();
  d.running_mean = sd.running_mean.data();
  d.running_var = sd.running_var.data();
  d.train_running_mean = sd.train_rm.data();
  d.train_running_var = sd.train_rv.data();
  d.save_mean = sd.save_mean.data();
  d.save_invstd = sd.save_invstd.data();
  d.batch_mean = sd.batch_mean.data();
  d.batch_var = sd.batch_var.data();
  d.dweight = sd.dweight.data();
  d.dbias = sd.dbias.data();
  return d;
}

void fill_nan(ShapeData& sd) {
  const auto n = static_cast<std::int64_t>(sd.numel);
  const double nan = std::numeric_limits<double>::quiet_NaN();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    store(sd.shape.dtype, sd.y.p, static_cast<std::size_t>(i), nan);
    store(sd.shape.dtype, sd.dx.p, static_cast<std::size_t>(i), nan);
  }
  std::fill(sd.dweight.begin(), sd.dweight.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(sd.dbias.begin(), sd.dbias.end(), std::numeric_limits<float>::quiet_NaN());
}

}  // namespace bench
