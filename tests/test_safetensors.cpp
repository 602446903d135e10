// Tests of the internal safetensors module: round trips, the exact byte layout of the format,
// strict validation of hostile input, and atomic file replacement.
#include "safetensors.hpp"

#include <gtest/gtest.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using bnorm::detail::parse_safetensors;
using bnorm::detail::read_safetensors;
using bnorm::detail::safetensors_dtype_size;
using bnorm::detail::SafeTensor;
using bnorm::detail::SafeTensorsFile;
using bnorm::detail::serialize_safetensors;
using bnorm::detail::write_file_atomic;

namespace {

using Bytes = std::vector<unsigned char>;

Bytes u64_le(std::uint64_t v) {
  Bytes out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<unsigned char>(v >> (8 * i));
  return out;
}

// A file image from a header text (not padded) and a data buffer.
Bytes image_of(const std::string& header, const Bytes& data) {
  // Sized up front: growing the 8-byte vector by insert() trips GCC 12's false -Warray-bounds at -O3.
  Bytes out;
  out.reserve(8 + header.size() + data.size());
  const Bytes len = u64_le(header.size());
  out.insert(out.end(), len.begin(), len.end());
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// A file image whose data buffer is `data_size` bytes counting up from 0.
Bytes image_of(const std::string& header, std::size_t data_size) {
  Bytes data(data_size);
  for (std::size_t i = 0; i < data_size; ++i) data[i] = static_cast<unsigned char>(i);
  return image_of(header, data);
}

Bytes bytes_of(const std::string& s) { return Bytes(s.begin(), s.end()); }

SafeTensor tensor(std::string dtype, std::vector<std::int64_t> shape, Bytes bytes) {
  return SafeTensor{std::move(dtype), std::move(shape), std::move(bytes)};
}

// Deterministic bytes for a tensor of `n` bytes.
Bytes pattern(std::size_t n, unsigned seed) {
  Bytes out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<unsigned char>((i * 31 + seed * 7 + 1) & 0xff);
  return out;
}

void expect_same(const SafeTensorsFile& a, const SafeTensorsFile& b) {
  EXPECT_EQ(a.metadata, b.metadata);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    const auto it = b.tensors.find(name);
    ASSERT_NE(it, b.tensors.end()) << "missing tensor " << name;
    EXPECT_EQ(t.dtype, it->second.dtype) << name;
    EXPECT_EQ(t.shape, it->second.shape) << name;
    EXPECT_EQ(t.bytes, it->second.bytes) << name;
  }
}

// Parses `image` expecting bnorm::Error whose message contains `needle`.
void expect_parse_error(const Bytes& image, const std::string& needle) {
  try {
    (void)parse_safetensors(image, "test.st");
    ADD_FAILURE() << "no error; expected one containing \"" << needle << "\"";
  } catch (const bnorm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(needle), std::string::npos) << "message: " << msg << "\nexpected to contain: " << needle;
    EXPECT_NE(msg.find("'test.st'"), std::string::npos) << "message does not name the source: " << msg;
  }
}

