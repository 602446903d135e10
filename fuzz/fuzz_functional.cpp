// Fuzz target: the functional API (batch_norm, batch_norm_backward, batch_stats) driven by fuzzed
// shapes, options, pointers, aliasing and values.
//
// Every call must end in one of two ways:
//   - it throws bnorm::Error, exactly when this file's own model of the argument rules (docs/errors.md)
//     says the call is invalid, and then every buffer is byte-for-byte unchanged;
//   - it succeeds, exactly when the model says the call is valid, and every result lies within a
//     stated bound of the float64 reference (src/kernels/reference.hpp), while no buffer that is
//     not an output changed.
// Anything else aborts (libFuzzer reports it as a crash), and so does any ASan or UBSan report.
// Buffers are allocated to their exact size, so that any access past a view is an ASan report.
#include <bnorm/bnorm.hpp>

#include "kernels/kernels.hpp"
#include "kernels/reference.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace bnorm;

std::ostringstream g_case;  // what the current input does; printed with any failure

std::string num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

[[noreturn]] void fail_case(const std::string& what, int line) {
  std::fprintf(stderr, "\nfuzz_functional.cpp:%d: %s\n  case: %s\n", line, what.c_str(), g_case.str().c_str());
  std::abort();
}
#define CHECK(cond, what)                                                   \
  do {                                                                      \
    if (!(cond)) fail_case(std::string(what) + "  [" #cond "]", __LINE__); \
  } while (0)

// ---- Memory owned by the harness ------------------------------------------------------------

// A block of exactly the bytes a view needs (plus the misalignment offset, if any).
struct Block {
  std::vector<unsigned char> bytes;
};

struct Arena {
  std::deque<Block> blocks;
  unsigned char* make(std::size_t n) {
    blocks.push_back(Block{std::vector<unsigned char>(n)});
    return n ? blocks.back().bytes.data() : nullptr;
  }
  std::vector<std::vector<unsigned char>> snapshot() const {
    std::vector<std::vector<unsigned char>> s;
    for (const Block& b : blocks) s.push_back(b.bytes);
    return s;
  }
};

std::size_t dsize(DType d) { return d == DType::Float64 ? 8 : 4; }  // invalid dtypes get 4-byte slots
bool valid_dtype(DType d) { return d == DType::Float32 || d == DType::Float64; }
bool aligned(const void* p, DType d) {
  return p == nullptr || !valid_dtype(d) || reinterpret_cast<std::uintptr_t>(p) % size_of(d) == 0;
}

// ---- Per-channel vectors ----------------------------------------------------------------------

enum class VecKind { Absent, Ok, Longer, Shorter, Null, Misaligned, WrongDtype, Float64 };
const char* vec_kind_name(VecKind k) {
  static const char* names[] = {"absent", "ok", "longer", "shorter", "null", "misaligned", "wrong-dtype", "float64"};
  return names[static_cast<int>(k)];
}

struct Vec {
  VecKind kind = VecKind::Absent;
  void* ptr = nullptr;
  std::int64_t size = 0;
  DType dtype = DType::Float32;
  bool present() const { return ptr != nullptr || size != 0; }
  // (null, 0) is absent to the library whatever the dtype, exactly as present() says here.
  VectorView view() const { return VectorView(ptr, dtype, size); }
  ConstVectorView cview() const { return ConstVectorView(ptr, dtype, size); }
  double get(std::int64_t i) const {
    return dtype == DType::Float64 ? static_cast<const double*>(ptr)[i] : static_cast<const float*>(ptr)[i];
  }
  void set(std::int64_t i, double v) const {
    if (dtype == DType::Float64)
      static_cast<double*>(ptr)[i] = v;
    else
      static_cast<float*>(ptr)[i] = static_cast<float>(v);
  }
  std::vector<double> values() const {  // of the C channels; only for valid vectors
    std::vector<double> out(static_cast<std::size_t>(size));
    for (std::int64_t i = 0; i < size; ++i) out[static_cast<std::size_t>(i)] = get(i);
    return out;
  }
};

VecKind pick_vec_kind(FuzzedDataProvider& fdp, bool may_be_absent) {
  const int r = fdp.ConsumeIntegralInRange<int>(0, 31);
  if (r < 20) return VecKind::Ok;
  if (r < 26) return may_be_absent ? VecKind::Absent : VecKind::Ok;
  if (r == 26) return VecKind::Longer;
  if (r == 27) return VecKind::Shorter;
  if (r == 28) return VecKind::Null;
  if (r == 29) return VecKind::Misaligned;
  if (r == 30) return VecKind::WrongDtype;
  return VecKind::Float64;
}

// A vector argument of kind k for C channels, `save` when float64 is also accepted (save_mean,
// save_invstd, batch_stats' outputs), filled by `value(c)`.
template <class T, class F>
Vec make_vec(Arena& arena, VecKind k, std::int64_t C, bool save, F value) {
  const DType dt = dtype_of<T>(), other = dt == DType::Float32 ? DType::Float64 : DType::Float32;
  Vec v;
  v.kind = k;
  v.dtype = dt;
  v.size = C;
  switch (k) {
    case VecKind::Absent: v.size = 0; return v;
    case VecKind::Null: return v;
    case VecKind::Longer: v.size = C + 1; break;
    case VecKind::Shorter: v.size = C - 1; break;
    case VecKind::WrongDtype: v.dtype = save ? (dt == DType::Float32 ? static_cast<DType>(7) : DType::Float32) : other; break;
    case VecKind::Float64: v.dtype = DType::Float64; break;
    default: break;
  }
  const std::size_t n = static_cast<std::size_t>(std::max<std::int64_t>(v.size, 0)) * dsize(v.dtype);
  const std::size_t off = k == VecKind::Misaligned ? (dt == DType::Float32 ? 1 : 4) : 0;
  unsigned char* base = arena.make(n + off);
  v.ptr = base ? base + off : nullptr;
  if (valid_dtype(v.dtype) && off == 0)
    for (std::int64_t c = 0; c < std::max<std::int64_t>(v.size, 0); ++c) v.set(c, value(c));
  return v;
}

// The rule of check_vector, written independently: length C, the dtype (or float64 where also
// accepted), a pointer when C > 0, aligned to the element.
bool vec_ok(const Vec& v, std::int64_t C, DType dt, bool also64) {
  if (v.size != C) return false;
  if (!(v.dtype == dt || (also64 && v.dtype == DType::Float64))) return false;
  if (C > 0 && v.ptr == nullptr) return false;
  return aligned(v.ptr, v.dtype);
}

// ---- Tables of values -------------------------------------------------------------------------

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double pick(FuzzedDataProvider& fdp, std::initializer_list<double> table) {
  const auto i = fdp.ConsumeIntegralInRange<std::size_t>(0, table.size() - 1);
  return *(table.begin() + i);
}

bool eps_ok(double eps) { return std::isfinite(eps) && eps > 0; }
bool momentum_ok(double m) { return m >= 0 && m <= 1; }

// ---- Comparison ------------------------------------------------------------------------------

// got (stored in T) against want (float64): a non-finite want needs a non-finite got; a finite
// want needs |got - want| <= tol (plus T's underflow), except that a want beyond T's range may be
// stored as +-Inf.
template <class T>
bool near(double got, double want, double tol) {
  if (!std::isfinite(want)) return !std::isfinite(got);
  // A bound built from a non-finite ingredient (an infinite running_mean under a ReLU that gives
  // a finite 0) asks for the exact value.
  if (!std::isfinite(tol)) tol = 0;
  tol += static_cast<double>(std::numeric_limits<T>::denorm_min());  // a tiny value stored in T may underflow
  if (std::isinf(got) && std::abs(want) >= 0.999 * static_cast<double>(std::numeric_limits<T>::max()))
    return (got > 0) == (want > 0);
  return std::abs(got - want) <= tol;
}

template <class T>
constexpr double unit() {  // a generous multiple of T's rounding unit
  return std::is_same_v<T, float> ? 1e-4 : 1e-10;
}
// Error of the statistics relative to the channel's largest |value| (docs/numerics.md): float32
// data is summed in float32 lanes of at most 64 terms within a block (about 128 float32 ulp at
// worst), float64 data in float64 lanes; blocks merge in double.
template <class T>
constexpr double kStat = std::is_same_v<T, float> ? 8e-6 : 1e-13;

// ---- Tensors ---------------------------------------------------------------------------------

struct Geometry {
  std::int64_t N = 0, C = 0, S = 1, numel = 0;
  bool valid = false;  // rank >= 2, no negative dim, no overflow of the byte size
};

Geometry geometry_of(const std::vector<std::int64_t>& dims, std::size_t elem) {
  Geometry g;
  if (dims.size() < 2) return g;
  // The products, element count and spatial size, are taken dim by dim, so an overflow before a
  // zero dim counts (as in the library: the rule is about the arithmetic, not the memory).
  std::int64_t numel = 1, bytes = 0, spatial = 1;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 0 || __builtin_mul_overflow(numel, dims[i], &numel)) return g;
    if (i >= 2 && __builtin_mul_overflow(spatial, dims[i], &spatial)) return g;
  }
  if (__builtin_mul_overflow(numel, static_cast<std::int64_t>(elem), &bytes)) return g;
  g.N = dims[0];
  g.C = dims[1];
  g.S = spatial;
  g.numel = numel;
  g.valid = true;
  return g;
}

