// Run-time dispatch of the kernels. stats.cpp, normalize.cpp and backward.cpp are compiled once per
// row of the ISA table (src/kernels/isas.cmake), each build into its own namespace, and the compiler
// vectorizes their loops for that row's instruction set. The first kernel call picks the best row
// that this target builds and the CPU supports; the environment variable BNORM_ISA=<row name> (or
// set_isa) caps it. Each entry point reads the active row once per call and calls through that
// row's table of kernels.
#include "kernels/kernels.hpp"
#include "parallel.hpp"

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <type_traits>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace bnorm::kernels {

// One build's kernels for storage type S: a pointer for each row of BNORM_KERNELS.
template <class S>
struct KernelTable {
#define BNORM_KERNEL_POINTER(name, parameters, arguments) void(*name) parameters;
  BNORM_KERNELS(BNORM_KERNEL_POINTER)
#undef BNORM_KERNEL_POINTER
};

}  // namespace bnorm::kernels

// For each built row of the ISA table: the declarations of its kernels, the storage types it builds
// and its tables.
#define BNORM_IS_TYPE(S, T) std::is_same_v<S, T> ||
#define BNORM_KERNEL_ADDRESS(name, parameters, arguments) .name = &name<S>,
#define BNORM_ISA_KERNELS(enumerator, ns, base, check)                     \
  namespace bnorm::kernels::ns {                                           \
  BNORM_KERNELS(BNORM_DECLARE_KERNEL)                                      \
  template <class S>                                                       \
  constexpr bool kBuilds = BNORM_ISA_TYPES_##ns(BNORM_IS_TYPE, S) false;   \
  template <class S>                                                       \
  constexpr KernelTable<S> kTable = {BNORM_KERNELS(BNORM_KERNEL_ADDRESS)}; \
  }
BNORM_BUILT_ISAS(BNORM_ISA_KERNELS)
#undef BNORM_ISA_KERNELS
#undef BNORM_KERNEL_ADDRESS
#undef BNORM_IS_TYPE

namespace bnorm::kernels {
namespace {

// ---- The CPU features that rows of the ISA table may name (FEATURES): BNORM_CPU_HAS(f) is
// BNORM_CPU_f, true when the CPU supports f. A feature with no line here does not compile.
#if defined(__x86_64__) || defined(__i386__)
// F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c".
[[maybe_unused]] bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}
// AVX512_BF16 from CPUID leaf 7, sub-leaf 1 (EAX bit 5), for the same reason.
[[maybe_unused]] bool cpu_has_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && (a & (1u << 5)) != 0;
}
#define BNORM_CPU_INIT() __builtin_cpu_init()
#define BNORM_CPU_avx2 __builtin_cpu_supports("avx2")
#define BNORM_CPU_fma __builtin_cpu_supports("fma")
#define BNORM_CPU_f16c cpu_has_f16c()
#define BNORM_CPU_avx512f __builtin_cpu_supports("avx512f")
#define BNORM_CPU_avx512bw __builtin_cpu_supports("avx512bw")
#define BNORM_CPU_avx512vl __builtin_cpu_supports("avx512vl")
#define BNORM_CPU_avx512dq __builtin_cpu_supports("avx512dq")
#define BNORM_CPU_avx512bf16 cpu_has_avx512_bf16()
#else
#define BNORM_CPU_INIT() (void)0
#endif
#define BNORM_CPU_HAS(feature) BNORM_CPU_##feature

bool cpu_has(Isa isa) {
  BNORM_CPU_INIT();
  switch (isa) {
#define BNORM_CPU_CHECK(enumerator, ns, base, check) \
  case Isa::enumerator: return check;
    BNORM_BUILT_ISAS(BNORM_CPU_CHECK)
#undef BNORM_CPU_CHECK
    default: return false;  // a row of the table that this target does not build
  }
}

// The kernels that `isa` runs for S: its own build, or its base's for a storage type it does not
// build (the avx512bf16 row's float and double); null for a row this target does not build.
template <class S>
constexpr const KernelTable<S>* table_of(Isa isa) {
  switch (isa) {
#define BNORM_TABLE_OF(enumerator, ns, base, check) \
  case Isa::enumerator:                             \
    if constexpr (ns::kBuilds<S>)                   \
      return &ns::kTable<S>;                        \
    else                                            \
      return table_of<S>(Isa::base);
    BNORM_BUILT_ISAS(BNORM_TABLE_OF)
#undef BNORM_TABLE_OF
    default: return nullptr;
  }
}

