// Internal: the vector type of the kernel files, one per instruction-set build.
//
// GCC/Clang vector extensions rather than intrinsics: the same source is the AVX-512 (64-byte),
// AVX2 (32-byte) or SSE2 (16-byte) kernel depending on the flags of the per-ISA object library,
// and the hot loops say exactly how many independent accumulators they keep (the compiler may not
// reassociate floating-point sums on its own, so a plain loop would be one dependent chain).
//
// Internal linkage throughout, for the reason given in per_isa.hpp.
#pragma once

#include "kernels/kernels.hpp"
#include "parallel.hpp"

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace bnorm::kernels {
namespace {

// The vector width, and the vector registers the loops can keep their accumulators in.
#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#else
inline constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#endif

template <class T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef std::int32_t mask __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef std::int64_t mask __attribute__((vector_size(kVectorBytes)));
};

template <class T>
using Vec = typename VectorOf<T>::type;
template <class T>
using Mask = typename VectorOf<T>::mask;

// Lanes of one vector.
template <class T>
inline constexpr std::int64_t kWidth = kVectorBytes / static_cast<int>(sizeof(T));

// Vectors in one accumulator set: always 64 lanes of float (32 of double), whatever the ISA, so
// that every build sums the same number of terms per lane and has the same rounding bound
// (docs/numerics.md). 4 vectors of AVX-512 also cover the latency of the adds.
template <class T>
inline constexpr int kAccVectors = 256 / kVectorBytes;
template <class T>
inline constexpr std::int64_t kAccLanes = kAccVectors<T> * kWidth<T>;

// The reductions that keep two sums (the statistics' deviation pass, the backward sums) need two
// accumulator sets, 2 kAccVectors registers, beside the loop's own few. AVX-512 has 32 vector
// registers, room for them; AVX2 and SSE2 have 16, and 2 x 8 accumulators left some on the stack,
// where every add became a store-to-load round trip (seen in the AVX2 bfloat16 deviation loop on
// the AMD EPYC: BENCHMARKS.md, "Channels-first statistics on AVX2"). There each set has half as
// many vectors, and a pair of vectors is added together before it joins its accumulator (add_pair):
// every lane then takes pair sums, and its rounding bound is that of the sequential sum of the same
// terms (docs/numerics.md).
template <class T>
inline constexpr int kPairAccVectors =
    2 * kAccVectors<T> + 4 > kVectorRegisters ? kAccVectors<T> / 2 : kAccVectors<T>;
// Adds vectors a and a + 1 of an accumulator set's group (a even) to acc, which has P vectors:
// each to its own accumulator (P = kAccVectors), or their sum to one (P = half of it).
template <int P, class T>
inline void add_pair(Vec<T>* acc, int a, Vec<T> first, Vec<T> second) {
  if constexpr (P == kAccVectors<T>) {
    acc[a] += first;
    acc[a + 1] += second;
  } else {
    acc[a / 2] += first + second;
  }
}

template <class T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// ---- Storage types (kernels.hpp: Compute<S>): conversions of single values and vector loads/stores.
template <class T>
inline T to_compute(T v) {
  return v;
}
inline float to_compute(bfloat16 v) { return v.to_float(); }

// A vector of kWidth<float> bfloat16 values (half a vector register) as floats: the bits move to
// the upper half of each 32-bit lane.
typedef std::uint16_t Bf16Bits __attribute__((vector_size(kVectorBytes / 2)));
typedef std::uint32_t Bf16Wide __attribute__((vector_size(kVectorBytes)));
#if defined(__AVX512F__)
// 16 bfloat16 bit patterns as floats with one VPMOVZXWD (ymm to zmm) and a shift: GCC 12 compiles the
// generic widening below as two 8-lane VPMOVZXWDs and a VINSERTI32X8, two more instructions for every
// vector that the bfloat16 kernels read (BENCHMARKS.md, "bfloat16 loads and stores").
// (The zero-masked widening with every lane kept, and the shift as vector arithmetic: the plain
// intrinsics trip -Wmaybe-uninitialized in GCC 12.)
inline Vec<float> widen_bf16(__m256i h) {
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(0xffff), h);
  return reinterpret_cast<Vec<float>>(reinterpret_cast<Bf16Wide>(wide) << 16);
}
#endif
inline Vec<float> load(const bfloat16* p) {
#if defined(__AVX512F__)
  return widen_bf16(_mm256_loadu_si256(static_cast<const __m256i*>(static_cast<const void*>(p))));
#elif defined(__AVX2__)
  // One VPMOVZXWD from memory and a shift (GCC splits the generic form below into halves on AVX2).
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(static_cast<const void*>(p)));
  return reinterpret_cast<Vec<float>>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  Bf16Bits h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<Vec<float>>(__builtin_convertvector(h, Bf16Wide) << 16);
