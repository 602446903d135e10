// bnorm: folding an eval-mode BatchNorm into the Conv, ConvTranspose or Linear/Gemm next to it
// (docs/folding.md). The algebra lives here only: bnorm.torch.fold and bnorm.onnx.fold call it.
//
// BN in eval is the per-channel affine y = s[c] * x + t[c], with s = gamma / sqrt(running_var + eps)
// and t = beta - running_mean * s (gamma absent: 1; beta absent: 0). A linear layer L (weight W, bias
// b, absent: 0) next to it absorbs it:
//   fold_into_producer: BN(L(x)), the BN's channels are L's output channels:
//     W'[o, ...] = s[o] * W[o, ...],          b'[o] = s[o] * b[o] + t[o].
//   fold_into_consumer: L(BN(x)), the BN's channels are L's input channels (exact only where every
//     output element sees every weight element once: a Conv without padding, a Linear/Gemm):
//     W'[., i, ...] = W[., i, ...] * s[i],    b'[o] = b[o] + sum over the weights of output o of W * t[i].
// Every value is computed in float64 from the inputs' values and rounded once to the output's dtype.
#pragma once

#include <bnorm/types.hpp>

namespace bnorm {

// How a weight of shape (A, B, k...) (k: the kernel's spatial sizes, none for Linear/Gemm) maps to
// channels, with g groups:
enum class WeightLayout : std::uint8_t {
  // (C_out, C_in / g, k...): torch's Conv1d/2d/3d and Linear (g = 1), ONNX Conv and Gemm with transB=1.
  OutIn,
  // (C_in, C_out / g, k...): torch's ConvTranspose1d/2d/3d, ONNX ConvTranspose, Gemm with transB=0
  // and MatMul's second operand (g = 1).
  InOut,
};
std::string to_string(WeightLayout);

// The eval-mode BatchNorm to fold: running statistics (required, length C), weight (gamma) and bias
// (beta) (optional, length C), eps >= 0 and finite. Any of the three dtypes.
struct FoldBatchNorm {
  ConstVectorView running_mean{}, running_var{};
  ConstVectorView weight{}, bias{};
  double eps = 1e-5;
};

// The layer: its weight (contiguous, rank >= 2, float32, float64 or bfloat16), its bias (optional,
// length C_out, any of the three dtypes), its groups (>= 1, dividing the weight's channel counts).
struct FoldLayer {
  ConstTensorView weight{};
  ConstVectorView bias{};
  WeightLayout layout = WeightLayout::OutIn;
  std::int64_t groups = 1;
};

// Writes the folded weight into out_weight (the weight's shape, contiguous, any of the three dtypes)
// and the folded bias into out_bias (length C_out, any of the three dtypes). out_weight may be the
// layer's weight and out_bias its bias (in place); otherwise no output may overlap an input. A call
// that throws bnorm::Error has written nothing. BN of length C_out.
void fold_into_producer(const FoldLayer& layer, const FoldBatchNorm& bn, TensorView out_weight, VectorView out_bias);

// The same for a BN in front of the layer (BN of length C_in). The caller makes sure that the layer
// does not pad its input; a WeightLayout::InOut weight must have rank 2 (Gemm, MatMul: a transposed
// convolution sums a different number of weights into each output, so no bias can stand for the shift).
void fold_into_consumer(const FoldLayer& layer, const FoldBatchNorm& bn, TensorView out_weight, VectorView out_bias);

}  // namespace bnorm