std::size_t mem_index(const Geometry& g, Layout l, std::int64_t n, std::int64_t c, std::int64_t s) {
  return static_cast<std::size_t>(l == Layout::ChannelsLast ? (n * g.S + s) * g.C + c : (n * g.C + c) * g.S + s);
}
std::size_t logical_index(const Geometry& g, std::int64_t n, std::int64_t c, std::int64_t s) {
  return static_cast<std::size_t>((n * g.C + c) * g.S + s);
}

template <class T>
std::vector<double> read_logical(const void* mem, const Geometry& g, Layout l) {
  std::vector<double> out(static_cast<std::size_t>(g.numel));
  const T* p = static_cast<const T*>(mem);
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t c = 0; c < g.C; ++c)
      for (std::int64_t s = 0; s < g.S; ++s) out[logical_index(g, n, c, s)] = static_cast<double>(p[mem_index(g, l, n, c, s)]);
  return out;
}

template <class T>
void write_logical(void* mem, const Geometry& g, Layout l, const std::vector<double>& v) {
  T* p = static_cast<T*>(mem);
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t c = 0; c < g.C; ++c)
      for (std::int64_t s = 0; s < g.S; ++s) p[mem_index(g, l, n, c, s)] = static_cast<T>(v[logical_index(g, n, c, s)]);
}