#endif
}
// Each lane rounded to bfloat16 (nearest, ties to even; NaN stays a quiet NaN), as from_float,
// in integer arithmetic: the bits in the low half of each 32-bit lane.
inline Bf16Wide bf16_rounded(Bf16Wide u) { return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; }
// `rounded` with its NaN lanes (all ones in `nan`) replaced by the quiet NaN from_float makes.
inline Bf16Wide bf16_with_nans(Bf16Wide rounded, Bf16Wide u, Bf16Wide nan) {
  return (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
}
// Whether any lane of a comparison's result is set (one VMOVMSKPS on AVX2, a test on AVX-512).
template <class M>
inline bool any_lane(M m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(m), reinterpret_cast<__m512i>(m)) != 0;
#elif defined(__AVX2__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(m)) != 0;
#else
  typedef std::uint32_t Words __attribute__((vector_size(kVectorBytes)));
  const Words w = reinterpret_cast<Words>(m);
  std::uint32_t any = 0;
  for (int i = 0; i < kVectorBytes / 4; ++i) any |= w[i];
  return any != 0;
#endif
}
inline Bf16Bits round_to_bf16(Vec<float> v) {
  const Bf16Wide u = reinterpret_cast<Bf16Wide>(v);
  Bf16Wide rounded = bf16_rounded(u);
  const Bf16Wide nan = reinterpret_cast<Bf16Wide>(v != v);  // all ones where v is NaN
#if defined(__AVX2__) && !defined(__AVX512F__)
  // NaN is rare: one test per vector (VMOVMSKPS) keeps its blend off the common path, and the
  // lanes (each <= 0xffff) pack with one VPACKUSDW and a lane fix-up (VPERMQ).
  if (__builtin_expect(any_lane(nan), 0)) rounded = bf16_with_nans(rounded, u, nan);
  const __m256i packed = _mm256_packus_epi32(reinterpret_cast<__m256i>(rounded), reinterpret_cast<__m256i>(rounded));
  const __m128i low = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xd8));
  Bf16Bits bits;
  std::memcpy(&bits, &low, sizeof bits);
  return bits;
#else
  return __builtin_convertvector(bf16_with_nans(rounded, u, nan), Bf16Bits);
#endif
}
#if defined(__AVX512BF16__) && defined(__AVX512F__)
// The avx512bf16 build: the CPU's VCVTNEPS2BF16 rounds 16 lanes in one instruction, to nearest
// even like from_float, but it flushes subnormal inputs to zero (measured: 1e-39f gives 0x0000,
// from_float 0x000b). Subnormal outputs are rare (|y| < 2^-126), so a lane-wise test sends the
// vectors that hold one to the integer rounding, and every build stores the same bits.
inline Bf16Bits to_bf16_bits(Vec<float> v) {
  // VFPCLASSPS category 0x20: subnormal (one instruction for the test).
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0)) return round_to_bf16(v);
  const __m256bh h = _mm512_cvtneps_pbh(v);
  Bf16Bits bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}
