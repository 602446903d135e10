// The safetensors file format: parsing (strict, fuzz-safe), serialization and atomic file writes.
//
// Layout of a file image:
//   bytes [0, 8)        N, the header length, an unsigned 64-bit little-endian integer
//   bytes [8, 8 + N)    the header: a UTF-8 JSON object {name: {dtype, shape, data_offsets}, ...}
//                       with an optional "__metadata__": {string: string}, padded with spaces
//   bytes [8 + N, end)  the data buffer; data_offsets are relative to its start
//
// The parser trusts nothing: every count is range-checked before it is used in arithmetic, every
// product and sum is overflow-checked, and every problem becomes a bnorm::Error naming the source.
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>

#include <fcntl.h>
#include <stdlib.h>  // mkstemp (POSIX, not in <cstdlib>'s std namespace)
#include <sys/stat.h>
#include <unistd.h>

namespace bnorm::detail {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, on read and on write.
constexpr std::uint64_t kMaxHeaderSize = 100'000'000;
// read_safetensors refuses larger files: the layer's state is tiny, and this bounds memory use.
constexpr std::uint64_t kMaxFileSize = std::uint64_t{1} << 30;
constexpr std::string_view kMetadataKey = "__metadata__";
// A valid header nests at most three deep: top object > entry object > shape array. Refusing
// anything deeper while parsing keeps hostile headers ("[[[[...") from building huge trees.
constexpr int kMaxJsonDepth = 3;

struct DtypeInfo {
  std::string_view name;
  std::size_t size;
};
constexpr std::array<DtypeInfo, 13> kDtypes{{{"BOOL", 1},
                                             {"U8", 1},
                                             {"I8", 1},
                                             {"U16", 2},
                                             {"I16", 2},
                                             {"F16", 2},
                                             {"BF16", 2},
                                             {"U32", 4},
                                             {"I32", 4},
                                             {"F32", 4},
                                             {"U64", 8},
                                             {"I64", 8},
                                             {"F64", 8}}};

std::string known_dtypes() {
  std::string out;
  for (const auto& d : kDtypes) {
    if (!out.empty()) out += ", ";
    out += d.name;
  }
  return out;
}

// A string from an untrusted file, made fit for an error message: quoted, non-printable bytes
// escaped, and cut short (a name may be megabytes long).
std::string printable(std::string_view s) {
  constexpr std::size_t kMaxShown = 200;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += static_cast<char>(c);  // UTF-8 continuation bytes pass through unchanged
    }
  }
  if (s.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

std::string shape_str(const std::vector<std::int64_t>& shape) {
  constexpr std::size_t kMaxShown = 16;
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size() && i < kMaxShown; ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() > kMaxShown) out += ", ... (" + std::to_string(shape.size()) + " dims)";
  return out + "]";
}

std::string offsets_str(std::uint64_t begin, std::uint64_t end) {
  // Appended piece by piece: "[" + std::to_string(...) trips GCC 12's false -Wrestrict (PR 105329).
  std::string out = "[";
  out += std::to_string(begin);
  out += ", ";
  out += std::to_string(end);
  out += "]";
  return out;
}

std::string errno_str(int err) { return std::generic_category().message(err); }

// Strict UTF-8 check (no overlong forms, no surrogates, nothing above U+10FFFF): JSON text must be
// valid UTF-8, so names and metadata that are not cannot be written.
bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1fu;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0fu;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return false;
    }
    if (s.size() - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3fu);
    }
    static constexpr std::uint32_t kMinForLen[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLen[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Parsing

// Throws for a problem in the file image named by `source`.
[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw Error("bnorm: safetensors file '" + source + "': " + what);
}

std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The value of a JSON number that must be a non-negative integer. nlohmann stores such numbers
// (up to 2^64 - 1) as number_unsigned; negatives are number_integer, and fractions, exponents and
// integers beyond 2^64 - 1 are number_float: all of those are refused here.
std::uint64_t as_count(const json& j, const std::string& source, const std::string& what) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer()) fail(source, what + " is " + j.dump() + ", expected a non-negative integer");
  if (j.is_number_float()) {
    fail(source, what + " is " + j.dump() +
                     ", expected a non-negative integer (fractions, exponents and values above "
                     "2^64 - 1 are not integers here)");
  }
  fail(source, what + " is a JSON " + std::string(j.type_name()) + ", expected a non-negative integer");
}

