// Internal: small helpers for the kernel files that are compiled once per instruction set.
//
// Why not std::min / std::fill: an inline function with external linkage is emitted in every
// translation unit that uses it, and the linker keeps one copy. If the kept copy came from the
// AVX-512 build of a kernel file, the generic build would run AVX-512 code on a CPU without it.
// Everything here has internal linkage, so each per-ISA object file keeps its own copy.
#pragma once

#include "kernels/kernels.hpp"

#include <cmath>
#include <cstdint>

#ifndef BNORM_ISA
#error "compile the kernel files with -DBNORM_ISA=<namespace> (see CMakeLists.txt)"
#endif

namespace bnorm::kernels {
namespace {

inline std::int64_t lesser(std::int64_t a, std::int64_t b) { return a < b ? a : b; }
inline std::int64_t greater(std::int64_t a, std::int64_t b) { return a < b ? b : a; }
inline void zero(double* p, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) p[i] = 0.0;
}

// The blocks of channel c of channels-first data, in a fixed order: f(offset, rows, len) for a
// block of `rows` segments of `len` contiguous values starting at `offset`, the segments C * S
// apart. Whole rows (n, c) make a block when a row is short, pieces of a row when it is long;
// a block has at most kBlock values. Statistics and backward sums use the same blocks.
template <class F>
void for_each_cf_block(const Geometry& g, std::int64_t c, F&& f) {
  const std::int64_t N = g.N, C = g.C, S = g.S;
  const std::int64_t rows_per_block = S >= kBlock ? 1 : greater(1, kBlock / greater(S, 1));
  const std::int64_t piece = S >= kBlock ? kBlock : S;
  for (std::int64_t n0 = 0; n0 < N; n0 += rows_per_block) {
    const std::int64_t rows = lesser(rows_per_block, N - n0);
    for (std::int64_t s0 = 0; s0 < S; s0 += piece) f((n0 * C + c) * S + s0, rows, lesser(piece, S - s0));
  }
}

}  // namespace
}  // namespace bnorm::kernels

namespace bnorm::kernels::BNORM_ISA {

// Mean and M2 of channel c of channels-first data (stats.cpp); the fused passes build on it.
template <class T>
void channel_moments_cf(const T* x, const Geometry& g, std::int64_t c, double& mean, double& m2);

}  // namespace bnorm::kernels::BNORM_ISA
