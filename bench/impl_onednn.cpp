// oneDNN under test (v3 API): batch_normalization_forward (forward_training, forward_inference with
// use_global_stats) and batch_normalization_backward (prop_kind::backward: diff_src, diff_scale,
// diff_shift), scale and shift as separate per-channel memories.
//   onednn         : memory descriptors nchw / nhwc (nc for 2-D) wrapping the harness's buffers;
//   onednn-blocked : its own blocked layout nChw16c (4-D only), on private buffers that are
//                    reordered from the harness's NCHW data in prepare() and back in publish(), both
//                    outside the timing. Shown in the NCHW group but not counted as a plain peer.
// Timed: execute() + stream.wait(). The primitives are created once per case.
// bf16: src, dst, diff_dst, diff_src are memory::data_type::bf16; scale, shift, mean, variance and
// their diffs stay f32 (what oneDNN v3 requires of them for every src type). Where oneDNN has no
// bf16 batch normalization for this CPU, creating the primitive descriptor fails with
// dnnl_unimplemented: the row says "unsupported" (bench::Unsupported), it is not an error.
//
// Threads: oneDNN's CPU threading is whatever it was built with. The PyPI wheel (onednn 2026.x =
// oneDNN v3.13) is a SYCL build whose CPU threading is TBB, so the thread count is set with
// tbb::global_control(max_allowed_parallelism); an OpenMP build would take omp_set_num_threads.
// The SYCL CPU device needs the OpenCL CPU runtime (main.cpp points OCL_ICD_FILENAMES at it).
#include "bench.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
#include <oneapi/tbb/global_control.h>
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

#include <cstdio>
#include <optional>
#include <string>
#include <unordered_map>

namespace bench {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}
dnnl::stream& cpu_stream() {
  static dnnl::stream s(cpu_engine());
  return s;
}

class OnednnImpl final : public Impl {
 public:
  explicit OnednnImpl(bool blocked) : blocked_(blocked) {}
  std::string name() const override { return blocked_ ? "onednn-blocked" : "onednn"; }
  std::string layout_label(const Case& c) const override { return blocked_ ? "nChw16c" : Impl::layout_label(c); }
  bool supports(const Case& c) const override {
    if (c.dtype != DType::F32 && c.dtype != DType::BF16) return false;
    if (blocked_) return c.dims.size() == 4 && c.layout == Layout::NCHW && c.C() % 16 == 0;
    return true;
  }
  bool is_peer() const override { return !blocked_; }

  void set_threads(int n) override {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
    control_.reset();
    control_.emplace(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(n));
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }

  void prepare(const Case& c, const Data& d) override {
    try {
      build(c, d);
    } catch (const dnnl::error& e) {
      args_.clear();
      prim_ = dnnl::primitive();
      if (e.status == dnnl_unimplemented) {
        std::string what = "oneDNN has no ";
        what += name_of(c.dtype);
        what += " batch normalization for this case on this CPU";
        throw Unsupported(what);
      }
      throw;
    }
  }