// One validated header entry, before its bytes are copied out.
struct Entry {
  const std::string* name;  // the key in the parsed header
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin;
  std::uint64_t end;
};

Entry parse_entry(const std::string& name, const json& value, std::uint64_t data_size,
                  const std::string& source) {
  if (name.empty()) fail(source, "a tensor name is empty");
  const std::string where = "tensor " + printable(name) + ": ";
  if (!value.is_object()) {
    fail(source, where + "the entry is a JSON " + std::string(value.type_name()) +
                     ", expected an object {\"dtype\", \"shape\", \"data_offsets\"}");
  }
  for (const auto& item : value.items()) {
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets") {
      fail(source, where + "unexpected key " + printable(item.key()) +
                       " (expected exactly \"dtype\", \"shape\" and \"data_offsets\")");
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(key)) fail(source, where + "missing key \"" + key + "\"");
  }

  Entry e{&name, {}, {}, 0, 0};

  const json& dtype = value["dtype"];
  if (!dtype.is_string()) fail(source, where + "dtype is a JSON " + std::string(dtype.type_name()) + ", expected a string");
  e.dtype = dtype.get<std::string>();
  const std::size_t elem_size = safetensors_dtype_size(e.dtype);
  if (elem_size == 0) fail(source, where + "dtype " + printable(e.dtype) + " is unknown (expected one of " + known_dtypes() + ")");

  const json& shape = value["shape"];
  if (!shape.is_array()) fail(source, where + "shape is a JSON " + std::string(shape.type_name()) + ", expected an array");
  e.shape.reserve(shape.size());
  // The product of the non-zero dims must fit int64 even when another dim is zero, so that any
  // partial product a consumer computes later is safe too.
  std::int64_t nonzero_product = 1;
  bool has_zero = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::string what = where + "shape[" + std::to_string(i) + "]";
    const std::uint64_t d = as_count(shape[i], source, what);
    if (d > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail(source, what + " = " + std::to_string(d) + " exceeds the limit " +
                       std::to_string(std::numeric_limits<std::int64_t>::max()));
    }
    const auto dim = static_cast<std::int64_t>(d);
    e.shape.push_back(dim);
    if (dim == 0) {
      has_zero = true;
    } else if (__builtin_mul_overflow(nonzero_product, dim, &nonzero_product)) {
      fail(source, where + "the element count of shape " + shape_str(e.shape) + "... overflows int64");
    }
  }
  const auto numel = static_cast<std::uint64_t>(has_zero ? 0 : nonzero_product);
  std::uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(elem_size), &nbytes)) {
    fail(source, where + "shape " + shape_str(e.shape) + " of dtype " + e.dtype + " needs more than 2^64 bytes");
  }

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    fail(source, where + "data_offsets is " + (offsets.is_array() ? "an array of " + std::to_string(offsets.size()) + " elements"
                                                                  : "a JSON " + std::string(offsets.type_name())) +
                     ", expected [begin, end]");
  }
  e.begin = as_count(offsets[0], source, where + "data_offsets[0]");
  e.end = as_count(offsets[1], source, where + "data_offsets[1]");
  if (e.begin > e.end) fail(source, where + "data_offsets " + offsets_str(e.begin, e.end) + ": begin exceeds end");
  if (e.end > data_size) {
    fail(source, where + "data_offsets " + offsets_str(e.begin, e.end) + ": end " + std::to_string(e.end) +
                     " exceeds the data size " + std::to_string(data_size) + " (is the file truncated?)");
  }
  if (e.end - e.begin != nbytes) {
    fail(source, where + "data_offsets " + offsets_str(e.begin, e.end) + " span " + std::to_string(e.end - e.begin) +
                     " bytes, but shape " + shape_str(e.shape) + " of dtype " + e.dtype + " needs " +
                     std::to_string(nbytes) + " bytes");
  }
  return e;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& source) {
  if (!value.is_object()) {
    fail(source, "\"__metadata__\" is a JSON " + std::string(value.type_name()) + ", expected an object of strings");
  }
  std::map<std::string, std::string> out;
  for (const auto& item : value.items()) {
    if (!item.value().is_string()) {
      fail(source, "\"__metadata__\" value of key " + printable(item.key()) + " is a JSON " +
                       std::string(item.value().type_name()) + ", expected a string");
    }
    out.emplace(item.key(), item.value().get<std::string>());
  }
  return out;
}

