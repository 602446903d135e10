// bnorm._bnorm: the thin binding between Python arrays (NumPy arrays, torch tensors: anything that
// speaks DLPack or the buffer protocol, on the CPU; float32, float64 and, from DLPack, bfloat16) and
// bnorm's functional API and its folding functions (bnorm/fold.hpp: bnorm.fold_weights).
//
// The argument checks are the library's: this file builds views of the arrays and lets
// bnorm::batch_norm & co. decide (shapes, ranks, lengths of the per-channel vectors, dtype
// agreement, running statistics, eps, momentum, aliasing, values per channel). bnorm::Error becomes
// TypeError (ErrorKind::Type) or ValueError (the other kinds), with the library's message. What is
// checked here is only what a view cannot describe: an element type bnorm has no DType for (a
// TypeError), memory that is neither dense layout (bnorm::layout_of) and vectors whose values are not
// contiguous (ValueErrors), so that a direct call with a bad array never reads or writes out of
// bounds. The Python package (python/bnorm/*.py) adds the rules of torch's that are not the
// library's and prepares the memory (one of the two dense layouts, contiguous vectors).
//
// Tensors of up to kMaxRank dims are passed to the library with their shape; beyond that, as
// (N, C, S) with S the product of the spatial sizes: the library treats the spatial dims as one, so
// this is the same computation, and it lifts the library's limit of 8 dims. The GIL is released
// while the kernels run.
#include <bnorm/bnorm.hpp>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <exception>
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

// The layout of the array's memory as bnorm::layout_of reads it (strides in elements); DLPack may
// leave out the strides of compact row-major memory.
template <class A>
std::optional<bnorm::Layout> memory_layout(const A& a) {
  if (a.stride_ptr() == nullptr) return bnorm::Layout::ChannelsFirst;
  return bnorm::layout_of({a.shape_ptr(), a.ndim()}, {a.stride_ptr(), a.ndim()});
}

// A tensor's memory is one of the two dense layouts, or it cannot be viewed (the library takes no
// strides).
template <class A>
bnorm::Layout tensor_layout(const A& a, const char* name) {
  if (const std::optional<bnorm::Layout> layout = memory_layout(a)) return *layout;
  throw nb::value_error((std::string("bnorm: ") + name +
                         ": expected dense channels-first (contiguous) or channels-last memory, got other strides "
                         "(make a contiguous copy first)")
                            .c_str());
}

// The shape as the library sees it: the array's own up to kMaxRank dims (so that the library checks
// the rank, the sizes and their product), otherwise (N, C, S).
template <class A>
bnorm::Shape logical_shape(const A& a, const char* name) {
  if (a.ndim() <= static_cast<std::size_t>(bnorm::kMaxRank)) return bnorm::Shape({a.shape_ptr(), a.ndim()});
  const auto n = static_cast<std::int64_t>(a.shape(0)), c = static_cast<std::int64_t>(a.shape(1));
  std::int64_t s = 1;
  for (std::size_t i = 2; i < a.ndim(); ++i)
    if (a.shape(i) == 0) return bnorm::Shape{n, c, 0};
  for (std::size_t i = 2; i < a.ndim(); ++i)
    if (__builtin_mul_overflow(s, static_cast<std::int64_t>(a.shape(i)), &s))
      throw nb::value_error((std::string("bnorm: ") + name + ": the product of the spatial sizes overflows int64").c_str());
  return bnorm::Shape{n, c, s};
}

bnorm::ConstTensorView in_tensor(const InArray& a, const char* name) {
  return {a.data(), dtype_of(a, name), logical_shape(a, name), tensor_layout(a, name)};
}

bnorm::TensorView out_tensor(const OutArray& a, const char* name) {
  return {a.data(), dtype_of(a, name), logical_shape(a, name), tensor_layout(a, name)};
}