#else
inline Bf16Bits to_bf16_bits(Vec<float> v) { return round_to_bf16(v); }
#endif
inline void store(bfloat16* p, Vec<float> v) {
  const Bf16Bits h = to_bf16_bits(v);
  std::memcpy(p, &h, sizeof h);
}
// Two vectors to p and p + kWidth<float>: as two stores, but the AVX2 build (no bfloat16
// instructions) rounds both with one NaN test and packs them with one VPACKUSDW and one VPERMQ
// into one 32-byte store. store_row takes rows a pair at a time where kStorePairs says so, which
// also halves the loop's own instructions (counted with callgrind:
// BENCHMARKS.md, "bfloat16 loads and stores").
template <class T>
inline void store_pair(T* p, Vec<Compute<T>> a, Vec<Compute<T>> b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bfloat16>) {
    const Bf16Wide ua = reinterpret_cast<Bf16Wide>(a), ub = reinterpret_cast<Bf16Wide>(b);
    Bf16Wide ra = bf16_rounded(ua), rb = bf16_rounded(ub);
    const Bf16Wide na = reinterpret_cast<Bf16Wide>(a != a), nb = reinterpret_cast<Bf16Wide>(b != b);
    if (__builtin_expect(any_lane(na | nb), 0)) {
      ra = bf16_with_nans(ra, ua, na);
      rb = bf16_with_nans(rb, ub, nb);
    }
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(reinterpret_cast<__m256i>(ra), reinterpret_cast<__m256i>(rb)), 0xd8);
    _mm256_storeu_si256(static_cast<__m256i*>(static_cast<void*>(p)), packed);
    return;
  }