void expect_serialize_error(const SafeTensorsFile& file, const std::string& needle) {
  try {
    (void)serialize_safetensors(file);
    ADD_FAILURE() << "no error; expected one containing \"" << needle << "\"";
  } catch (const bnorm::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// A valid file with several tensors, for mutation tests.
SafeTensorsFile sample_file() {
  SafeTensorsFile f;
  f.tensors["weight"] = tensor("F32", {3}, pattern(12, 1));
  f.tensors["bias"] = tensor("F32", {3}, pattern(12, 2));
  f.tensors["num_batches_tracked"] = tensor("I64", {}, pattern(8, 3));
  f.tensors["running_var"] = tensor("F64", {3}, pattern(24, 4));
  f.tensors["empty"] = tensor("U8", {0}, {});
  f.metadata["format"] = "pt";
  return f;
}

Bytes read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_plain(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A fresh temporary folder per test, removed afterwards.
class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::random_device rd;
    dir_ = fs::temp_directory_path() /
           ("bnorm_st_" + std::string(info->name()) + "_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  // Names of the entries in the folder.
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
  fs::path dir_;
};

}  // namespace

// --- Round trips and layout --------------------------------------------------------------------

TEST(Safetensors, DtypeSizes) {
  EXPECT_EQ(safetensors_dtype_size("BOOL"), 1u);
  EXPECT_EQ(safetensors_dtype_size("U8"), 1u);
  EXPECT_EQ(safetensors_dtype_size("I8"), 1u);
  EXPECT_EQ(safetensors_dtype_size("U16"), 2u);
  EXPECT_EQ(safetensors_dtype_size("I16"), 2u);
  EXPECT_EQ(safetensors_dtype_size("F16"), 2u);
  EXPECT_EQ(safetensors_dtype_size("BF16"), 2u);
  EXPECT_EQ(safetensors_dtype_size("U32"), 4u);
  EXPECT_EQ(safetensors_dtype_size("I32"), 4u);
  EXPECT_EQ(safetensors_dtype_size("F32"), 4u);
  EXPECT_EQ(safetensors_dtype_size("U64"), 8u);
  EXPECT_EQ(safetensors_dtype_size("I64"), 8u);
  EXPECT_EQ(safetensors_dtype_size("F64"), 8u);
  EXPECT_EQ(safetensors_dtype_size("f32"), 0u);
  EXPECT_EQ(safetensors_dtype_size(""), 0u);
  EXPECT_EQ(safetensors_dtype_size("F8_E4M3"), 0u);
}

TEST(Safetensors, RoundTripManyDtypesAndShapes) {
  SafeTensorsFile f;
  f.tensors["a.f32"] = tensor("F32", {2, 3}, pattern(24, 1));
  f.tensors["b.f64"] = tensor("F64", {4}, pattern(32, 2));
  f.tensors["c.i64.scalar"] = tensor("I64", {}, pattern(8, 3));
  f.tensors["d.u8.empty"] = tensor("U8", {0}, {});
  f.tensors["e.bf16.empty"] = tensor("BF16", {2, 0, 3}, {});
  f.tensors["f.bool"] = tensor("BOOL", {3}, {1, 0, 1});
  f.tensors["g.f16"] = tensor("F16", {1, 1, 5}, pattern(10, 4));
  f.tensors["h.i32"] = tensor("I32", {2, 1, 1, 1, 1, 1, 1, 1, 1, 2}, pattern(16, 5));
  f.tensors["i.u16"] = tensor("U16", {3}, pattern(6, 6));
  f.tensors["j.i8"] = tensor("I8", {7}, pattern(7, 7));
  f.tensors["k.u32"] = tensor("U32", {1}, pattern(4, 8));
  f.tensors["l.u64"] = tensor("U64", {2}, pattern(16, 9));
  f.tensors["m.i16"] = tensor("I16", {}, pattern(2, 10));
  f.tensors["odd name \"quoted\"\n\xc3\xa9"] = tensor("F32", {1}, pattern(4, 11));
  const Bytes image = serialize_safetensors(f);
  expect_same(f, parse_safetensors(image, "buffer"));
  // Serializing again is byte-identical (deterministic output).
  EXPECT_EQ(serialize_safetensors(parse_safetensors(image, "buffer")), image);
}

TEST(Safetensors, RoundTripMetadata) {
  SafeTensorsFile f;
  f.tensors["w"] = tensor("F32", {2}, pattern(8, 1));
  f.metadata["format"] = "pt";
  f.metadata["bnorm.eps"] = "1e-05";
  f.metadata["empty"] = "";
  f.metadata["unicode \xe2\x9c\x93"] = "line1\nline2\t\"q\"\\";
  expect_same(f, parse_safetensors(serialize_safetensors(f), "buffer"));
}

TEST(Safetensors, EmptyMetadataIsNotEmitted) {
  SafeTensorsFile f;
  f.tensors["w"] = tensor("F32", {1}, pattern(4, 1));
  const Bytes image = serialize_safetensors(f);
  const std::string text(image.begin(), image.end());
  EXPECT_EQ(text.find("__metadata__"), std::string::npos);
}

TEST(Safetensors, EmptyFileRoundTrip) {
  const SafeTensorsFile f;
  const Bytes image = serialize_safetensors(f);
  EXPECT_EQ(image, image_of("{}      ", 0));  // "{}" padded to 8 bytes
  expect_same(f, parse_safetensors(image, "buffer"));
}

TEST(Safetensors, HeaderIsPaddedWithSpacesToAMultipleOf8) {
  // Names of every length mod 8 exercise every amount of padding.
  for (std::size_t len = 1; len <= 16; ++len) {
    SafeTensorsFile f;
    f.tensors[std::string(len, 'x')] = tensor("F64", {1}, pattern(8, static_cast<unsigned>(len)));
    const Bytes image = serialize_safetensors(f);
    ASSERT_GE(image.size(), 8u);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | image[static_cast<std::size_t>(i)];
    EXPECT_EQ(n % 8, 0u) << "name length " << len;
    EXPECT_EQ((8 + n) % 8, 0u);  // so the data buffer starts 8-aligned in the file
    ASSERT_EQ(image.size(), 8 + n + 8);
    const std::string header(image.begin() + 8, image.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    const std::size_t close = header.find_last_of('}');
    ASSERT_NE(close, std::string::npos);
    EXPECT_LT(header.size() - close - 1, 8u);
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos) << "padding is not spaces";
    EXPECT_EQ(Bytes(image.end() - 8, image.end()), f.tensors.begin()->second.bytes);
  }
}

// The bytes Python's `safetensors.torch.save_file({"a": tensor([1., 2.]), "b": tensor(3.)},
// metadata={"format": "pt"})` writes: serde_json's compact JSON with "__metadata__" first, entry
// keys in the order dtype, shape, data_offsets, padded with spaces to a multiple of 8, followed by
// the little-endian data. Spelled out here by hand.
TEST(Safetensors, ByteExactAgainstTheReferenceFormat) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[8,12]}})";
  ASSERT_EQ(header.size(), 138u);
  const std::string padded = header + "      ";  // 6 spaces: 144 = 18 * 8
  Bytes expected = {144, 0, 0, 0, 0, 0, 0, 0};
  expected.insert(expected.end(), padded.begin(), padded.end());
  const Bytes data = {0x00, 0x00, 0x80, 0x3f,   // 1.0f
                      0x00, 0x00, 0x00, 0x40,   // 2.0f
                      0x00, 0x00, 0x40, 0x40};  // 3.0f
  expected.insert(expected.end(), data.begin(), data.end());

  SafeTensorsFile f;
  f.tensors["a"] = tensor("F32", {2}, {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40});
  f.tensors["b"] = tensor("F32", {}, {0x00, 0x00, 0x40, 0x40});
  f.metadata["format"] = "pt";
  EXPECT_EQ(serialize_safetensors(f), expected);
  expect_same(f, parse_safetensors(expected, "buffer"));
}

