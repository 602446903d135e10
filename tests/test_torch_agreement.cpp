// Agreement with PyTorch: every case of tests/fixtures/torch_cases.safetensors (written by
// tools/gen_torch_fixtures.py from torch.nn.BatchNorm{1,2,3}d) is replayed through the functional
// API and through the layer, in both memory layouts, and every quantity torch recorded is compared:
// per step the output, the saved batch mean and invstd, the running statistics and
// num_batches_tracked; for the last step grad_input, grad_weight and grad_bias.
//
// Tolerances. Each comparison allows |got - want| <= K * (scale + |want|), K = 1e-6 for float32
// (about 17 units of rounding; the worst case uses a fifth of it) and 1e-13 for float64 (about 450
// units; the worst case uses a thousandth), where `scale` is the magnitude of the terms that
// combine into the quantity, computed per channel from torch's data and the statistics the step
// normalized with (mean_c, invstd_c):
//   xm_c    = max |x - mean_c| * invstd_c    the largest normalized value
//   kappa_c = |mean_c| * invstd_c            the offset of the channel in units of its spread
//   y            : |gamma_c| * (xm_c + kappa_c) + |beta_c|   (y = x*a - mean*a + beta cancels)
//   save_mean    : max |x|
//   save_invstd  : relative only
//   running_mean : max |running_mean| + max |x|;  running_var : max |running_var|
//   grad_bias    : sum |dy|            grad_weight : sum |dy| * (xm_c + kappa_c)
//   grad_input   : |gamma_c| * invstd_c * max |dy| * (1 + xm_c * (xm_c + kappa_c)) with batch
//                  statistics, |gamma_c| * invstd_c * max |dy| with frozen ones.
// The scales matter in two places: at a large offset (mean 100, std 0.1: kappa = 1000) torch's
// float32 path rounds the mean to float32 before normalizing, and with two values per channel the
// input gradient is zero up to rounding (it is pure cancellation); a tolerance relative to the
// largest value would call torch's own rounding a mismatch there. BNORM_TORCH_MARGINS=1 in the
// environment prints the share of its tolerance every comparison used.
#include <bnorm/functional.hpp>
#include <bnorm/layer.hpp>

#include "safetensors.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

// The build names the fixture folder; the fallback serves a run from the source root.
#ifndef BNORM_FIXTURE_DIR
#define BNORM_FIXTURE_DIR "tests/fixtures"
#endif

namespace {

using bnorm::Activation;
using bnorm::ConstTensorView;
using bnorm::ConstVectorView;
using bnorm::Layout;
using bnorm::TensorView;
using bnorm::VectorView;
using json = nlohmann::json;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string fixture_path() { return std::string(BNORM_FIXTURE_DIR) + "/torch_cases.safetensors"; }

// ------------------------------------------------------------------------------------------------
// The fixture file

struct Step {
  bool training = true;     // the module's mode
  bool batch_stats = true;  // normalized with batch statistics (training, or not tracking)
  std::int64_t num_batches_tracked = 0;
};

struct Case {
  std::string id, name, dtype, offset;
  std::vector<std::int64_t> shape;
  bool affine = true;
  bool track = true;
  std::optional<double> momentum;  // nullopt: cumulative average
  double eps = 1e-5;
  Activation activation = Activation::None;
  std::vector<Step> steps;
};

struct Fixture {
  bnorm::detail::SafeTensorsFile file;
  std::vector<Case> cases;
  std::string torch_version;
  std::string error;  // why loading failed; empty when it worked
};

Case parse_case(const json& j) {
  Case c;
  c.id = j.at("id").get<std::string>();
  c.name = j.at("name").get<std::string>();
  c.dtype = j.at("dtype").get<std::string>();
  if (c.dtype != "float32" && c.dtype != "float64") throw std::runtime_error("case " + c.id + ": dtype " + c.dtype);
  c.shape = j.at("shape").get<std::vector<std::int64_t>>();
  if (c.shape.size() < 2) throw std::runtime_error("case " + c.id + ": rank < 2");
  c.affine = j.at("affine").get<bool>();
  c.track = j.at("track_running_stats").get<bool>();
  if (!j.at("momentum").is_null()) c.momentum = j.at("momentum").get<double>();
  c.eps = j.at("eps").get<double>();
  const auto act = j.at("activation").get<std::string>();
  if (act != "none" && act != "relu") throw std::runtime_error("case " + c.id + ": activation " + act);
  c.activation = act == "relu" ? Activation::Relu : Activation::None;
  c.offset = j.at("offset").get<std::string>();
  for (const json& s : j.at("steps")) {
    c.steps.push_back({s.at("training").get<bool>(), s.at("batch_stats").get<bool>(),
                       s.at("num_batches_tracked").get<std::int64_t>()});
  }
  if (c.steps.empty()) throw std::runtime_error("case " + c.id + ": no steps");
  return c;
}

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture out;
    try {
      out.file = bnorm::detail::read_safetensors(fixture_path());
      const auto& md = out.file.metadata;
      if (md.count("torch_version")) out.torch_version = md.at("torch_version");
      if (!md.count("cases")) throw std::runtime_error("no \"cases\" in the metadata");
      for (const json& j : json::parse(md.at("cases"))) out.cases.push_back(parse_case(j));
    } catch (const std::exception& e) {
      out.error = fixture_path() + ": " + e.what();
      out.cases.clear();
    }
    return out;
  }();
  return f;
}

