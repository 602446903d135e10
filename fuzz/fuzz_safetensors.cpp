// Fuzz target: the checkpoint loader. The input is a whole file image.
//
//   1. parse_safetensors either returns a file or throws bnorm::Error (any other exception escapes
//      and is a crash). A parsed file is self-consistent (each tensor's bytes = numel * dtype
//      size), and serialize -> parse gives the same file back, whose serialization is a fixed point.
//   2. BasicBatchNorm<float|double>::load of the same bytes (from a memfd, no disk I/O), for the
//      prefixes and layer options the file suggests: it either throws bnorm::Error and leaves the
//      layer exactly as it was, or succeeds and the layer then holds exactly the file's values.
#include <bnorm/bnorm.hpp>

#include "safetensors.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

namespace {

using namespace bnorm;

[[noreturn]] void fail_case(const std::string& what, int line) {
  std::fprintf(stderr, "\nfuzz_safetensors.cpp:%d: %s\n", line, what.c_str());
  std::abort();
}
#define CHECK(cond, what)                                                   \
  do {                                                                      \
    if (!(cond)) fail_case(std::string(what) + "  [" #cond "]", __LINE__); \
  } while (0)

bool same(const detail::SafeTensorsFile& a, const detail::SafeTensorsFile& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (auto i = a.tensors.begin(), j = b.tensors.begin(); i != a.tensors.end(); ++i, ++j)
    if (i->first != j->first || i->second.dtype != j->second.dtype || i->second.shape != j->second.shape ||
        i->second.bytes != j->second.bytes)
      return false;
  return true;
}

// The file lives in a memfd; the layer opens it by its /proc path like any other file.
struct MemFile {
  int fd = -1;
  std::string path;
  MemFile() {
    fd = ::memfd_create("bnorm_fuzz", MFD_CLOEXEC);
    if (fd < 0) fail_case("memfd_create failed", __LINE__);
    path = "/proc/self/fd/" + std::to_string(fd);
  }
  void set(const std::uint8_t* data, std::size_t size) {
    CHECK(::ftruncate(fd, 0) == 0, "ftruncate");
    std::size_t done = 0;
    while (done < size) {
      const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
      CHECK(n > 0, "pwrite");
      done += static_cast<std::size_t>(n);
    }
  }
};

template <class P>
struct State {
  std::vector<P> w, b, rm, rv;
  std::int64_t nbt;
  explicit State(const BasicBatchNorm<P>& bn)
      : w(bn.weight().begin(), bn.weight().end()),
        b(bn.bias().begin(), bn.bias().end()),
        rm(bn.running_mean().begin(), bn.running_mean().end()),
        rv(bn.running_var().begin(), bn.running_var().end()),
        nbt(bn.num_batches_tracked()) {}
  // Bitwise, so that a NaN compares equal to itself.
  static bool bits_equal(const std::vector<P>& x, const std::vector<P>& y) {
    return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(P)) == 0);
  }
  bool operator==(const State& o) const {
    return bits_equal(w, o.w) && bits_equal(b, o.b) && bits_equal(rm, o.rm) && bits_equal(rv, o.rv) && nbt == o.nbt;
  }
};

// The value the layer must hold after loading tensor `t` (F32 or F64) at index c.
template <class P>
P expected_value(const detail::SafeTensor& t, std::size_t c) {
  if (t.dtype == "F32") {
    float v;
    std::memcpy(&v, t.bytes.data() + 4 * c, 4);
    return static_cast<P>(v);
  }
  double v;
  std::memcpy(&v, t.bytes.data() + 8 * c, 8);
  return static_cast<P>(v);
}

template <class P>
bool same_value(P a, P b) {
  return std::memcmp(&a, &b, sizeof(P)) == 0 || (std::isnan(a) && std::isnan(b));
}