#endif
  store(p, a);
  store(p + kWidth<Compute<T>>, b);
}
// ---- Pairs: 2W consecutive values (W = kWidth<Compute<S>>) as two vectors, for the loops that
// take a row or a block two vectors at a time.
//
// Float and double pairs are values [0, W) and [W, 2W). A bfloat16 pair on the AVX2 build is instead
// the even-indexed values and the odd-indexed ones: one full-width load holds 2W bfloat16 as W
// 32-bit words, and the even value of each word becomes a float by a 16-bit left shift, the odd one
// by clearing the low half. The natural order needs a widening shuffle per vector (VPMOVZXWD) and a
// shift; on Zen 3 shuffles and shifts share two of the four FP pipes with the adds, and llvm-mca
// models the bfloat16 deviation loop far faster this way (bench/mca; in wall time the passes mostly
// wait on memory: BENCHMARKS.md, "bfloat16 loads and stores"). Where the pair's two vectors only meet
// splats and other pairs loaded the same way (sums, and channels-first rows, whose coefficients are
// per-row scalars), the lane order cannot change a result; store_pair_interleaved puts the values
// back in their places. Channels-last rows load per-channel float vectors beside the data, so
// they keep the natural order (LaneOrder::Natural below).
//
// Only the AVX2 build so far: the AVX-512 build without avx512_bf16 (Skylake-X to Ice Lake) would take
// the same code at twice the width, but no CPU here has run it (the AMD EPYC has no AVX-512, and the
// Sapphire Rapids VM runs the avx512bf16 row unless BNORM_ISA=avx512), so it keeps its widening loads
// until it has been tested and measured there.
#if defined(__AVX2__) && !defined(__AVX512F__)
inline constexpr bool kBf16Deinterleaved = true;
#else
inline constexpr bool kBf16Deinterleaved = false;
#endif
template <class S>
struct Pair {
  Vec<Compute<S>> first, second;
};
template <class S>
inline Pair<S> load_pair(const S* p) {
  if constexpr (std::is_same_v<S, bfloat16> && kBf16Deinterleaved) {
    Bf16Wide words;
    std::memcpy(&words, p, sizeof words);
    return {reinterpret_cast<Vec<float>>(words << 16), reinterpret_cast<Vec<float>>(words & 0xffff0000u)};
  } else {
    return {load(p), load(p + kWidth<Compute<S>>)};
  }
}
// Each lane of u (float bits) rounded to bfloat16 (nearest, ties to even), the result in the upper
// half: u + 0x7fff + (bit 16 of u), with the bit's test as a compare (its -1 or 0 replaces 0x7fff +
// bit 16 by 0x8000 - 1 or 0x8000) rather than a shift, which would go to the shift pipes again.
// Not for NaN lanes (the add could carry out of them).
inline Bf16Wide bf16_rounded_high(Bf16Wide u) {
  return u + 0x8000u + reinterpret_cast<Bf16Wide>((u & 0x10000u) == 0u);
}
// u's bfloat16 in the upper half: rounded, or a NaN made quiet as from_float does.
inline Bf16Wide bf16_high(Bf16Wide u, Bf16Wide nan) {
  return (bf16_rounded_high(u) & ~nan) | ((u | 0x400000u) & nan);
}
// Writes the pair (first, second) of load_pair's order to p: 2W values.
template <class T>
inline void store_pair_interleaved(T* p, Vec<Compute<T>> first, Vec<Compute<T>> second) {
  if constexpr (std::is_same_v<T, bfloat16> && kBf16Deinterleaved) {
    const Bf16Wide ua = reinterpret_cast<Bf16Wide>(first), ub = reinterpret_cast<Bf16Wide>(second);
    const auto na = first != first, nb = second != second;  // NaN lanes: all ones
    Bf16Wide ra, rb;
    if (__builtin_expect(any_lane(na | nb), 0)) {
      ra = bf16_high(ua, reinterpret_cast<Bf16Wide>(na));
      rb = bf16_high(ub, reinterpret_cast<Bf16Wide>(nb));
    } else {
      ra = bf16_rounded_high(ua);
      rb = bf16_rounded_high(ub);
    }
    const Bf16Wide words = (ra >> 16) | (rb & 0xffff0000u);
    std::memcpy(static_cast<void*>(p), &words, sizeof words);
  } else {
    store_pair(p, first, second);
  }
}
// How a pair loop reads a row's inputs: the first or the second vector of load_pair at each pointer.
// Only for rows of storage type S whose other operands are splats: a per-channel vector of floats
// beside bfloat16 data would come in the other order, so loading one does not compile.
template <class S, bool Second>
struct LoadPairHalf {
  template <class U>
  Vec<Compute<U>> operator()(const U* p) const {
    static_assert(std::is_same_v<U, S>, "a pair row reads only its storage type (per-channel vectors: LaneOrder::Natural)");
    const Pair<U> v = load_pair(p);
    return Second ? v.second : v.first;
  }
};
template <class S>
using LoadPairFirst = LoadPairHalf<S, false>;
template <class S>
using LoadPairSecond = LoadPairHalf<S, true>;

// ---- The first k lanes (0 < k <= the vector's lanes): for the ends of a row, in place of a scalar
// loop. Lanes k and up load as 0 and are not stored. AVX-512 masks loads and stores, AVX2 loads (a
// masked-out lane is never touched, so reading past the row's end cannot fault); other builds go
// through a small buffer (a variable-length memcpy and a store-to-load forward per call). AVX2's
// masked stores (VMASKMOVPS) are slow on AMD Zen, so rows avoid partial stores there (store_row).
#if defined(__AVX512F__)
inline constexpr bool kMaskedStores = true;
#else
inline constexpr bool kMaskedStores = false;
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
// All ones in the 32-bit lanes below k (VPCMPGTD against the lane indices).
inline __m256i first_lanes32(int k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
template <class T>
inline Vec<T> load_first(const T* p, int k) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << k) - 1), p);
  else return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << k) - 1), p);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskload_ps(p, first_lanes32(k));
  } else {
    const __m256i lanes = _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_setr_epi64x(0, 1, 2, 3));
    return _mm256_maskload_pd(p, lanes);
  }
