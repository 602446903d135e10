// No allocation on the hot path: after one warm-up call with the same (or a larger) channel count,
// batch_norm / batch_norm_backward / batch_stats allocate nothing (src/workspace.hpp keeps their
// per-channel scratch in a per-thread arena).
//
// Its own executable, because it replaces the global operator new / delete (every overload: plain,
// array, nothrow, aligned, sized) with versions that count the allocations while a check runs. What
// it does not see: OpenMP's runtime (libgomp) allocates its thread pool and team state with malloc,
// not operator new, so those allocations are not counted; the library's own code (and the C++
// standard library it calls) allocates only through operator new.
#include <bnorm/bnorm.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

namespace {

std::atomic<bool> g_counting{false};
std::atomic<std::int64_t> g_allocations{0};

void* counted_alloc(std::size_t size, std::size_t align) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (size == 0) size = 1;
  void* p = nullptr;
  if (align <= alignof(std::max_align_t)) {
    p = std::malloc(size);
  } else if (posix_memalign(&p, align, size) != 0) {
    p = nullptr;
  }
  return p;
}

void* counted_alloc_or_throw(std::size_t size, std::size_t align) {
  void* p = counted_alloc(size, align);
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace

// Every replaceable allocation function; all of them end in malloc / posix_memalign, and every
// deallocation function in free.
void* operator new(std::size_t n) { return counted_alloc_or_throw(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc_or_throw(n, 0); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace bnorm {
namespace {

// Operator new calls (any thread) during `calls` calls of f.
template <class F>
std::int64_t count_allocations(F&& f, int calls = 3) {
  g_allocations.store(0);
  g_counting.store(true);
  for (int i = 0; i < calls; ++i) f();
  g_counting.store(false);
  return g_allocations.load();
}

// The same after one uncounted warm-up call.
template <class F>
std::int64_t allocations_after_warmup(F&& f, int calls = 3) {
  f();
  return count_allocations(f, calls);
}

// One problem's buffers, filled outside the counted calls.
template <class T>
struct Problem {
  using V = std::conditional_t<std::is_same_v<T, bfloat16>, float, T>;  // per-channel vectors' type
  Shape shape;
  Layout layout;
  std::int64_t C;
  std::vector<T> x, y, dy, dx, residual;
  std::vector<V> weight, bias, running_mean, running_var, save_mean, save_invstd, grad_weight, grad_bias;

  Problem(const std::vector<std::int64_t>& dims, Layout l)
      : shape(std::span<const std::int64_t>(dims)), layout(l), C(shape[1]) {
    std::int64_t n = 1;
    for (std::int64_t d : dims) n *= d;
    std::mt19937_64 rng(42);
    std::normal_distribution<double> normal(0.5, 2.0);
    const auto un = static_cast<std::size_t>(n), uC = static_cast<std::size_t>(C);
    for (auto* t : {&x, &y, &dy, &dx, &residual}) {
      t->resize(un);
      for (T& v : *t) v = make(normal(rng));
    }
    weight.assign(uC, V(1.5));
    bias.assign(uC, V(-0.25));
    running_mean.assign(uC, V(0));
    running_var.assign(uC, V(1));
    save_mean.assign(uC, V(0));
    save_invstd.assign(uC, V(1));
    grad_weight.assign(uC, V(0));
    grad_bias.assign(uC, V(0));
  }
  static T make(double v) {
    if constexpr (std::is_same_v<T, bfloat16>)
      return bfloat16::from_float(static_cast<float>(v));
    else
      return static_cast<T>(v);
  }
  ConstTensorView in(const std::vector<T>& t) const { return ConstTensorView(t.data(), shape, layout); }
  TensorView out(std::vector<T>& t) { return TensorView(t.data(), shape, layout); }
  static VectorView vec(std::vector<V>& v) { return VectorView(v.data(), static_cast<std::int64_t>(v.size())); }

  void forward(bool training, Activation act = Activation::None, bool with_residual = false, bool params = true) {
    batch_norm(in(x), out(y), {params ? vec(running_mean) : VectorView(), params ? vec(running_var) : VectorView()},
               {params ? vec(weight) : VectorView(), params ? vec(bias) : VectorView()},
               {.training = training, .activation = act}, {vec(save_mean), vec(save_invstd)},
               with_residual ? in(residual) : ConstTensorView());
  }
  void backward(bool training, Activation act = Activation::None) {
    batch_norm_backward(in(dy),
                        {.input = in(x),
                         .output = act == Activation::Relu ? in(y) : ConstTensorView(),
                         .weight = vec(weight),
                         .saved = {vec(save_mean), vec(save_invstd)},
                         .running = {vec(running_mean), vec(running_var)}},
                        {.training = training, .activation = act}, out(dx), {vec(grad_weight), vec(grad_bias)});
  }
};

class NoAlloc : public ::testing::Test {
 protected:
  // Two threads: the kernels run OpenMP teams and the reduction workspace is sized per thread.
  void SetUp() override {
    saved_threads_ = num_threads();
    set_num_threads(2);
  }
  void TearDown() override { set_num_threads(saved_threads_); }
  int saved_threads_ = 1;
};

// The counter itself works: a vector allocated while counting is seen.
TEST_F(NoAlloc, CounterSeesOperatorNew) {
  static std::vector<double>* volatile sink = nullptr;
  const std::int64_t n = allocations_after_warmup([] {
    delete sink;
    sink = new std::vector<double>(100);
  });
  EXPECT_EQ(n, 6);  // the vector object and its buffer, 3 times
  delete sink;
  sink = nullptr;
}

TEST_F(NoAlloc, TrainingForwardFloatChannelsFirstFused) {
  Problem<float> p({4, 8, 16, 16}, Layout::ChannelsFirst);
  EXPECT_EQ(allocations_after_warmup([&] { p.forward(true); }), 0);
}

TEST_F(NoAlloc, TrainingForwardFloatChannelsFirstLargeSpatial) {
  Problem<float> p({2, 4, 256, 256}, Layout::ChannelsFirst);
  EXPECT_EQ(allocations_after_warmup([&] { p.forward(true); }), 0);
}

TEST_F(NoAlloc, TrainingForwardFloatChannelsFirstUnfused) {
  // An odd C below 8 * threads never takes the fused path with 2 threads.
  Problem<float> p({2, 3, 64, 64}, Layout::ChannelsFirst);
  EXPECT_EQ(allocations_after_warmup([&] { p.forward(true); }), 0);
  EXPECT_EQ(allocations_after_warmup([&] { p.backward(true); }), 0);
}

TEST_F(NoAlloc, TrainingForwardFloatChannelsLast) {
  Problem<float> p({4, 8, 16, 16}, Layout::ChannelsLast);
  EXPECT_EQ(allocations_after_warmup([&] { p.forward(true); }), 0);
  Problem<float> wide({8, 300, 4, 4}, Layout::ChannelsLast);  // more than one channel tile
  EXPECT_EQ(allocations_after_warmup([&] { wide.forward(true); }), 0);
}

TEST_F(NoAlloc, TrainingForwardWithoutParameters) {
  Problem<float> p({4, 8, 16, 16}, Layout::ChannelsFirst);
  EXPECT_EQ(allocations_after_warmup([&] { p.forward(true, Activation::None, false, false); }), 0);
  Problem<float> q({4, 8, 16, 16}, Layout::ChannelsLast);
  EXPECT_EQ(allocations_after_warmup([&] { q.forward(true, Activation::None, false, false); }), 0);
}

TEST_F(NoAlloc, EvalForward) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Problem<float> p({4, 8, 16, 16}, l);
    EXPECT_EQ(allocations_after_warmup([&] { p.forward(false); }), 0);
    EXPECT_EQ(allocations_after_warmup([&] {
                batch_norm_inference(p.in(p.x), p.out(p.y),
                                     {Problem<float>::vec(p.running_mean), Problem<float>::vec(p.running_var)});
              }),
              0);
  }
}

TEST_F(NoAlloc, TrainingBackward) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Problem<float> p({4, 8, 16, 16}, l);
    p.forward(true);
    EXPECT_EQ(allocations_after_warmup([&] { p.backward(true); }), 0);
    Problem<float> big({2, 4, 256, 256}, l);
    big.forward(true);
    EXPECT_EQ(allocations_after_warmup([&] { big.backward(true); }), 0);
  }
}

TEST_F(NoAlloc, EvalBackward) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Problem<float> p({4, 8, 16, 16}, l);
    EXPECT_EQ(allocations_after_warmup([&] { p.backward(false); }), 0);
  }
}