// A per-channel vector: any shape whose values are contiguous; its length is its number of values.
// A given vector is present even without values: DLPack may give those a null pointer, which the
// library would read as absent (None), so an aligned address that is never read stands in.
template <class A>
void* vector_data(const A& a, const char* name) {
  if (memory_layout(a) != bnorm::Layout::ChannelsFirst)
    throw nb::value_error(
        (std::string("bnorm: ") + name + ": expected contiguous values, got a strided array").c_str());
  alignas(8) static std::byte no_values[8];
  return a.data() != nullptr ? const_cast<void*>(static_cast<const void*>(a.data())) : no_values;
}

bnorm::ConstVectorView in_vector(const OptIn& a, const char* name) {
  if (!a) return {};
  return {vector_data(*a, name), dtype_of(*a, name), static_cast<std::int64_t>(a->size())};
}

bnorm::VectorView out_vector(const OptOut& a, const char* name) {
  if (!a) return {};
  return {vector_data(*a, name), dtype_of(*a, name), static_cast<std::int64_t>(a->size())};
}

// bnorm::layout_of for the Python package: "channels_first", "channels_last" or None.
std::optional<std::string> layout_name(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& strides) {
  const std::optional<bnorm::Layout> layout = bnorm::layout_of(shape, strides);
  if (!layout) return std::nullopt;
  return bnorm::to_string(*layout);
}

void forward(const InArray& input, const OutArray& output, const OptOut& running_mean, const OptOut& running_var,
             const OptIn& weight, const OptIn& bias, bool training, double momentum, double eps,
             const OptOut& save_mean, const OptOut& save_invstd) {
  const bnorm::ConstTensorView x = in_tensor(input, "input");
  const bnorm::TensorView y = out_tensor(output, "output");
  const bnorm::VectorView rm = out_vector(running_mean, "running_mean"), rv = out_vector(running_var, "running_var");
  const bnorm::ConstVectorView w = in_vector(weight, "weight"), b = in_vector(bias, "bias");
  const bnorm::VectorView sm = out_vector(save_mean, "save_mean"), si = out_vector(save_invstd, "save_invstd");
  nb::gil_scoped_release release;
  bnorm::batch_norm(x, y, {rm, rv}, {w, b},               // the package allocates every output just before the call
              {.training = training, .momentum = momentum, .eps = eps, .outputs = bnorm::OutputMemory::Fresh,
               .policy = bnorm::Policy::Torch},  // the package's batch_norm is torch's
              {sm, si});
}

// Eval: the running statistics are only read (bnorm::batch_norm writes them in training only), so
// read-only arrays are accepted; None is the library's error (eval needs them).
void forward_eval(const InArray& input, const OutArray& output, const OptIn& running_mean, const OptIn& running_var,
                  const OptIn& weight, const OptIn& bias, double eps) {
  const bnorm::ConstTensorView x = in_tensor(input, "input");
  const bnorm::TensorView y = out_tensor(output, "output");
  const bnorm::ConstVectorView rm = in_vector(running_mean, "running_mean"), rv = in_vector(running_var, "running_var");
  const bnorm::VectorView rm_view{const_cast<void*>(rm.data()), rm.dtype(), rm.size()};
  const bnorm::VectorView rv_view{const_cast<void*>(rv.data()), rv.dtype(), rv.size()};
  const bnorm::ConstVectorView w = in_vector(weight, "weight"), b = in_vector(bias, "bias");
  nb::gil_scoped_release release;
  bnorm::batch_norm(x, y, {rm_view, rv_view}, {w, b},
                    {.eps = eps, .policy = bnorm::Policy::Torch});
}