TEST(Safetensors, ParsesHeadersWrittenByOthers) {
  // Whitespace, key order, unpadded headers and escapes are all fine on read.
  const std::string header =
      " {\n \"b\" : {\"shape\": [4], \"data_offsets\": [4, 8], \"dtype\": \"U8\"},\n"
      "  \"\\u0061\": {\"data_offsets\": [0, 4], \"dtype\": \"I32\", \"shape\": []} }";
  const auto f = parse_safetensors(image_of(header, 8), "buffer");
  ASSERT_EQ(f.tensors.size(), 2u);
  EXPECT_EQ(f.tensors.at("a").dtype, "I32");
  EXPECT_EQ(f.tensors.at("a").bytes, (Bytes{0, 1, 2, 3}));
  EXPECT_EQ(f.tensors.at("b").shape, (std::vector<std::int64_t>{4}));
}

TEST(Safetensors, ZeroSizeTensorsAnywhere) {
  // Zero-size tensors may sit at any offset, including the end and next to each other.
  const std::string header =
      R"({"z0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
      R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
      R"("z1":{"dtype":"F64","shape":[3,0],"data_offsets":[4,4]},)"
      R"("z2":{"dtype":"F64","shape":[0],"data_offsets":[4,4]}})";
  const auto f = parse_safetensors(image_of(header, 4), "buffer");
  EXPECT_EQ(f.tensors.size(), 4u);
  EXPECT_TRUE(f.tensors.at("z1").bytes.empty());
}

TEST(Safetensors, ZeroDimDoesNotHideAnOverflowingShape) {
  expect_parse_error(
      image_of(R"({"z":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", 0),
      "overflows int64");
}

// --- Parse errors ------------------------------------------------------------------------------

TEST(SafetensorsErrors, EmptyFile) { expect_parse_error({}, "shorter than the 8-byte header length"); }

