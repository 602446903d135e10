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

}  // namespace
}  // namespace bnorm::kernels

namespace bnorm::kernels::BNORM_ISA {

// Mean and M2 of channel c of channels-first data (stats.cpp); the fused passes build on it.
template <class T>
void channel_moments_cf(const T* x, const Geometry& g, std::int64_t c, double& mean, double& m2);

}  // namespace bnorm::kernels::BNORM_ISA
