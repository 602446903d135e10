// The IDX file format of (Fashion-)MNIST, plain or gzip-compressed (zlib reads both).
//
// Layout: two zero bytes, a type byte (0x08 = unsigned byte, the only one we accept), the number of
// dimensions, then each dimension as a big-endian uint32, then the data in row-major order. A file must hold
// exactly the bytes its header promises: fewer or more is an error.
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnorm::train {

// Every problem with a data file: the message names the file and what is wrong, on one line.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct IdxArray {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> data;  // product(dims) bytes
};

// Parses the bytes of an (uncompressed) IDX file; `name` is used in error messages.
IdxArray parse_idx(std::span<const std::uint8_t> bytes, const std::string& name);

// Reads a .gz or plain IDX file.
IdxArray read_idx(const std::string& path);

// Images (n, 28, 28) and labels (n) in 0..9 of one split of Fashion-MNIST in `dir`
// (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...; the .gz may be absent).
struct Split {
  IdxArray images;
  IdxArray labels;
  std::int64_t size() const { return labels.dims.empty() ? 0 : labels.dims[0]; }
};
Split load_fashion_mnist(const std::string& dir, bool train);

inline constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";

}  // namespace bnorm::train