#else
  T lanes[kWidth<T>] = {};
  std::memcpy(lanes, p, static_cast<std::size_t>(k) * sizeof(T));
  return load(lanes);
#endif
}
inline Vec<float> load_first(const bfloat16* p, int k) {
#if defined(__AVX512F__)
  return widen_bf16(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << k) - 1), p));
#elif defined(__AVX2__)
  // k / 2 whole pairs of bfloat16 as 32-bit lanes (a masked load: no byte past the row is read),
  // then an odd last value on its own.
  const __m128i pairs = _mm_maskload_epi32(reinterpret_cast<const int*>(static_cast<const void*>(p)),
                                           _mm256_castsi256_si128(first_lanes32(k / 2)));
  Bf16Bits bits;
  std::memcpy(&bits, &pairs, sizeof bits);
  if (k & 1) {
    std::uint16_t last;
    std::memcpy(&last, p + (k - 1), sizeof last);
    bits[k - 1] = last;
  }
  return reinterpret_cast<Vec<float>>(__builtin_convertvector(bits, Bf16Wide) << 16);
#else
  bfloat16 lanes[kWidth<float>] = {};
  std::memcpy(static_cast<void*>(lanes), p, static_cast<std::size_t>(k) * sizeof(bfloat16));
  return load(lanes);
#endif
}
template <class T>
inline void store_first(T* p, Vec<T> v, int k) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << k) - 1), v);
  else _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << k) - 1), v);
#else
  T lanes[kWidth<T>];
  store(lanes, v);
  std::memcpy(p, lanes, static_cast<std::size_t>(k) * sizeof(T));
#endif
}
inline void store_first(bfloat16* p, Vec<float> v, int k) {
#if defined(__AVX512F__)
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << k) - 1), reinterpret_cast<__m256i>(to_bf16_bits(v)));
#else
  bfloat16 lanes[kWidth<float>];
  store(lanes, v);
  std::memcpy(static_cast<void*>(p), lanes, static_cast<std::size_t>(k) * sizeof(bfloat16));
#endif
}
// How a row kernel reads its inputs: whole vectors, or the first k lanes (the row's tail).
struct LoadAll {
  template <class S>
  Vec<Compute<S>> operator()(const S* p) const {
    return load(p);
  }
};
struct LoadFirst {
  int k;
  template <class S>
  Vec<Compute<S>> operator()(const S* p) const {
    return load_first(p, k);
  }
};

// Stores v at p (kVectorBytes-aligned) with a non-temporal store: the line goes to memory without
// being read first (no read-for-ownership) and without evicting the data the kernel still needs.
// For outputs far larger than the caches; stream_fence() must follow before the data are shared.
template <class T>
inline void store_stream(T* p, Vec<T> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v);
  else _mm512_stream_pd(p, v);
#elif defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) _mm_stream_ps(p, v);
  else _mm_stream_pd(p, v);
#else
  store(p, v);
#endif
}
// bfloat16 outputs are not streamed (stream_output is false for them); this keeps the code generic.
inline void store_stream(bfloat16* p, Vec<float> v) { store(p, v); }
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}
// f(i) for i in [0, n) over the library's threads (each a contiguous range; `values`: the tensor's
// size, which caps the threads: parallel.hpp); with `stream`, each
// thread then fences its non-temporal stores, so that they are visible before the region's barrier.
template <class F>
void parallel_for_streamed(std::int64_t n, std::int64_t values, bool stream, F&& f) {
  detail::parallel_for_then(n, values, f, [stream] {
    if (stream) stream_fence();
  });
}

