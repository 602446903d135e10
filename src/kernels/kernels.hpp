// Internal: the kernel families over caller-owned memory viewed as (N, C, S).
//
// Channels-first: element (n, c, s) at (n * C + c) * S + s. Channels-last: at (n * S + s) * C + c.
// Kernels neither allocate nor throw: the functional layer validates, sizes the workspace and
// hands it in. Statistics and reductions accumulate in double; elementwise passes run in T.
#pragma once

#include <bnorm/types.hpp>

#include "kernels/isa_table.hpp"

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace bnorm::kernels {

// The arithmetic type of a storage type: kernels read and write S and compute in Compute<S>
// (float32 for bfloat16; the type itself otherwise).
template <class S>
struct ComputeOf {
  using type = S;
};
template <>
struct ComputeOf<bfloat16> {
  using type = float;
};
template <class S>
using Compute = typename ComputeOf<S>::type;

struct Geometry {
  std::int64_t N = 0, C = 0, S = 0;
  Layout layout = Layout::ChannelsFirst;
  // Threads of the channels-last reductions, fixed once per call (check_tensor does it) so that the
  // workspace sized for them stays right while another thread calls set_num_threads; 0: not fixed.
  int reduce_threads = 0;
  // False when the outputs are fresh memory (Options::outputs): large outputs then take ordinary
  // stores, not non-temporal ones (stream_output).
  bool may_stream = true;
  std::int64_t per_channel() const { return N * S; }  // m, the values per channel
  std::int64_t numel() const { return N * C * S; }
  std::int64_t rows() const { return N * S; }         // channels-last: rows of C values
};

// Elements handled by one two-pass block: small enough that the second pass over it hits L1.
inline constexpr std::int64_t kBlock = 2048;

// Channels-last reductions work on tiles of at most this many channels (and cl_rows_per_block
// rows), so that a tile's values and its per-channel sums stay in L1 between the two passes.
inline constexpr std::int64_t kTileChannels = 256;

// Outputs of at least the threshold are written with non-temporal stores (simd.hpp): a tensor that
// large does not stay in the caches for its consumer anyway, and streaming it saves the read of every
// destination line and keeps the input's lines in cache for the kernel's second pass. The threshold
// is this machine's (stream_threshold.cpp): BNORM_STREAM_BYTES, or measured once, on the first call
// large enough to need it.
struct StreamProbe {
  std::int64_t bytes = 0;                   // a copy of this many bytes into as many
  double cached_s = 0, streamed_s = 0;      // best of 5, ordinary and non-temporal stores
};
struct StreamThreshold {
  std::int64_t bytes = 0;                   // outputs of at least this many bytes are streamed
  std::string source;                       // where it came from (bnorm info prints it)
  std::vector<StreamProbe> probes;          // the timings it was chosen from (none if not measured)
  int threads = 0;                          // the threads that ran each timed copy (0 if not measured)
};
// This process's threshold (computed on the first call: measuring takes up to a few hundred ms).
const StreamThreshold& stream_threshold();
// The measurement: copies of first, 2 first, ... bytes up to last, each split over the library's
// threads (num_threads()), until streaming wins (stream_wins) twice in a row at one size; that size,
// or 2 last if none.
StreamThreshold calibrate_stream_threshold(std::int64_t first, std::int64_t last);
// Streaming wins a probe where it takes at most 97% of the ordinary stores' time.
bool stream_wins(const StreamProbe& p);
// Whether an output of `bytes` is streamed (measures the threshold only for outputs that need it).
bool stream_output_bytes(std::int64_t bytes);
// Tests: a fixed threshold instead of this machine's (-1: back to it).
void set_stream_threshold_for_testing(std::int64_t bytes);

template <class T>
bool stream_output(const Geometry& g) {
  // Not bfloat16: streaming its outputs (half-line or, paired, whole-line stores) measured slower on
  // Sapphire Rapids and no better on the AMD EPYC (BENCHMARKS.md, "Non-temporal stores").
  if constexpr (std::is_same_v<T, bfloat16>) return false;
  // Only rows of whole cache lines (channels-first rows of S values, channels-last rows of C; the
  // kernels check too that the output starts on a vector boundary: stream_to in simd.hpp). Otherwise a
  // line where one row ends and the next begins takes ordinary stores from one row and streamed ones
  // from the other, and streaming turns into a loss, measured on 7x7 maps (rows of 196 bytes):
  // BENCHMARKS.md, "Non-temporal stores".
  const std::int64_t row_bytes = (g.layout == Layout::ChannelsFirst ? g.S : g.C) * static_cast<std::int64_t>(sizeof(T));
  return g.may_stream && row_bytes % 64 == 0 &&
         stream_output_bytes(g.N * g.C * g.S * static_cast<std::int64_t>(sizeof(T)));
}

// The instruction sets the kernels are compiled for: one enumerator per row of the ISA table
// (src/kernels/isas.cmake, through the generated kernels/isa_table.hpp), in its order, lowest
// first. Dispatch picks the best one that this target builds and the CPU supports.
enum class Isa {
#define BNORM_ISA_ENUMERATOR(enumerator, name) enumerator,
  BNORM_ISAS(BNORM_ISA_ENUMERATOR)
#undef BNORM_ISA_ENUMERATOR
};
// Every Isa, lowest first (for tests that run each build).
inline constexpr Isa kAllIsas[] = {
#define BNORM_ISA_LIST_ENTRY(enumerator, name) Isa::enumerator,
    BNORM_ISAS(BNORM_ISA_LIST_ENTRY)
#undef BNORM_ISA_LIST_ENTRY
};
Isa active_isa();
const char* isa_name(Isa);
// For tests and benchmarks: use `isa` (capped at what the CPU supports) from now on.
void set_isa(Isa isa);
bool isa_supported(Isa isa);

// Workspace (in doubles) that channel_moments and backward_reduce need for `threads` threads.
std::int64_t reduce_workspace_doubles(const Geometry& g, int threads);
// Threads the reductions will use for this geometry (what the workspace must be sized for).
int reduce_threads(const Geometry& g);
// Channels-last reductions take blocks of this many rows (about kBlock values).
std::int64_t cl_rows_per_block(const Geometry& g);

// Per-channel coefficients of the normalize pass, in T: y = (x - mean_hi) * scale + shift. The
// double mean is split in two parts of T (hi + lo), so that x - mean_hi is exact where it matters (a
// constant channel gives exactly 0, and a large offset costs no accuracy); the small part goes into
// the shift, computed in double: shift = beta - mean_lo * scale (normalize_shift). Its rounding is
// that of a value of the output's size, so the pass needs one subtraction and one fused multiply-add.
template <class T>
struct ChannelCoeffs {
  const T* mean_hi;
  const T* scale;  // gamma * invstd
  const T* shift;  // beta - mean_lo * scale
};
template <class T>
inline T normalize_shift(double beta, T mean_lo, T scale) {
  return static_cast<T>(beta - static_cast<double>(mean_lo) * static_cast<double>(scale));
}

// dx = dy' * k_dy - (x - mean_hi) * k_x - k_c (backward_apply), where k_c holds the mean's low part
// (backward_coeffs).
template <class T>
struct BackwardCoeffs {
  const T* mean_hi;
  const T* k_dy;
  const T* k_x;
  const T* k_c;
};

// What the fused backward needs per channel from its forward: the mean and invstd it normalized
// with, and gamma (null: 1).
struct ForwardChannels {
  const double* mean;
  const double* invstd;
  const double* gamma;
};

// ---- The kernel table: each kernel is declared once, here, as a row
// X(name, (parameters), (arguments)), with S the storage type. Every kernel returns void.
// Everything else comes from this list:
//   - the entry points below, kernels::<name><S>(...), which dispatch.cpp defines so that each call
//     runs the active ISA's build (one function-pointer table per ISA and storage type);
//   - the declarations in each ISA's namespace (per_isa.hpp for the kernel files, dispatch.cpp for
//     all built ISAs);
//   - the instantiations. A kernel file ends with BNORM_INSTANTIATE(<name>) for each kernel that it
//     defines (per_isa.hpp), which gives the storage types that the ISA table lists for its build.
#define BNORM_KERNELS(X)                                                                                      \
  /* Per-channel mean and M2 = sum((x - mean)^2) of the N * S values of each channel: per-block               \
     two-pass sums in double, blocks merged with Chan's formula. M2 is never negative. */                     \
  X(channel_moments, (const S* x, const Geometry& g, double* mean, double* m2, double* workspace),            \
    (x, g, mean, m2, workspace))                                                                              \
  /* y = (x - mean_hi) * scale + shift, then max(y, 0) with Activation::Relu. y may equal x.                 \
     With a residual (same layout as x; null for none): y = act(normalized + residual). */                    \
  X(normalize, (const S* x, S* y, const Geometry& g, ChannelCoeffs<Compute<S>> k, Activation act,             \
                const S* residual),                                                                           \
    (x, y, g, k, act, residual))                                                                              \
  /* Per-channel sum(dy') and sum(dy' * (x - mean)) in double, where dy' = dy masked by output > 0 when       \
     `output` is given (fused ReLU) and dy otherwise. */                                                      \
  X(backward_reduce, (const S* dy, const S* x, const S* output, const Geometry& g, const Compute<S>* mean_hi, \
                      const Compute<S>* mean_lo, double* sum_dy, double* sum_dy_xmu, double* workspace),      \
    (dy, x, output, g, mean_hi, mean_lo, sum_dy, sum_dy_xmu, workspace))                                      \
  /* dx = dy' * k_dy - (x - mean) * k_x - k_c. dx may equal dy or x. */                                       \
  X(backward_apply, (const S* dy, const S* x, const S* output, S* dx, const Geometry& g,                      \
                     BackwardCoeffs<Compute<S>> k),                                                           \
    (dy, x, output, dx, g, k))                                                                                \
  /* The channels-first fast path of training forward (use_fused_forward): statistics of channel c, then      \
     y for channel c. gamma/beta may be null (1, 0). Writes mean[c] and var[c] (biased). */                   \
  X(fused_forward_cf, (const S* x, S* y, const Geometry& g, const double* gamma, const double* beta,          \
                       double eps, Activation act, const S* residual, double* mean, double* var),             \
    (x, y, g, gamma, beta, eps, act, residual, mean, var))                                                    \
  /* The channels-first fast path of backward (use_fused_backward): the two reductions of channel c, then     \
     dx for channel c (when dx is not null), with mean/invstd the statistics of the forward and training      \
     selecting the full or frozen form. */                                                                    \
  X(fused_backward_cf, (const S* dy, const S* x, const S* output, S* dx, const Geometry& g,                   \
                        ForwardChannels f, bool training, double* sum_dy, double* sum_dy_xmu),                \
    (dy, x, output, dx, g, f, training, sum_dy, sum_dy_xmu))

// The storage types of the kernels: X(a, T) for each.
#define BNORM_STORAGE_TYPES(X, a) X(a, float) X(a, double) X(a, bfloat16)

// A row of BNORM_KERNELS as a declaration, in whatever namespace it is expanded in.
#define BNORM_DECLARE_KERNEL(name, parameters, arguments) \
  template <class S>                                      \
  void name parameters;
BNORM_KERNELS(BNORM_DECLARE_KERNEL)

// The explicit instantiation of template `name` for T. The function type comes from the template's
// one declaration, so a definition whose parameters differ from it (a second template) does not
// compile here.
#define BNORM_INSTANTIATE_ONE(name, T) template std::remove_pointer_t<decltype(&name<T>)> name<T>;

// ---- Fused or unfused: the one place that decides.
// The channels-first fast paths (fused_forward_cf, fused_backward_cf) take one channel at a time and
// make the second pass while the channel is still in L2, so that the tensor crosses memory twice in
// forward (not three times) and three times in backward (not five). They apply when the channel's
// slices of the tensors that the second pass re-reads fit in fuse_budget_bytes() (an output written
// with streaming stores takes no room), and when the channels spread evenly over the threads: the
// fused path runs a channel per thread, where the unfused passes split rows. Both read
// num_threads() once per call.
template <class S>
bool use_fused_forward(const Geometry& g);
// relu_output: the ReLU's output is given (dy is masked by it); writes_dx: dx is not null.
template <class S>
bool use_fused_backward(const Geometry& g, bool relu_output, bool writes_dx);

// Three quarters of one core's L2 (sysconf; 1 MiB when the system does not say): the room a
// channel's slices may take between the two passes.
std::int64_t fuse_budget_bytes();
// A core's L2 as the system reports it (sysconf), 0 when it does not.
std::int64_t l2_cache_bytes();

// The tensors whose slices a fused pass keeps in cache between its two passes. use_fused_* size
// the path with them, and the kernels size their channel blocks with them. An output written with
// streaming stores takes no room.
template <class S>
int fused_forward_cached(const Geometry& g) {
  return stream_output<S>(g) ? 1 : 2;  // x (and y)
}
template <class S>
int fused_backward_cached(const Geometry& g, bool relu_output, bool writes_dx) {
  return (relu_output ? 3 : 2) + (writes_dx && !stream_output<S>(g) ? 1 : 0);  // dy, x (output, dx)
}

// The per-channel constants of the elementwise passes, computed in one place for every path.
// Static like chan_merge: each per-ISA build keeps its own copy.
//
// mean = hi + lo in T, so that (x - hi) - lo carries the double mean's precision.
template <class T>
static inline void split_mean(double mean, T& hi, T& lo) {
  hi = static_cast<T>(mean);
  // An infinite mean (a running_mean of +-Inf) keeps lo = 0, so that x - mean is +-Inf as in torch
  // (Inf - Inf would make it NaN).
  const double rest = mean - static_cast<double>(hi);
  lo = rest == rest ? static_cast<T>(rest) : T(0);
}

// dx = dy * k_dy - (x - mean) * k_x - k_c. Training (batch statistics):
//   dx = gamma * invstd * (dy - sum(dy) / m - (x - mean) * invstd^2 * sum(dy * (x - mean)) / m);
// eval (frozen statistics): dx = gamma * invstd * dy.
template <class T>
static inline void backward_coeffs(double gamma, double invstd, double sum_dy, double sum_dy_xmu, double m,
                                   bool training, T mean_lo, T& k_dy, T& k_x, T& k_c) {
  const double a = gamma * invstd;
  k_dy = static_cast<T>(a);
  k_x = training ? static_cast<T>(a * invstd * invstd * sum_dy_xmu / m) : T(0);
  // The mean's low part folded in, as in the normalize pass's shift: (x - mean_hi - mean_lo) * k_x +
  // k_c = (x - mean_hi) * k_x + (k_c - mean_lo * k_x), the latter in double, rounded once.
  k_c = training ? static_cast<T>(a * sum_dy / m - static_cast<double>(mean_lo) * static_cast<double>(k_x)) : T(0);
}

// The mean of n values of mean `mean` and nb values of mean mb (total = n + nb). Chan's update
// mean + (mb - mean) * nb / total in the finite case; where mb - mean is not finite (an infinite
// mean on either side) the weighted average, so that same-signed infinities give that infinity,
// as torch's sum / count does, and not Inf - Inf = NaN.
static inline double merged_mean(double n, double mean, double nb, double mb, double total) {
  const double delta = mb - mean;
  return delta - delta == 0 ? mean + delta * (nb / total) : (mean * n + mb * nb) / total;
}

// Chan's merge of the moments (nb, mb, m2b) into (n, mean, m2). Static: every per-ISA build of the
// kernels gets its own copy (see dispatch.cpp).
static inline void chan_merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double total = n + nb;
  const double delta = mb - mean;
  m2 += m2b + delta * delta * (n * nb / total);
  mean = merged_mean(n, mean, nb, mb, total);
  n = total;
}

}  // namespace bnorm::kernels
