// bnorm::runtime_info(): what this process detected and which kernel variant each operation takes
// (`bnorm info`, bnorm.info() in Python). Everything printed is read from the same functions the
// kernels call, so it cannot drift from what they do.
#include <bnorm/types.hpp>

#include "kernels/kernels.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>

#include <unistd.h>

namespace bnorm {
namespace {

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  return "unknown (no model name in /proc/cpuinfo)";
}

std::string bytes(long b) {
  if (b <= 0) return "not reported";
  char s[32];
  if (b >= (1L << 20) && b % (1L << 20) == 0) std::snprintf(s, sizeof s, "%ld MiB", b >> 20);
  else if (b >= 1024) std::snprintf(s, sizeof s, "%ld KiB", b >> 10);
  else std::snprintf(s, sizeof s, "%ld B", b);
  return s;
}

}  // namespace

std::string runtime_info() {
  using namespace kernels;
  std::ostringstream o;
  o << "CPU: " << cpu_model() << "\n";
  o << "instruction sets (rows of src/kernels/isas.cmake) built and supported here:";
  for (Isa isa : kAllIsas) o << " " << isa_name(isa) << (isa_supported(isa) ? "" : " (not supported)");
  o << "\nactive: " << isa_name(active_isa());
  if (const char* env = std::getenv("BNORM_ISA")) o << " (capped by BNORM_ISA=" << env << ")";
  o << "\nthreads: " << num_threads() << "\n";
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  o << "caches (sysconf): L1d " << bytes(sysconf(_SC_LEVEL1_DCACHE_SIZE)) << ", L2 " << bytes(sysconf(_SC_LEVEL2_CACHE_SIZE))
    << ", L3 " << bytes(sysconf(_SC_LEVEL3_CACHE_SIZE)) << "\n";
#else
  o << "caches: not reported by this system\n";
#endif
  o << "fused channels-first passes: when a channel's cached slices fit in " << bytes(fuse_budget_bytes())
    << " (3/4 of L2) and the channels spread evenly over the threads\n";
  const StreamThreshold& st = stream_threshold();
  o << "non-temporal output stores: outputs of at least "
    << (st.bytes == std::numeric_limits<std::int64_t>::max() ? std::string("(none)")
        : st.bytes == 0                                       ? std::string("0 B (every output)")
                                                              : bytes(static_cast<long>(st.bytes)))
    << " (unless the output is fresh memory; " << st.source << ")\n";
  if (!st.probes.empty()) {
    o << "  copies timed on " << st.threads << (st.threads == 1 ? " thread" : " threads")
      << ", ordinary / non-temporal stores:";
    char b[96];
    for (const StreamProbe& p : st.probes) {
      std::snprintf(b, sizeof b, " %s %.3f / %.3f ms%s;", bytes(static_cast<long>(p.bytes)).c_str(), p.cached_s * 1e3,
                    p.streamed_s * 1e3, stream_wins(p) ? " (streaming wins)" : "");
      o << b;
    }
    o << "\n";
  }
  o << "variants taken (float32; forward = training forward, backward = training backward):\n";
  struct Example {
    std::int64_t N, C, S;
    const char* name;
  };
  const Example examples[] = {{32, 64, 112 * 112, "32x64x112x112"}, {32, 256, 56 * 56, "32x256x56x56"},
                              {32, 512, 7 * 7, "32x512x7x7"}, {256, 1024, 1, "256x1024"}};
  for (const Example& e : examples)
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      if (e.S == 1 && layout == Layout::ChannelsLast) continue;  // (N, C): one layout
      const Geometry g{e.N, e.C, e.S, e.S == 1 ? Layout::ChannelsLast : layout};  // as check_tensor normalizes it
      o << "  " << e.name << " " << (e.S == 1 ? std::string("(N, C)") : to_string(layout)) << ": forward "
        << (use_fused_forward<float>(g) ? "fused (two passes over memory)" : "separate passes")
        << ", backward " << (use_fused_backward<float>(g, false, true) ? "fused" : "separate passes") << ", output "
        << (stream_output<float>(g) ? "streamed" : "cached");
      if (layout == Layout::ChannelsLast) o << ", tile " << (e.C < kTileChannels ? e.C : kTileChannels) << "x" << cl_rows_per_block(g);
      o << "\n";
    }
  return o.str();
}

}  // namespace bnorm