// f(row, c) for every row (n, c) = row of channels-first data (rows of S values, row = n * C + c),
// each thread a contiguous range of rows (no division per row); with `stream`, each thread then
// fences its non-temporal stores.
template <class F>
void parallel_for_cf_rows(const Geometry& g, bool stream, F&& f) {
  const std::int64_t rows = g.N * g.C;
  detail::parallel_ranges(rows, 1, detail::threads_for(rows, g.numel()), [&](int, std::int64_t b, std::int64_t e) {
    std::int64_t c = g.C > 0 ? b % g.C : 0;
    for (std::int64_t r = b; r < e; ++r) {
      f(r, c);
      if (++c == g.C) c = 0;
    }
    if (stream) stream_fence();
  });
}

// Elements before p + result are not kVectorBytes-aligned (at most n).
template <class T>
inline std::int64_t elements_to_alignment(const T* p, std::int64_t n) {
  const auto misalign = reinterpret_cast<std::uintptr_t>(p) % kVectorBytes;
  const std::int64_t k = misalign == 0 ? 0 : static_cast<std::int64_t>((kVectorBytes - misalign) / sizeof(T));
  return k < n ? k : n;
}

// Whether store_row takes a row two vectors at a time (store_pair): the builds without masked stores
// (AVX2 and below), where it halves the loop's instructions and, for bfloat16, packs a pair with one
// VPACKUSDW into one store. The AVX-512 builds end a row with one masked vector and keep one vector
// at a time (measured no faster there).
inline constexpr bool kStorePairs = !kMaskedStores;

// Writes vec(j, load) to y + j for j = i, i + W, ... up to n (W: the lanes of Compute<S>), `load`
// reading the inputs at j: LoadAll, or LoadFirst for a partial vector, whose lanes past its end
// are neither read nor written. With `stream`, the values before the first kVectorBytes boundary
// go as partial vectors and the whole vectors after it are stored non-temporally (the kernels stream
// only rows of whole aligned vectors, stream_to, so there the head and the tail are empty).
//
// Without masked stores (kMaskedStores), a row of at least W values ends with one whole vector of
// its last W values instead of a partial one: it overlaps values the loop writes too, with the same
// values. It is computed before the loop stores anything, so that a row normalized in place (y is
// the input) reads its original values there.
// Whether a row's lanes may be permuted within a pair (load_pair): LaneOrder::Any for rows whose
// vector operands are all of the storage type at the same index (channels-first rows, with
// per-row scalar coefficients); Natural where a per-channel vector is loaded beside them.
enum class LaneOrder { Natural, Any };

template <LaneOrder Order = LaneOrder::Natural, class S, class F>
void store_row(S* y, std::int64_t i, std::int64_t n, bool stream, const F& vec_in) {
  constexpr std::int64_t W = kWidth<Compute<S>>;
  // A local copy: through the caller's object, whose address escapes when store_row is not
  // inlined, the compiler must assume each store to y may change the captured pointers and
  // coefficients, and it reloads all of them for every vector (4 extra loads per vector). The copy
  // makes AVX2 rows and bfloat16 rows faster, but float32 rows of 7x7 and 14x14 slower on AVX-512 (the
  // copy per row outweighs the reloads of a 3-vector row), so those keep the caller's object
  // (BENCHMARKS.md, "Row loops").
  const F copy = vec_in;
  const F& vec = (!kMaskedStores || std::is_same_v<S, bfloat16>) ? copy : vec_in;
  auto partial = [&](std::int64_t j, std::int64_t k) {  // the k (<= W) values at j
    store_first(y + j, vec(j, LoadFirst{static_cast<int>(k)}), static_cast<int>(k));
  };
  const bool overlap_tail = !kMaskedStores && n - i >= W && (n - i) % W != 0;
  Vec<Compute<S>> last{};
  if (overlap_tail) last = vec(n - W, LoadAll{});
  if (stream) {
    const std::int64_t aligned = i + elements_to_alignment(y + i, n - i);
    for (; i < aligned; i += W) partial(i, aligned - i < W ? aligned - i : W);
    for (i = aligned; i + W <= n; i += W) store_stream(y + i, vec(i, LoadAll{}));
  } else {
    if constexpr (Order == LaneOrder::Any && std::is_same_v<S, bfloat16> && kBf16Deinterleaved) {
      for (; i + 2 * W <= n; i += 2 * W) {  // one load per input pair, no widening shuffle (load_pair)
        const auto a = vec(i, LoadPairFirst<S>{});
        const auto b = vec(i, LoadPairSecond<S>{});
        store_pair_interleaved(y + i, a, b);
      }
    } else if constexpr (kStorePairs) {
      for (; i + 2 * W <= n; i += 2 * W) {
        // In address order: as function arguments GCC computed the second vector first and stored it
        // first, and the descending pair made float32 inference slower for the same instructions
        // (BENCHMARKS.md, "Row loops").
        const auto a = vec(i, LoadAll{});
        const auto b = vec(i + W, LoadAll{});
        store_pair(y + i, a, b);
      }
    }
    for (; i + W <= n; i += W) store(y + i, vec(i, LoadAll{}));
  }
  if (i < n) {
    if (overlap_tail)
      store(y + n - W, last);
    else
      partial(i, n - i);
  }
}

