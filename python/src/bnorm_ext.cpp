// bnorm._bnorm: the thin binding between Python arrays (NumPy arrays, torch tensors: anything that
// speaks DLPack or the buffer protocol, on the CPU; float32, float64 and, from DLPack, bfloat16) and
// bnorm's functional API.
//
// The Python package (python/bnorm/*.py) does the argument checking that gives torch's errors and
// prepares the memory (one of the two dense layouts, vectors of C contiguous values). This file
// trusts none of that: it checks dtypes, devices and strides itself, so that a direct call with a bad
// array raises TypeError or ValueError and never reads or writes out of bounds. bnorm::Error (a
// std::invalid_argument) becomes ValueError through nanobind's standard translation.
//
// Tensors of any rank >= 2 are passed to the library as (N, C, S) with S the product of the spatial
// sizes: the library treats the spatial dims as one, so this is the same computation, and it lifts
// the library's limit of 8 dims. The GIL is released while the kernels run.
#include <bnorm/bnorm.hpp>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using InArray = nb::ndarray<nb::ro, nb::device::cpu>;
using OutArray = nb::ndarray<nb::device::cpu>;
using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

template <class A>
bnorm::DType dtype_of(const A& a, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float) && dt.lanes == 1) {
    if (dt.bits == 32) return bnorm::DType::Float32;
    if (dt.bits == 64) return bnorm::DType::Float64;
  }
  // bfloat16 (torch.bfloat16): a storage type; its per-channel vectors are float32, which the
  // library checks (a bfloat16 vector is a ValueError there).
  if (dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.lanes == 1 && dt.bits == 16)
    return bnorm::DType::BFloat16;
  std::string msg = "bnorm: ";
  msg += name;
  msg += ": expected dtype float32, float64 or bfloat16, got DLPack type code ";
  msg += std::to_string(dt.code);
  msg += " with ";
  msg += std::to_string(dt.bits);
  msg += " bits";
  throw nb::type_error(msg.c_str());
}

// True when the array's memory is dense in the axis order `order` (outermost first). Dims of size 1
// may have any stride; an empty array is dense in every order.
template <class A>
bool dense_in(const A& a, const std::vector<std::size_t>& order) {
  for (std::size_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0) return true;
  std::int64_t expected = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const auto extent = static_cast<std::int64_t>(a.shape(*it));
    if (extent == 1) continue;
    if (a.stride(*it) != expected) return false;
    expected *= extent;
  }
  return true;
}

std::vector<std::size_t> channels_first_order(std::size_t ndim) {
  std::vector<std::size_t> order(ndim);
  for (std::size_t i = 0; i < ndim; ++i) order[i] = i;
  return order;
}

std::vector<std::size_t> channels_last_order(std::size_t ndim) {
  std::vector<std::size_t> order{0};
  for (std::size_t i = 2; i < ndim; ++i) order.push_back(i);
  order.push_back(1);
  return order;
}

// The layout of a tensor's memory: `preferred` when its strides fit it (both fit when the layouts
// are the same memory), otherwise the other one; neither is a ValueError.
template <class A>
bnorm::Layout layout_of(const A& a, const char* name, bnorm::Layout preferred) {
  const std::size_t nd = a.ndim();
  const bool cf = dense_in(a, channels_first_order(nd));
  const bool cl = nd >= 3 && dense_in(a, channels_last_order(nd));
  if (preferred == bnorm::Layout::ChannelsLast ? cl : cf) return preferred;
  if (cf) return bnorm::Layout::ChannelsFirst;
  if (cl) return bnorm::Layout::ChannelsLast;
  throw nb::value_error((std::string("bnorm: ") + name +
                         ": expected dense channels-first (contiguous) or channels-last memory, got other strides "
                         "(make a contiguous copy first)")
                            .c_str());
}