// ------------------------------------------------------------------------------------------------
// Geometry and layouts: logical (N, C, S) <-> memory (N, C, S) or (N, S, C)

struct Geom {
  std::int64_t N = 0, C = 0, S = 1;
  std::size_t numel() const { return static_cast<std::size_t>(N * C * S); }
  std::size_t logical(std::int64_t n, std::int64_t c, std::int64_t s) const {
    return static_cast<std::size_t>((n * C + c) * S + s);
  }
  std::size_t memory(std::int64_t n, std::int64_t c, std::int64_t s, Layout l) const {
    return l == Layout::ChannelsFirst ? logical(n, c, s) : static_cast<std::size_t>((n * S + s) * C + c);
  }
};

Geom geom_of(const std::vector<std::int64_t>& shape) {
  Geom g;
  g.N = shape[0];
  g.C = shape[1];
  for (std::size_t i = 2; i < shape.size(); ++i) g.S *= shape[i];
  return g;
}

template <class T>
std::vector<T> to_memory(const std::vector<double>& logical, const Geom& g, Layout l) {
  std::vector<T> out(logical.size());
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t c = 0; c < g.C; ++c)
      for (std::int64_t s = 0; s < g.S; ++s) out[g.memory(n, c, s, l)] = static_cast<T>(logical[g.logical(n, c, s)]);
  return out;
}

template <class T>
std::vector<double> to_logical(const std::vector<T>& mem, const Geom& g, Layout l) {
  std::vector<double> out(mem.size());
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t c = 0; c < g.C; ++c)
      for (std::int64_t s = 0; s < g.S; ++s) out[g.logical(n, c, s)] = static_cast<double>(mem[g.memory(n, c, s, l)]);
  return out;
}

template <class T>
std::vector<T> narrow(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}
template <class T>
std::vector<double> widen(std::span<const T> v) {
  return std::vector<double>(v.begin(), v.end());
}

