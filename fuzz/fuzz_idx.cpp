// Fuzz target: the IDX reader of bnorm-train (apps/train/idx.cpp). The input is a file image.
//
//   1. parse_idx either returns an array or throws DataError (anything else escaping is a crash).
//      A returned array is self-consistent: every dimension > 0, data bytes = product of the
//      dimensions, and the data are the input's bytes after the header.
//   2. read_idx on the same bytes written as a plain file gives the same answer (the same array or
//      a DataError), and so does read_idx on the bytes gzip-compressed: the .gz path must not
//      change what is accepted.
//   3. read_idx on the raw input named as a .gz file (mostly not valid gzip: zlib then passes the
//      bytes through or reports corrupt data) returns or throws DataError, never crashes.
#include "idx.hpp"

#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

using bnorm::train::DataError;
using bnorm::train::IdxArray;

[[noreturn]] void fail_case(const char* what, int line) {
  std::fprintf(stderr, "\nfuzz_idx.cpp:%d: %s\n", line, what);
  std::abort();
}
#define CHECK(cond)                         \
  do {                                      \
    if (!(cond)) fail_case(#cond, __LINE__); \
  } while (0)

// One scratch file per process (libFuzzer runs inputs one after another in a process).
const std::string& scratch_path() {
  static const std::string path = [] {
    std::string p = "/tmp/bnorm_fuzz_idx_";
    p += std::to_string(::getpid());
    return p;
  }();
  return path;
}

void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  CHECK(f != nullptr);
  CHECK(bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  CHECK(std::fclose(f) == 0);
}

std::vector<std::uint8_t> gzip(const std::vector<std::uint8_t>& bytes) {
  z_stream z{};
  CHECK(deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK);  // 15 + 16: gzip wrapper
  std::vector<std::uint8_t> out(deflateBound(&z, static_cast<uLong>(bytes.size())) + 32);
  z.next_in = const_cast<Bytef*>(bytes.data());
  z.avail_in = static_cast<uInt>(bytes.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  CHECK(deflate(&z, Z_FINISH) == Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

// The array, or nullopt for a DataError.
template <class F>
std::optional<IdxArray> outcome(F&& f) {
  try {
    return f();
  } catch (const DataError&) {
    return std::nullopt;
  }
}

bool same(const std::optional<IdxArray>& a, const std::optional<IdxArray>& b) {
  if (a.has_value() != b.has_value()) return false;
  return !a || (a->dims == b->dims && a->data == b->data);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::vector<std::uint8_t> bytes(data, data + size);
  const auto parsed = outcome([&] { return bnorm::train::parse_idx(bytes, "fuzz"); });
  if (parsed) {
    std::uint64_t count = 1;
    for (std::int64_t d : parsed->dims) {
      CHECK(d > 0);
      count *= static_cast<std::uint64_t>(d);
    }
    CHECK(!parsed->dims.empty() && parsed->dims.size() == bytes[3]);
    CHECK(parsed->data.size() == count);
    const std::size_t header = 4 + 4 * parsed->dims.size();
    CHECK(std::equal(parsed->data.begin(), parsed->data.end(), bytes.begin() + static_cast<std::ptrdiff_t>(header)));
  }

  const std::string& path = scratch_path();
  write_file(path, bytes);
  CHECK(same(parsed, outcome([&] { return bnorm::train::read_idx(path); })));
  write_file(path, gzip(bytes));
  CHECK(same(parsed, outcome([&] { return bnorm::train::read_idx(path); })));

  const std::string gz = path + ".gz";
  write_file(gz, bytes);
  (void)outcome([&] { return bnorm::train::read_idx(gz); });
  std::remove(gz.c_str());
  std::remove(path.c_str());
  return 0;
}
