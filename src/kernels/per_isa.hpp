// Internal: small helpers for the kernel files that are compiled once per instruction set.
//
// Why not std::min / std::fill: an inline function with external linkage is emitted in every
// translation unit that uses it, and the linker keeps one copy. If the kept copy came from the
// AVX-512 build of a kernel file, the generic build would run AVX-512 code on a CPU without it.
// Everything here has internal linkage, so each per-ISA object file keeps its own copy.
#pragma once

#include "kernels/kernels.hpp"
#include "kernels/simd.hpp"

#include <cmath>
#include <cstdint>
#include <initializer_list>

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

// One block of channel c of channels-first data: `rows` segments of `len` contiguous values starting
// at `offset`, the segments C * S apart, after `before` values of channel c in its earlier blocks;
// `next` is the offset of the block that the walk visits after this one (-1 for the last).
struct CfBlock {
  std::int64_t c, offset, rows, len, before, next;
};

// f(block) for the blocks of channels [c0, c1) of channels-first data. Whole rows (n, c) make a
// block when a row is short, pieces of a row when it is long; a block has at most kBlock values.
// Each channel's blocks come in one fixed order (by sample group, then piece), whatever the range,
// so per-channel merges in that order give the same bits for any c0, c1 (and thread count).
// Statistics and backward sums use the same blocks.
//
// The channels go innermost: one group of samples of the whole range before the next. A pass over
// a range then reads memory in order, the group's rows of consecutive channels being adjacent (one
// sample's rows c0..c1 are one contiguous run); channel by channel it would jump C * S values at
// every row, N concurrent streams too many for the hardware prefetchers to follow.
template <class F>
void for_each_cf_block(const Geometry& g, std::int64_t c0, std::int64_t c1, F&& f) {
  const std::int64_t N = g.N, C = g.C, S = g.S;
  const std::int64_t rows_per_block = S >= kBlock ? 1 : greater(1, kBlock / greater(S, 1));
  const std::int64_t piece = S >= kBlock ? kBlock : S;
  CfBlock pending{};
  bool have = false;
  for (std::int64_t n0 = 0; n0 < N; n0 += rows_per_block) {
    const std::int64_t rows = lesser(rows_per_block, N - n0);
    for (std::int64_t c = c0; c < c1; ++c)
      for (std::int64_t s0 = 0; s0 < S; s0 += piece) {
        const CfBlock b{c, (n0 * C + c) * S + s0, rows, lesser(piece, S - s0), n0 * S + rows * s0, -1};
        if (have) {
          pending.next = b.offset;
          f(pending);
        }
        pending = b;
        have = true;
      }
  }
  if (have) f(pending);
}

// Asks for the cache lines of `bytes` bytes at `address` (a hint: no fault, whatever the address). An
// address, not a pointer: the next block's rows may run past the tensor's end, where forming a
// pointer would be undefined.
inline void prefetch_lines(std::uintptr_t address, std::int64_t bytes) {
  for (std::int64_t b = 0; b < bytes; b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(address + static_cast<std::uintptr_t>(b)), 0, 3);
}

// ---- Channel blocks of the fused channels-first passes.
// Channel c is N rows of S values, C * S apart. With short rows (7x7) that is N scattered pieces of
// a few cache lines each. The hardware prefetchers follow sequential streams within a page and
// fetch almost nothing ahead of such pieces, and software prefetches, like demand loads, are
// limited by the core's few outstanding L1 misses: a pass that reads such a channel from memory
// waits for its misses a few at a time. But channels c0..c1 of one sample are contiguous. So the
// fused passes take the channels in blocks: first read the block's N contiguous pieces front to
// back (touch_channels: one load per cache line, which the L2 streamer turns into a full-speed
// stream), then run the per-channel passes from L2.
inline constexpr std::int64_t kShortRowBytes = 512;  // rows up to this long take blocks
inline constexpr std::int64_t kBlockPieceBytes = 8192;  // aim: a block's piece of one sample
inline constexpr std::int64_t kMaxChannelsPerBlock = 64;