template <class A>
bnorm::Shape logical_shape(const A& a, const char* name) {
  if (a.ndim() < 2)
    throw nb::value_error((std::string("bnorm: ") + name + ": expected at least 2 dims (N, C, ...), got " +
                           std::to_string(a.ndim()))
                              .c_str());
  const auto n = static_cast<std::int64_t>(a.shape(0)), c = static_cast<std::int64_t>(a.shape(1));
  if (a.ndim() == 2) return bnorm::Shape{n, c};
  std::int64_t s = 1;
  for (std::size_t i = 2; i < a.ndim(); ++i)
    if (a.shape(i) == 0) return bnorm::Shape{n, c, 0};
  for (std::size_t i = 2; i < a.ndim(); ++i)
    if (__builtin_mul_overflow(s, static_cast<std::int64_t>(a.shape(i)), &s))
      throw nb::value_error((std::string("bnorm: ") + name + ": the product of the spatial sizes overflows int64").c_str());
  return bnorm::Shape{n, c, s};
}

bnorm::ConstTensorView in_tensor(const InArray& a, const char* name, bnorm::Layout preferred) {
  return {a.data(), dtype_of(a, name), logical_shape(a, name), layout_of(a, name, preferred)};
}

bnorm::TensorView out_tensor(const OutArray& a, const char* name, bnorm::Layout preferred) {
  return {a.data(), dtype_of(a, name), logical_shape(a, name), layout_of(a, name, preferred)};
}

// A per-channel vector: any shape whose values are contiguous; its length is its number of values.
template <class A>
void check_vector_memory(const A& a, const char* name) {
  if (!dense_in(a, channels_first_order(a.ndim())))
    throw nb::value_error(
        (std::string("bnorm: ") + name + ": expected contiguous values, got a strided array").c_str());
}

bnorm::ConstVectorView in_vector(const OptIn& a, const char* name) {
  if (!a) return {};
  check_vector_memory(*a, name);
  return {a->data(), dtype_of(*a, name), static_cast<std::int64_t>(a->size())};
}

bnorm::VectorView out_vector(const OptOut& a, const char* name) {
  if (!a) return {};
  check_vector_memory(*a, name);
  return {a->data(), dtype_of(*a, name), static_cast<std::int64_t>(a->size())};
}

void forward(const InArray& input, const OutArray& output, const OptOut& running_mean, const OptOut& running_var,
             const OptIn& weight, const OptIn& bias, bool training, double momentum, double eps,
             const OptOut& save_mean, const OptOut& save_invstd) {
  const bnorm::ConstTensorView x = in_tensor(input, "input", bnorm::Layout::ChannelsFirst);
  const bnorm::TensorView y = out_tensor(output, "output", x.layout());
  const bnorm::VectorView rm = out_vector(running_mean, "running_mean"), rv = out_vector(running_var, "running_var");
  const bnorm::ConstVectorView w = in_vector(weight, "weight"), b = in_vector(bias, "bias");
  const bnorm::VectorView sm = out_vector(save_mean, "save_mean"), si = out_vector(save_invstd, "save_invstd");
  nb::gil_scoped_release release;
  bnorm::batch_norm(x, y, {rm, rv}, {w, b}, {.training = training, .momentum = momentum, .eps = eps}, {sm, si});
}

// Eval: the running statistics are only read (bnorm::batch_norm writes them in training only), so
// read-only arrays are accepted.
void forward_eval(const InArray& input, const OutArray& output, const InArray& running_mean,
                  const InArray& running_var, const OptIn& weight, const OptIn& bias, double eps) {
  const bnorm::ConstTensorView x = in_tensor(input, "input", bnorm::Layout::ChannelsFirst);
  const bnorm::TensorView y = out_tensor(output, "output", x.layout());
  const bnorm::ConstVectorView rm = in_vector(running_mean, "running_mean"), rv = in_vector(running_var, "running_var");
  const bnorm::VectorView rm_view{const_cast<void*>(rm.data()), rm.dtype(), rm.size()};
  const bnorm::VectorView rv_view{const_cast<void*>(rv.data()), rv.dtype(), rv.size()};
  const bnorm::ConstVectorView w = in_vector(weight, "weight"), b = in_vector(bias, "bias");
  nb::gil_scoped_release release;
  bnorm::batch_norm(x, y, rm_view, rv_view, w, b, /*training=*/false, 0.0, eps);
}

