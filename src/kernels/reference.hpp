// The float64 scalar reference: Batch Normalization written straight from the seeds' formulas,
// one channel at a time, over logical channels-first data (n, c, s) at (n * C + c) * S + s.
// It is the test oracle and stays deliberately plain: never optimize it.
#pragma once

#include <cstdint>
#include <vector>

namespace bnorm::reference {

struct Problem {
  std::int64_t N = 0, C = 0, S = 1;
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
  bool relu = false;
};

struct Forward {
  std::vector<double> y;
  std::vector<double> mean, var;        // the statistics used: batch (biased var) or running
  std::vector<double> invstd;           // 1 / sqrt(var + eps)
  std::vector<double> running_mean, running_var;  // after the update (unchanged in eval)
};

// weight/bias empty means gamma = 1, beta = 0; running_* empty means not tracked.
Forward forward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                const std::vector<double>& bias, const std::vector<double>& running_mean,
                const std::vector<double>& running_var);

struct Backward {
  std::vector<double> dx, dweight, dbias;
};

// Back-propagation node by node through the computation graph of the forward pass (seed 003):
// mu -> xmu -> sq -> var -> sqrtvar -> ivar -> xhat -> gamma * xhat + beta (-> relu).
// `fwd` is the forward's result: its mean/var are the statistics that were used, its y the output.
Backward backward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                  const Forward& fwd, const std::vector<double>& dy);

// Ghost Batch Normalization: the batch split along N into virtual batches of `virtual_batch_size`
// samples (the last may be smaller), forward() applied to each in turn with the running statistics
// carried from one to the next. mean/var/invstd hold one row of C per virtual batch.
Forward ghost_forward(const Problem& p, std::int64_t virtual_batch_size, const std::vector<double>& x,
                      const std::vector<double>& weight, const std::vector<double>& bias,
                      const std::vector<double>& running_mean, const std::vector<double>& running_var);
// backward() of each virtual batch; the parameter gradients summed.
Backward ghost_backward(const Problem& p, std::int64_t virtual_batch_size, const std::vector<double>& x,
                        const std::vector<double>& weight, const Forward& fwd, const std::vector<double>& dy);

// Batch Renormalization (Ioffe 2017, Algorithm 1), training: sigma = sqrt(running_var + eps) before
// the update, sigma_B = sqrt(var_B + eps), r = clip(sigma_B / sigma, 1/r_max, r_max),
// d = clip((mu_B - running_mean) / sigma, -d_max, d_max), y = gamma (xhat r + d) + beta; running
// statistics updated as forward()'s.
struct Renorm {
  Forward fwd;  // y, the batch statistics, the updated running statistics
  std::vector<double> r, d;
};
Renorm renorm_forward(const Problem& p, double r_max, double d_max, const std::vector<double>& x,
                      const std::vector<double>& weight, const std::vector<double>& bias,
                      const std::vector<double>& running_mean, const std::vector<double>& running_var);
// Its backward with r and d constants: dxhat = dy gamma r through xhat = (x - mu_B) / sigma_B.
Backward renorm_backward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                         const Renorm& fwd, const std::vector<double>& dy);

}  // namespace bnorm::reference
