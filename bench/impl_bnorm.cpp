// bnorm under test: the public functional API over the harness's memory. bf16: bnorm::DType::BFloat16
// views of x, dy, y, dx with the float32 per-channel vectors (bnorm's mixed-precision form).
#include "bench.hpp"

#include <bnorm/bnorm.hpp>

namespace bench {
namespace {

class BnormImpl final : public Impl {
 public:
  std::string name() const override { return "bnorm"; }
  bool supports(const Case& c) const override { return c.dtype == DType::F32 || c.dtype == DType::BF16; }
  void set_threads(int n) override { bnorm::set_num_threads(n); }

  void prepare(const Case& c, const Data& d) override {
    c_ = c;
    d_ = d;
    bnorm::Shape shape(std::span<const std::int64_t>(c.dims.data(), c.dims.size()));
    const auto layout = c.layout == Layout::NHWC ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
    const auto dtype = c.dtype == DType::BF16 ? bnorm::DType::BFloat16 : bnorm::DType::Float32;
    x_ = bnorm::ConstTensorView(d.x, dtype, shape, layout);
    dy_ = bnorm::ConstTensorView(d.dy, dtype, shape, layout);
    y_ = bnorm::TensorView(d.y, dtype, shape, layout);
    dx_ = bnorm::TensorView(d.dx, dtype, shape, layout);
  }

  void run() override {
    const std::int64_t C = c_.C();
    switch (c_.op) {
      case Op::TrainFwd:
        bnorm::batch_norm(x_, y_, {{d_.train_running_mean, C}, {d_.train_running_var, C}},
                          {{d_.weight, C}, {d_.bias, C}}, {.training = true, .momentum = c_.momentum, .eps = c_.eps},
                          {{d_.save_mean, C}, {d_.save_invstd, C}});
        break;
      case Op::InferFwd:
        // The running statistics are only read in eval; the API takes writable views for both modes.
        bnorm::batch_norm(x_, y_, {const_cast<float*>(d_.running_mean), C}, {const_cast<float*>(d_.running_var), C},
                          {d_.weight, C}, {d_.bias, C}, false, c_.momentum, c_.eps);
        break;
      case Op::Backward:
        bnorm::batch_norm_backward(
            dy_, {.input = x_, .weight = {d_.weight, C}, .saved = {{d_.save_mean, C}, {d_.save_invstd, C}}},
            {.training = true, .eps = c_.eps}, dx_, {{d_.dweight, C}, {d_.dbias, C}});
        break;
    }
  }

 private:
  Case c_;
  Data d_;
  bnorm::ConstTensorView x_, dy_;
  bnorm::TensorView y_, dx_;
};

}  // namespace

std::unique_ptr<Impl> make_bnorm() { return std::make_unique<BnormImpl>(); }

}  // namespace bench