TEST(SafetensorsErrors, TruncatedHeaderLength) {
  expect_parse_error({2, 0, 0, 0, 0}, "the file is 5 bytes, shorter than the 8-byte header length");
}

TEST(SafetensorsErrors, HeaderLengthLargerThanFile) {
  Bytes image = image_of("{}", 0);
  image[0] = 200;
  expect_parse_error(image, "header length 200 exceeds the file size 10");
}

TEST(SafetensorsErrors, OversizedHeaderClaim) {
  expect_parse_error(image_of("", 0), "not valid JSON");  // sanity: 0-length header
  for (const std::uint64_t claim : {std::uint64_t{100'000'001}, std::uint64_t{1} << 40, ~std::uint64_t{0}}) {
    Bytes image = u64_le(claim);
    image.push_back('{');
    expect_parse_error(image, "header length " + std::to_string(claim) + " exceeds the limit of 100000000 bytes");
  }
}

TEST(SafetensorsErrors, TruncatedFile) {
  const Bytes full = serialize_safetensors(sample_file());
  Bytes cut(full.begin(), full.end() - 3);
  expect_parse_error(cut, "exceeds the data size");
  // Every proper prefix is refused, and with bnorm::Error only.
  for (std::size_t n = 0; n < full.size(); ++n) {
    EXPECT_THROW((void)parse_safetensors(std::span(full.data(), n), "test.st"), bnorm::Error) << "prefix " << n;
  }
}

TEST(SafetensorsErrors, NonJsonHeader) {
  expect_parse_error(image_of("hello, world", 0), "not valid JSON");
  expect_parse_error(image_of(R"({"a":{"dtype":"F32")", 0), "not valid JSON");
  expect_parse_error(image_of("{} {}", 0), "not valid JSON");
  // nlohmann alone would stop at a NUL and accept these.
  expect_parse_error(image_of(std::string("{}\0\0", 4), 0), "a NUL byte at header offset 2");
  expect_parse_error(image_of(std::string("{}\0junk", 7), 0), "a NUL byte at header offset 2");
}

TEST(SafetensorsErrors, JsonNotAnObject) {
  expect_parse_error(image_of("[1, 2]", 0), "the header is a JSON array, expected an object");
  expect_parse_error(image_of("\"x\"", 0), "the header is a JSON string, expected an object");
  expect_parse_error(image_of("null", 0), "the header is a JSON null, expected an object");
}

TEST(SafetensorsErrors, HeaderNotUtf8) {
  expect_parse_error(image_of("{\"\xff\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}", 1),
                     "not valid JSON");
  expect_parse_error(image_of("{\"\xc0\xaf\":1}", 0), "not valid JSON");       // overlong '/'
  expect_parse_error(image_of("{\"\\ud800\":1}", 0), "not valid JSON");       // lone surrogate
}

TEST(SafetensorsErrors, DuplicateKeys) {
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                              R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                              1),
                     "the key 'a' twice");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
                     "the key 'dtype' twice");
}

TEST(SafetensorsErrors, DeepNesting) {
  expect_parse_error(image_of(std::string(100000, '[') + std::string(100000, ']'), 0), "nests JSON containers");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", 1),
                     "nests JSON containers 4 deep");
}

TEST(SafetensorsErrors, EntryShape) {
  expect_parse_error(image_of(R"({"a":[1,2]})", 0), "tensor 'a': the entry is a JSON array");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[1]}})", 1), "tensor 'a': missing key \"data_offsets\"");
  expect_parse_error(image_of(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", 1), "missing key \"dtype\"");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", 1), "missing key \"shape\"");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":0}})", 1),
                     "unexpected key 'extra'");
  expect_parse_error(image_of(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1), "a tensor name is empty");
}

TEST(SafetensorsErrors, UnknownDtype) {
  expect_parse_error(image_of(R"({"a":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", 1),
                     "tensor 'a': dtype 'F8' is unknown (expected one of BOOL, U8,");
  expect_parse_error(image_of(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4), "dtype 'f32' is unknown");
  expect_parse_error(image_of(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4),
                     "dtype is a JSON number, expected a string");
}