// Parses the header text into a JSON object. nlohmann validates UTF-8 inside strings (and any
// byte >= 0x80 outside a string is a syntax error), rejects control characters in strings and
// unpaired surrogate escapes. Its callback also lets us refuse duplicate keys (nlohmann would
// silently keep the last one) and excessive nesting as soon as they are seen.
json parse_header_json(std::string_view text, const std::string& source) {
  std::vector<std::set<std::string>> keys_per_object;  // one set per open object
  const json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) {
          fail(source, "the header nests JSON containers " + std::to_string(depth + 1) +
                           " deep; a valid header nests at most " + std::to_string(kMaxJsonDepth));
        }
        if (event == json::parse_event_t::object_start) keys_per_object.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys_per_object.empty()) keys_per_object.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys_per_object.empty() && parsed.is_string() &&
            !keys_per_object.back().insert(parsed.get<std::string>()).second) {
          fail(source, "the header has the key " + printable(parsed.get<std::string>()) + " twice in one object");
        }
        break;
      default:
        break;
    }
    return true;
  };
  // nlohmann's lexer takes a raw NUL outside a string for the end of the input, so "{}\0junk"
  // would pass; JSON never allows a raw NUL (inside strings it must be escaped), so refuse it.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) {
    fail(source, "the header is not valid JSON: a NUL byte at header offset " + std::to_string(nul));
  }
  try {
    return json::parse(text.begin(), text.end(), check, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    fail(source, "the header is not valid JSON: " + std::string(e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// Files

// Closes a file descriptor on scope exit unless released.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now and reports close()'s result; the descriptor is gone either way (Linux semantics,
  // so no retry on EINTR).
  int close() {
    const int r = ::close(fd_);
    fd_ = -1;
    return r;
  }

 private:
  int fd_;
};

std::vector<unsigned char> read_whole_file(const std::string& path) {
  const auto io_fail = [&](const std::string& step, int err) -> void {
    throw Error("bnorm: cannot read safetensors file '" + path + "': " + step + ": " + errno_str(err));
  };
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) io_fail("open failed", errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) io_fail("fstat failed", errno);
  if (!S_ISREG(st.st_mode)) throw Error("bnorm: cannot read safetensors file '" + path + "': not a regular file");
  const auto too_big = [&](std::uint64_t size) {
    throw Error("bnorm: cannot read safetensors file '" + path + "': its size " + std::to_string(size) +
                " bytes exceeds the limit of 1 GiB (" + std::to_string(kMaxFileSize) + " bytes)");
  };
  if (st.st_size < 0) io_fail("fstat gave a negative size", EIO);
  if (static_cast<std::uint64_t>(st.st_size) > kMaxFileSize) too_big(static_cast<std::uint64_t>(st.st_size));

  // Read until EOF rather than trusting st_size: the file may change under us. One byte of slack
  // lets a single read() both fill the buffer and see EOF.
  std::vector<unsigned char> buf(static_cast<std::size_t>(st.st_size) + 1);
  std::size_t filled = 0;
  for (;;) {
    if (filled == buf.size()) {
      if (filled > kMaxFileSize) too_big(filled);
      buf.resize(std::min<std::size_t>(buf.size() * 2, kMaxFileSize + 1));
    }
    const ssize_t n = ::read(fd.get(), buf.data() + filled, buf.size() - filled);
    if (n < 0) {
      if (errno == EINTR) continue;
      io_fail("read failed", errno);
    }
    if (n == 0) break;
    filled += static_cast<std::size_t>(n);
  }
  if (filled > kMaxFileSize) too_big(filled);
  buf.resize(filled);
  return buf;
}

// The process umask, read without changing it (umask(2) can only read by setting, which races
// with other threads creating files). Falls back to the common 022.
mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0) {
      try {
        return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8) & 0777);
      } catch (const std::exception&) {
        break;
      }
    }
  }
  return 022;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public (internal) API

Checked<std::vector<double>> float_values(const SafeTensor& t) {
  if (t.dtype != "F32" && t.dtype != "F64") return Problem("expected dtype F32 or F64, got " + t.dtype, ErrorKind::Type);
  const std::size_t size = safetensors_dtype_size(t.dtype);
  std::vector<double> out(t.bytes.size() / size);
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (size == 4) {
      float v;
      std::memcpy(&v, t.bytes.data() + 4 * i, 4);
      out[i] = v;
    } else {
      std::memcpy(&out[i], t.bytes.data() + 8 * i, 8);
    }
  }
  return out;
}

