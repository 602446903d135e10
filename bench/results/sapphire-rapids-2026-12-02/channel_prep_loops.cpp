#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>
#include <algorithm>
using P = float;
static inline void split_mean(double mean, P& hi, P& lo) { hi = (P)mean; const double rest = mean - (double)hi; lo = rest == rest ? (P)rest : P(0); }
__attribute__((noinline)) void fused(const float* rm, const float* rv, const float* w, const float* b, double eps, long C, P* hi, P* sc, P* sh) {
  for (long c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt((double)rv[c] + eps);
    P lo; split_mean((double)rm[c], hi[c], lo);
    sc[c] = (P)((double)w[c] * invstd);
    sh[c] = (P)((double)b[c] - (double)lo * (double)sc[c]);
  }
}
__attribute__((noinline)) void staged(const float* rm, const float* rv, const float* w, const float* b, double eps, long C, P* hi, P* sc, P* sh, double* m, double* v, double* is, double* g, double* be, P* lo) {
  for (long c = 0; c < C; ++c) g[c] = w[c];
  for (long c = 0; c < C; ++c) be[c] = b[c];
  for (long c = 0; c < C; ++c) m[c] = rm[c];
  for (long c = 0; c < C; ++c) v[c] = rv[c];
  for (long c = 0; c < C; ++c) is[c] = 1.0 / std::sqrt(v[c] + eps);
  for (long c = 0; c < C; ++c) split_mean(m[c], hi[c], lo[c]);
  for (long c = 0; c < C; ++c) { sc[c] = (P)(g[c] * is[c]); sh[c] = (P)(be[c] - (double)lo[c] * (double)sc[c]); }
}
int main() {
  const long C = 2048;
  std::vector<float> rm(C, 0.1f), rv(C, 1.2f), w(C, 1.1f), b(C, 0.2f); std::vector<P> hi(C), sc(C), sh(C), lo(C); std::vector<double> m(C), v(C), is(C), g(C), be(C);
  for (int k = 0; k < 3; ++k) {
    auto T = [&](auto&& f) { std::vector<double> t; for (int r = 0; r < 2000; ++r) { auto t0 = std::chrono::steady_clock::now(); f(); t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count()); } std::sort(t.begin(), t.end()); return t[t.size()/2]; };
    double a = T([&] { staged(rm.data(), rv.data(), w.data(), b.data(), 1e-5, C, hi.data(), sc.data(), sh.data(), m.data(), v.data(), is.data(), g.data(), be.data(), lo.data()); });
    double f = T([&] { fused(rm.data(), rv.data(), w.data(), b.data(), 1e-5, C, hi.data(), sc.data(), sh.data()); });
    printf("staged %.2f us  fused %.2f us\n", a, f);
  }
}