TEST(SafetensorsErrors, BadShapeEntries) {
  const auto with_shape = [](const std::string& shape) {
    return image_of(R"({"a":{"dtype":"U8","shape":)" + shape + R"(,"data_offsets":[0,2]}})", 2);
  };
  expect_parse_error(with_shape("[-2]"), "shape[0] is -2, expected a non-negative integer");
  expect_parse_error(with_shape("[1,-1]"), "shape[1] is -1");
  expect_parse_error(with_shape("[2.0]"), "shape[0] is 2.0, expected a non-negative integer");
  expect_parse_error(with_shape("[2e0]"), "shape[0] is 2.0");
  expect_parse_error(with_shape("[1.5]"), "shape[0] is 1.5");
  expect_parse_error(with_shape("[\"2\"]"), "shape[0] is a JSON string");
  expect_parse_error(with_shape("[true]"), "shape[0] is a JSON boolean");
  expect_parse_error(with_shape("2"), "shape is a JSON number, expected an array");
  expect_parse_error(with_shape("[18446744073709551616]"), "shape[0] is ");  // > 2^64 - 1: a float
  expect_parse_error(with_shape("[9223372036854775808]"), "shape[0] = 9223372036854775808 exceeds the limit");
  expect_parse_error(with_shape("[4294967296,4294967296]"), "overflows int64");
  // Fits int64 elements, but not 2^64 bytes once multiplied by the element size.
  expect_parse_error(image_of(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,2]}})", 2),
                     "needs more than 2^64 bytes");
}

TEST(SafetensorsErrors, BadOffsets) {
  const auto with_offsets = [](const std::string& offsets, std::size_t data) {
    return image_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":)" + offsets + "}}", data);
  };
  expect_parse_error(with_offsets("[0,2,4]", 2), "data_offsets is an array of 3 elements, expected [begin, end]");
  expect_parse_error(with_offsets("[0]", 2), "data_offsets is an array of 1 elements");
  expect_parse_error(with_offsets("{}", 2), "data_offsets is a JSON object");
  expect_parse_error(with_offsets("[-1,1]", 2), "data_offsets[0] is -1");
  expect_parse_error(with_offsets("[0,2.5]", 2), "data_offsets[1] is 2.5");
  expect_parse_error(with_offsets("[2,0]", 2), "data_offsets [2, 0]: begin exceeds end");
  expect_parse_error(with_offsets("[0,2]", 1), "data_offsets [0, 2]: end 2 exceeds the data size 1");
  expect_parse_error(with_offsets("[18446744073709551614,18446744073709551615]", 2), "exceeds the data size 2");
  expect_parse_error(with_offsets("[0,18446744073709551616]", 2), "data_offsets[1] is ");
}

TEST(SafetensorsErrors, SizeMismatchBetweenShapeAndOffsets) {
  expect_parse_error(image_of(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12),
                     "data_offsets [0, 12] span 12 bytes, but shape [2, 2] of dtype F32 needs 16 bytes");
  expect_parse_error(image_of(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,0]}})", 0), "needs 4 bytes");
}

TEST(SafetensorsErrors, OverlappingTensors) {
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                              R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                              8),
                     "tensor 'b' (data_offsets [4, 8]) overlaps tensor 'a' (data_offsets [0, 8])");
  // Two names for the same bytes.
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                              R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                              4),
                     "overlaps");
  // A zero-size tensor inside another one.
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                              R"("z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})",
                              4),
                     "overlaps");
}

TEST(SafetensorsErrors, HoleInTheData) {
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                              R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                              8),
                     "the data bytes [4, 6) belong to no tensor (a hole before tensor 'b')");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", 4),
                     "the data bytes [0, 2) belong to no tensor");
  expect_parse_error(image_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 6),
                     "the data bytes [4, 6) at the end of the data buffer belong to no tensor");
  expect_parse_error(image_of("{}", 3), "the data bytes [0, 3) at the end");
}

TEST(SafetensorsErrors, BadMetadata) {
  expect_parse_error(image_of(R"({"__metadata__":["x"]})", 0), "\"__metadata__\" is a JSON array");
  expect_parse_error(image_of(R"({"__metadata__":null})", 0), "\"__metadata__\" is a JSON null");
  expect_parse_error(image_of(R"({"__metadata__":{"k":1}})", 0), "\"__metadata__\" value of key 'k' is a JSON number");
  expect_parse_error(image_of(R"({"__metadata__":{"k":{}}})", 0), "value of key 'k' is a JSON object");
  // Valid: empty metadata and metadata alone.
  EXPECT_TRUE(parse_safetensors(image_of(R"({"__metadata__":{}})", 0), "b").metadata.empty());
}