// Training forward + backward and eval forward of T, in both layouts, on a shape that takes the fused
// channels-first path and on one that never does (odd C).
template <class T>
void expect_no_allocations_for_dtype() {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    for (const std::vector<std::int64_t>& dims : {std::vector<std::int64_t>{4, 8, 16, 16}, {2, 3, 64, 64}}) {
      Problem<T> p(dims, l);
      EXPECT_EQ(allocations_after_warmup([&] { p.forward(true); }), 0);
      EXPECT_EQ(allocations_after_warmup([&] { p.backward(true); }), 0);
      EXPECT_EQ(allocations_after_warmup([&] { p.forward(false); }), 0);
    }
  }
}

TEST_F(NoAlloc, BFloat16ForwardAndBackward) { expect_no_allocations_for_dtype<bfloat16>(); }

TEST_F(NoAlloc, DoubleForwardAndBackward) { expect_no_allocations_for_dtype<double>(); }

TEST_F(NoAlloc, ResidualAndRelu) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Problem<float> p({4, 8, 16, 16}, l);
    EXPECT_EQ(allocations_after_warmup([&] { p.forward(true, Activation::Relu, true); }), 0);
    EXPECT_EQ(allocations_after_warmup([&] { p.backward(true, Activation::Relu); }), 0);
    EXPECT_EQ(allocations_after_warmup([&] { p.forward(false, Activation::Relu, true); }), 0);
    Problem<float> odd({2, 3, 64, 64}, l);
    EXPECT_EQ(allocations_after_warmup([&] { odd.forward(true, Activation::Relu, true); }), 0);
    EXPECT_EQ(allocations_after_warmup([&] { odd.backward(true, Activation::Relu); }), 0);
  }
}

