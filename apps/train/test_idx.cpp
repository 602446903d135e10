// The IDX reader against small hand-made files: good (plain and gzip) and corrupt ones.
#include "idx.hpp"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using bnorm::train::DataError;
using Bytes = std::vector<std::uint8_t>;

Bytes idx(std::vector<std::uint32_t> dims, std::uint8_t type = 8) {
  Bytes b{0, 0, type, static_cast<std::uint8_t>(dims.size())};
  std::size_t n = 1;
  for (auto d : dims) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(d >> s));
    n *= d;
  }
  for (std::size_t i = 0; i < n; ++i) b.push_back(static_cast<std::uint8_t>(i % 10));
  return b;
}

class Idx : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("bnorm_idx_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                                        "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string plain(const std::string& name, const Bytes& b) {
    const std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    return p;
  }
  std::string gz(const std::string& name, const Bytes& b) {
    const std::string p = (dir_ / name).string();
    gzFile f = gzopen(p.c_str(), "wb");
    EXPECT_NE(f, nullptr);
    EXPECT_EQ(gzwrite(f, b.data(), static_cast<unsigned>(b.size())), static_cast<int>(b.size()));
    gzclose(f);
    return p;
  }
  fs::path dir_;
};

void expect_error(const std::string& path, const std::string& fragment) {
  try {
    bnorm::train::read_idx(path);
    ADD_FAILURE() << path << ": no error, expected one containing '" << fragment << "'";
  } catch (const DataError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(fragment), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << "the message names the file: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
}

TEST_F(Idx, ReadsPlainAndGzip) {
  for (const std::string& p : {plain("a-idx3-ubyte", idx({3, 2, 4})), gz("a-idx3-ubyte.gz", idx({3, 2, 4}))}) {
    auto a = bnorm::train::read_idx(p);
    EXPECT_EQ(a.dims, (std::vector<std::int64_t>{3, 2, 4}));
    ASSERT_EQ(a.data.size(), 24u);
    EXPECT_EQ(a.data[13], 3);
  }
}

TEST_F(Idx, RejectsCorruptFiles) {
  expect_error((dir_ / "missing.gz").string(), "no such file");
  Bytes b = idx({2, 2});
  b[0] = 1;
  expect_error(plain("magic", b), "bad magic");
  expect_error(plain("type", idx({2, 2}, 0x0D)), "element type 13");
  expect_error(plain("short", Bytes{0, 0}), "shorter than");
  b = idx({4, 5});
  b.pop_back();
  expect_error(plain("truncated", b), "announces 20 data bytes, the file has 19");
  b = idx({4, 5});
  b.push_back(7);
  expect_error(gz("trailing.gz", b), "the file has 21");
  expect_error(plain("zero", idx({0, 5})), "dimension 0 is 0");
  Bytes hdr{0, 0, 8, 3, 0, 0};
  expect_error(plain("hdr", hdr), "truncated header");
  // A gzip file cut in the middle, and one with damaged compressed bytes.
  const std::string good = gz("good.gz", idx({50, 50}));
  std::ifstream in(good, std::ios::binary);
  Bytes z((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes cut(z.begin(), z.begin() + static_cast<std::ptrdiff_t>(z.size() / 2));
  const std::string cutp = plain("cut.gz", cut);
  EXPECT_THROW(bnorm::train::read_idx(cutp), DataError);
  Bytes bad = z;
  for (std::size_t i = 12; i < bad.size() - 8; ++i) bad[i] = static_cast<std::uint8_t>(bad[i] ^ 0x5A);
  EXPECT_THROW(bnorm::train::read_idx(plain("bad.gz", bad)), DataError);
}

TEST_F(Idx, LoadsASplitAndChecksIt) {
  plain("t10k-images-idx3-ubyte", idx({5, 28, 28}));
  gz("t10k-labels-idx1-ubyte.gz", idx({5}));
  auto s = bnorm::train::load_fashion_mnist(dir_.string(), false);
  EXPECT_EQ(s.size(), 5);
  EXPECT_THROW(bnorm::train::load_fashion_mnist(dir_.string(), true), DataError);  // no train files
  gz("train-images-idx3-ubyte.gz", idx({5, 28, 28}));
  gz("train-labels-idx1-ubyte.gz", idx({4}));
  EXPECT_THROW(bnorm::train::load_fashion_mnist(dir_.string(), true), DataError);  // 4 labels, 5 images
  gz("train-labels-idx1-ubyte.gz", idx({5}));
  EXPECT_EQ(bnorm::train::load_fashion_mnist(dir_.string(), true).size(), 5);
  gz("train-images-idx3-ubyte.gz", idx({5, 28, 27}));
  EXPECT_THROW(bnorm::train::load_fashion_mnist(dir_.string(), true), DataError);  // not 28 x 28
}

}  // namespace
