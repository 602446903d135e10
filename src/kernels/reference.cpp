#include "kernels/reference.hpp"

#include <cmath>

namespace bnorm::reference {
namespace {
std::size_t at(const Problem& p, std::int64_t n, std::int64_t c, std::int64_t s) {
  return static_cast<std::size_t>((n * p.C + c) * p.S + s);
}
double param(const std::vector<double>& v, std::int64_t c, double absent) {
  return v.empty() ? absent : v[static_cast<std::size_t>(c)];
}
}  // namespace

Forward forward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                const std::vector<double>& bias, const std::vector<double>& running_mean,
                const std::vector<double>& running_var) {
  const auto C = static_cast<std::size_t>(p.C);
  const double m = static_cast<double>(p.N * p.S);
  Forward f;
  f.y.assign(x.size(), 0.0);
  f.mean.assign(C, 0.0);
  f.var.assign(C, 0.0);
  f.invstd.assign(C, 0.0);
  f.running_mean = running_mean;
  f.running_var = running_var;
  for (std::int64_t c = 0; c < p.C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    double mean, var;
    if (p.training || running_mean.empty()) {
      // mean = sum(x) / m; var = sum((x - mean)^2) / m (biased)
      double sum = 0;
      for (std::int64_t n = 0; n < p.N; ++n)
        for (std::int64_t s = 0; s < p.S; ++s) sum += x[at(p, n, c, s)];
      mean = sum / m;
      double sq = 0;
      for (std::int64_t n = 0; n < p.N; ++n)
        for (std::int64_t s = 0; s < p.S; ++s) sq += (x[at(p, n, c, s)] - mean) * (x[at(p, n, c, s)] - mean);
      var = sq / m;
      if (p.training && !running_mean.empty()) {
        // running = (1 - momentum) * running + momentum * batch; the variance unbiased
        f.running_mean[ci] = (1 - p.momentum) * running_mean[ci] + p.momentum * mean;
        f.running_var[ci] = (1 - p.momentum) * running_var[ci] + p.momentum * var * m / (m - 1);
      }
    } else {
      mean = running_mean[ci];
      var = running_var[ci];
    }
    const double invstd = 1.0 / std::sqrt(var + p.eps);
    f.mean[ci] = mean;
    f.var[ci] = var;
    f.invstd[ci] = invstd;
    const double gamma = param(weight, c, 1.0), beta = param(bias, c, 0.0);
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) {
        double y = gamma * (x[at(p, n, c, s)] - mean) * invstd + beta;
        if (p.relu && !(y > 0) && !std::isnan(y)) y = 0;
        f.y[at(p, n, c, s)] = y;
      }
  }
  return f;
}

Backward backward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                  const Forward& fwd, const std::vector<double>& dy) {
  const auto C = static_cast<std::size_t>(p.C);
  const double m = static_cast<double>(p.N * p.S);
  const bool batch_stats = p.training;
  Backward b;
  b.dx.assign(x.size(), 0.0);
  b.dweight.assign(C, 0.0);
  b.dbias.assign(C, 0.0);
  std::vector<double> dout(static_cast<std::size_t>(p.N * p.S)), xmu(dout.size()), dx1(dout.size());
  for (std::int64_t c = 0; c < p.C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const double gamma = param(weight, c, 1.0);
    const double mu = fwd.mean[ci], var = fwd.var[ci];
    const double sqrtvar = std::sqrt(var + p.eps), ivar = 1.0 / sqrtvar;
    // Gather the channel; the relu node passes the gradient only where its output was positive.
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) {
        const std::size_t i = static_cast<std::size_t>(n * p.S + s);
        dout[i] = dy[at(p, n, c, s)];
        if (p.relu && !(fwd.y[at(p, n, c, s)] > 0)) dout[i] = 0;
        xmu[i] = x[at(p, n, c, s)] - mu;
      }
    // out = gamma * xhat + beta
    double dbeta = 0, dgamma = 0;
    for (std::size_t i = 0; i < dout.size(); ++i) {
      dbeta += dout[i];
      dgamma += dout[i] * xmu[i] * ivar;
    }
    b.dbias[ci] = dbeta;
    b.dweight[ci] = dgamma;
    // xhat = xmu * ivar: dxhat = dout * gamma; divar = sum(dxhat * xmu); dxmu1 = dxhat * ivar
    double divar = 0;
    for (std::size_t i = 0; i < dout.size(); ++i) {
      const double dxhat = dout[i] * gamma;
      divar += dxhat * xmu[i];
      dx1[i] = dxhat * ivar;
    }
    if (batch_stats) {
      // ivar = 1 / sqrtvar: dsqrtvar = -divar / sqrtvar^2
      const double dsqrtvar = -divar / (sqrtvar * sqrtvar);
      // sqrtvar = sqrt(var + eps): dvar = dsqrtvar * 0.5 / sqrtvar
      const double dvar = 0.5 * dsqrtvar / sqrtvar;
      // var = sum(sq) / m, sq = xmu^2: dsq = dvar / m, dxmu2 = 2 * xmu * dsq
      double dmu = 0;
      for (std::size_t i = 0; i < dout.size(); ++i) {
        dx1[i] += 2.0 * xmu[i] * dvar / m;
        // xmu = x - mu: dmu = -sum(dxmu)
        dmu -= dx1[i];
      }
      // mu = sum(x) / m: dx2 = dmu / m
      for (std::size_t i = 0; i < dout.size(); ++i) dx1[i] += dmu / m;
    }
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) b.dx[at(p, n, c, s)] = dx1[static_cast<std::size_t>(n * p.S + s)];
  }
  return b;
}

}  // namespace bnorm::reference