// Channels per block: about kBlockPieceBytes per sample, few enough that the block's slices of
// the `cached` tensors take at most half the fuse budget, and the blocks a multiple of the thread
// count (each thread gets a contiguous range of blocks: the ranges then differ by less than a block).
template <class S>
std::int64_t cf_channels_per_block(const Geometry& g, int cached) {
  const std::int64_t row = g.S * static_cast<std::int64_t>(sizeof(S));
  if (row > kShortRowBytes || row == 0) return 1;
  const std::int64_t slice = g.per_channel() * static_cast<std::int64_t>(sizeof(S)) * cached;
  const std::int64_t threads = num_threads();
  const std::int64_t target = lesser(kMaxChannelsPerBlock, lesser((kBlockPieceBytes + row - 1) / row,
                                                                  greater(1, fuse_budget_bytes() / 2 / slice)));
  const std::int64_t blocks = greater(1, ((g.C + target - 1) / target + threads - 1) / threads) * threads;
  return greater(1, (g.C + blocks - 1) / blocks);
}

// Loads one value per cache line of channels [c0, c1) of every sample, in memory order.
template <class S>
void touch_channels(const S* p, const Geometry& g, std::int64_t c0, std::int64_t c1) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(p);
  const std::int64_t row = g.S * static_cast<std::int64_t>(sizeof(S)), len = (c1 - c0) * row;
  unsigned sink = 0;
  for (std::int64_t n = 0; n < g.N; ++n) {
    const unsigned char* q = bytes + (n * g.C + c0) * row;
    for (std::int64_t i = 0; i < len; i += 64) sink += q[i];
    sink += q[len - 1];
  }
  asm volatile("" : : "r"(sink));  // the loads must happen
}

// The two passes of a fused channels-first kernel over every channel: k = first(c) (the channel's
// reduction, which returns its coefficients), then second(n, c, k) for each sample n. Channels go
// in blocks of cf_channels_per_block over the threads (each thread a contiguous range of blocks).
// In a block of several channels, the input `tensors` (null: absent) are touched first, and the
// second pass runs sample by sample over the block's channels, so that its output is written in
// contiguous pieces too. With `stream`, each thread fences its non-temporal stores at the end.
template <class S, class First, class Second>
void fused_channel_passes(const Geometry& g, int cached, bool stream, std::initializer_list<const S*> tensors,
                          First&& first, Second&& second) {
  using K = decltype(first(std::int64_t{0}));
  const std::int64_t cb = cf_channels_per_block<S>(g, cached);
  const std::int64_t blocks = (g.C + cb - 1) / cb;
  parallel_for_streamed(blocks, g.numel(), stream, [&](std::int64_t b) {
    const std::int64_t c0 = b * cb, c1 = lesser(g.C, c0 + cb);
    if (cb == 1) {
      const K k = first(c0);
      for (std::int64_t n = 0; n < g.N; ++n) second(n, c0, k);
      return;
    }
    for (const S* t : tensors)
      if (t) touch_channels(t, g, c0, c1);
    K k[kMaxChannelsPerBlock];
    for (std::int64_t c = c0; c < c1; ++c) k[c - c0] = first(c);
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t c = c0; c < c1; ++c) second(n, c, k[c - c0]);
  });
}

}  // namespace
}  // namespace bnorm::kernels

namespace bnorm::kernels::BNORM_ISA {

// This build's kernels (kernels.hpp: BNORM_KERNELS). A kernel file defines some of them and ends
// with BNORM_INSTANTIATE(<name>) for each.
BNORM_KERNELS(BNORM_DECLARE_KERNEL)

// Mean and M2 of channel c of channels-first data (stats.cpp); the fused passes build on it.
template <class T>
void channel_moments_cf(const T* x, const Geometry& g, std::int64_t c, double& mean, double& m2);

}  // namespace bnorm::kernels::BNORM_ISA

// The explicit instantiations of this build's template `name`, one for each storage type that the
// ISA table gives the build (kernels/isa_table.hpp: the avx512bf16 row builds bfloat16 only).
#define BNORM_ISA_TYPES_OF(isa) BNORM_ISA_TYPES_OF_(isa)
#define BNORM_ISA_TYPES_OF_(isa) BNORM_ISA_TYPES_##isa
#define BNORM_INSTANTIATE(name) BNORM_ISA_TYPES_OF(BNORM_ISA)(BNORM_INSTANTIATE_ONE, name)
