// The networks bnorm-train trains: seed 000's CNN, seed 004's MLP and the plain CNNs of the depth experiment,
// with the normalization done by bnorm (bnorm::torch), by torch (the control) or absent.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace bnorm::train {

// bn_* = bnorm's BatchNorm; torch_bn (after the ReLU) and torch_bn_before = torch's, the controls.
extern const std::vector<std::string> kModels, kVariants;

bool is_torch_bn(const std::string& variant);
// Conv/Linear -> BN -> ReLU (seed 004's and Ioffe & Szegedy's order), against Conv -> ReLU -> BN (seed 000's).
bool bn_first(const std::string& variant);

struct NetSpec {
  std::string model = "plain", variant = "none";
  int depth = 2;            // plain only: conv layers
  std::int64_t width = 16;  // plain only: channels
  bool conv_bias = true;    // plain only: the convs' bias (redundant before BN, seed 004)
  double dropout = 0;       // plain only: dropout probability before the classifier
  double init = 1;          // every conv/linear weight multiplied by this after the default init
  std::int64_t seed = 0;    // the initial weights' seed
};

struct Net : ::torch::nn::Module {
  ::torch::nn::Sequential body;
  explicit Net(::torch::nn::Sequential s) : body(register_module("body", std::move(s))) {}
  ::torch::Tensor forward(::torch::Tensor x) { return body->forward(x); }
};

// The network, its weights drawn after ::torch::manual_seed(spec.seed), once all layers exist, in layer order:
// so one seed gives every variant (BN or not, conv bias or not, dropout or not) the same conv and linear
// weights. The plain CNN's convs get He init (kaiming normal, fan_in, ReLU gain) and zero biases; the MLP's and
// seed 000's CNN's layers torch's default init.
std::shared_ptr<Net> make_net(const NetSpec& spec);

// The sum of |w| over the conv and linear weights: equal across the variants of one seed (tested).
double weight_checksum(Net& net);

// The conv layers' bias gradient norm over their weight gradient norm, from the last backward: with BN right
// after the conv it is 0 in exact arithmetic (the batch mean subtracts the bias), so only rounding is left.
double bias_grad_ratio(Net& net);

}  // namespace bnorm::train