// One tensor of a case, as logical doubles (exact: F32 and F64 widen without rounding).
std::vector<double> tensor(const Fixture& f, const Case& c, const std::string& quantity, std::size_t numel) {
  const std::string key = c.id + "/" + quantity;
  const auto it = f.file.tensors.find(key);
  if (it == f.file.tensors.end()) throw std::runtime_error("the fixture has no tensor " + key);
  const bnorm::detail::SafeTensor& t = it->second;
  const std::string want_dtype = c.dtype == "float32" ? "F32" : "F64";
  if (t.dtype != want_dtype) throw std::runtime_error(key + ": dtype " + t.dtype + ", expected " + want_dtype);
  const std::size_t esize = t.dtype == "F32" ? 4 : 8;
  if (t.bytes.size() != numel * esize) {
    throw std::runtime_error(key + ": " + std::to_string(t.bytes.size() / esize) + " elements, expected " +
                             std::to_string(numel));
  }
  std::vector<double> out(numel);
  for (std::size_t i = 0; i < numel; ++i) {
    if (esize == 4) {
      float v;
      std::memcpy(&v, t.bytes.data() + 4 * i, 4);
      out[i] = static_cast<double>(v);
    } else {
      std::memcpy(&out[i], t.bytes.data() + 8 * i, 8);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Comparison

// |got - want| <= k * (scale + |want|) everywhere; the worst element is reported.
::testing::AssertionResult agree(const std::vector<double>& got, const std::vector<double>& want, double k,
                                 double scale, const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " values, torch has " << want.size();
  double worst = 0;
  std::size_t wi = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double diff = std::abs(got[i] - want[i]);
    if (!(diff == diff)) {  // NaN: unwritten, or computed as NaN
      return ::testing::AssertionFailure() << what << "[" << i << "]: got " << got[i] << ", torch " << want[i];
    }
    const double allowed = k * (scale + std::abs(want[i]));
    const double excess = allowed > 0 ? diff / allowed : (diff > 0 ? std::numeric_limits<double>::infinity() : 0.0);
    if (excess > worst) {
      worst = excess;
      wi = i;
    }
  }
  // BNORM_TORCH_MARGINS=1 prints how much of its tolerance every comparison used.
  static const bool report = std::getenv("BNORM_TORCH_MARGINS") != nullptr;
  if (report) std::cout << "[ margin   ] " << what << " " << worst << "\n";
  if (worst > 1) {
    return ::testing::AssertionFailure()
           << what << "[" << wi << "] (logical, channels-first index): got " << got[wi] << ", torch " << want[wi]
           << ", |diff| " << std::abs(got[wi] - want[wi]) << " is " << worst << " times the tolerance "
           << k << " * (" << scale << " + |torch|)";
  }
  return ::testing::AssertionSuccess();
}

// What the tolerances of one step are scaled by (see the top of the file).
struct Scales {
  double y = 0, mean = 0, grad_bias = 0, grad_weight = 0, grad_input = 0;
};

// x, dy: logical; mean, invstd: the statistics the step normalized with; gamma, beta: absent = 1, 0.
Scales scales_of(const Geom& g, const std::vector<double>& x, const std::vector<double>& dy,
                 const std::vector<double>& mean, const std::vector<double>& invstd, const std::vector<double>& gamma,
                 const std::vector<double>& beta, bool batch_stats) {
  Scales sc;
  for (std::int64_t c = 0; c < g.C; ++c) {
    const auto uc = static_cast<std::size_t>(c);
    const double gm = gamma.empty() ? 1.0 : std::abs(gamma[uc]);
    const double bt = beta.empty() ? 0.0 : std::abs(beta[uc]);
    double xabs = 0, xm = 0, dyabs = 0, dysum = 0;
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t s = 0; s < g.S; ++s) {
        const std::size_t i = g.logical(n, c, s);
        xabs = std::max(xabs, std::abs(x[i]));
        xm = std::max(xm, std::abs(x[i] - mean[uc]) * invstd[uc]);
        if (!dy.empty()) {
          dyabs = std::max(dyabs, std::abs(dy[i]));
          dysum += std::abs(dy[i]);
        }
      }
    const double kappa = std::abs(mean[uc]) * invstd[uc];
    sc.y = std::max(sc.y, gm * (xm + kappa) + bt);
    sc.mean = std::max(sc.mean, xabs);
    sc.grad_bias = std::max(sc.grad_bias, dysum);
    sc.grad_weight = std::max(sc.grad_weight, dysum * (xm + kappa));
    const double unit = gm * invstd[uc] * dyabs;
    sc.grad_input = std::max(sc.grad_input, batch_stats ? unit * (1 + xm * (xm + kappa)) : unit);
  }
  return sc;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::abs(e));
  return m;
}

// ------------------------------------------------------------------------------------------------
// Replaying a case

// Everything torch recorded for one case, plus what the replays share.
struct Recorded {
  Geom g;
  bnorm::Shape shape;
  std::vector<double> weight, bias, rm_init, rv_init, grad_output, grad_input, grad_weight, grad_bias;
  std::vector<std::vector<double>> x, y, save_mean, save_invstd, running_mean, running_var;
  // The statistics each step normalized with: the batch's, or the running ones before the step.
  std::vector<std::vector<double>> used_mean, used_invstd;

