#include "kernels/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>

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

namespace {
std::vector<double> slice(const std::vector<double>& v, std::size_t from, std::size_t n) {
  return {v.begin() + static_cast<std::ptrdiff_t>(from), v.begin() + static_cast<std::ptrdiff_t>(from + n)};
}
void append(std::vector<double>& to, const std::vector<double>& v) { to.insert(to.end(), v.begin(), v.end()); }
}  // namespace

Forward ghost_forward(const Problem& p, std::int64_t virtual_batch_size, const std::vector<double>& x,
                      const std::vector<double>& weight, const std::vector<double>& bias,
                      const std::vector<double>& running_mean, const std::vector<double>& running_var) {
  if (!p.training) return forward(p, x, weight, bias, running_mean, running_var);
  Forward f;
  f.running_mean = running_mean;
  f.running_var = running_var;
  for (std::int64_t n0 = 0; n0 < p.N; n0 += virtual_batch_size) {
    Problem q = p;
    q.N = std::min(virtual_batch_size, p.N - n0);
    const auto per_sample = static_cast<std::size_t>(p.C * p.S);
    const Forward part = forward(q, slice(x, static_cast<std::size_t>(n0) * per_sample,
                                          static_cast<std::size_t>(q.N) * per_sample),
                                 weight, bias, f.running_mean, f.running_var);
    append(f.y, part.y);
    append(f.mean, part.mean);
    append(f.var, part.var);
    append(f.invstd, part.invstd);
    f.running_mean = part.running_mean;
    f.running_var = part.running_var;
  }
  return f;
}

Backward ghost_backward(const Problem& p, std::int64_t virtual_batch_size, const std::vector<double>& x,
                        const std::vector<double>& weight, const Forward& fwd, const std::vector<double>& dy) {
  if (!p.training) return backward(p, x, weight, fwd, dy);
  Backward b;
  const auto C = static_cast<std::size_t>(p.C), per_sample = static_cast<std::size_t>(p.C * p.S);
  b.dweight.assign(C, 0.0);
  b.dbias.assign(C, 0.0);
  std::size_t j = 0;
  for (std::int64_t n0 = 0; n0 < p.N; n0 += virtual_batch_size, ++j) {
    Problem q = p;
    q.N = std::min(virtual_batch_size, p.N - n0);
    const std::size_t from = static_cast<std::size_t>(n0) * per_sample, n = static_cast<std::size_t>(q.N) * per_sample;
    Forward part;
    part.y = slice(fwd.y, from, n);
    part.mean = slice(fwd.mean, j * C, C);
    part.var = slice(fwd.var, j * C, C);
    const Backward pb = backward(q, slice(x, from, n), weight, part, slice(dy, from, n));
    append(b.dx, pb.dx);
    for (std::size_t c = 0; c < C; ++c) {
      b.dweight[c] += pb.dweight[c];
      b.dbias[c] += pb.dbias[c];
    }
  }
  return b;
}

Renorm renorm_forward(const Problem& p, double r_max, double d_max, const std::vector<double>& x,
                      const std::vector<double>& weight, const std::vector<double>& bias,
                      const std::vector<double>& running_mean, const std::vector<double>& running_var) {
  Renorm out;
  // The batch statistics and the running update are batch normalization's.
  out.fwd = forward(p, x, {}, {}, running_mean, running_var);
  if (!p.training) {
    out.fwd = forward(p, x, weight, bias, running_mean, running_var);
    return out;
  }
  const auto C = static_cast<std::size_t>(p.C);
  out.r.assign(C, 0.0);
  out.d.assign(C, 0.0);
  for (std::int64_t c = 0; c < p.C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const double sigma = std::sqrt(running_var[ci] + p.eps);
    const double sigma_b = std::sqrt(out.fwd.var[ci] + p.eps);
    const double r = std::min(std::max(sigma_b / sigma, 1.0 / r_max), r_max);
    const double d = std::min(std::max((out.fwd.mean[ci] - running_mean[ci]) / sigma, -d_max), d_max);
    out.r[ci] = r;
    out.d[ci] = d;
    const double gamma = param(weight, c, 1.0), beta = param(bias, c, 0.0);
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) {
        const double xhat = (x[at(p, n, c, s)] - out.fwd.mean[ci]) / sigma_b;
        out.fwd.y[at(p, n, c, s)] = gamma * (xhat * r + d) + beta;
      }
  }
  return out;
}

Backward renorm_backward(const Problem& p, const std::vector<double>& x, const std::vector<double>& weight,
                         const Renorm& fwd, const std::vector<double>& dy) {
  if (!p.training) return backward(p, x, weight, fwd.fwd, dy);
  const auto C = static_cast<std::size_t>(p.C);
  const double m = static_cast<double>(p.N * p.S);
  Backward b;
  b.dx.assign(x.size(), 0.0);
  b.dweight.assign(C, 0.0);
  b.dbias.assign(C, 0.0);
  for (std::int64_t c = 0; c < p.C; ++c) {
    const auto ci = static_cast<std::size_t>(c);
    const double gamma = param(weight, c, 1.0), r = fwd.r[ci], d = fwd.d[ci];
    const double sigma_b = std::sqrt(fwd.fwd.var[ci] + p.eps), mu = fwd.fwd.mean[ci];
    // out = gamma * (xhat * r + d) + beta: dgamma = sum(dy (xhat r + d)), dbeta = sum(dy), dxhat = dy gamma r
    double sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) {
        const double g = dy[at(p, n, c, s)], xhat = (x[at(p, n, c, s)] - mu) / sigma_b;
        b.dweight[ci] += g * (xhat * r + d);
        b.dbias[ci] += g;
        sum_dxhat += g * gamma * r;
        sum_dxhat_xhat += g * gamma * r * xhat;
      }
    // xhat = (x - mu_B) / sigma_B with mu_B and sigma_B functions of the batch:
    // dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sigma_B
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t s = 0; s < p.S; ++s) {
        const double xhat = (x[at(p, n, c, s)] - mu) / sigma_b;
        b.dx[at(p, n, c, s)] =
            (dy[at(p, n, c, s)] * gamma * r - sum_dxhat / m - xhat * sum_dxhat_xhat / m) / sigma_b;
      }
  }
  return b;
}

}  // namespace bnorm::reference