void backward(const InArray& grad_output, const InArray& input, const OptIn& weight, const OptIn& running_mean,
              const OptIn& running_var, const OptIn& save_mean, const OptIn& save_invstd, bool training, double eps,
              const OptOut& grad_input, const OptOut& grad_weight, const OptOut& grad_bias) {
  const bnorm::ConstTensorView x = in_tensor(input, "input");
  const bnorm::ConstTensorView dy = in_tensor(grad_output, "grad_output");
  const bnorm::TensorView dx = grad_input ? out_tensor(*grad_input, "grad_input") : bnorm::TensorView{};
  const bnorm::ConstVectorView w = in_vector(weight, "weight");
  const bnorm::ConstVectorView rm = in_vector(running_mean, "running_mean"), rv = in_vector(running_var, "running_var");
  const bnorm::ConstVectorView sm = in_vector(save_mean, "save_mean"), si = in_vector(save_invstd, "save_invstd");
  const bnorm::VectorView gw = out_vector(grad_weight, "grad_weight"), gb = out_vector(grad_bias, "grad_bias");
  nb::gil_scoped_release release;
  bnorm::batch_norm_backward(dy, {.input = x, .weight = w, .saved = {sm, si}, .running = {rm, rv}},
                             {.training = training, .eps = eps, .outputs = bnorm::OutputMemory::Fresh,
                              .policy = bnorm::Policy::Torch},
                             dx, {gw, gb});
}

void batch_stats(const InArray& input, const OutArray& mean, const OutArray& var) {
  const bnorm::ConstTensorView x = in_tensor(input, "input");
  const bnorm::VectorView m = out_vector(mean, "mean"), v = out_vector(var, "var");
  nb::gil_scoped_release release;
  bnorm::batch_stats(x, m, v);
}

// bnorm::fold_into_producer / fold_into_consumer: the folded weight and bias into out_weight and out_bias
// (allocated by the package, dtypes of its choosing). layout: "out_in" or "in_out".
void fold(const InArray& weight, const OptIn& bias, const InArray& running_mean, const InArray& running_var,
          const OptIn& bn_weight, const OptIn& bn_bias, double eps, const std::string& layout, std::int64_t groups,
          bool consumer, const OutArray& out_weight, const OutArray& out_bias) {
  bnorm::WeightLayout wl = bnorm::WeightLayout::OutIn;
  if (layout == "in_out")
    wl = bnorm::WeightLayout::InOut;
  else if (layout != "out_in")
    throw nb::value_error(("bnorm: layout: expected 'out_in' or 'in_out', got '" + layout + "'").c_str());
  const bnorm::FoldLayer layer{.weight = in_tensor(weight, "weight"), .bias = in_vector(bias, "bias"), .layout = wl,
                               .groups = groups};
  const bnorm::FoldBatchNorm bn{.running_mean = in_vector(running_mean, "running_mean"),
                                .running_var = in_vector(running_var, "running_var"),
                                .weight = in_vector(bn_weight, "bn_weight"),
                                .bias = in_vector(bn_bias, "bn_bias"),
                                .eps = eps};
  const bnorm::TensorView ow = out_tensor(out_weight, "out_weight");
  const bnorm::VectorView ob = out_vector(out_bias, "out_bias");
  nb::gil_scoped_release release;
  (consumer ? bnorm::fold_into_consumer : bnorm::fold_into_producer)(layer, bn, ow, ob);
}

// bnorm::PopulationStats for bnorm.torch.recompute_batch_norm_stats (python/bnorm/_precise.py): add
// takes any CPU array the other functions take; mean and m2 come back as lists of floats (C doubles,
// exact), which is also what crosses torch.distributed between ranks before merge.
void population_add(bnorm::PopulationStats& p, const InArray& batch) {
  const bnorm::ConstTensorView x = in_tensor(batch, "batch");
  nb::gil_scoped_release release;
  p.add(x);
}
void population_finalize(const bnorm::PopulationStats& p, const OutArray& running_mean, const OutArray& running_var) {
  const bnorm::VectorView rm = out_vector(running_mean, "running_mean"), rv = out_vector(running_var, "running_var");
  p.finalize({rm, rv});
}

}  // namespace