// Values of a (logical) tensor: per channel an offset and a scale from tables (large offsets,
// constant channels, tiny spreads), or raw bit patterns (bounded by 1e30 so that deviations stay
// within float range), and now and then a NaN, an Inf or a denormal.
template <class T>
std::vector<double> make_values(FuzzedDataProvider& fdp, const Geometry& g, bool specials) {
  std::vector<double> x(static_cast<std::size_t>(g.numel));
  for (std::int64_t c = 0; c < g.C; ++c) {
    const bool raw = fdp.ConsumeIntegralInRange<int>(0, 15) == 0;
    const double off = pick(fdp, {0.0, 1.0, -3.0, 1e4, -3e4, 1e6, 1e7, 0.5});
    const double scale = pick(fdp, {1.0, 1.0 / 16, 0.0, 1e-3, 100.0, 1.0});
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t s = 0; s < g.S; ++s) {
        double v;
        if (raw) {
          const float f = fdp.ConsumeFloatingPoint<float>();
          v = std::isfinite(f) && std::abs(f) <= 1e30f ? static_cast<double>(f) : 0.0;
        } else {
          v = off + scale * fdp.ConsumeIntegral<std::int8_t>() / 16.0;
        }
        x[logical_index(g, n, c, s)] = static_cast<double>(static_cast<T>(v));
      }
  }
  if (specials && g.numel > 0 && fdp.ConsumeIntegralInRange<int>(0, 7) == 0) {
    const int count = fdp.ConsumeIntegralInRange<int>(1, 3);
    for (int i = 0; i < count; ++i) {
      const auto at = fdp.ConsumeIntegralInRange<std::int64_t>(0, g.numel - 1);
      x[static_cast<std::size_t>(at)] = pick(fdp, {kNaN, kInf, -kInf, 1e-40, -0.0});
      x[static_cast<std::size_t>(at)] = static_cast<double>(static_cast<T>(x[static_cast<std::size_t>(at)]));
    }
  }
  return x;
}

// Channel c's largest finite |x|, and whether it holds a non-finite value.
struct ChannelScan {
  double max_abs = 0;
  bool non_finite = false;
};
ChannelScan scan(const std::vector<double>& x, const Geometry& g, std::int64_t c) {
  ChannelScan r;
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t s = 0; s < g.S; ++s) {
      const double v = x[logical_index(g, n, c, s)];
      if (std::isfinite(v))
        r.max_abs = std::max(r.max_abs, std::abs(v));
      else
        r.non_finite = true;
    }
  return r;
}

// ---- The case --------------------------------------------------------------------------------

enum class OutKind { Separate, InPlace, PartialOverlap, Misaligned, WrongDtype, WrongShape, WrongLayout, Null };

