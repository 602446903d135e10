// bnorm-bench: the pieces shared by the harness (main.cpp and its parts: options, data, check,
// timing, roofline, report) and the implementations under test (impl_bnorm.cpp, impl_torch.cpp,
// impl_onednn.cpp).
//
// One benchmark case is a (shape, layout, op, dtype); the harness owns every tensor of it (inputs in
// the case's layout, outputs, per-channel vectors) and hands the same memory to each implementation,
// which wraps it without copying (oneDNN's blocked layout is the exception: it keeps reordered
// copies of its own). An implementation's run() is what is timed; publish() moves a private result
// into the shared output buffers before the harness checks it against the float64 reference.
//
// Dtypes: f32 and bf16 (bfloat16 storage of x, dy, y, dx; every per-channel vector stays float32,
// and the libraries compute in float32). Adding another: add it to DType with its name and size
// below, teach store()/load() (data.hpp) and the tolerance (check.cpp), and make each
// Impl::supports() accept it where the library under test does. The traffic model, the table and
// the JSON carry the dtype.
// An implementation that finds at prepare() time that it has no kernel for a case (oneDNN without
// a bf16 implementation on this CPU) throws Unsupported: the row says so and is not a failure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench {

enum class DType { F32, BF16 };
inline const char* name_of(DType d) { return d == DType::BF16 ? "bf16" : "f32"; }
inline std::size_t size_of(DType d) { return d == DType::BF16 ? 2 : 4; }

struct Unsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Layout { NCHW, NHWC };  // for a 2-D (N, C) shape both are the same memory: labelled "NC"
enum class Op { TrainFwd, InferFwd, Backward };
inline const char* name_of(Op op) {
  switch (op) {
    case Op::TrainFwd: return "train_fwd";
    case Op::InferFwd: return "infer_fwd";
    case Op::Backward: return "backward";
  }
  return "?";
}

struct Case {
  std::vector<std::int64_t> dims;  // logical (N, C) or (N, C, H, W)
  Layout layout = Layout::NCHW;
  Op op = Op::TrainFwd;
  DType dtype = DType::F32;
  double eps = 1e-5, momentum = 0.1;

  std::int64_t N() const { return dims[0]; }
  std::int64_t C() const { return dims[1]; }
  std::int64_t S() const {
    std::int64_t s = 1;
    for (std::size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  std::int64_t numel() const { return N() * C() * S(); }
  bool is_2d() const { return dims.size() == 2; }
};

// Memory of one case. Tensors (x, dy, y, dx) have the case's dtype and layout (bf16: 16-bit words,
// bnorm::bfloat16's bits); per-channel vectors are float32 for every dtype. Outputs are shared by
// all implementations (and filled with NaN before each check).
struct Data {
  const void* x = nullptr;
  const void* dy = nullptr;
  void* y = nullptr;
  void* dx = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  const float* running_mean = nullptr;  // eval statistics (read only)
  const float* running_var = nullptr;
  float* train_running_mean = nullptr;  // updated by training forwards (bnorm, torch)
  float* train_running_var = nullptr;
  float* save_mean = nullptr;    // training forward outputs; for backward they hold the reference's
  float* save_invstd = nullptr;  //   batch statistics (so every backward starts from the same ones)
  float* batch_mean = nullptr;   // oneDNN's form of the same: mean and biased variance
  float* batch_var = nullptr;
  float* dweight = nullptr;
  float* dbias = nullptr;
};

class Impl {
 public:
  virtual ~Impl() = default;
  virtual std::string name() const = 0;
  // The layout label of its rows ("NCHW", "NHWC", "NC"; oneDNN's blocked one says "nChw16c").
  virtual std::string layout_label(const Case& c) const;
  virtual bool supports(const Case& c) const = 0;
  // A peer is compared with bnorm ("ratio to the faster peer"); oneDNN's blocked layout is shown
  // but is not a peer of a plain-layout row.
  virtual bool is_peer() const { return true; }
  virtual void set_threads(int n) = 0;
  // Builds whatever run() needs (wrappers, primitives, reordered copies); outside the timing.
  virtual void prepare(const Case& c, const Data& d) = 0;
  virtual void run() = 0;       // one call of the case's op: what is timed
  virtual void publish() {}     // private results -> d.y / d.dx (after a run, before a check)
  virtual void release() {}     // drops what prepare() built
  virtual std::string detail() const { return ""; }  // e.g. the kernel oneDNN picked
};

std::unique_ptr<Impl> make_bnorm();
// These return empty vectors when the bench was built without the library.
std::vector<std::unique_ptr<Impl>> make_torch();
std::vector<std::unique_ptr<Impl>> make_onednn();
std::string torch_version();   // "" when absent
std::string onednn_version();  // "" when absent

}  // namespace bench