TEST(SafetensorsErrors, MessagesEscapeHostileNames) {
  const std::string name = "bad\\u0001" + std::string(1000, 'n');
  try {
    (void)parse_safetensors(image_of("{\"" + name + R"(":{"dtype":"X","shape":[],"data_offsets":[0,0]}})", 0), "s");
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'bad\\x01nnn"), std::string::npos) << msg;
    EXPECT_NE(msg.find("...'"), std::string::npos) << msg;  // cut short
    EXPECT_LT(msg.size(), 600u);
  }
}

TEST(SafetensorsErrors, BitFlipsNeverCrash) {
  const Bytes good = serialize_safetensors(sample_file());
  int refused = 0;
  for (std::size_t pos = 0; pos < good.size(); ++pos) {
    for (const int mask : {0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff}) {
      Bytes image = good;
      image[pos] = static_cast<unsigned char>(image[pos] ^ mask);
      try {
        (void)parse_safetensors(image, "flipped");
      } catch (const bnorm::Error&) {
        ++refused;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "position " << pos << " mask " << mask << ": not a bnorm::Error: " << e.what();
      }
    }
  }
  EXPECT_GT(refused, 0);
  // Random multi-byte corruption, deterministic seed.
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes image = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) image[rng() % image.size()] = static_cast<unsigned char>(rng());
    try {
      (void)parse_safetensors(image, "flipped");
    } catch (const bnorm::Error&) {
    }
  }
}

TEST(SafetensorsErrors, FlippedOffsetDigitIsAnError) {
  const Bytes good = serialize_safetensors(sample_file());
  const std::string text(good.begin(), good.end());
  std::size_t changed = 0;
  // Change each digit inside every "data_offsets":[...] to another digit.
  for (std::size_t at = text.find("\"data_offsets\":["); at != std::string::npos;
       at = text.find("\"data_offsets\":[", at + 1)) {
    for (std::size_t i = at + 16; text[i] != ']'; ++i) {
      if (text[i] < '0' || text[i] > '9') continue;
      Bytes image = good;
      image[i] = static_cast<unsigned char>(text[i] == '9' ? '1' : text[i] + 1);
      EXPECT_THROW((void)parse_safetensors(image, "flipped"), bnorm::Error) << "digit at " << i;
      ++changed;
    }
  }
  EXPECT_GE(changed, 10u);
}

// --- Serialization errors -----------------------------------------------------------------------

TEST(SafetensorsSerialize, RejectsInvalidInput) {
  SafeTensorsFile f;
  f.tensors["w"] = tensor("F32", {2}, pattern(7, 1));
  expect_serialize_error(f, "tensor 'w': has 7 bytes, but shape [2] of dtype F32 needs 2 x 4 bytes");
  f.tensors["w"] = tensor("F31", {2}, pattern(8, 1));
  expect_serialize_error(f, "dtype 'F31' is unknown");
  f.tensors["w"] = tensor("F32", {-2}, pattern(8, 1));
  expect_serialize_error(f, "has a negative dim");
  f.tensors["w"] = tensor("U8", {std::int64_t{1} << 32, std::int64_t{1} << 32}, {});
  expect_serialize_error(f, "overflows int64");
  f.tensors.clear();
  f.tensors[""] = tensor("U8", {}, {1});
  expect_serialize_error(f, "a tensor name is empty");
  f.tensors.clear();
  f.tensors["__metadata__"] = tensor("U8", {}, {1});
  expect_serialize_error(f, "cannot be named \"__metadata__\"");
  f.tensors.clear();
  f.tensors["bad\xff"] = tensor("U8", {}, {1});
  expect_serialize_error(f, "is not valid UTF-8");
  f.tensors.clear();
  f.metadata["k"] = "\xed\xa0\x80";  // an encoded surrogate
  expect_serialize_error(f, "metadata value of key 'k' is not valid UTF-8");
}

// --- Files -------------------------------------------------------------------------------------

