#include "model.hpp"

#include "bnorm_torch.hpp"

#include <cmath>

namespace bnorm::train {

// plain: a CNN of --depth 3x3 conv layers without skip connections (the depth experiment of issue 17).
const std::vector<std::string> kModels{"mlp", "cnn", "plain"};
const std::vector<std::string> kVariants{"none", "bn_before", "bn_after", "torch_bn", "torch_bn_before"};

bool is_torch_bn(const std::string& v) { return v.rfind("torch_bn", 0) == 0; }
bool bn_first(const std::string& v) { return v == "bn_before" || v == "torch_bn_before"; }

namespace {

// BN of the variant's kind, or nothing. `two_d` picks BatchNorm2d (CNN) or BatchNorm1d (MLP).
void add_bn(::torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (variant == "none") return;
  if (is_torch_bn(variant)) {
    if (two_d)
      s->push_back(::torch::nn::BatchNorm2d(c));
    else
      s->push_back(::torch::nn::BatchNorm1d(c));
  } else if (two_d) {
    s->push_back(bnorm::torch::BatchNorm2d(c));
  } else {
    s->push_back(bnorm::torch::BatchNorm1d(c));
  }
}

void add_act_bn(::torch::nn::Sequential& s, const std::string& variant, std::int64_t c, bool two_d) {
  if (bn_first(variant)) {
    add_bn(s, variant, c, two_d);
    s->push_back(::torch::nn::ReLU());
  } else {
    s->push_back(::torch::nn::ReLU());
    add_bn(s, variant, c, two_d);
  }
}

// The plain CNN: conv(1->w) at 28x28, MaxPool, then depth-1 convs (w->w, 3x3, padding 1), the first half at
// 14x14, the rest after a second MaxPool at 7x7; each conv followed by the variant's ReLU/BN pair; then
// Dropout (if any) and Linear(w*7*7, 10). No skip connections. Depth 2: one conv at 28x28, one at 14x14.
void add_plain(::torch::nn::Sequential& s, const NetSpec& n) {
  const int at14 = n.depth == 2 ? 1 : n.depth / 2;  // convs at 14x14; the remaining depth - 1 - at14 at 7x7
  const auto w = n.width;
  s->push_back(::torch::nn::Conv2d(::torch::nn::Conv2dOptions(1, w, 3).padding(1).bias(n.conv_bias)));
  add_act_bn(s, n.variant, w, true);
  s->push_back(::torch::nn::MaxPool2d(2));
  for (int i = 1; i < n.depth; ++i) {
    if (i == at14 + 1) s->push_back(::torch::nn::MaxPool2d(2));
    s->push_back(::torch::nn::Conv2d(::torch::nn::Conv2dOptions(w, w, 3).padding(1).bias(n.conv_bias)));
    add_act_bn(s, n.variant, w, true);
  }
  if (n.depth - 1 <= at14) s->push_back(::torch::nn::MaxPool2d(2));
  s->push_back(::torch::nn::Flatten());
  // Dropout draws random numbers only in training, after the weights are drawn: the weights stay the same.
  if (n.dropout > 0) s->push_back(::torch::nn::Dropout(n.dropout));
  s->push_back(::torch::nn::Linear(w * 7 * 7, 10));
}

}  // namespace

std::shared_ptr<Net> make_net(const NetSpec& spec) {
  ::torch::nn::Sequential s;
  if (spec.model == "plain") {
    add_plain(s, spec);
  } else if (spec.model == "mlp") {  // seed 004: Linear(784,256) -> BN -> ReLU -> Linear(256,10)
    s->push_back(::torch::nn::Flatten());
    s->push_back(::torch::nn::Linear(784, 256));
    add_act_bn(s, spec.variant, 256, false);
    s->push_back(::torch::nn::Linear(256, 10));
  } else {  // seed 000: (Conv -> ReLU -> BN -> MaxPool) x 2, then a linear classifier
    s->push_back(::torch::nn::Conv2d(::torch::nn::Conv2dOptions(1, 16, 3).padding(1)));
    add_act_bn(s, spec.variant, 16, true);
    s->push_back(::torch::nn::MaxPool2d(2));
    s->push_back(::torch::nn::Conv2d(::torch::nn::Conv2dOptions(16, 32, 3).padding(1)));
    add_act_bn(s, spec.variant, 32, true);
    s->push_back(::torch::nn::MaxPool2d(2));
    s->push_back(::torch::nn::Flatten());
    s->push_back(::torch::nn::Linear(32 * 7 * 7, 10));
  }
  auto net = std::make_shared<Net>(s);
  ::torch::NoGradGuard g;
  // Drawn again here, not at construction, where a conv without bias would skip the draws of its bias and
  // shift every later layer's weights.
  ::torch::manual_seed(static_cast<std::uint64_t>(spec.seed));
  for (auto& m : net->modules(false)) {
    if (auto* c = m->as<::torch::nn::Conv2d>()) {
      if (spec.model == "plain") {
        ::torch::nn::init::kaiming_normal_(c->weight, 0.0, ::torch::kFanIn, ::torch::kReLU);
        if (c->bias.defined()) ::torch::nn::init::zeros_(c->bias);
      } else {
        c->reset_parameters();
      }
    } else if (auto* l = m->as<::torch::nn::Linear>()) {
      l->reset_parameters();
    }
  }
  if (spec.init != 1.0)
    for (auto& p : net->named_parameters())
      if (p.key().find("weight") != std::string::npos && p.value().dim() > 1) p.value().mul_(spec.init);
  return net;
}

double weight_checksum(Net& net) {
  ::torch::NoGradGuard g;
  double sum = 0;
  for (auto& p : net.parameters())
    if (p.dim() > 1) sum += p.abs().sum().item<double>();
  return sum;
}

double bias_grad_ratio(Net& net) {
  double b2 = 0, w2 = 0;
  for (auto& m : net.modules(false))
    if (auto* c = m->as<::torch::nn::Conv2d>()) {
      if (!c->bias.defined() || !c->bias.grad().defined() || !c->weight.grad().defined()) return std::nan("");
      b2 += c->bias.grad().pow(2).sum().item<double>();
      w2 += c->weight.grad().pow(2).sum().item<double>();
    }
  return w2 > 0 ? std::sqrt(b2 / w2) : std::nan("");
}

}  // namespace bnorm::train