std::size_t safetensors_dtype_size(const std::string& dtype) {
  for (const auto& d : kDtypes) {
    if (d.name == dtype) return d.size;
  }
  return 0;
}

SafeTensorsFile parse_safetensors(std::span<const unsigned char> image, const std::string& source) {
  if (image.size() < 8) {
    fail(source, "the file is " + std::to_string(image.size()) +
                     " bytes, shorter than the 8-byte header length (empty or truncated file)");
  }
  const std::uint64_t header_len = read_u64_le(image.data());
  if (header_len > kMaxHeaderSize) {
    fail(source, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                     std::to_string(kMaxHeaderSize) + " bytes");
  }
  // Subtract rather than add, so that no sum can overflow.
  const std::uint64_t after_len = image.size() - 8;
  if (header_len > after_len) {
    fail(source, "header length " + std::to_string(header_len) + " exceeds the file size " +
                     std::to_string(image.size()) + " minus 8 (is the file truncated?)");
  }
  const std::uint64_t data_size = after_len - header_len;
  const auto* header_begin = reinterpret_cast<const char*>(image.data() + 8);
  const std::string_view header_text(header_begin, static_cast<std::size_t>(header_len));
  const std::span<const unsigned char> data = image.subspan(8 + static_cast<std::size_t>(header_len));

  const json header = parse_header_json(header_text, source);
  if (!header.is_object()) fail(source, "the header is a JSON " + std::string(header.type_name()) + ", expected an object");

  SafeTensorsFile out;
  std::vector<Entry> entries;
  entries.reserve(header.size());
  // Entries point at the names stored in `header`, which outlives them.
  for (const auto& [name, value] : header.get_ref<const json::object_t&>()) {
    if (name == kMetadataKey) {
      out.metadata = parse_metadata(value, source);
    } else {
      entries.push_back(parse_entry(name, value, data_size, source));
    }
  }

  // The tensors must tile the data buffer exactly, as the reference implementation requires: in
  // offset order each one starts where the previous ended, and the last ends at the buffer's end.
  // Zero-size tensors sort before a tensor starting at the same offset and tile trivially.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, *a.name) < std::tie(b.begin, b.end, *b.name);
  });
  std::uint64_t cursor = 0;
  const Entry* previous = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < cursor) {
      fail(source, "tensor " + printable(*e.name) + " (data_offsets " + offsets_str(e.begin, e.end) +
                       ") overlaps tensor " + printable(*previous->name) + " (data_offsets " +
                       offsets_str(previous->begin, previous->end) + ")");
    }
    if (e.begin > cursor) {
      fail(source, "the data bytes [" + std::to_string(cursor) + ", " + std::to_string(e.begin) +
                       ") belong to no tensor (a hole before tensor " + printable(*e.name) + ")");
    }
    cursor = e.end;
    previous = &e;
  }
  if (cursor != data_size) {
    fail(source, "the data bytes [" + std::to_string(cursor) + ", " + std::to_string(data_size) +
                     ") at the end of the data buffer belong to no tensor");
  }

  for (Entry& e : entries) {
    SafeTensor t;
    t.dtype = std::move(e.dtype);
    t.shape = std::move(e.shape);
    const auto first = data.begin() + static_cast<std::ptrdiff_t>(e.begin);
    t.bytes.assign(first, first + static_cast<std::ptrdiff_t>(e.end - e.begin));
    out.tensors.emplace(*e.name, std::move(t));
  }
  return out;
}

SafeTensorsFile read_safetensors(const std::string& path) {
  const std::vector<unsigned char> image = read_whole_file(path);
  return parse_safetensors(image, path);
}

