// PyTorch under test, through its C++ library (ATen, the same kernels as torch.nn.functional):
//   torch-out   : at::native_batch_norm_out / at::native_batch_norm_backward_out into the harness's
//                 preallocated outputs (no allocation by us; see the note on backward below);
//   torch-alloc : at::native_batch_norm / at::native_batch_norm_backward, which allocate their
//                 outputs on every call, as the Python API does.
// Every tensor wraps the harness's memory with at::from_blob (strides give the channels-last case).
//
// Backward: ATen has no CPU kernel with out= arguments for native_batch_norm_backward; its _out
// variant is the generated wrapper that runs the allocating kernel and copies into the outputs, so
// torch-out's backward figure still includes an allocation and a copy of dx. That is the cost a
// caller with preallocated buffers pays with torch.
//
// bf16: x, dy, y, dx are at::kBFloat16 tensors and weight, bias, running and saved statistics stay
// at::kFloat: torch's CPU BatchNorm accepts this "mixed type" (bf16 input, float32 parameters) in
// forward and backward and computes in float32, like bnorm.
//
// Threads: at::set_num_threads (torch::set_num_threads is the same function, re-exported).
#include "bench.hpp"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#include <stdexcept>
#include <tuple>

namespace bench {
namespace {

at::Tensor wrap_tensor(const void* p, const Case& c) {
  std::vector<std::int64_t> strides(c.dims.size());
  if (c.layout == Layout::NHWC && !c.is_2d()) {
    // logical (N, C, H, W) in memory (N, H, W, C): torch.channels_last
    const std::int64_t C = c.C();
    strides[1] = 1;
    std::int64_t s = C;
    for (std::size_t i = c.dims.size() - 1; i >= 2; --i) {
      strides[i] = s;
      s *= c.dims[i];
    }
    strides[0] = s;
  } else {
    std::int64_t s = 1;
    for (std::size_t i = c.dims.size(); i-- > 0;) {
      strides[i] = s;
      s *= c.dims[i];
    }
  }
  const auto dtype = c.dtype == DType::BF16 ? at::kBFloat16 : at::kFloat;
  return at::from_blob(const_cast<void*>(p), c.dims, strides, at::TensorOptions().dtype(dtype));
}

at::Tensor wrap_vector(const float* p, std::int64_t n) {
  return at::from_blob(const_cast<float*>(p), {n}, at::TensorOptions().dtype(at::kFloat));
}

class TorchImpl final : public Impl {
 public:
  explicit TorchImpl(bool preallocated) : out_(preallocated) {}
  std::string name() const override { return out_ ? "torch-out" : "torch-alloc"; }
  bool supports(const Case& c) const override { return c.dtype == DType::F32 || c.dtype == DType::BF16; }
  void set_threads(int n) override { at::set_num_threads(n); }

  void prepare(const Case& c, const Data& d) override {
    c_ = c;
    y_base_ = d.y;
    dx_base_ = d.dx;
    const std::int64_t C = c.C();
    x_ = wrap_tensor(d.x, c);
    dy_ = wrap_tensor(d.dy, c);
    y_ = wrap_tensor(d.y, c);
    dx_ = wrap_tensor(d.dx, c);
    w_ = wrap_vector(d.weight, C);
    b_ = wrap_vector(d.bias, C);
    rm_ = wrap_vector(d.running_mean, C);
    rv_ = wrap_vector(d.running_var, C);
    trm_ = wrap_vector(d.train_running_mean, C);
    trv_ = wrap_vector(d.train_running_var, C);
    sm_ = wrap_vector(d.save_mean, C);
    si_ = wrap_vector(d.save_invstd, C);
    dw_ = wrap_vector(d.dweight, C);
    db_ = wrap_vector(d.dbias, C);
  }

  void run() override {
    if (out_) {
      switch (c_.op) {
        case Op::TrainFwd:
          at::native_batch_norm_out(y_, sm_, si_, x_, w_, b_, trm_, trv_, true, c_.momentum, c_.eps);
          break;
        case Op::InferFwd:
          // In eval the saved statistics are not written; scratch tensors stand in for them.
          at::native_batch_norm_out(y_, scratch_mean_, scratch_invstd_, x_, w_, b_, rm_, rv_, false, c_.momentum,
                                    c_.eps);
          break;
        case Op::Backward:
          at::native_batch_norm_backward_out(dx_, dw_, db_, dy_, x_, w_, std::nullopt, std::nullopt, sm_, si_, true,
                                             c_.eps, {true, true, true});
          break;
      }
    } else {
      call_allocating();
      result_ = {};  // freed inside the timed call, as a caller dropping the outputs would
    }
  }

  // The allocating call (torch-alloc), its outputs kept in result_.
  void call_allocating() {
    switch (c_.op) {
      case Op::TrainFwd:
        result_ = at::native_batch_norm(x_, w_, b_, trm_, trv_, true, c_.momentum, c_.eps);
        break;
      case Op::InferFwd:
        result_ = at::native_batch_norm(x_, w_, b_, rm_, rv_, false, c_.momentum, c_.eps);
        break;
      case Op::Backward:
        result_ = at::native_batch_norm_backward(dy_, x_, w_, std::nullopt, std::nullopt, sm_, si_, true, c_.eps,
                                                 {true, true, true});
        break;
    }
  }

  void publish() override {
    if (out_) {
      // The out= tensors must still be views of the harness's memory.
      at::Tensor& t = c_.op == Op::Backward ? dx_ : y_;
      const void* want = c_.op == Op::Backward ? dx_base_ : y_base_;
      if (t.data_ptr() != want) throw std::runtime_error("torch-out wrote to a tensor it allocated itself");
      return;
    }
    // Run once more, keep the outputs and copy them into the harness's buffers.
    call_allocating();
    if (c_.op == Op::Backward) {
      dx_.copy_(std::get<0>(result_));
      dw_.copy_(std::get<1>(result_));
      db_.copy_(std::get<2>(result_));
    } else {
      y_.copy_(std::get<0>(result_));
    }
    result_ = {};
  }

  void release() override {
    x_ = dy_ = y_ = dx_ = w_ = b_ = rm_ = rv_ = trm_ = trv_ = sm_ = si_ = dw_ = db_ = at::Tensor();
  }

 private:
  bool out_;
  Case c_;
  at::Tensor x_, dy_, y_, dx_, w_, b_, rm_, rv_, trm_, trv_, sm_, si_, dw_, db_;
  at::Tensor scratch_mean_ = at::empty({0}, at::kFloat), scratch_invstd_ = at::empty({0}, at::kFloat);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result_;
  const void* y_base_ = nullptr;
  const void* dx_base_ = nullptr;
};

}  // namespace

std::vector<std::unique_ptr<Impl>> make_torch() {
  std::vector<std::unique_ptr<Impl>> v;
  v.push_back(std::make_unique<TorchImpl>(true));
  v.push_back(std::make_unique<TorchImpl>(false));
  return v;
}

std::string torch_version() {
#ifdef TORCH_VERSION
  return TORCH_VERSION;
#else
  return "2.x";
#endif
}

}  // namespace bench
