// bnorm::torch::BatchNorm*d against torch::nn::BatchNorm*d: forward, running statistics over several
// training steps, eval, and the gradients of input, weight and bias, on contiguous and channels-last
// tensors, float32 and float64, and bfloat16 input with float32 parameters and buffers (torch's CPU mixed
// precision).
#include "bnorm_torch.hpp"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace {

struct Case {
  int dims;            // 1, 2 or 3 (BatchNorm1d/2d/3d)
  bool channels_last;  // channels-last memory for the input and the output gradient
  bool dbl;            // float64
  bool affine;
  bool track;
  bool momentum_none;  // cumulative average
  bool rank2;          // BatchNorm1d on (N, C)
  bool bf16;           // bfloat16 input and output gradient; float32 parameters and buffers (dbl is false)
};

std::string name(const Case& c) {
  return "BatchNorm" + std::to_string(c.dims) + "d" + (c.rank2 ? "_NC" : "") + (c.channels_last ? "_cl" : "_cf") +
         (c.dbl ? "_f64" : "_f32") + (c.affine ? "" : "_noaffine") + (c.track ? "" : "_notrack") +
         (c.momentum_none ? "_cumavg" : "") + (c.bf16 ? "_bf16" : "");
}

at::Tensor make_input(const Case& c, std::int64_t C, int seed) {
  torch::manual_seed(seed);
  std::vector<std::int64_t> shape{6, C};
  if (!c.rank2)
    for (int d = 0; d < c.dims; ++d) shape.push_back(c.dims == 3 ? 3 : 5 - d);
  at::Tensor x = torch::randn(shape, torch::dtype(c.dbl ? torch::kDouble : torch::kFloat)) * 3.0 + 1.5;
  if (c.bf16) x = x.to(torch::kBFloat16);  // the same bfloat16 values for both modules
  if (c.channels_last) {
    std::vector<std::int64_t> order{0};
    for (std::int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
    order.push_back(1);
    std::vector<std::int64_t> inv{0, x.dim() - 1};
    for (std::int64_t d = 1; d < x.dim() - 1; ++d) inv.push_back(d);
    x = x.permute(order).contiguous().permute(inv);
  }
  return x;
}

// Tolerances relative to the values' scale: 1e-10 (float64), 2e-4 (float32). A bfloat16 tensor
// (output, grad_input) gets 2^-7: both sides compute in float32 from the same bfloat16 values and round
// once to bfloat16; float32 noise may put the two on either side of a rounding boundary, one bfloat16
// step (8 significant bits) apart. Float32 results of a bfloat16 run (running statistics, gradients of
// weight and bias) are never rounded to bfloat16 and keep a float32 tolerance.
// What torch's module is given: the same values, and the same memory except for a bfloat16 tensor of
// rank 3 with channels-last strides (a layout torch has no memory format for). There torch's bfloat16
// fallback accumulates the backward sums in bfloat16 (grad_bias off by ~2e-2 against a float64
// reference, where bnorm is off by ~1e-6), so torch gets a contiguous copy: the math does not depend on
// the layout, and ours still runs on the channels-last memory.
at::Tensor torch_side(const Case& c, const at::Tensor& t) { return c.bf16 && t.dim() == 3 ? t.contiguous() : t; }

void expect_close(const at::Tensor& a, const at::Tensor& b, bool dbl, const std::string& what) {
  ASSERT_EQ(a.defined(), b.defined()) << what;
  if (!a.defined()) return;
  ASSERT_TRUE(a.sizes().equals(b.sizes())) << what;
  ASSERT_EQ(a.scalar_type(), b.scalar_type()) << what;
  const double tol = dbl ? 1e-10 : a.scalar_type() == torch::kBFloat16 ? 1.0 / 128 : 2e-4;
  const double err = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  const double scale = 1.0 + b.to(torch::kDouble).abs().max().item<double>();
  EXPECT_LE(err, tol * scale) << what;
}

template <class Ours, class Theirs>
void run_case(const Case& c) {
  const std::int64_t C = 4;
  torch::nn::BatchNormOptions opt(C);
  opt.affine(c.affine).track_running_stats(c.track);
  if (c.momentum_none) opt.momentum(std::nullopt);
  Theirs theirs(opt);
  Ours ours(opt);
  if (c.dbl) {
    theirs->to(torch::kDouble);
    ours->to(torch::kDouble);
  }
  if (c.affine) {  // non-trivial parameters, copied from torch's module
    torch::NoGradGuard g;
    theirs->weight.uniform_(0.5, 1.5);
    theirs->bias.uniform_(-0.5, 0.5);
  }
  bnorm::torch::copy_state(*theirs, *ours);

  for (int step = 0; step < 3; ++step) {
    at::Tensor x1 = torch_side(c, make_input(c, C, 10 + step)).requires_grad_(true);
    at::Tensor x2 = make_input(c, C, 10 + step).requires_grad_(true);
    at::Tensor y1 = theirs->forward(x1);
    at::Tensor y2 = ours->forward(x2);
    expect_close(y2, y1, c.dbl, name(c) + " forward step " + std::to_string(step));
    at::Tensor dy = make_input(c, C, 100 + step);
    (y1 * torch_side(c, dy)).sum().backward();
    (y2 * dy).sum().backward();
    expect_close(x2.grad(), x1.grad(), c.dbl, name(c) + " grad_input step " + std::to_string(step));
    if (c.affine) {
      expect_close(ours->weight.grad(), theirs->weight.grad(), c.dbl, name(c) + " grad_weight");
      expect_close(ours->bias.grad(), theirs->bias.grad(), c.dbl, name(c) + " grad_bias");
    }
    if (c.track) {
      expect_close(ours->running_mean, theirs->running_mean, c.dbl, name(c) + " running_mean");
      expect_close(ours->running_var, theirs->running_var, c.dbl, name(c) + " running_var");
      EXPECT_EQ(ours->num_batches_tracked.template item<std::int64_t>(),
                theirs->num_batches_tracked.template item<std::int64_t>());
    }
  }
  // eval: running statistics (or batch statistics without tracking), and its gradient.
  theirs->eval();
  ours->eval();
  at::Tensor x1 = torch_side(c, make_input(c, C, 7)).requires_grad_(true);
  at::Tensor x2 = make_input(c, C, 7).requires_grad_(true);
  at::Tensor y1 = theirs->forward(x1);
  at::Tensor y2 = ours->forward(x2);
  expect_close(y2, y1, c.dbl, name(c) + " eval forward");
  at::Tensor dy = make_input(c, C, 8);
  (y1 * torch_side(c, dy)).sum().backward();
  (y2 * dy).sum().backward();
  expect_close(x2.grad(), x1.grad(), c.dbl, name(c) + " eval grad_input");
  // torch's memory format: channels-last output for a channels-last input of rank 4 or 5 (rank 3
  // has no channels-last format in torch, and comes out contiguous, as torch's does).
  if (c.channels_last && y2.dim() >= 4) {
    EXPECT_FALSE(y2.is_contiguous()) << "channels-last input gives channels-last output";
  }
  if (y2.dim() == 3) {
    EXPECT_TRUE(y2.is_contiguous());
  }
}

TEST(TorchAdapter, AgreesWithTorchBatchNorm2d) {
  for (bool cl : {false, true})
    for (bool dbl : {false, true})
      for (bool affine : {true, false})
        for (bool track : {true, false})
          run_case<bnorm::torch::BatchNorm2d, torch::nn::BatchNorm2d>({2, cl, dbl, affine, track, false, false, false});
  run_case<bnorm::torch::BatchNorm2d, torch::nn::BatchNorm2d>({2, true, false, true, true, true, false, false});
}

TEST(TorchAdapter, AgreesWithTorchBatchNorm1d) {
  for (bool rank2 : {true, false})
    for (bool dbl : {false, true})
      for (bool affine : {true, false})
        run_case<bnorm::torch::BatchNorm1d, torch::nn::BatchNorm1d>({1, false, dbl, affine, true, false, rank2, false});
  run_case<bnorm::torch::BatchNorm1d, torch::nn::BatchNorm1d>({1, true, false, true, true, false, false, false});
  run_case<bnorm::torch::BatchNorm1d, torch::nn::BatchNorm1d>({1, false, false, true, true, true, true, false});
}

// bfloat16 activations with float32 module state, as torch::nn::BatchNorm*d takes them on CPU.
TEST(TorchAdapter, AgreesWithTorchOnBFloat16Input) {
  for (bool cl : {false, true})
    for (bool affine : {true, false})
      for (bool track : {true, false})
        run_case<bnorm::torch::BatchNorm2d, torch::nn::BatchNorm2d>({2, cl, false, affine, track, false, false, true});
  run_case<bnorm::torch::BatchNorm2d, torch::nn::BatchNorm2d>({2, true, false, true, true, true, false, true});
  run_case<bnorm::torch::BatchNorm1d, torch::nn::BatchNorm1d>({1, false, false, true, true, false, true, true});
  run_case<bnorm::torch::BatchNorm1d, torch::nn::BatchNorm1d>({1, true, false, true, true, false, false, true});
  for (bool cl : {false, true})
    run_case<bnorm::torch::BatchNorm3d, torch::nn::BatchNorm3d>({3, cl, false, true, true, false, false, true});
}

TEST(TorchAdapter, BFloat16KeepsFloat32StateAndGradients) {
  bnorm::torch::BatchNorm2d bn(3);
  at::Tensor x = torch::randn({4, 3, 5, 5}).to(torch::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  x.requires_grad_(true);
  at::Tensor y = bn->forward(x);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(y.is_contiguous(at::MemoryFormat::ChannelsLast));
  y.sum().backward();
  EXPECT_EQ(x.grad().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(bn->weight.grad().scalar_type(), torch::kFloat);
  EXPECT_EQ(bn->bias.grad().scalar_type(), torch::kFloat);
  EXPECT_EQ(bn->running_mean.scalar_type(), torch::kFloat);
  EXPECT_EQ(bn->running_var.scalar_type(), torch::kFloat);
  // The functional form, without weight/bias, in eval with running statistics.
  at::Tensor z = bnorm::torch::batch_norm(x.detach(), bn->running_mean, bn->running_var, {}, {}, false, 0.1, 1e-5);
  at::Tensor tz = torch::batch_norm(x.detach(), {}, {}, bn->running_mean, bn->running_var, false, 0.1, 1e-5, false);
  expect_close(z, tz, false, "functional bf16 eval");
}

TEST(TorchAdapter, AgreesWithTorchBatchNorm3d) {
  for (bool cl : {false, true})
    run_case<bnorm::torch::BatchNorm3d, torch::nn::BatchNorm3d>({3, cl, false, true, true, false, false, false});
}

TEST(TorchAdapter, SameNamesAsTorch) {
  torch::nn::BatchNorm2d theirs(8);
  bnorm::torch::BatchNorm2d ours(8);
  auto a = theirs->named_parameters().keys();
  auto b = ours->named_parameters().keys();
  EXPECT_EQ(a, b);
  EXPECT_EQ(theirs->named_buffers().keys(), ours->named_buffers().keys());
  // state round trip: ours -> torch
  {
    torch::NoGradGuard g;
    ours->running_mean.fill_(0.25);
    ours->weight.fill_(2.0);
  }
  bnorm::torch::copy_state(*ours, *theirs);
  EXPECT_EQ(theirs->running_mean[3].item<float>(), 0.25f);
  EXPECT_EQ(theirs->weight[0].item<float>(), 2.0f);
}

TEST(TorchAdapter, InSequentialAndClone) {
  torch::nn::Sequential net(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)), bnorm::torch::BatchNorm2d(4),
                            torch::nn::ReLU());
  at::Tensor y = net->forward(torch::randn({2, 1, 6, 6}));
  EXPECT_EQ(y.sizes(), (std::vector<std::int64_t>{2, 4, 4, 4}));
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->named_buffers().size(), net->named_buffers().size());
}