  Recorded(const Fixture& f, const Case& c) : g(geom_of(c.shape)), shape(std::span<const std::int64_t>(c.shape)) {
    const std::size_t uC = static_cast<std::size_t>(g.C), numel = g.numel();
    if (c.affine) {
      weight = tensor(f, c, "weight", uC);
      bias = tensor(f, c, "bias", uC);
    }
    if (c.track) {
      rm_init = tensor(f, c, "running_mean_init", uC);
      rv_init = tensor(f, c, "running_var_init", uC);
    }
    std::vector<double> rm = rm_init, rv = rv_init;
    for (std::size_t k = 0; k < c.steps.size(); ++k) {
      const std::string ks = std::to_string(k);
      x.push_back(tensor(f, c, "x" + ks, numel));
      y.push_back(tensor(f, c, "y" + ks, numel));
      if (c.steps[k].batch_stats) {
        save_mean.push_back(tensor(f, c, "save_mean" + ks, uC));
        save_invstd.push_back(tensor(f, c, "save_invstd" + ks, uC));
        used_mean.push_back(save_mean.back());
        used_invstd.push_back(save_invstd.back());
      } else {
        if (!c.track) throw std::runtime_error(c.id + ": a step without batch statistics needs running ones");
        save_mean.emplace_back();
        save_invstd.emplace_back();
        used_mean.push_back(rm);
        std::vector<double> inv(uC);
        for (std::size_t i = 0; i < uC; ++i) inv[i] = 1.0 / std::sqrt(rv[i] + c.eps);
        used_invstd.push_back(inv);
      }
      if (c.track) {
        running_mean.push_back(tensor(f, c, "running_mean" + ks, uC));
        running_var.push_back(tensor(f, c, "running_var" + ks, uC));
        rm = running_mean.back();
        rv = running_var.back();
      }
    }
    grad_output = tensor(f, c, "grad_output", numel);
    grad_input = tensor(f, c, "grad_input", numel);
    if (c.affine) {
      grad_weight = tensor(f, c, "grad_weight", uC);
      grad_bias = tensor(f, c, "grad_bias", uC);
    }
  }

  Scales scales(const Case& c, std::size_t k) const {
    const bool last = k + 1 == c.steps.size();
    return scales_of(g, x[k], last ? grad_output : std::vector<double>{}, used_mean[k], used_invstd[k], weight, bias,
                     c.steps[k].batch_stats);
  }
};

template <class T>
constexpr double kTol = std::is_same_v<T, float> ? 1e-6 : 1e-13;

std::string step_name(std::size_t k) { return "step " + std::to_string(k); }