template <class T>
void forward_case(FuzzedDataProvider& fdp) {
  constexpr DType dt = dtype_of<T>();
  constexpr DType other = dt == DType::Float32 ? DType::Float64 : DType::Float32;
  Arena arena;

  // Shape.
  std::vector<std::int64_t> dims;
  const int shape_mode = fdp.ConsumeIntegralInRange<int>(0, 63);
  if (shape_mode < 56) {  // ordinary: rank 2..5 (now and then up to 8 or below 2), at most ~4096 elements
    int rank = 2 + shape_mode % 4;
    if (shape_mode >= 48) rank = std::vector<int>{6, 7, 8, 1, 0, 2, 3, 4}[static_cast<std::size_t>(shape_mode - 48)];
    std::int64_t budget = 4096;
    for (int i = 0; i < rank; ++i) {
      const std::int64_t d = fdp.ConsumeIntegralInRange<std::int64_t>(0, std::min<std::int64_t>(i == 1 ? 40 : 12, budget));
      dims.push_back(d);
      if (d > 0) budget = std::max<std::int64_t>(budget / d, 1);
    }
  } else if (shape_mode < 60) {  // big channels: m > 2^17, the unfused (blocked) channels-first path
    const std::int64_t n = fdp.ConsumeIntegralInRange<std::int64_t>(1, 3);
    dims = {n, fdp.ConsumeIntegralInRange<std::int64_t>(1, 2),
            (std::int64_t{1} << 17) / n + fdp.ConsumeIntegralInRange<std::int64_t>(1, 3000)};
  } else if (shape_mode < 62) {  // negative dims or byte sizes past int64: refused before any access
    const int rank = fdp.ConsumeIntegralInRange<int>(2, 5);
    for (int i = 0; i < rank; ++i)
      dims.push_back(static_cast<std::int64_t>(pick(fdp, {3.0, 0.0, -1.0, -1099511627776.0, 8589934592.0,
                                                          4611686018427387904.0})));
  } else if (shape_mode == 62) {  // 9 dims: the Shape itself refuses
    std::vector<std::int64_t> nine(9, 1);
    bool threw = false;
    try {
      const Shape s{std::span<const std::int64_t>(nine)};
      (void)s;
    } catch (const Error&) {
      threw = true;
    }
    CHECK(threw, "a Shape of 9 dims was accepted");
    return;
  } else {
    dims = {2, 3, 0, 4};
  }
  const Geometry g = geometry_of(dims, sizeof(T));
  const bool extreme = shape_mode >= 60 && shape_mode < 62;
  if (extreme && g.valid) return;  // the table happened to give a valid shape: nothing to back it with
  const Shape shape{std::span<const std::int64_t>(dims)};

  // Options.
  const int layout_sel = fdp.ConsumeIntegralInRange<int>(0, 15);
  const Layout layout = layout_sel < 8 ? Layout::ChannelsFirst : layout_sel < 15 ? Layout::ChannelsLast : static_cast<Layout>(9);
  const bool bad_dtype = fdp.ConsumeIntegralInRange<int>(0, 31) == 0;
  const bool training = fdp.ConsumeBool();
  const int act_sel = fdp.ConsumeIntegralInRange<int>(0, 15);
  const Activation act = act_sel < 10 ? Activation::None : act_sel < 15 ? Activation::Relu : static_cast<Activation>(5);
  const double eps = pick(fdp, {1e-5, 1e-5, 1e-3, 1e-10, 0.5, 1e-5, 0.0, -1e-5, kNaN, kInf});
  const double momentum = pick(fdp, {0.1, 0.1, 0.0, 1.0, 0.5, 0.1, -0.1, 1.5, kNaN});
  const int threads = fdp.ConsumeIntegralInRange<int>(1, 3);
  const auto isa = static_cast<kernels::Isa>(fdp.ConsumeIntegralInRange<int>(0, 2));
  set_num_threads(threads);
  kernels::set_isa(isa);

  // Per-channel vectors (only with a valid shape: C may be astronomically large otherwise).
  const std::int64_t C = g.valid ? g.C : 0;
  const VecKind k_rm = pick_vec_kind(fdp, true);
  const VecKind k_rv = fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? pick_vec_kind(fdp, true) : k_rm;
  const VecKind k_w = pick_vec_kind(fdp, true), k_b = pick_vec_kind(fdp, true);
  const VecKind k_sm = pick_vec_kind(fdp, true), k_si = pick_vec_kind(fdp, true);
  auto rm_value = [&](std::int64_t) { return pick(fdp, {0.0, 1.0, -2.5, 1e4, 1e6, 0.25, kNaN, kInf}); };
  auto rv_value = [&](std::int64_t) { return pick(fdp, {1.0, 0.0, 0.5, 1e-8, 1e4, 2.0, kNaN, kInf, -1.0}); };
  auto w_value = [&](std::int64_t) { return pick(fdp, {1.0, 0.0, -1.0, 0.5, 2.0, 1e3, -3.25}); };
  auto b_value = [&](std::int64_t) { return pick(fdp, {0.0, 1.0, -1.0, 0.5, 1e3, -7.0}); };
  auto junk = [](std::int64_t) { return 12345.0; };
  Vec rm, rv, w, b, sm, si;
  if (g.valid) {
    rm = make_vec<T>(arena, k_rm, C, false, rm_value);
    rv = make_vec<T>(arena, k_rv, C, false, rv_value);
    w = make_vec<T>(arena, k_w, C, false, w_value);
    b = make_vec<T>(arena, k_b, C, false, b_value);
    sm = make_vec<T>(arena, k_sm, C, true, junk);
    si = make_vec<T>(arena, k_si, C, true, junk);
  }

  // Input and output.
  const DType in_dt = bad_dtype ? static_cast<DType>(42) : dt;
  const int out_sel = fdp.ConsumeIntegralInRange<int>(0, 31);
  OutKind out_kind = OutKind::Separate;
  if (out_sel >= 16) out_kind = OutKind::InPlace;
  if (out_sel >= 24) out_kind = static_cast<OutKind>(2 + (out_sel - 24));  // 24..29: 2..7
  if (out_sel >= 30) out_kind = OutKind::Separate;
  const bool in_misaligned = fdp.ConsumeIntegralInRange<int>(0, 63) == 0;
  const bool in_null = fdp.ConsumeIntegralInRange<int>(0, 63) == 0;
  const std::size_t bytes = g.valid ? static_cast<std::size_t>(g.numel) * sizeof(T) : 64;
  std::vector<double> x = g.valid ? make_values<T>(fdp, g, true) : std::vector<double>{};
  const std::int64_t overlap = g.valid && g.numel > 1 ? fdp.ConsumeIntegralInRange<std::int64_t>(1, g.numel - 1) : 1;

  unsigned char* in_base = arena.make(bytes + (out_kind == OutKind::PartialOverlap ? overlap * sizeof(T) : 0) +
                                      (in_misaligned ? 1 : 0));
  void* in_ptr = in_null ? nullptr : in_base ? in_base + (in_misaligned ? 1 : 0) : nullptr;
  if (g.valid && in_ptr && !in_misaligned) write_logical<T>(in_ptr, g, layout == Layout::ChannelsLast ? layout : Layout::ChannelsFirst, x);
  const Layout mem_layout = layout == Layout::ChannelsLast ? Layout::ChannelsLast : Layout::ChannelsFirst;

  void* out_ptr = nullptr;
  DType out_dt = dt;
  Shape out_shape = shape;
  Layout out_layout = layout;
  switch (out_kind) {
    case OutKind::Separate: out_ptr = arena.make(bytes); break;
    case OutKind::InPlace: out_ptr = in_ptr; break;
    case OutKind::PartialOverlap: out_ptr = in_base ? in_base + overlap * static_cast<std::int64_t>(sizeof(T)) : nullptr; break;
    case OutKind::Misaligned: out_ptr = arena.make(bytes + 1) + 1; break;
    case OutKind::WrongDtype: out_dt = other; out_ptr = arena.make(g.valid ? static_cast<std::size_t>(g.numel) * dsize(other) : 64); break;
    case OutKind::WrongShape: {
      std::vector<std::int64_t> d2 = dims;
      if (!d2.empty()) d2[0] += 1;
      out_shape = Shape{std::span<const std::int64_t>(d2)};
      const Geometry g2 = geometry_of(d2, sizeof(T));
      out_ptr = arena.make(g2.valid ? static_cast<std::size_t>(g2.numel) * sizeof(T) : 64);
      break;
    }
    case OutKind::WrongLayout:
      out_layout = layout == Layout::ChannelsFirst ? Layout::ChannelsLast : Layout::ChannelsFirst;
      out_ptr = arena.make(bytes);
      break;
    case OutKind::Null: out_ptr = nullptr; break;
  }

  // The fused residual (y = act(bn(x) + z)): usually absent; else a separate tensor, the output
  // itself, one of another shape, or one partly overlapping the output.
  enum class ResKind { None, Separate, IsOutput, WrongShape, PartialOverlap };
  const int res_sel = fdp.ConsumeIntegralInRange<int>(0, 15);
  const ResKind res_kind = res_sel < 10 ? ResKind::None : static_cast<ResKind>(1 + (res_sel - 10) % 4);
  void* res_ptr = nullptr;
  Shape res_shape = shape;
  std::vector<double> z;
  if (res_kind != ResKind::None && g.valid) {
    z = make_values<T>(fdp, g, false);
    switch (res_kind) {
      case ResKind::Separate:
        res_ptr = arena.make(bytes);
        break;
      case ResKind::IsOutput:
        res_ptr = out_ptr;
        break;
      case ResKind::WrongShape: {
        std::vector<std::int64_t> d2 = dims;
        d2.back() += 1;
        res_shape = Shape{std::span<const std::int64_t>(d2)};
        const Geometry g2 = geometry_of(d2, sizeof(T));
        res_ptr = arena.make(g2.valid ? static_cast<std::size_t>(g2.numel) * sizeof(T) : 64);
        break;
      }
      case ResKind::PartialOverlap:
        res_ptr = out_ptr && g.numel > 1 ? static_cast<unsigned char*>(out_ptr) + sizeof(T) : nullptr;
        break;
      case ResKind::None: break;
    }
    // z's values go into its memory: a separate buffer, or the output buffer as a caller
    // accumulating into it would have it filled (not when the output is the input: then z = x).
    // A partial overlap keeps whatever is there (the call is refused).
    const bool fill = res_kind == ResKind::Separate ||
                      (res_kind == ResKind::IsOutput && out_kind == OutKind::Separate);
    if (res_ptr && g.numel && fill) write_logical<T>(res_ptr, g, mem_layout, z);
  }
  const bool has_res = res_kind != ResKind::None && g.valid;

  g_case << "forward<" << (dt == DType::Float32 ? "f32" : "f64") << "> shape " << shape.str() << " layout "
         << static_cast<int>(layout) << (bad_dtype ? " bad-dtype" : "") << (training ? " training" : " eval") << " act "
         << static_cast<int>(act) << " eps " << eps << " momentum " << momentum << " threads " << threads << " isa "
         << static_cast<int>(isa) << " rm " << vec_kind_name(k_rm) << " rv " << vec_kind_name(k_rv) << " w "
         << vec_kind_name(k_w) << " b " << vec_kind_name(k_b) << " sm " << vec_kind_name(k_sm) << " si "
         << vec_kind_name(k_si) << " out " << static_cast<int>(out_kind) << (in_misaligned ? " in-misaligned" : "")
         << (in_null ? " in-null" : "") << " residual " << static_cast<int>(res_kind);

  // The model: is this call valid?
  bool valid = g.valid && valid_dtype(in_dt) && (layout == Layout::ChannelsFirst || layout == Layout::ChannelsLast);
  if (valid) {
    const bool in_ok = (g.numel == 0 || in_ptr != nullptr) && aligned(in_ptr, in_dt);
    const bool out_ok = (g.numel == 0 || out_ptr != nullptr) && aligned(out_ptr, out_dt) && out_dt == in_dt &&
                        out_shape == shape && (g.S == 1 || out_layout == layout);
    // Same memory or disjoint (nothing to overlap when the tensor is empty).
    const bool alias_ok = out_kind != OutKind::PartialOverlap || g.numel == 0 || in_ptr == nullptr || overlap >= g.numel;
    valid = in_ok && out_ok && alias_ok;
    if (rm.present() != rv.present()) valid = false;
    if (rm.present() && !(vec_ok(rm, C, dt, false) && vec_ok(rv, C, dt, false))) valid = false;
    if (!rm.present() && !training) valid = false;
    if (w.present() && !vec_ok(w, C, dt, false)) valid = false;
    if (b.present() && !vec_ok(b, C, dt, false)) valid = false;
    if (sm.present() && !vec_ok(sm, C, dt, true)) valid = false;
    if (si.present() && !vec_ok(si, C, dt, true)) valid = false;
    if (act != Activation::None && act != Activation::Relu) valid = false;
    if (!eps_ok(eps) || !momentum_ok(momentum)) valid = false;
    if (training && C > 0 && g.N * g.S <= 1) valid = false;
    if (has_res) {
      // Like the input (shape, dtype, layout), present, aligned; the output equal to it or disjoint.
      const bool same_as_out = res_ptr == out_ptr;
      const bool res_ok = res_shape == shape && (g.numel == 0 || res_ptr != nullptr) && aligned(res_ptr, dt) &&
                          (same_as_out || res_kind != ResKind::PartialOverlap || g.numel <= 1);
      if (!res_ok) valid = false;
      if (same_as_out && out_dt != dt) valid = false;  // then the residual has the wrong dtype too
    }
  }
  // A residual that is the output is read as the output buffer held it before the call.
  if (valid && has_res && res_kind == ResKind::IsOutput && g.numel) z = read_logical<T>(res_ptr, g, mem_layout);

  // Inputs of the reference, read before the call (the output may be the input).
  const std::vector<double> rm0 = valid && rm.present() ? rm.values() : std::vector<double>{};
  const std::vector<double> rv0 = valid && rv.present() ? rv.values() : std::vector<double>{};
  const std::vector<double> w0 = valid && w.present() ? w.values() : std::vector<double>{};
  const std::vector<double> b0 = valid && b.present() ? b.values() : std::vector<double>{};
  const auto before = arena.snapshot();

  bool threw = false;
  std::string message;
  try {
    batch_norm(ConstTensorView(in_ptr, in_dt, shape, layout), TensorView(out_ptr, out_dt, out_shape, out_layout),
               {rm.view(), rv.view()}, {w.cview(), b.cview()},
               {.training = training, .momentum = momentum, .eps = eps, .activation = act}, {sm.view(), si.view()},
               has_res ? ConstTensorView(res_ptr, dt, res_shape, layout) : ConstTensorView());
  } catch (const Error& e) {
    threw = true;
    message = e.what();
  }
  if (threw) {
    CHECK(!valid, "a valid call threw: " + message);
    CHECK(message.rfind("bnorm::", 0) == 0, "error message without the bnorm:: prefix: " + message);
    CHECK(arena.snapshot() == before, "a failed call changed a buffer: " + message);
    return;
  }
  CHECK(valid, "an invalid call succeeded");

  // Nothing but the outputs changed.
  {
    const auto after = arena.snapshot();
    std::size_t i = 0;
    for (const Block& blk : arena.blocks) {
      const unsigned char* p = blk.bytes.data();
      const bool is_output = !blk.bytes.empty() &&
                             ((p <= static_cast<unsigned char*>(out_ptr) && static_cast<unsigned char*>(out_ptr) < p + blk.bytes.size()) ||
                              (training && (p == rm.ptr || p == rv.ptr || p == sm.ptr || p == si.ptr)));
      if (!is_output) CHECK(after[i] == before[i], "a buffer that is not an output changed");
      ++i;
    }
  }

  // Against the reference.
  // With a residual the reference normalizes without the activation; z and the ReLU come after.
  const reference::Problem p{g.N, g.C, g.S, training, momentum, eps, act == Activation::Relu && !has_res};
  reference::Forward ref = reference::forward(p, x, w0, b0, rm0, rv0);
  if (has_res)
    for (std::size_t i = 0; i < ref.y.size(); ++i) {
      const double v = ref.y[i] + z[i];
      ref.y[i] = act == Activation::Relu && v < 0 ? 0.0 : v;
    }
  const std::vector<double> y = g.numel ? read_logical<T>(out_ptr, g, mem_layout) : std::vector<double>{};
  const double u = unit<T>();
  for (std::int64_t c = 0; c < C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const ChannelScan sc = scan(x, g, c);
    const double mean = ref.mean[ci], invstd = ref.invstd[ci];
    const double gamma = w0.empty() ? 1.0 : w0[ci], beta = b0.empty() ? 0.0 : b0[ci];
    const double M = std::max(sc.max_abs, std::isfinite(mean) ? std::abs(mean) : 0.0);
    const double stat_err = training ? kStat<T> * M * (std::isfinite(invstd) ? invstd : 0.0) : 0.0;  // relative, of invstd
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t s = 0; s < g.S; ++s) {
        const std::size_t li = logical_index(g, n, c, s);
        if (training && sc.non_finite) {
          CHECK(std::isnan(y[li]), "a non-finite input did not make its channel's output NaN (training)");
          continue;
        }
        const double t = std::abs(gamma * invstd * (x[li] - mean));
        const double tol = u * (1 + t + std::abs(beta) + (has_res ? 2 * std::abs(z[li]) : 0.0)) + t * stat_err +
                           std::abs(gamma * invstd) * kStat<T> * M * 4;
        CHECK(near<T>(y[li], ref.y[li], tol),
              "y[" + std::to_string(li) + "] = " + num(y[li]) + ", reference " + num(ref.y[li]));
      }
    if (!training) continue;
    const double mean_tol = kStat<T> * M + (sm.dtype == DType::Float32 ? 1e-7 * std::abs(mean) : 0.0);
    if (sm.present()) {
      // The mean of a channel holding infinities of one sign is that infinity (as in torch), else NaN.
      if (sc.non_finite) CHECK(!std::isfinite(sm.get(c)), "save_mean of a channel with a non-finite input is finite");
      else CHECK(near<T>(sm.get(c), mean, mean_tol), "save_mean[" + std::to_string(c) + "]");
    }
    if (si.present()) {
      if (sc.non_finite) CHECK(std::isnan(si.get(c)), "save_invstd of a channel with a non-finite input is not NaN");
      else CHECK(near<T>(si.get(c), invstd, invstd * (u + 4 * stat_err)), "save_invstd[" + std::to_string(c) + "]");
    }
    if (rm.present()) {
      const double m = static_cast<double>(g.N * g.S);
      const double want_m = ref.running_mean[ci], want_v = ref.running_var[ci];
      const double tm = u * (std::abs(rm0[ci]) + std::abs(mean) + 1e-30) + momentum * kStat<T> * M;
      const double var_err = 2 * std::sqrt(ref.var[ci]) * kStat<T> * M + (kStat<T> * M) * (kStat<T> * M) + 1e-12 * ref.var[ci];
      const double tv = u * (std::abs(rv0[ci]) + ref.var[ci] * m / (m - 1) + 1e-30) + momentum * var_err * m / (m - 1);
      if (sc.non_finite) {
        CHECK(!std::isfinite(rm.get(c)) && std::isnan(rv.get(c)), "running stats of a channel with a non-finite input");
      } else {
        CHECK(near<T>(rm.get(c), want_m, tm), "running_mean[" + std::to_string(c) + "]");
        CHECK(near<T>(rv.get(c), want_v, tv), "running_var[" + std::to_string(c) + "]");
      }
    }
  }

  // ---- Backward of this forward -------------------------------------------------------------
  // (not after a residual forward: its output's ReLU mask is not the reference's)
  if (!fdp.ConsumeBool() || g.numel > 200000 || has_res) return;
  // Now and then the statistics of a training forward are frozen for the backward (eval formula
  // with the updated running statistics); never the other way (save_* hold no statistics then).
  const bool b_training = training && fdp.ConsumeIntegralInRange<int>(0, 7) != 0;
  const std::vector<double> dy = make_values<T>(fdp, g, fdp.ConsumeIntegralInRange<int>(0, 3) == 0);
  const std::size_t nbytes = static_cast<std::size_t>(g.numel) * sizeof(T);
  void* dy_ptr = arena.make(nbytes + static_cast<std::size_t>(g.numel) * sizeof(T));  // room for a partial overlap
  if (g.numel) write_logical<T>(dy_ptr, g, mem_layout, dy);
  void* xb_ptr = arena.make(nbytes);  // the forward's input (the forward may have overwritten it in place)
  if (g.numel) write_logical<T>(xb_ptr, g, mem_layout, x);
  const int gi_sel = fdp.ConsumeIntegralInRange<int>(0, 15);
  void* gi_ptr = nullptr;
  bool gi_present = true, gi_ok = true;
  Shape gi_shape = shape;
  switch (gi_sel) {
    case 0: gi_present = false; break;
    case 1: gi_ptr = dy_ptr; break;  // in place over grad_output: allowed
    case 2: gi_ptr = xb_ptr; break;  // in place over input: allowed
    case 3:  // partial overlap with grad_output: refused
      gi_ptr = g.numel > 1 ? static_cast<unsigned char*>(dy_ptr) + sizeof(T) : arena.make(nbytes);
      gi_ok = g.numel <= 1;
      break;
    case 4:
      gi_ptr = arena.make(nbytes + 1) + 1;
      gi_ok = false;
      break;
    case 5: {
      std::vector<std::int64_t> d2 = dims;
      d2.back() += 1;
      gi_shape = Shape{std::span<const std::int64_t>(d2)};
      gi_ptr = arena.make(static_cast<std::size_t>(geometry_of(d2, sizeof(T)).numel) * sizeof(T));
      gi_ok = false;
      break;
    }
    default: gi_ptr = arena.make(nbytes); break;
  }
  const VecKind k_gw = pick_vec_kind(fdp, true), k_gb = pick_vec_kind(fdp, true);
  const Vec gw = make_vec<T>(arena, k_gw == VecKind::Float64 ? VecKind::WrongDtype : k_gw, C, false, junk);
  const Vec gb = make_vec<T>(arena, k_gb == VecKind::Float64 ? VecKind::WrongDtype : k_gb, C, false, junk);
  const bool give_output = fdp.ConsumeIntegralInRange<int>(0, 15) != 0;
  const bool relu = act == Activation::Relu;
  g_case << " | backward " << (b_training ? "training" : "eval") << " grad_input " << gi_sel << " gw "
         << vec_kind_name(k_gw) << " gb " << vec_kind_name(k_gb) << (give_output ? "" : " no-output");

  bool b_valid = gi_ok;
  if (w.present() && !vec_ok(w, C, dt, false)) b_valid = false;
  if (b_training) {
    if (!(sm.present() && si.present() && vec_ok(sm, C, dt, true) && vec_ok(si, C, dt, true))) b_valid = false;
  } else {
    if (!(rm.present() && rv.present())) b_valid = false;  // (valid vectors: the forward accepted them)
  }
  if (gw.present() && !vec_ok(gw, C, dt, false)) b_valid = false;
  if (gb.present() && !vec_ok(gb, C, dt, false)) b_valid = false;
  if (relu && !give_output) b_valid = false;

  const std::vector<double> rm1 = rm.present() ? rm.values() : std::vector<double>{};
  const std::vector<double> rv1 = rv.present() ? rv.values() : std::vector<double>{};
  const std::vector<double> sm1 = sm.present() ? sm.values() : std::vector<double>{};
  const auto before_b = arena.snapshot();
  threw = false;
  try {
    batch_norm_backward(ConstTensorView(dy_ptr, dt, shape, layout),
                        {.input = ConstTensorView(xb_ptr, dt, shape, layout),
                         .output = give_output ? ConstTensorView(out_ptr, dt, shape, layout) : ConstTensorView(),
                         .weight = w.cview(),
                         .saved = {sm.cview(), si.cview()},
                         .running = {rm.cview(), rv.cview()}},
                        {.training = b_training, .eps = eps, .activation = act},
                        gi_present ? TensorView(gi_ptr, dt, gi_shape, layout) : TensorView(), {gw.view(), gb.view()});
  } catch (const Error& e) {
    threw = true;
    message = e.what();
  }
  if (threw) {
    CHECK(!b_valid, "a valid backward threw: " + message);
    CHECK(arena.snapshot() == before_b, "a failed backward changed a buffer: " + message);
    return;
  }
  CHECK(b_valid, "an invalid backward succeeded");

  // The reference, with the statistics the backward was given and the forward's own output for
  // the ReLU mask.
  reference::Forward fwd;
  fwd.y = relu ? y : std::vector<double>(static_cast<std::size_t>(g.numel), 1.0);
  fwd.mean = b_training ? ref.mean : rm1;
  fwd.var = b_training ? ref.var : rv1;
  const reference::Problem pb{g.N, g.C, g.S, b_training, momentum, eps, relu};
  const reference::Backward rb = reference::backward(pb, x, w0, fwd, dy);
  const std::vector<double> dx = gi_present && g.numel ? read_logical<T>(gi_ptr, g, mem_layout) : std::vector<double>{};
  const double m = static_cast<double>(g.N * g.S);
  for (std::int64_t c = 0; c < C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const ChannelScan sx = scan(x, g, c), sd = scan(dy, g, c);
    const double gamma = w0.empty() ? 1.0 : w0[ci];
    const double mean = fwd.mean[ci], invstd = 1.0 / std::sqrt(fwd.var[ci] + eps);
    const double M = std::max(sx.max_abs, std::isfinite(mean) ? std::abs(mean) : 0.0);
    // Errors of the statistics the backward used: computed in double, perhaps stored in float.
    const bool float_mean = b_training && sm.dtype == DType::Float32;
    const double dmu = b_training ? kStat<T> * M + (float_mean ? 1e-7 * std::abs(sm1[ci]) : 0.0) : 0.0;
    const double eps_i = b_training ? kStat<T> * M * invstd + (si.dtype == DType::Float32 ? 1e-7 : 0.0) : 0.0;
    double S1 = 0, S2 = 0;  // sum |dy'|, sum |dy' * (x - mean)|
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t s = 0; s < g.S; ++s) {
        const std::size_t li = logical_index(g, n, c, s);
        const double d = relu && !(y[li] > 0) ? 0.0 : dy[li];
        S1 += std::abs(d);
        S2 += std::abs(d * (x[li] - mean));
      }
    const bool garbage = !std::isfinite(S1) || !std::isfinite(S2) || !std::isfinite(invstd) || !std::isfinite(mean) ||
                         !std::isfinite(gamma) || sx.non_finite || sd.non_finite;
    const double a = std::abs(gamma * invstd);
    if (gi_present) {
      for (std::int64_t n = 0; n < g.N; ++n)
        for (std::int64_t s = 0; s < g.S; ++s) {
          const std::size_t li = logical_index(g, n, c, s);
          if (garbage) {
            if (!std::isfinite(rb.dx[li])) CHECK(!std::isfinite(dx[li]), "dx finite where the reference is not");
            continue;
          }
          const double d = relu && !(y[li] > 0) ? 0.0 : dy[li];
          const double xmu = std::abs(x[li] - mean);
          double E = a * std::abs(d), extra = 0;
          if (b_training) {
            E += a * invstd * invstd * xmu * S2 / m + a * S1 / m;
            extra = a * invstd * invstd * dmu * (S2 + xmu * S1) / m + a * dmu * S1 / m;
          }
          const double tol = E * (u + 3 * eps_i) + extra + 1e-300;
          CHECK(near<T>(dx[li], rb.dx[li], tol),
                "dx[" + std::to_string(li) + "] = " + num(dx[li]) + ", reference " + num(rb.dx[li]));
        }
    }
    if (garbage) continue;
    if (gb.present()) CHECK(near<T>(gb.get(c), rb.dbias[ci], u * S1 + 1e-300), "grad_bias[" + std::to_string(c) + "]");
    if (gw.present())
      CHECK(near<T>(gw.get(c), rb.dweight[ci], invstd * (u * S2 + dmu * S1) + eps_i * invstd * S2 + 1e-300),
            "grad_weight[" + std::to_string(c) + "] = " + num(gw.get(c)) + ", reference " +
                num(rb.dweight[ci]));
  }
}

