// Run-time dispatch of the kernel families. stats.cpp, normalize.cpp and backward.cpp are compiled
// once per instruction set, each build in its own namespace (generic: baseline x86-64 or whatever
// the target is; avx2: AVX2 + FMA + F16C; avx512: AVX-512 F/BW/VL/DQ), and the compiler vectorizes
// their loops for that set; avx512bf16 is the avx512 set plus AVX512_BF16 and holds only the
// bfloat16 kernels (float and double dispatch to avx512 there). The first kernel call picks the
// best set the CPU supports; the environment variable BNORM_ISA=generic|avx2|avx512|avx512bf16
// (or set_isa) caps it.
#include "kernels/kernels.hpp"
#include "parallel.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <unistd.h>

#if BNORM_HAVE_X86_ISAS
#include <cpuid.h>
#endif

// Declarations of one per-ISA build of the kernels.
#define BNORM_DECLARE_KERNELS(ns)                                                                             \
  namespace bnorm::kernels::ns {                                                                              \
  template <class T>                                                                                          \
  void channel_moments(const T* x, const Geometry& g, double* mean, double* m2, double* workspace);           \
  template <class T>                                                                                          \
  void normalize(const T* x, T* y, const Geometry& g, ChannelCoeffs<Compute<T>> k, Activation act,           \
                 const T* residual);                                                                          \
  template <class T>                                                                                          \
  void backward_reduce(const T* dy, const T* x, const T* output, const Geometry& g, const Compute<T>* mean_hi, \
                       const Compute<T>* mean_lo, double* sum_dy, double* sum_dy_xmu, double* workspace);     \
  template <class T>                                                                                          \
  void backward_apply(const T* dy, const T* x, const T* output, T* dx, const Geometry& g,                    \
                      BackwardCoeffs<Compute<T>> k);                                                          \
  template <class T>                                                                                          \
  void fused_forward_cf(const T* x, T* y, const Geometry& g, const double* gamma, const double* beta,         \
                        double eps, Activation act, const T* residual, double* mean, double* var);            \
  template <class T>                                                                                          \
  void fused_backward_cf(const T* dy, const T* x, const T* output, T* dx, const Geometry& g,                 \
                         const double* mean, const double* invstd, const double* gamma, bool training,        \
                         double* sum_dy, double* sum_dy_xmu);                                                 \
  }

BNORM_DECLARE_KERNELS(generic)
#if BNORM_HAVE_X86_ISAS
BNORM_DECLARE_KERNELS(avx2)
BNORM_DECLARE_KERNELS(avx512)
BNORM_DECLARE_KERNELS(avx512bf16)
#endif

namespace bnorm::kernels {
namespace {

#if BNORM_HAVE_X86_ISAS
// F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c".
bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}
// AVX512_BF16 from CPUID leaf 7, sub-leaf 1 (EAX bit 5), for the same reason.
bool cpu_has_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && (a & (1u << 5)) != 0;
}
#endif

bool cpu_has(Isa isa) {
#if BNORM_HAVE_X86_ISAS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::Generic: return true;
    case Isa::Avx2: return avx2;
    case Isa::Avx512: return avx512;
    case Isa::Avx512Bf16: return avx512 && cpu_has_avx512_bf16();
  }
  return false;
#else
  return isa == Isa::Generic;
#endif
}

Isa best_isa(Isa cap) {
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2})
    if (static_cast<int>(isa) <= static_cast<int>(cap) && cpu_has(isa)) return isa;
  return Isa::Generic;
}

Isa initial_isa() {
  Isa cap = Isa::Avx512Bf16;
  if (const char* env = std::getenv("BNORM_ISA")) {
    for (Isa isa : kAllIsas)
      if (std::strcmp(env, isa_name(isa)) == 0) cap = isa;
  }
  return best_isa(cap);
}

std::atomic<int> g_isa{-1};

}  // namespace