// The functional API: batch_norm per step (cumulative momentum becomes 1 / num_batches_tracked),
// batch_norm_backward for the last one.
template <class T>
void replay_functional(const Case& c, const Recorded& r, Layout layout) {
  constexpr double K = kTol<T>;
  const Geom& g = r.g;
  const auto uC = static_cast<std::size_t>(g.C);
  const std::vector<T> weight = narrow<T>(r.weight), bias = narrow<T>(r.bias);
  std::vector<T> rm = narrow<T>(r.rm_init), rv = narrow<T>(r.rv_init);
  const ConstVectorView wv = c.affine ? ConstVectorView(weight) : ConstVectorView{};
  const ConstVectorView bv = c.affine ? ConstVectorView(bias) : ConstVectorView{};
  const VectorView rmv = c.track ? VectorView(rm) : VectorView{};
  const VectorView rvv = c.track ? VectorView(rv) : VectorView{};
  std::int64_t nbt = 0;

  for (std::size_t k = 0; k < c.steps.size(); ++k) {
    SCOPED_TRACE(step_name(k));
    const Step& st = c.steps[k];
    const std::vector<T> x = to_memory<T>(r.x[k], g, layout);
    std::vector<T> y(x.size(), static_cast<T>(kNaN));
    std::vector<T> sm(uC, static_cast<T>(kNaN)), si(uC, static_cast<T>(kNaN));
    double momentum = c.momentum.value_or(0.1);  // cumulative: set below where it matters
    if (st.training && c.track) {
      ++nbt;
      if (!c.momentum) momentum = 1.0 / static_cast<double>(nbt);
    }
    const ConstTensorView xv(x.data(), r.shape, layout);
    const TensorView yv(y.data(), r.shape, layout);
    ASSERT_NO_THROW(bnorm::batch_norm(
        xv, yv, {rmv, rvv}, {wv, bv},
        {.training = st.batch_stats, .momentum = momentum, .eps = c.eps, .activation = c.activation},
        {st.batch_stats ? VectorView(sm) : VectorView{}, st.batch_stats ? VectorView(si) : VectorView{}}));

    const Scales sc = r.scales(c, k);
    EXPECT_TRUE(agree(to_logical(y, g, layout), r.y[k], K, sc.y, "output"));
    if (st.batch_stats) {
      EXPECT_TRUE(agree(widen<T>(sm), r.save_mean[k], K, sc.mean, "save_mean"));
      EXPECT_TRUE(agree(widen<T>(si), r.save_invstd[k], K, 0, "save_invstd"));
    }
    if (c.track) {
      EXPECT_TRUE(agree(widen<T>(rm), r.running_mean[k], K, max_abs(r.running_mean[k]) + sc.mean, "running_mean"));
      EXPECT_TRUE(agree(widen<T>(rv), r.running_var[k], K, max_abs(r.running_var[k]), "running_var"));
      EXPECT_EQ(nbt, st.num_batches_tracked) << "num_batches_tracked (the test's own count)";
    }

    if (k + 1 < c.steps.size()) continue;
    // Backward of the last step.
    const std::vector<T> dy = to_memory<T>(r.grad_output, g, layout);
    std::vector<T> dx(x.size(), static_cast<T>(kNaN)), gw(uC, static_cast<T>(kNaN)), gb(uC, static_cast<T>(kNaN));
    const bool relu = c.activation == Activation::Relu;
    // Batch statistics: the saved ones; frozen statistics: the running ones (unchanged by the step).
    const ConstVectorView run_mean = st.batch_stats ? ConstVectorView{} : ConstVectorView(rm);
    const ConstVectorView run_var = st.batch_stats ? ConstVectorView{} : ConstVectorView(rv);
    const ConstVectorView saved_mean = st.batch_stats ? ConstVectorView(sm) : ConstVectorView{};
    const ConstVectorView saved_invstd = st.batch_stats ? ConstVectorView(si) : ConstVectorView{};
    ASSERT_NO_THROW(bnorm::batch_norm_backward(
        ConstTensorView(dy.data(), r.shape, layout),
        {.input = xv,
         .output = relu ? ConstTensorView(yv) : ConstTensorView{},
         .weight = wv,
         .saved = {saved_mean, saved_invstd},
         .running = {run_mean, run_var}},
        {.training = st.batch_stats, .eps = c.eps, .activation = c.activation}, TensorView(dx.data(), r.shape, layout),
        {c.affine ? VectorView(gw) : VectorView{}, c.affine ? VectorView(gb) : VectorView{}}));
    EXPECT_TRUE(agree(to_logical(dx, g, layout), r.grad_input, K, sc.grad_input, "grad_input"));
    if (c.affine) {
      EXPECT_TRUE(agree(widen<T>(gw), r.grad_weight, K, sc.grad_weight, "grad_weight"));
      EXPECT_TRUE(agree(widen<T>(gb), r.grad_bias, K, sc.grad_bias, "grad_bias"));
    }
  }
}