TEST_F(NoAlloc, BatchStats) {
  Problem<float> p({4, 8, 16, 16}, Layout::ChannelsLast);
  EXPECT_EQ(allocations_after_warmup([&] {
              batch_stats(p.in(p.x), Problem<float>::vec(p.save_mean), Problem<float>::vec(p.save_invstd));
            }),
            0);
}

// A warm-up with more channels covers every later call with fewer.
TEST_F(NoAlloc, SmallerChannelCountAfterWarmup) {
  for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    Problem<float> large({2, 512, 4, 4}, l), small({2, 24, 8, 8}, l);
    large.forward(true);
    large.backward(true);
    EXPECT_EQ(count_allocations([&] {
                small.forward(true);
                small.backward(true);
              }),
              0);
  }
}

// A layer's training step (forward, backward, with its saved statistics and parameter gradients
// taken from the workspace: src/layer.cpp) allocates nothing after the first, for BatchNorm and for
// the variants, whose reducers save more rows.
template <class Layer>
void expect_layer_step_allocates_nothing(Layer& layer) {
  Problem<float> p({4, 8, 6, 6}, Layout::ChannelsFirst);
  EXPECT_EQ(allocations_after_warmup([&] {
              layer.forward(p.in(p.x), p.out(p.y));
              layer.backward(p.in(p.x), p.in(p.dy), p.out(p.dx));
            }),
            0);
}

TEST_F(NoAlloc, LayerTrainingStep) {
  BatchNorm2d bn(8);
  expect_layer_step_allocates_nothing(bn);
}

TEST_F(NoAlloc, GhostAndRenormLayerTrainingSteps) {
  GhostBatchNormT<float> ghost(8, 2, {}, 2);
  expect_layer_step_allocates_nothing(ghost);
  BatchRenormT<float> renorm(8, {}, {}, 2);
  expect_layer_step_allocates_nothing(renorm);
}

}  // namespace
}  // namespace bnorm