// batch_stats: the statistics alone.
template <class T>
void stats_case(FuzzedDataProvider& fdp) {
  constexpr DType dt = dtype_of<T>();
  Arena arena;
  std::vector<std::int64_t> dims;
  const int rank = fdp.ConsumeIntegralInRange<int>(1, 5);
  std::int64_t budget = 4096;
  for (int i = 0; i < rank; ++i) {
    const std::int64_t d = fdp.ConsumeIntegralInRange<std::int64_t>(0, std::min<std::int64_t>(i == 1 ? 40 : 12, budget));
    dims.push_back(d);
    if (d > 0) budget = std::max<std::int64_t>(budget / d, 1);
  }
  const Geometry g = geometry_of(dims, sizeof(T));
  const Layout layout = fdp.ConsumeBool() ? Layout::ChannelsLast : Layout::ChannelsFirst;
  set_num_threads(fdp.ConsumeIntegralInRange<int>(1, 3));
  kernels::set_isa(static_cast<kernels::Isa>(fdp.ConsumeIntegralInRange<int>(0, 2)));
  const std::int64_t C = g.valid ? g.C : 0;
  auto junk = [](std::int64_t) { return 12345.0; };
  const VecKind km = pick_vec_kind(fdp, false), kv = pick_vec_kind(fdp, false);
  const Vec mean = make_vec<T>(arena, km, C, true, junk), var = make_vec<T>(arena, kv, C, true, junk);
  const std::vector<double> x = g.valid ? make_values<T>(fdp, g, true) : std::vector<double>{};
  void* in = arena.make(g.valid ? static_cast<std::size_t>(g.numel) * sizeof(T) : 64);
  if (g.valid && g.numel) write_logical<T>(in, g, layout, x);
  const Shape shape{std::span<const std::int64_t>(dims)};
  g_case << "batch_stats<" << (dt == DType::Float32 ? "f32" : "f64") << "> shape " << shape.str() << " layout "
         << static_cast<int>(layout) << " mean " << vec_kind_name(km) << " var " << vec_kind_name(kv);

  const bool valid = g.valid && vec_ok(mean, C, dt, true) && vec_ok(var, C, dt, true) && !(C > 0 && g.N * g.S < 1);
  const auto before = arena.snapshot();
  bool threw = false;
  std::string message;
  try {
    batch_stats(ConstTensorView(in, dt, shape, layout), mean.view(), var.view());
  } catch (const Error& e) {
    threw = true;
    message = e.what();
  }
  if (threw) {
    CHECK(!valid, "a valid batch_stats threw: " + message);
    CHECK(arena.snapshot() == before, "a failed batch_stats changed a buffer");
    return;
  }
  CHECK(valid, "an invalid batch_stats succeeded");
  const reference::Forward ref = reference::forward({g.N, g.C, g.S, true, 0.1, 1.0, false}, x, {}, {}, {}, {});
  for (std::int64_t c = 0; c < C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const ChannelScan sc = scan(x, g, c);
    if (sc.non_finite) {
      CHECK(std::isnan(mean.get(c)) || std::isinf(mean.get(c)), "mean of a channel with a non-finite value is finite");
      CHECK(std::isnan(var.get(c)), "var of a channel with a non-finite value is not NaN");
      continue;
    }
    const double M = std::max(sc.max_abs, std::abs(ref.mean[ci])), dmu = kStat<T> * M;
    const double su = mean.dtype == DType::Float32 ? 1e-7 : 0.0, sv = var.dtype == DType::Float32 ? 1e-7 : 0.0;
    CHECK(near<T>(mean.get(c), ref.mean[ci], dmu + su * std::abs(ref.mean[ci])), "batch_stats mean[" + std::to_string(c) + "]");
    CHECK(near<T>(var.get(c), ref.var[ci], 2 * std::sqrt(ref.var[ci]) * dmu + dmu * dmu + (sv + 1e-12) * ref.var[ci]),
          "batch_stats var[" + std::to_string(c) + "] = " + num(var.get(c)) + ", reference " +
              num(ref.var[ci]));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  g_case.str("");
  const int op = fdp.ConsumeIntegralInRange<int>(0, 7);
  const bool f64 = fdp.ConsumeBool();
  if (op < 6) {
    if (f64)
      forward_case<double>(fdp);
    else
      forward_case<float>(fdp);
  } else {
    if (f64)
      stats_case<double>(fdp);
    else
      stats_case<float>(fdp);
  }
  return 0;
}
