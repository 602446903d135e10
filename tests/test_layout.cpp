// bnorm::layout_of, the one answer every binding (the nanobind extension, the Python package through
// it, the torch adapter) gives to "which layout is this memory in": the edge cases the bindings met
// (size-1 dims, empty tensors, rank 2, rank 5, 1x1 spatial, permuted or sliced memory), and every
// small shape and stride pattern against a brute-force model of density.
#include <bnorm/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace bnorm {
namespace {

using Dims = std::vector<std::int64_t>;

std::optional<Layout> layout(const Dims& shape, const Dims& strides) { return layout_of(shape, strides); }

// The strides of dense memory of `shape` whose axes lie in memory in `order` (outermost first).
Dims dense_strides(const Dims& shape, const std::vector<std::size_t>& order) {
  Dims strides(shape.size());
  std::int64_t step = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    strides[*it] = step;
    step *= shape[*it];
  }
  return strides;
}

std::vector<std::size_t> channels_first(std::size_t rank) {
  std::vector<std::size_t> o(rank);
  std::iota(o.begin(), o.end(), std::size_t{0});
  return o;
}

std::vector<std::size_t> channels_last(std::size_t rank) {
  std::vector<std::size_t> o{0};
  for (std::size_t d = 2; d < rank; ++d) o.push_back(d);
  o.push_back(1);
  return o;
}

