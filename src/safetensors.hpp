// Internal: the safetensors file format (https-less summary: 8-byte little-endian header length,
// a JSON header mapping names to {dtype, shape, data_offsets}, optional "__metadata__" of string
// pairs, then the raw little-endian tensor bytes). Used by the layer's save/load and by the tests'
// PyTorch fixtures. Every parse error throws bnorm::Error naming the source and the problem.
#pragma once

#include <bnorm/types.hpp>

#include "validate.hpp"

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace bnorm::detail {

struct SafeTensor {
  std::string dtype;                // "F32", "F64", "I64", ... as in the format
  std::vector<std::int64_t> shape;  // {} is a scalar
  std::vector<unsigned char> bytes; // raw little-endian data, size == numel * element size
};

struct SafeTensorsFile {
  std::map<std::string, SafeTensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Size in bytes of one element of a safetensors dtype string; 0 when unknown.
std::size_t safetensors_dtype_size(const std::string& dtype);

// The values of a floating-point tensor (F32 or F64) as doubles (exact for both); any other dtype is
// a problem "expected dtype F32 or F64, got <dtype>".
Checked<std::vector<double>> float_values(const SafeTensor& t);

// Parses a whole file image. `source` names it in error messages (a path, or "buffer").
SafeTensorsFile parse_safetensors(std::span<const unsigned char> image, const std::string& source);
SafeTensorsFile read_safetensors(const std::string& path);

// The file image: header padded with spaces to a multiple of 8 bytes, tensors in name order.
std::vector<unsigned char> serialize_safetensors(const SafeTensorsFile& file);

// Writes bytes to path atomically: a temporary file in the same folder, written, flushed and
// fsync'ed, then renamed over path (and the folder fsync'ed). On any failure the temporary file is
// removed, path is untouched, and bnorm::Error is thrown.
void write_file_atomic(const std::string& path, std::span<const unsigned char> bytes);

}  // namespace bnorm::detail