// Whether a kernel writes its output at p, of geometry g, with non-temporal stores: stream_output's
// rule (which takes only rows of whole cache lines) and p on a vector boundary, so that every row is
// whole aligned vectors.
template <class T>
inline bool stream_to(const T* p, const Geometry& g) {
  return stream_output<T>(g) && reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0;
}

template <class T>
inline Vec<T> splat(T s) {
  return Vec<T>{} + s;
}
// The sum of all lanes of the n vectors at v, in double: lane-wise into double lanes, then a tree.
// (A lane-by-lane scalar sum would be a chain of 64 dependent adds per accumulator set: at one
// set per 2048-value block that alone would cost more than the block's loads.)
template <class T>
inline double hsum(const Vec<T>* v, int n) {
  double lanes[kWidth<T>] = {};
  for (int a = 0; a < n; ++a)
    for (std::int64_t j = 0; j < kWidth<T>; ++j) lanes[j] += static_cast<double>(v[a][j]);
  for (std::int64_t w = kWidth<T> / 2; w > 0; w /= 2)
    for (std::int64_t j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
}

// True when every a[i] and b[i] is finite (x - x is 0 exactly for finite x, NaN for Inf and NaN);
// written as an integer or-reduction so that it vectorizes.
template <class T>
inline bool all_finite(const T* a, const T* b, std::int64_t n) {
  int bad = 0;
  for (std::int64_t i = 0; i < n; ++i) bad |= static_cast<int>(!(a[i] - a[i] == 0)) | static_cast<int>(!(b[i] - b[i] == 0));
  return bad == 0;
}

// f(std::integral_constant<int, n>) for n in 1..Max (n > Max: Max): the vectors of a column chunk as
// a compile-time count, so that its accumulators live in registers.
template <int Max = 4, class F>
void with_count(int n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, f);
  }
  return f(std::integral_constant<int, Max>{});
}

// max(v, 0) lane by lane, keeping NaN a NaN (as torch.relu): clears the lanes where v < 0.
template <class T>
inline Vec<T> relu(Vec<T> v) {
  const Mask<T> negative = v < Vec<T>{};
  return reinterpret_cast<Vec<T>>(reinterpret_cast<Mask<T>>(v) & ~negative);
}
// v where gate > 0, else 0 (the ReLU's backward mask).
template <class T>
inline Vec<T> keep_where_positive(Vec<T> v, Vec<T> gate) {
  const Mask<T> positive = gate > Vec<T>{};
  return reinterpret_cast<Vec<T>>(reinterpret_cast<Mask<T>>(v) & positive);
}

}  // namespace
}  // namespace bnorm::kernels