void backward(const InArray& grad_output, const InArray& input, const OptIn& weight, const OptIn& running_mean,
              const OptIn& running_var, const OptIn& save_mean, const OptIn& save_invstd, bool training, double eps,
              const OptOut& grad_input, const OptOut& grad_weight, const OptOut& grad_bias) {
  const bnorm::ConstTensorView x = in_tensor(input, "input", bnorm::Layout::ChannelsFirst);
  const bnorm::ConstTensorView dy = in_tensor(grad_output, "grad_output", x.layout());
  const bnorm::TensorView dx = grad_input ? out_tensor(*grad_input, "grad_input", x.layout()) : bnorm::TensorView{};
  const bnorm::ConstVectorView w = in_vector(weight, "weight");
  const bnorm::ConstVectorView rm = in_vector(running_mean, "running_mean"), rv = in_vector(running_var, "running_var");
  const bnorm::ConstVectorView sm = in_vector(save_mean, "save_mean"), si = in_vector(save_invstd, "save_invstd");
  const bnorm::VectorView gw = out_vector(grad_weight, "grad_weight"), gb = out_vector(grad_bias, "grad_bias");
  nb::gil_scoped_release release;
  bnorm::batch_norm_backward(dy, {.input = x, .weight = w, .saved = {sm, si}, .running = {rm, rv}},
                             {.training = training, .eps = eps}, dx, {gw, gb});
}

void batch_stats(const InArray& input, const OutArray& mean, const OutArray& var) {
  const bnorm::ConstTensorView x = in_tensor(input, "input", bnorm::Layout::ChannelsFirst);
  const bnorm::VectorView m = out_vector(mean, "mean"), v = out_vector(var, "var");
  nb::gil_scoped_release release;
  bnorm::batch_stats(x, m, v);
}

}  // namespace

NB_MODULE(_bnorm, m) {
  m.doc() = "bnorm's compiled kernels (internal: use bnorm.batch_norm and bnorm.torch)";
  m.def("forward", &forward, "input"_a, "output"_a, "running_mean"_a.none(), "running_var"_a.none(),
        "weight"_a.none(), "bias"_a.none(), "training"_a, "momentum"_a, "eps"_a, "save_mean"_a.none(),
        "save_invstd"_a.none(),
        "bnorm::batch_norm on CPU arrays: writes output (and, in training, save_mean, save_invstd and the "
        "running statistics in place).");
  m.def("forward_eval", &forward_eval, "input"_a, "output"_a, "running_mean"_a, "running_var"_a, "weight"_a.none(),
        "bias"_a.none(), "eps"_a,
        "bnorm::batch_norm with training=false: writes output; the running statistics are only read.");
  m.def("backward", &backward, "grad_output"_a, "input"_a, "weight"_a.none(), "running_mean"_a.none(),
        "running_var"_a.none(), "save_mean"_a.none(), "save_invstd"_a.none(), "training"_a, "eps"_a,
        "grad_input"_a.none(), "grad_weight"_a.none(), "grad_bias"_a.none(),
        "bnorm::batch_norm_backward on CPU arrays: writes the gradients that are given (not None).");
  m.def("batch_stats", &batch_stats, "input"_a, "mean"_a, "var"_a,
        "bnorm::batch_stats: per-channel mean and biased variance into mean and var.");
  m.def("set_num_threads", &bnorm::set_num_threads, "n"_a, "Sets the number of threads of bnorm's kernels.");
  m.def("num_threads", &bnorm::num_threads, "The number of threads of bnorm's kernels.");
}