bool isa_supported(Isa isa) { return cpu_has(isa); }

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) { g_isa.store(static_cast<int>(best_isa(isa)), std::memory_order_relaxed); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

int reduce_threads(const Geometry& g) {
  if (g.reduce_threads > 0) return g.reduce_threads;
  if (g.layout == Layout::ChannelsFirst) return detail::threads_for(g.C);
  const std::int64_t R = cl_rows_per_block(g);
  return detail::threads_for((g.rows() + R - 1) / R);
}

std::int64_t cl_rows_per_block(const Geometry& g) {
  // About kBlock values per channel tile, and 16 to 64 rows: enough rows that the per-block work
  // is amortized, few enough that a float lane sums at most 64 terms.
  const std::int64_t tile = g.C < kTileChannels ? (g.C > 0 ? g.C : 1) : kTileChannels;
  const std::int64_t rows = kBlock / tile;
  return rows < 16 ? 16 : (rows > 64 ? 64 : rows);
}

std::int64_t fuse_budget_bytes() {
  static const std::int64_t budget = [] {
    long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? static_cast<std::int64_t>(l2) / 4 * 3 : std::int64_t{1} << 20;
  }();
  return budget;
}

std::int64_t reduce_workspace_doubles(const Geometry& g, int threads) {
  return g.layout == Layout::ChannelsFirst ? 0 : static_cast<std::int64_t>(threads) * 2 * g.C;
}

#if BNORM_HAVE_X86_ISAS
// T is the storage type of the dispatching function: only bfloat16 has an avx512bf16 build.
#define BNORM_DISPATCH(fn, ...)                                         \
  switch (active_isa()) {                                               \
    case Isa::Avx512Bf16:                                               \
      if constexpr (std::is_same_v<T, bfloat16>) return avx512bf16::fn(__VA_ARGS__); \
      else return avx512::fn(__VA_ARGS__);                              \
    case Isa::Avx512: return avx512::fn(__VA_ARGS__);                   \
    case Isa::Avx2: return avx2::fn(__VA_ARGS__);                       \
    case Isa::Generic: break;                                           \
  }                                                                     \
  return generic::fn(__VA_ARGS__)
#else
#define BNORM_DISPATCH(fn, ...) return generic::fn(__VA_ARGS__)
#endif

template <class T>
void channel_moments(const T* x, const Geometry& g, double* mean, double* m2, double* workspace) {
  BNORM_DISPATCH(channel_moments<T>, x, g, mean, m2, workspace);
}
template <class T>
void normalize(const T* x, T* y, const Geometry& g, ChannelCoeffs<Compute<T>> k, Activation act, const T* residual) {
  BNORM_DISPATCH(normalize<T>, x, y, g, k, act, residual);
}
template <class T>
void backward_reduce(const T* dy, const T* x, const T* output, const Geometry& g, const Compute<T>* mean_hi,
                     const Compute<T>* mean_lo, double* sum_dy, double* sum_dy_xmu, double* workspace) {
  BNORM_DISPATCH(backward_reduce<T>, dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace);
}
template <class T>
void backward_apply(const T* dy, const T* x, const T* output, T* dx, const Geometry& g, BackwardCoeffs<Compute<T>> k) {
  BNORM_DISPATCH(backward_apply<T>, dy, x, output, dx, g, k);
}

template <class T>
void fused_forward_cf(const T* x, T* y, const Geometry& g, const double* gamma, const double* beta, double eps,
                      Activation act, const T* residual, double* mean, double* var) {
  BNORM_DISPATCH(fused_forward_cf<T>, x, y, g, gamma, beta, eps, act, residual, mean, var);
}
template <class T>
void fused_backward_cf(const T* dy, const T* x, const T* output, T* dx, const Geometry& g, const double* mean,
                       const double* invstd, const double* gamma, bool training, double* sum_dy, double* sum_dy_xmu) {
  BNORM_DISPATCH(fused_backward_cf<T>, dy, x, output, dx, g, mean, invstd, gamma, training, sum_dy, sum_dy_xmu);
}

#define BNORM_INSTANTIATE(T)                                                                                   \
  template void channel_moments<T>(const T*, const Geometry&, double*, double*, double*);                     \
  template void normalize<T>(const T*, T*, const Geometry&, ChannelCoeffs<Compute<T>>, Activation, const T*); \
  template void backward_reduce<T>(const T*, const T*, const T*, const Geometry&, const Compute<T>*,          \
                                   const Compute<T>*, double*, double*, double*);                              \
  template void backward_apply<T>(const T*, const T*, const T*, T*, const Geometry&, BackwardCoeffs<Compute<T>>); \
  template void fused_forward_cf<T>(const T*, T*, const Geometry&, const double*, const double*, double, Activation, \
                                    const T*, double*, double*);                                                \
  template void fused_backward_cf<T>(const T*, const T*, const T*, T*, const Geometry&, const double*, const double*, \
                                     const double*, bool, double*, double*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(bfloat16)

}  // namespace bnorm::kernels