NB_MODULE(_bnorm, m) {
  m.doc() = "bnorm's compiled kernels (internal: use bnorm.batch_norm and bnorm.torch)";
  // bnorm::Error is a std::invalid_argument, which nanobind would make a ValueError whatever its kind.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const bnorm::Error& e) {
      PyErr_SetString(e.kind() == bnorm::ErrorKind::Type ? PyExc_TypeError : PyExc_ValueError, e.what());
    }
  });
  m.def("forward", &forward, "input"_a, "output"_a, "running_mean"_a.none(), "running_var"_a.none(),
        "weight"_a.none(), "bias"_a.none(), "training"_a, "momentum"_a, "eps"_a, "save_mean"_a.none(),
        "save_invstd"_a.none(),
        "bnorm::batch_norm on CPU arrays: writes output (and, in training, save_mean, save_invstd and the "
        "running statistics in place).");
  m.def("forward_eval", &forward_eval, "input"_a, "output"_a, "running_mean"_a.none(), "running_var"_a.none(),
        "weight"_a.none(),
        "bias"_a.none(), "eps"_a,
        "bnorm::batch_norm with training=false: writes output; the running statistics are only read.");
  m.def("backward", &backward, "grad_output"_a, "input"_a, "weight"_a.none(), "running_mean"_a.none(),
        "running_var"_a.none(), "save_mean"_a.none(), "save_invstd"_a.none(), "training"_a, "eps"_a,
        "grad_input"_a.none(), "grad_weight"_a.none(), "grad_bias"_a.none(),
        "bnorm::batch_norm_backward on CPU arrays: writes the gradients that are given (not None).");
  m.def("batch_stats", &batch_stats, "input"_a, "mean"_a, "var"_a,
        "bnorm::batch_stats: per-channel mean and biased variance into mean and var.");
  m.def("fold", &fold, "weight"_a, "bias"_a.none(), "running_mean"_a, "running_var"_a, "bn_weight"_a.none(),
        "bn_bias"_a.none(), "eps"_a, "layout"_a, "groups"_a, "consumer"_a, "out_weight"_a, "out_bias"_a,
        "bnorm::fold_into_producer (consumer=False: the BN after the layer) or fold_into_consumer (consumer=True: "
        "the BN before it): writes the folded weight and bias into out_weight and out_bias.");
  m.def("layout_of", &layout_name, "shape"_a, "strides"_a,
        "bnorm::layout_of: 'channels_first' or 'channels_last' for dense memory with these strides (in "
        "elements), channels-first where both hold; None for other memory.");
  nb::class_<bnorm::PopulationStats>(m, "PopulationStats",
                                     "bnorm::PopulationStats: exact per-channel count, mean and M2 of many batches.")
      .def(nb::init<std::int64_t>(), "channels"_a)
      .def("add", &population_add, "batch"_a, "Merges a batch (N, C, ...) of float32, float64 or bfloat16.")
      .def("merge",
           [](bnorm::PopulationStats& p, double count, const std::vector<double>& mean, const std::vector<double>& m2) {
             p.merge(count, mean, m2);
           },
           "count"_a, "mean"_a, "m2"_a, "Merges moments computed elsewhere (another rank's).")
      .def_prop_ro("count", &bnorm::PopulationStats::count)
      .def_prop_ro("channels", &bnorm::PopulationStats::channels)
      .def("mean", [](const bnorm::PopulationStats& p) { return std::vector<double>(p.mean().begin(), p.mean().end()); })
      .def("m2", [](const bnorm::PopulationStats& p) { return std::vector<double>(p.m2().begin(), p.m2().end()); })
      .def("finalize", &population_finalize, "running_mean"_a, "running_var"_a,
           "Writes the population mean and unbiased variance (float32 or float64 vectors); nothing on an error.");
  m.def("set_num_threads", &bnorm::set_num_threads, "n"_a, "Sets the number of threads of bnorm's kernels.");
  m.def("num_threads", &bnorm::num_threads, "The number of threads of bnorm's kernels.");
  m.def("info", &bnorm::runtime_info,
        "What bnorm detected here (CPU, instruction sets, caches, threads) and the kernel variant each op takes.");
}