std::vector<unsigned char> serialize_safetensors(const SafeTensorsFile& file) {
  const auto bad = [](const std::string& what) -> void { throw Error("bnorm: serialize_safetensors: " + what); };

  // ordered_json keeps insertion order, which gives the reference layout: "__metadata__" first,
  // then the tensors, each entry as {"dtype", "shape", "data_offsets"} in that order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!file.metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : file.metadata) {
      if (!valid_utf8(key)) bad("metadata key " + printable(key) + " is not valid UTF-8");
      if (!valid_utf8(value)) bad("metadata value of key " + printable(key) + " is not valid UTF-8");
      meta[key] = value;
    }
    header[std::string(kMetadataKey)] = std::move(meta);
  }

  std::uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {  // std::map: name order
    if (name.empty()) bad("a tensor name is empty");
    if (name == kMetadataKey) bad("a tensor cannot be named \"__metadata__\"");
    if (!valid_utf8(name)) bad("tensor name " + printable(name) + " is not valid UTF-8");
    const std::string where = "tensor " + printable(name) + ": ";
    const std::size_t elem_size = safetensors_dtype_size(t.dtype);
    if (elem_size == 0) bad(where + "dtype " + printable(t.dtype) + " is unknown (expected one of " + known_dtypes() + ")");
    std::int64_t nonzero_product = 1;
    bool has_zero = false;
    for (const std::int64_t d : t.shape) {
      if (d < 0) bad(where + "shape " + shape_str(t.shape) + " has a negative dim");
      if (d == 0) {
        has_zero = true;
      } else if (__builtin_mul_overflow(nonzero_product, d, &nonzero_product)) {
        bad(where + "the element count of shape " + shape_str(t.shape) + " overflows int64");
      }
    }
    const auto numel = static_cast<std::uint64_t>(has_zero ? 0 : nonzero_product);
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(elem_size), &nbytes) || nbytes != t.bytes.size()) {
      bad(where + "has " + std::to_string(t.bytes.size()) + " bytes, but shape " + shape_str(t.shape) + " of dtype " +
          t.dtype + " needs " + std::to_string(numel) + " x " + std::to_string(elem_size) + " bytes");
    }
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = t.dtype;
    entry["shape"] = t.shape;
    entry["data_offsets"] = nlohmann::ordered_json::array({offset, offset + nbytes});
    header[name] = std::move(entry);
    offset += nbytes;  // cannot overflow: the sum of the sizes of objects in memory
  }

  std::string text = header.dump();  // compact, like serde_json; cannot throw: all UTF-8 checked
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderSize) {
    bad("the header would be " + std::to_string(text.size()) + " bytes, above the limit of " +
        std::to_string(kMaxHeaderSize) + " bytes that readers accept");
  }

  std::vector<unsigned char> out;
  out.reserve(8 + text.size() + static_cast<std::size_t>(offset));
  const std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>((n >> (8 * i)) & 0xff));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& [name, t] : file.tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void write_file_atomic(const std::string& path, std::span<const unsigned char> bytes) {
  if (path.empty()) throw Error("bnorm: cannot write a file: the path is empty");
  const auto io_error = [&](const std::string& step, int err) {
    return Error("bnorm: cannot write '" + path + "': " + step + ": " + errno_str(err));
  };

  std::string tmp = path + ".tmp.XXXXXX";  // mkstemp replaces the X's in place
  Fd fd(::mkstemp(tmp.data()));
  if (fd.get() < 0) throw io_error("cannot create a temporary file '" + tmp + "'", errno);

  // Every failure from here on removes the temporary file; `path` is only touched by rename(2),
  // which replaces it atomically or not at all.
  const auto fail_and_unlink = [&](const std::string& step, int err) {
    if (fd.get() >= 0) fd.close();
    ::unlink(tmp.c_str());
    throw io_error(step + " (temporary file '" + tmp + "')", err);
  };

  // mkstemp creates the file 0600; give it the mode of the file it replaces, or the mode a plain
  // open(O_CREAT, 0666) would have given under the process umask.
  struct stat old {};
  const mode_t mode = ::stat(path.c_str(), &old) == 0 ? (old.st_mode & 07777) : (0666 & ~current_umask());
  if (::fchmod(fd.get(), mode) != 0) fail_and_unlink("fchmod failed", errno);

  const unsigned char* p = bytes.data();
  std::size_t left = bytes.size();
  constexpr std::size_t kMaxChunk = std::size_t{1} << 30;  // Linux writes at most ~2 GiB per call
  while (left > 0) {
    const ssize_t n = ::write(fd.get(), p, std::min(left, kMaxChunk));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_and_unlink("write failed", errno);
    }
    if (n == 0) fail_and_unlink("write made no progress", EIO);
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) fail_and_unlink("fsync failed", errno);
  if (fd.close() != 0) fail_and_unlink("close failed", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail_and_unlink("rename over the target failed", errno);

  // Make the rename itself durable. The new file is complete and in place by now, so only a real
  // I/O error is reported; a folder that cannot be opened for reading, or a file system that
  // does not support fsync on folders, leaves nothing to do.
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0 && ::fsync(dir_fd.get()) != 0 && errno == EIO) {
    throw io_error("the file was replaced, but fsync of its folder '" + dir.string() + "' failed", EIO);
  }
}

}  // namespace bnorm::detail
