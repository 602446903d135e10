#include "idx.hpp"

#include <zlib.h>

#include <filesystem>
#include <limits>

namespace bnorm::train {

IdxArray parse_idx(std::span<const std::uint8_t> bytes, const std::string& name) {
  auto fail = [&](const std::string& why) { return DataError(name + ": not a valid IDX file: " + why); };
  if (bytes.size() < 4) throw fail("shorter than the 4-byte header (" + std::to_string(bytes.size()) + " bytes)");
  if (bytes[0] != 0 || bytes[1] != 0) throw fail("bad magic (the first two bytes must be 0)");
  if (bytes[2] != 0x08) throw fail("element type " + std::to_string(bytes[2]) + ", expected 8 (unsigned byte)");
  const int rank = bytes[3];
  if (rank < 1) throw fail("0 dimensions");
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(rank);
  if (bytes.size() < header) throw fail("truncated header (" + std::to_string(rank) + " dimensions announced)");
  IdxArray out;
  std::uint64_t count = 1;
  for (int d = 0; d < rank; ++d) {
    const std::size_t o = 4 + 4 * static_cast<std::size_t>(d);
    const std::uint32_t v = (std::uint32_t{bytes[o]} << 24) | (std::uint32_t{bytes[o + 1]} << 16) |
                            (std::uint32_t{bytes[o + 2]} << 8) | std::uint32_t{bytes[o + 3]};
    if (v == 0) throw fail("dimension " + std::to_string(d) + " is 0");
    count *= v;
    if (count > (std::uint64_t{1} << 34)) throw fail("announces more than 16 GiB of data");
    out.dims.push_back(static_cast<std::int64_t>(v));
  }
  const std::uint64_t have = bytes.size() - header;
  if (have != count)
    throw fail("the header announces " + std::to_string(count) + " data bytes, the file has " + std::to_string(have));
  out.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
  return out;
}

IdxArray read_idx(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw DataError(path + ": no such file");
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw DataError(path + ": cannot open");
  std::vector<std::uint8_t> bytes;
  std::vector<std::uint8_t> chunk(1 << 20);
  for (;;) {
    const int n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int errnum = 0;
      const std::string msg = gzerror(f, &errnum);
      gzclose(f);
      throw DataError(path + ": corrupt gzip data (" + msg + ")");
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + n);
  }
  const int rc = gzclose(f);
  if (rc != Z_OK) throw DataError(path + ": corrupt gzip data (truncated or bad checksum)");
  return parse_idx(bytes, path);
}

Split load_fashion_mnist(const std::string& dir, bool train) {
  const std::string prefix = train ? "train" : "t10k";
  auto find = [&](const std::string& stem) {
    const std::string gz = dir + "/" + stem + ".gz";
    const std::string plain = dir + "/" + stem;
    std::error_code ec;
    if (std::filesystem::exists(gz, ec)) return gz;
    if (std::filesystem::exists(plain, ec)) return plain;
    throw DataError(gz + ": no such file (install Debian's dataset-fashion-mnist, or give --data DIR)");
  };
  const std::string ip = find(prefix + "-images-idx3-ubyte");
  const std::string lp = find(prefix + "-labels-idx1-ubyte");
  Split s{read_idx(ip), read_idx(lp)};
  if (s.images.dims.size() != 3 || s.images.dims[1] != 28 || s.images.dims[2] != 28)
    throw DataError(ip + ": expected images of shape (n, 28, 28)");
  if (s.labels.dims.size() != 1) throw DataError(lp + ": expected labels of shape (n)");
  if (s.labels.dims[0] != s.images.dims[0])
    throw DataError(lp + ": " + std::to_string(s.labels.dims[0]) + " labels for " + std::to_string(s.images.dims[0]) +
                    " images in " + ip);
  for (std::size_t i = 0; i < s.labels.data.size(); ++i)
    if (s.labels.data[i] > 9)
      throw DataError(lp + ": label " + std::to_string(s.labels.data[i]) + " at index " + std::to_string(i) +
                      " is not in 0..9");
  return s;
}

}  // namespace bnorm::train