template <class P>
void try_load(MemFile& file, const detail::SafeTensorsFile* parsed, std::int64_t C, const BatchNormOptions& o,
              const std::string& prefix) {
  BasicBatchNorm<P> bn(C, o, -1);
  // A recognisable state that no file can hold by accident.
  for (auto& v : bn.weight()) v = P(-7.5);
  for (auto& v : bn.running_var()) v = P(3.25);
  const State<P> before(bn);
  try {
    bn.load(file.path, prefix);
  } catch (const Error& e) {
    CHECK(State<P>(bn) == before, std::string("a failed load changed the layer: ") + e.what());
    return;
  }
  CHECK(parsed != nullptr, "load succeeded on a file that parse_safetensors refused");
  auto check_vec = [&](const std::string& key, std::span<const P> got) {
    const auto it = parsed->tensors.find(prefix + key);
    CHECK(it != parsed->tensors.end(), "load succeeded without key " + prefix + key);
    CHECK(it->second.shape.size() == 1 && it->second.shape[0] == C, "load accepted a wrong shape for " + key);
    for (std::size_t c = 0; c < got.size(); ++c)
      CHECK(same_value(got[c], expected_value<P>(it->second, c)), "loaded value differs from the file: " + key);
  };
  if (o.affine) {
    check_vec("weight", bn.weight());
    check_vec("bias", bn.bias());
  }
  if (o.track_running_stats) {
    check_vec("running_mean", bn.running_mean());
    check_vec("running_var", bn.running_var());
    for (P v : bn.running_var()) CHECK(v >= 0, "load accepted a negative or NaN running_var");
    CHECK(bn.num_batches_tracked() >= 0, "load accepted a negative num_batches_tracked");
  }
}

const char* const kKeys[] = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static MemFile file;
  const std::span<const unsigned char> image(data, size);

  // 1. Parse, invariants, round trip.
  detail::SafeTensorsFile parsed;
  bool ok = true;
  try {
    parsed = detail::parse_safetensors(image, "fuzz");
  } catch (const Error& e) {
    ok = false;
    CHECK(std::string(e.what()).find("'fuzz'") != std::string::npos, "parse error does not name the source");
  }
  if (ok) {
    for (const auto& [name, t] : parsed.tensors) {
      const std::size_t es = detail::safetensors_dtype_size(t.dtype);
      CHECK(es != 0, "parsed an unknown dtype");
      std::uint64_t numel = 1;
      bool zero = false;
      for (std::int64_t d : t.shape) {
        CHECK(d >= 0, "parsed a negative dim");
        if (d == 0) zero = true;
        else CHECK(!__builtin_mul_overflow(numel, static_cast<std::uint64_t>(d), &numel), "numel overflow");
      }
      CHECK(t.bytes.size() == (zero ? 0 : numel) * es, "a tensor's bytes do not match its shape and dtype");
    }
    const std::vector<unsigned char> again = detail::serialize_safetensors(parsed);  // must not throw
    const detail::SafeTensorsFile reparsed = detail::parse_safetensors(again, "round trip");
    CHECK(same(parsed, reparsed), "serialize -> parse changed the file");
    CHECK(detail::serialize_safetensors(reparsed) == again, "serialization is not a fixed point");
  }

  // 2. The layer's load, for what the file suggests: prefixes of known keys, and C from their shapes.
  file.set(data, size);
  std::set<std::string> prefixes{""};
  std::int64_t C = 3;
  if (ok) {
    for (const auto& [name, t] : parsed.tensors)
      for (const char* key : kKeys) {
        const std::size_t k = std::strlen(key);
        if (name.size() >= k && name.compare(name.size() - k, k, key) == 0) {
          if (prefixes.size() < 3) prefixes.insert(name.substr(0, name.size() - k));
          if (t.shape.size() == 1 && t.shape[0] >= 1 && t.shape[0] <= 4096) C = t.shape[0];
        }
      }
  }
  if (!ok) {  // one attempt is enough to see that a refused file changes nothing
    try_load<float>(file, nullptr, C, {}, "");
    return 0;
  }
  for (const std::string& prefix : prefixes)
    for (int opt = 0; opt < 4; ++opt) {
      BatchNormOptions o;
      o.affine = (opt & 1) == 0;
      o.track_running_stats = (opt & 2) == 0;
      try_load<float>(file, &parsed, C, o, prefix);
      try_load<double>(file, &parsed, C, o, prefix);
    }
  return 0;
}