inline constexpr std::size_t kIsaCount = std::size(kAllIsas);
template <class S>
constexpr auto kTables = [] {
  std::array<const KernelTable<S>*, kIsaCount> tables{};
  for (std::size_t i = 0; i < kIsaCount; ++i) tables[i] = table_of<S>(kAllIsas[i]);
  return tables;
}();

// The highest row at or below `cap` that this target builds and the CPU supports; the first row
// (generic, built everywhere) when there is none.
Isa best_isa(Isa cap) {
  for (std::size_t i = kIsaCount; i-- > 1;)
    if (static_cast<int>(kAllIsas[i]) <= static_cast<int>(cap) && cpu_has(kAllIsas[i])) return kAllIsas[i];
  return kAllIsas[0];
}

Isa initial_isa() {
  Isa cap = kAllIsas[kIsaCount - 1];
  if (const char* env = std::getenv("BNORM_ISA")) {
    bool known = false;
    for (Isa isa : kAllIsas)
      if (std::strcmp(env, isa_name(isa)) == 0) {
        cap = isa;
        known = true;
      }
    if (!known) {  // said once (the first call picks the row), then ignored: no cap
      std::string names;
      for (Isa isa : kAllIsas) names += std::string(names.empty() ? "" : ", ") + isa_name(isa);
      std::fprintf(stderr, "bnorm: BNORM_ISA: expected one of this build's rows (%s), got '%s'; ignored\n", names.c_str(), env);
    }
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
#define BNORM_ISA_NAME(enumerator, name) \
  case Isa::enumerator: return name;
    BNORM_ISAS(BNORM_ISA_NAME)
#undef BNORM_ISA_NAME
  }
  return "unknown";
}

int reduce_threads(const Geometry& g) {
  if (g.reduce_threads > 0) return g.reduce_threads;
  if (g.layout == Layout::ChannelsFirst) return detail::threads_for(g.C, g.numel());
  const std::int64_t R = cl_rows_per_block(g);
  return detail::threads_for((g.rows() + R - 1) / R, g.numel());
}

std::int64_t cl_rows_per_block(const Geometry& g) {
  // About kBlock values per channel tile, and 16 to 64 rows: enough rows that the per-block work
  // is amortized, few enough that a float lane sums at most 64 terms.
  const std::int64_t tile = g.C < kTileChannels ? (g.C > 0 ? g.C : 1) : kTileChannels;
  const std::int64_t rows = kBlock / tile;
  return rows < 16 ? 16 : (rows > 64 ? 64 : rows);
}

std::int64_t l2_cache_bytes() {
  static const std::int64_t l2 = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<std::int64_t>(v) : std::int64_t{0};
  }();
  return l2;
}

std::int64_t fuse_budget_bytes() {
  const std::int64_t l2 = l2_cache_bytes();
  return l2 > 0 ? l2 / 4 * 3 : std::int64_t{1} << 20;
}

std::int64_t reduce_workspace_doubles(const Geometry& g, int threads) {
  return g.layout == Layout::ChannelsFirst ? 0 : static_cast<std::int64_t>(threads) * 2 * g.C;
}

namespace {

// The fused paths' conditions (kernels.hpp: use_fused_forward says why), for a pass that keeps the
// channel's slices of `cached` tensors in cache.
template <class S>
bool fuse_channels(const Geometry& g, int cached) {
  const std::int64_t threads = num_threads();
  return g.layout == Layout::ChannelsFirst && g.per_channel() > 0 &&
         g.per_channel() * static_cast<std::int64_t>(sizeof(S)) * cached <= fuse_budget_bytes() &&
         (g.C % threads == 0 || g.C >= 8 * threads);
}

}  // namespace

template <class S>
bool use_fused_forward(const Geometry& g) {
  return fuse_channels<S>(g, fused_forward_cached<S>(g));
}
template <class S>
bool use_fused_backward(const Geometry& g, bool relu_output, bool writes_dx) {
  return fuse_channels<S>(g, fused_backward_cached<S>(g, relu_output, writes_dx));
}
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, use_fused_forward)
BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, use_fused_backward)

// The entry points: the active ISA's kernel for S, read once per call.
#define BNORM_DEFINE_ENTRY(name, parameters, arguments)                 \
  template <class S>                                                    \
  void name parameters {                                                \
    kTables<S>[static_cast<std::size_t>(active_isa())]->name arguments; \
  }                                                                     \
  BNORM_STORAGE_TYPES(BNORM_INSTANTIATE_ONE, name)
BNORM_KERNELS(BNORM_DEFINE_ENTRY)
#undef BNORM_DEFINE_ENTRY

}  // namespace bnorm::kernels