// The layer: BasicBatchNorm<T> with the case's options and torch's starting state.
template <class T>
void replay_layer(const Case& c, const Recorded& r, Layout layout) {
  constexpr double K = kTol<T>;
  const Geom& g = r.g;
  bnorm::BatchNormOptions o;
  o.eps = c.eps;
  o.momentum = c.momentum;
  o.affine = c.affine;
  o.track_running_stats = c.track;
  o.activation = c.activation;
  bnorm::BasicBatchNorm<T> bn(g.C, o, -1);
  if (c.affine) {
    ASSERT_EQ(bn.weight().size(), r.weight.size());
    ASSERT_EQ(bn.bias().size(), r.bias.size());
    std::ranges::copy(narrow<T>(r.weight), bn.weight().begin());
    std::ranges::copy(narrow<T>(r.bias), bn.bias().begin());
  } else {
    EXPECT_TRUE(bn.weight().empty());
    EXPECT_TRUE(bn.bias().empty());
  }
  if (c.track) {
    ASSERT_EQ(bn.running_mean().size(), r.rm_init.size());
    ASSERT_EQ(bn.running_var().size(), r.rv_init.size());
    std::ranges::copy(narrow<T>(r.rm_init), bn.running_mean().begin());
    std::ranges::copy(narrow<T>(r.rv_init), bn.running_var().begin());
  } else {
    EXPECT_TRUE(bn.running_mean().empty());
    EXPECT_TRUE(bn.running_var().empty());
  }

  for (std::size_t k = 0; k < c.steps.size(); ++k) {
    SCOPED_TRACE(step_name(k));
    const Step& st = c.steps[k];
    bn.train(st.training);
    const std::vector<T> x = to_memory<T>(r.x[k], g, layout);
    std::vector<T> y(x.size(), static_cast<T>(kNaN));
    const ConstTensorView xv(x.data(), r.shape, layout);
    const TensorView yv(y.data(), r.shape, layout);
    ASSERT_NO_THROW(bn.forward(xv, yv));

    const Scales sc = r.scales(c, k);
    EXPECT_TRUE(agree(to_logical(y, g, layout), r.y[k], K, sc.y, "output"));
    if (c.track) {
      EXPECT_TRUE(agree(widen<T>(std::span<const T>(bn.running_mean())), r.running_mean[k], K,
                        max_abs(r.running_mean[k]) + sc.mean, "running_mean"));
      EXPECT_TRUE(agree(widen<T>(std::span<const T>(bn.running_var())), r.running_var[k], K,
                        max_abs(r.running_var[k]), "running_var"));
      EXPECT_EQ(bn.num_batches_tracked(), st.num_batches_tracked) << "num_batches_tracked";
    }

    if (k + 1 < c.steps.size()) continue;
    const std::vector<T> dy = to_memory<T>(r.grad_output, g, layout);
    std::vector<T> dx(x.size(), static_cast<T>(kNaN));
    bn.zero_grad();
    ASSERT_NO_THROW(bn.backward(xv, ConstTensorView(dy.data(), r.shape, layout), TensorView(dx.data(), r.shape, layout),
                                c.activation == Activation::Relu ? ConstTensorView(yv) : ConstTensorView{}));
    EXPECT_TRUE(agree(to_logical(dx, g, layout), r.grad_input, K, sc.grad_input, "grad_input"));
    if (c.affine) {
      EXPECT_TRUE(agree(widen<T>(bn.weight_grad()), r.grad_weight, K, sc.grad_weight, "weight_grad"));
      EXPECT_TRUE(agree(widen<T>(bn.bias_grad()), r.grad_bias, K, sc.grad_bias, "bias_grad"));
    } else {
      EXPECT_TRUE(bn.weight_grad().empty());
      EXPECT_TRUE(bn.bias_grad().empty());
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The tests

struct Param {
  std::size_t index;
  Layout layout;
};

// gtest prints a failing test's parameter; without this it would dump the struct's bytes.
void PrintTo(const Param& p, std::ostream* os) {
  *os << "case " << p.index << ", " << (p.layout == Layout::ChannelsFirst ? "channels-first" : "channels-last");
}

std::vector<Param> all_params() {
  std::vector<Param> out;
  for (std::size_t i = 0; i < fixture().cases.size(); ++i)
    for (Layout l : {Layout::ChannelsFirst, Layout::ChannelsLast}) out.push_back({i, l});
  return out;
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const Case& c = fixture().cases.at(info.param.index);
  std::string name = c.id + "_" + c.name;
  name += info.param.layout == Layout::ChannelsFirst ? "_ChannelsFirst" : "_ChannelsLast";
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

class TorchAgreement : public ::testing::TestWithParam<Param> {
 protected:
  // Runs replay<T>(case, recorded, layout) with T the case's dtype.
  template <class F>
  void run(F&& replay) {
    const Fixture& f = fixture();
    ASSERT_TRUE(f.error.empty()) << f.error;
    const Case& c = f.cases.at(GetParam().index);
    std::optional<Recorded> r;
    try {
      r.emplace(f, c);
    } catch (const std::exception& e) {
      FAIL() << "fixture case " << c.id << " (" << c.name << "): " << e.what();
    }
    replay(c, *r, GetParam().layout);
  }
};

TEST_P(TorchAgreement, Functional) {
  run([](const Case& c, const Recorded& r, Layout l) {
    if (c.dtype == "float32")
      replay_functional<float>(c, r, l);
    else
      replay_functional<double>(c, r, l);
  });
}

TEST_P(TorchAgreement, Layer) {
  run([](const Case& c, const Recorded& r, Layout l) {
    if (c.dtype == "float32")
      replay_layer<float>(c, r, l);
    else
      replay_layer<double>(c, r, l);
  });
}

INSTANTIATE_TEST_SUITE_P(Cases, TorchAgreement, ::testing::ValuesIn(all_params()), param_name);

TEST(TorchFixture, HoldsEnoughCasesAndNamesTorchVersion) {
  const Fixture& f = fixture();
  ASSERT_TRUE(f.error.empty()) << f.error;
  EXPECT_GE(f.cases.size(), 50u);
  ASSERT_FALSE(f.torch_version.empty()) << "metadata torch_version";
  EXPECT_TRUE(std::isdigit(static_cast<unsigned char>(f.torch_version[0]))) << f.torch_version;
  std::cout << "[ fixture  ] " << f.cases.size() << " cases from torch " << f.torch_version << "\n";
}

// The fixture covers what it claims to: every rank, both dtypes, each option both ways, the three
// momentum modes, eval steps, the fused ReLU, a non-default eps and a large offset; and every
// tensor in the file belongs to a case (a stale generator would leave orphans).
TEST(TorchFixture, CoversTheSemantics) {
  const Fixture& f = fixture();
  ASSERT_TRUE(f.error.empty()) << f.error;
  std::set<std::size_t> ranks;
  std::set<std::string> dtypes, ids, names;
  std::set<double> momenta;
  bool cumulative = false, no_affine = false, no_track = false, relu = false, eval_frozen = false,
       eval_batch = false, multi_step = false, eps = false, large = false, c1 = false, n2 = false;
  for (const Case& c : f.cases) {
    ranks.insert(c.shape.size());
    dtypes.insert(c.dtype);
    EXPECT_TRUE(ids.insert(c.id).second) << "duplicate id " << c.id;
    EXPECT_TRUE(names.insert(c.name).second) << "duplicate name " << c.name;
    if (c.momentum) momenta.insert(*c.momentum);
    cumulative |= c.track && !c.momentum && c.steps.size() >= 3;
    no_affine |= !c.affine;
    no_track |= !c.track;
    relu |= c.activation == Activation::Relu;
    eps |= c.eps != 1e-5;
    large |= c.offset == "large";
    c1 |= c.shape[1] == 1;
    n2 |= c.shape[0] == 2;
    multi_step |= c.steps.size() >= 3 && c.steps[2].training;
    for (const Step& s : c.steps) {
      eval_frozen |= !s.training && !s.batch_stats;
      eval_batch |= !s.training && s.batch_stats;
    }
  }
  EXPECT_EQ(ranks, (std::set<std::size_t>{2, 3, 4, 5}));
  EXPECT_EQ(dtypes, (std::set<std::string>{"float32", "float64"}));
  EXPECT_TRUE(momenta.count(0.1) && momenta.count(0.3));
  EXPECT_TRUE(cumulative && no_affine && no_track && relu && eval_frozen && eval_batch && multi_step && eps && large &&
              c1 && n2);
  for (const auto& [key, t] : f.file.tensors) {
    const auto slash = key.find('/');
    EXPECT_TRUE(slash != std::string::npos && ids.count(key.substr(0, slash))) << "orphan tensor " << key;
  }
}

}  // namespace