TEST(Layout, DenseLayoutsOfEveryRank) {
  const Dims s5{2, 3, 4, 5, 6};
  EXPECT_EQ(layout(s5, dense_strides(s5, channels_first(5))), Layout::ChannelsFirst);
  EXPECT_EQ(layout(s5, dense_strides(s5, channels_last(5))), Layout::ChannelsLast);  // torch's channels_last_3d
  const Dims s4{2, 3, 4, 5};
  EXPECT_EQ(layout(s4, {60, 20, 5, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout(s4, {60, 1, 15, 3}), Layout::ChannelsLast);  // torch's channels_last
  const Dims s3{2, 3, 4};
  EXPECT_EQ(layout(s3, {12, 4, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout(s3, {12, 1, 3}), Layout::ChannelsLast);
  // Rank 2 has no spatial dims: one memory order, channels-first; (C, N) memory is neither.
  EXPECT_EQ(layout({4, 3}, {3, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({4, 3}, {1, 4}), std::nullopt);
  // Below rank 2 (refused later by the functional API) the answer is still about the memory.
  EXPECT_EQ(layout({5}, {1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({5}, {2}), std::nullopt);
  EXPECT_EQ(layout({}, {}), Layout::ChannelsFirst);
}

TEST(Layout, SameMemoryInBothLayoutsIsChannelsFirst) {
  // C == 1, 1x1 spatial, and a 1-element tensor: both orders describe the same memory.
  EXPECT_EQ(layout({2, 1, 4, 5}, {20, 20, 5, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({2, 1, 4, 5}, {20, 1, 5, 1}), Layout::ChannelsFirst);  // torch's channels_last strides of it
  EXPECT_EQ(layout({2, 3, 1, 1}, {3, 1, 1, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({2, 3, 1, 1}, {3, 1, 3, 3}), Layout::ChannelsFirst);  // torch's channels_last strides of it
  EXPECT_EQ(layout({1, 1, 1}, {7, -3, 0}), Layout::ChannelsFirst);
}

TEST(Layout, SizeOneDimsTakeAnyStride) {
  EXPECT_EQ(layout({1, 3, 4}, {999, 4, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({2, 3, 1, 5}, {15, 5, -7, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({2, 3, 1, 5}, {15, 1, 0, 3}), Layout::ChannelsLast);
  EXPECT_EQ(layout({4, 1}, {1, 123}), Layout::ChannelsFirst);
}

TEST(Layout, EmptyTensorsAreDenseInBoth) {
  EXPECT_EQ(layout({0, 3, 4}, {12, 4, 1}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({0, 3, 4}, {12, 1, 3}), Layout::ChannelsFirst);
  EXPECT_EQ(layout({2, 3, 0, 5}, {-1, 7, 0, 2}), Layout::ChannelsFirst);  // any strides: no element to place
  EXPECT_EQ(layout({2, 0}, {5, 5}), Layout::ChannelsFirst);
}

TEST(Layout, OtherMemoryIsNeither) {
  const Dims s{2, 3, 4, 5};
  EXPECT_EQ(layout(s, {60, 20, 1, 4}), std::nullopt);    // transposed spatial dims
  EXPECT_EQ(layout(s, {120, 40, 10, 2}), std::nullopt);  // a slice with step 2
  EXPECT_EQ(layout(s, {60, 20, 5, -1}), std::nullopt);   // a negative stride
  EXPECT_EQ(layout(s, {60, 1, 3, 12}), std::nullopt);    // channels-last with spatial dims swapped
  EXPECT_EQ(layout(s, {1, 2, 6, 24}), std::nullopt);     // Fortran order
  EXPECT_EQ(layout(s, {0, 20, 5, 1}), std::nullopt);     // a broadcast (stride 0) batch dim
  EXPECT_EQ(layout({2, 3, 4}, {3, 1, 6}), std::nullopt);  // (N, C) inside, spatial outermost
  EXPECT_EQ(layout({2, -3, 4}, {12, 4, 1}), std::nullopt);  // a negative size describes no memory
}

TEST(Layout, ExtentsThatOverflowInt64) {
  const std::int64_t big = std::int64_t{1} << 62;
  // The outermost dim's extent overflows, but no dim is checked against it.
  EXPECT_EQ(layout({big, 4}, {4, 1}), Layout::ChannelsFirst);
  // Here one would be: such memory cannot be dense.
  EXPECT_EQ(layout({2, big, 4}, {0, 4, 1}), std::nullopt);
}

TEST(Layout, StridesOfAnotherLengthThrow) {
  try {
    layout({2, 3, 4}, {12, 4});
    ADD_FAILURE() << "expected bnorm::Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "bnorm::layout_of: strides: expected 3 values (one per dim), got 2");
    EXPECT_EQ(e.kind(), ErrorKind::Value);
  }
}

// The model: memory is dense in `order` when every element's offset (sum of index * stride) is its
// position in that order. Slow, and independent of how layout_of walks the dims.
bool dense_by_enumeration(const Dims& shape, const Dims& strides, const std::vector<std::size_t>& order) {
  std::int64_t count = 1;
  for (const std::int64_t d : shape) count *= d;
  for (std::int64_t pos = 0; pos < count; ++pos) {
    std::int64_t rest = pos, offset = 0;
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      offset += (rest % shape[*it]) * strides[*it];
      rest /= shape[*it];
    }
    if (offset != pos) return false;
  }
  return true;
}

// What the three bindings did before they shared layout_of: channels-first when dense so,
// otherwise channels-last when dense so and rank >= 3, otherwise neither.
std::optional<Layout> model(const Dims& shape, const Dims& strides) {
  if (dense_by_enumeration(shape, strides, channels_first(shape.size()))) return Layout::ChannelsFirst;
  if (shape.size() >= 3 && dense_by_enumeration(shape, strides, channels_last(shape.size())))
    return Layout::ChannelsLast;
  return std::nullopt;
}

TEST(Layout, EverySmallShapeAndStridePatternAgreesWithTheModel) {
  int checked = 0, channels_last_seen = 0, neither_seen = 0;
  for (std::size_t rank = 2; rank <= 4; ++rank) {
    Dims shape(rank, 0);
    std::int64_t shapes = 1;
    for (std::size_t i = 0; i < rank; ++i) shapes *= 4;
    for (std::int64_t code = 0; code < shapes; ++code) {
      std::int64_t c = code;
      for (std::size_t i = 0; i < rank; ++i, c /= 4) shape[i] = c % 4;  // sizes 0 to 3
      std::vector<std::size_t> order = channels_first(rank);
      do {
        const Dims dense = dense_strides(shape, order);
        std::vector<Dims> candidates{dense};
        for (std::size_t i = 0; i < rank; ++i) {
          for (const std::int64_t delta : {std::int64_t{1}, std::int64_t{-1}}) {
            Dims s = dense;
            s[i] += delta;
            candidates.push_back(s);
          }
          Dims s = dense;
          s[i] = -s[i];
          candidates.push_back(s);
        }
        for (const Dims& strides : candidates) {
          const std::optional<Layout> got = layout(shape, strides), want = model(shape, strides);
          ASSERT_EQ(got, want) << "shape " << Shape(shape).str() << " strides " << Shape(strides).str();
          channels_last_seen += got == Layout::ChannelsLast;
          neither_seen += !got.has_value();
          ++checked;
        }
      } while (std::next_permutation(order.begin(), order.end()));
    }
  }
  EXPECT_GT(checked, 10000);
  EXPECT_GT(channels_last_seen, 100);
  EXPECT_GT(neither_seen, 1000);
}

}  // namespace
}  // namespace bnorm