TEST_F(SafetensorsFiles, WriteAndReadBack) {
  const SafeTensorsFile f = sample_file();
  const std::string path = (dir_ / "state.safetensors").string();
  write_file_atomic(path, serialize_safetensors(f));
  expect_same(f, read_safetensors(path));
  EXPECT_EQ(listing(), std::vector<std::string>{"state.safetensors"});
}

TEST_F(SafetensorsFiles, WriteFileAtomicReplaces) {
  const fs::path path = dir_ / "file.bin";
  write_plain(path, bytes_of("old contents"));
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  write_file_atomic(path.string(), bytes_of("new"));
  EXPECT_EQ(read_file(path), bytes_of("new"));
  // The mode of the replaced file is kept.
  EXPECT_EQ(fs::status(path).permissions(), fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  write_file_atomic(path.string(), {});
  EXPECT_TRUE(read_file(path).empty());
  const Bytes big = pattern(3'000'000, 5);
  write_file_atomic(path.string(), big);
  EXPECT_EQ(read_file(path), big);
  EXPECT_EQ(listing(), std::vector<std::string>{"file.bin"});
}

TEST_F(SafetensorsFiles, WriteFileAtomicIntoMissingFolderFails) {
  const std::string path = (dir_ / "no_such_folder" / "file.bin").string();
  try {
    write_file_atomic(path, bytes_of("x"));
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsFiles, WriteFileAtomicOverAFolderKeepsItAndLeavesNoTemporary) {
  // rename(2) of a file over a non-empty folder fails after the data was written: the temporary
  // file must be removed and the target left as it was.
  const fs::path target = dir_ / "target";
  fs::create_directory(target);
  write_plain(target / "inner", bytes_of("keep"));
  EXPECT_THROW(write_file_atomic(target.string(), bytes_of("data")), bnorm::Error);
  EXPECT_TRUE(fs::is_directory(target));
  EXPECT_EQ(read_file(target / "inner"), bytes_of("keep"));
  EXPECT_EQ(listing(), std::vector<std::string>{"target"});
}

TEST_F(SafetensorsFiles, WriteFileAtomicFailingWriteKeepsTheOldFile) {
  // Make write(2) fail part-way with EFBIG through a file-size limit: works even as root.
  const fs::path path = dir_ / "file.bin";
  write_plain(path, bytes_of("old contents"));
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = saved;
  small.rlim_cur = 64;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    write_file_atomic(path.string(), pattern(10'000, 3));
  } catch (const bnorm::Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(message.find("write failed"), std::string::npos) << message;
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_EQ(read_file(path), bytes_of("old contents"));
  EXPECT_EQ(listing(), std::vector<std::string>{"file.bin"});
}

TEST_F(SafetensorsFiles, WriteFileAtomicInReadOnlyFolderKeepsTheOldFile) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores folder permissions";
  const fs::path path = dir_ / "file.bin";
  write_plain(path, bytes_of("old contents"));
  fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
  EXPECT_THROW(write_file_atomic(path.string(), bytes_of("new")), bnorm::Error);
  fs::permissions(dir_, fs::perms::owner_all);
  EXPECT_EQ(read_file(path), bytes_of("old contents"));
  EXPECT_EQ(listing(), std::vector<std::string>{"file.bin"});
}

TEST_F(SafetensorsFiles, ReadMissingFileNamesPathAndReason) {
  const std::string path = (dir_ / "missing.safetensors").string();
  try {
    (void)read_safetensors(path);
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'" + path + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
}

TEST_F(SafetensorsFiles, ReadFolderFails) {
  try {
    (void)read_safetensors(dir_.string());
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsFiles, ReadRefusesFilesOver1GiB) {
  const fs::path path = dir_ / "huge.safetensors";
  write_plain(path, serialize_safetensors(sample_file()));
  fs::resize_file(path, (std::uintmax_t{1} << 30) + 1);  // sparse: costs no disk
  try {
    (void)read_safetensors(path.string());
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the limit of 1 GiB"), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsFiles, ReadCorruptFileNamesThePath) {
  const fs::path path = dir_ / "corrupt.safetensors";
  write_plain(path, bytes_of("garbage!garbage"));
  try {
    (void)read_safetensors(path.string());
    ADD_FAILURE() << "no error";
  } catch (const bnorm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("safetensors file '" + path.string() + "'"), std::string::npos) << e.what();
  }
}