// Expects std::invalid_argument whose message contains `fragment`.
template <class F>
void expect_invalid(F f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error thrown, expected: " << fragment;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(TorchAdapter, Errors) {
  bnorm::torch::BatchNorm2d bn(3);
  expect_invalid([&] { bn->forward(torch::randn({2, 3, 4})); }, "BatchNorm2d: expected 4D input, got 3D");
  // The library's checks, with its messages.
  expect_invalid([&] { bn->forward(torch::randn({1, 3, 1, 1})); }, "Expected more than 1 value per channel when training");
  expect_invalid([&] { bn->forward(torch::randn({2, 5, 2, 2})); },
                 "bnorm::batch_norm: running_mean: expected 5 values (one per channel), got 3");
  expect_invalid([&] { bn->forward(torch::zeros({2, 3, 2, 2}, torch::kInt)); },
                 "input: expected float32, float64, bfloat16 or float16, got int32");
  // Nothing counted or updated by the failed calls (torch counts the batch before it checks it).
  EXPECT_EQ(bn->num_batches_tracked.item<std::int64_t>(), 0);
  EXPECT_TRUE(torch::equal(bn->running_mean, torch::zeros({3})));
  // A bfloat16 input takes float32 vectors only: float64 or bfloat16 parameters are refused, naming them.
  bnorm::torch::BatchNorm2d bn64(3);
  bn64->to(torch::kDouble);
  expect_invalid([&] { bn64->forward(torch::randn({2, 3, 2, 2}).to(torch::kBFloat16)); },
                 "bnorm::batch_norm: running_mean: expected dtype float32, got float64");
  expect_invalid([&] {
    bnorm::torch::batch_norm(torch::randn({2, 3, 2, 2}), torch::zeros({3}), {}, {}, {}, true, 0.1, 1e-5);
  }, "bnorm::batch_norm: running_var: expected a vector like running_mean, got none");
  expect_invalid([&] { bnorm::torch::batch_norm(torch::randn({2, 3, 2, 2}), {}, {}, {}, {}, false, 0.1, 1e-5); },
                 "bnorm::batch_norm: running_mean: expected running statistics when training=false, got none");
  expect_invalid([&] {
    bnorm::torch::batch_norm(torch::randn({2, 3, 2, 2}), {}, {}, torch::ones({3}), {}, true, 0.1, 1e-5);
  }, "weight and bias: give both or neither");
  at::Tensor x = torch::randn({2, 3, 2, 2}).to(torch::kBFloat16);
  expect_invalid([&] {
    bnorm::torch::batch_norm(x, torch::zeros({3}, torch::kDouble), torch::ones({3}, torch::kDouble), {}, {}, true, 0.1,
                             1e-5);
  }, "bnorm::batch_norm: running_mean: expected dtype float32, got float64");
}

// float16, and bfloat16 parameters and buffers, as torch's CPU BatchNorm takes them (computed in float32).
TEST(TorchAdapter, ReducedPrecisionLikeTorch) {
  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    bnorm::torch::BatchNorm2d bn(3);
    torch::nn::BatchNorm2d ref(3);
    bn->to(dtype);
    ref->to(dtype);
    at::Tensor x = (torch::randn({4, 3, 5, 5}) * 2 + 1).to(dtype);
    at::Tensor y = bn->forward(x), t = ref->forward(x);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), t.to(torch::kFloat), 2e-2, 2e-2));
    EXPECT_TRUE(torch::allclose(bn->running_var.to(torch::kFloat), ref->running_var.to(torch::kFloat), 1e-2, 1e-2));
    EXPECT_EQ(bn->running_mean.scalar_type(), dtype);
  }
}

}  // namespace