  void build(const Case& c, const Data& d) {
    c_ = c;
    d_ = d;
    auto& eng = cpu_engine();
    const memory::dims dims(c.dims.begin(), c.dims.end());
    const Tag plain = c.is_2d() ? Tag::nc : (c.layout == Layout::NHWC ? Tag::nhwc : Tag::nchw);
    const auto dt = c.dtype == DType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
    const memory::desc plain_md(dims, dt, plain);
    const memory::desc md = blocked_ ? memory::desc(dims, dt, Tag::nChw16c) : plain_md;
    const memory::desc cmd({c.C()}, memory::data_type::f32, Tag::x);
    auto vec = [&](const float* p) { return memory(cmd, eng, const_cast<float*>(p)); };

    const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    const auto fwd_kind = c.op == Op::InferFwd ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
    const auto fwd_flags = c.op == Op::InferFwd ? flags | dnnl::normalization_flags::use_global_stats : flags;
    dnnl::batch_normalization_forward::primitive_desc fwd_pd(eng, fwd_kind, md, md, static_cast<float>(c.eps),
                                                             fwd_flags);
    args_.clear();
    args_[DNNL_ARG_SCALE] = vec(d.weight);
    if (c.op == Op::Backward) {
      dnnl::batch_normalization_backward::primitive_desc bwd_pd(eng, dnnl::prop_kind::backward, md, md, md,
                                                                static_cast<float>(c.eps), flags, fwd_pd);
      impl_ = bwd_pd.impl_info_str();
      prim_ = dnnl::batch_normalization_backward(bwd_pd);
      args_[DNNL_ARG_SRC] = tensor(md, plain_md, d.x);
      args_[DNNL_ARG_DIFF_DST] = tensor(md, plain_md, d.dy);
      args_[DNNL_ARG_DIFF_SRC] = tensor(md, plain_md, nullptr);
      args_[DNNL_ARG_MEAN] = vec(d.batch_mean);
      args_[DNNL_ARG_VARIANCE] = vec(d.batch_var);
      args_[DNNL_ARG_DIFF_SCALE] = vec(d.dweight);
      args_[DNNL_ARG_DIFF_SHIFT] = vec(d.dbias);
      if (bwd_pd.workspace_desc().get_size() != 0) args_[DNNL_ARG_WORKSPACE] = memory(bwd_pd.workspace_desc(), eng);
    } else {
      impl_ = fwd_pd.impl_info_str();
      prim_ = dnnl::batch_normalization_forward(fwd_pd);
      args_[DNNL_ARG_SRC] = tensor(md, plain_md, d.x);
      args_[DNNL_ARG_DST] = tensor(md, plain_md, nullptr);
      args_[DNNL_ARG_SHIFT] = vec(d.bias);
      if (c.op == Op::InferFwd) {
        args_[DNNL_ARG_MEAN] = vec(d.running_mean);
        args_[DNNL_ARG_VARIANCE] = vec(d.running_var);
      } else {
        // oneDNN writes the batch mean and biased variance (it keeps no running statistics).
        args_[DNNL_ARG_MEAN] = memory(cmd, eng);
        args_[DNNL_ARG_VARIANCE] = memory(cmd, eng);
      }
      if (fwd_pd.workspace_desc().get_size() != 0) args_[DNNL_ARG_WORKSPACE] = memory(fwd_pd.workspace_desc(), eng);
    }
    plain_md_ = plain_md;
  }

  void run() override {
    prim_.execute(cpu_stream(), args_);
    cpu_stream().wait();
  }

  void publish() override {
    if (!blocked_) return;
    auto& eng = cpu_engine();
    const int arg = c_.op == Op::Backward ? DNNL_ARG_DIFF_SRC : DNNL_ARG_DST;
    memory out(plain_md_, eng, c_.op == Op::Backward ? d_.dx : d_.y);
    dnnl::reorder(args_[arg], out).execute(cpu_stream(), args_[arg], out);
    cpu_stream().wait();
  }

  std::string detail() const override { return impl_; }

  void release() override {
    args_.clear();
    prim_ = dnnl::primitive();
  }

 private:
  // A tensor argument: the harness's buffer (plain), or a private blocked buffer holding a
  // reordered copy of it (src == nullptr: an output, left to be written).
  memory tensor(const memory::desc& md, const memory::desc& plain_md, const void* src) {
    auto& eng = cpu_engine();
    if (!blocked_) return memory(md, eng, src ? const_cast<void*>(src) : (c_.op == Op::Backward ? d_.dx : d_.y));
    memory mine(md, eng);  // allocated by oneDNN
    if (src) {
      memory from(plain_md, eng, const_cast<void*>(src));
      dnnl::reorder(from, mine).execute(cpu_stream(), from, mine);
      cpu_stream().wait();
    }
    return mine;
  }

  bool blocked_;
  Case c_;
  Data d_;
  memory::desc plain_md_;
  dnnl::primitive prim_;
  std::unordered_map<int, memory> args_;
  std::string impl_;
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
  std::optional<tbb::global_control> control_;
#endif
};

}  // namespace

std::vector<std::unique_ptr<Impl>> make_onednn() {
  std::vector<std::unique_ptr<Impl>> v;
  try {
    cpu_engine();
    cpu_stream();
  } catch (const dnnl::error& e) {
    std::fprintf(stderr, "bnorm-bench: oneDNN has no CPU engine here (%s): benchmarking without it\n", e.what());
    return v;
  }
  v.push_back(std::make_unique<OnednnImpl>(false));
  v.push_back(std::make_unique<OnednnImpl>(true));
  return v;
}

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  std::string s = std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
  s += " (SYCL CPU runtime";
#else
  s += " (CPU runtime";
#endif
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
  s += ", TBB threads)";
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  s += ", OpenMP threads)";
#else
  s += ")";
#endif
  return s;
}

}  // namespace bench
