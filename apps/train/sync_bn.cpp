// bnorm-train --sync-bn: data-parallel training under mpirun. Every rank builds the same network from
// the same seed and draws the same global batches; rank r trains on its slice of each global batch
// (uneven slices allowed, 0 and 1 included: --split), its BatchNorm layers are SyncBatchNorm over MPI,
// and the parameter gradients are summed over the ranks before every identical SGD step. Each rank's
// loss is its slice's summed loss divided by the global batch size, so that the summed gradients are
// exactly the single-process gradients of the mean loss: the run reproduces the single-process run at
// the same global batch (`mpirun -np 1`) up to float rounding. --local-bn swaps SyncBatchNorm for
// per-rank BatchNorm (what data-parallel training without SyncBN does), the control that shows the
// difference a broken synchronization makes. Test: train_sync_bn.sh; docs/distributed.md.
#include "sync_bn.hpp"

#if BNORM_TRAIN_SYNC_BN

#include "bnorm_torch.hpp"
#include "idx.hpp"

#include <bnorm/bnorm.hpp>
#include <bnorm/mpi.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace bnorm::train {
namespace {

using ::torch::autograd::AutogradContext;
using ::torch::autograd::tensor_list;

ConstTensorView cview(const at::Tensor& t) {
  return {t.data_ptr(), DType::Float32, Shape(std::span<const std::int64_t>(t.sizes().data(), t.sizes().size()))};
}
TensorView view(at::Tensor& t) {
  return {t.data_ptr(), DType::Float32, Shape(std::span<const std::int64_t>(t.sizes().data(), t.sizes().size()))};
}
VectorView vview(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr(), t.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32, t.numel()};
}

// Autograd through sync_batch_norm / sync_batch_norm_backward (float32, channels-first). The
// communicator travels as an address: autograd arguments must be tensors or IValues.
struct SyncBNFunction : public ::torch::autograd::Function<SyncBNFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                            double momentum, double eps, std::int64_t comm_address) {
    auto& comm = *reinterpret_cast<Communicator*>(comm_address);
    at::Tensor x = input.contiguous(), y = at::empty_like(x);
    const auto f64 = x.options().dtype(at::kDouble);
    at::Tensor save_mean = at::empty({x.size(1)}, f64), save_invstd = at::empty({x.size(1)}, f64);
    {
      at::NoGradGuard no_grad;
      sync_batch_norm(comm, cview(x), view(y), {vview(running_mean), vview(running_var)}, {vview(weight), vview(bias)},
                      {.training = true, .momentum = momentum, .eps = eps}, {vview(save_mean), vview(save_invstd)});
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["comm"] = comm_address;
    ctx->save_for_backward({x, weight, save_mean, save_invstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto& comm = *reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    at::Tensor dy = grads[0].contiguous(), dx = at::empty_like(saved[0]);
    at::Tensor dw = at::zeros_like(saved[1]), db = at::zeros_like(saved[1]);
    sync_batch_norm_backward(
        comm, cview(dy),
        {.input = cview(saved[0]), .weight = vview(saved[1]), .saved = {vview(saved[2]), vview(saved[3])}},
        {.training = true, .eps = ctx->saved_data["eps"].toDouble()}, view(dx), {vview(dw), vview(db)});
    // dw, db: this rank's contributions; the gradient all-reduce of the training loop sums them.
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// torch.nn.SyncBatchNorm's state (weight, bias, running statistics) for a channels-first input.
// Training: global-batch statistics through SyncBNFunction; eval: the running statistics, locally
// (nothing to synchronize, so a rank may evaluate alone).
struct SyncBNImpl : ::torch::nn::Module {
  SyncBNImpl(std::int64_t c, Communicator& comm) : comm_(&comm) {
    weight = register_parameter("weight", ::torch::ones({c}));
    bias = register_parameter("bias", ::torch::zeros({c}));
    running_mean = register_buffer("running_mean", ::torch::zeros({c}));
    running_var = register_buffer("running_var", ::torch::ones({c}));
  }
  at::Tensor forward(const at::Tensor& x) {
    if (!is_training()) return bnorm::torch::batch_norm(x, running_mean, running_var, weight, bias, false, 0.1, 1e-5);
    return SyncBNFunction::apply(x, weight, bias, running_mean, running_var, 0.1, 1e-5,
                                 static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(comm_)));
  }
  at::Tensor weight, bias, running_mean, running_var;

 private:
  Communicator* comm_;
};
// The module holder, spelled out: inside namespace bnorm, TORCH_MODULE's unqualified torch:: would
// name bnorm::torch.
class SyncBN : public ::torch::nn::ModuleHolder<SyncBNImpl> {
 public:
  using ::torch::nn::ModuleHolder<SyncBNImpl>::ModuleHolder;
};

struct Options {
  std::string data_dir = kDefaultDataDir, out = "bnorm-train-sync.csv", model = "cnn";
  std::vector<std::int64_t> split;
  int epochs = 1, batch = 64, threads = 1;
  std::int64_t train_limit = 0, test_limit = 2000, seed = 0;
  double lr = 0.05;
  bool local_bn = false;
};

// The seed 000 CNN (Conv -> ReLU -> BN -> MaxPool, twice, then Linear) or the seed 004 MLP
// (Linear -> BN -> ReLU -> Linear), with SyncBatchNorm or, for --local-bn, per-rank BatchNorm.
::torch::nn::Sequential make_net(const Options& o, Communicator& comm) {
  ::torch::nn::Sequential s;
  auto bn = [&](std::int64_t c, bool two_d) {
    if (!o.local_bn)
      s->push_back(SyncBN(c, comm));
    else if (two_d)
      s->push_back(bnorm::torch::BatchNorm2d(c));
    else
      s->push_back(bnorm::torch::BatchNorm1d(c));
  };
  if (o.model == "mlp") {
    s->push_back(::torch::nn::Flatten());
    s->push_back(::torch::nn::Linear(784, 256));
    bn(256, false);
    s->push_back(::torch::nn::ReLU());
    s->push_back(::torch::nn::Linear(256, 10));
  } else {
    for (auto [in, out] : {std::pair<std::int64_t, std::int64_t>{1, 16}, {16, 32}}) {
      s->push_back(::torch::nn::Conv2d(::torch::nn::Conv2dOptions(in, out, 3).padding(1)));
      s->push_back(::torch::nn::ReLU());
      bn(out, true);
      s->push_back(::torch::nn::MaxPool2d(2));
    }
    s->push_back(::torch::nn::Flatten());
    s->push_back(::torch::nn::Linear(32 * 7 * 7, 10));
  }
  return s;
}

std::pair<at::Tensor, at::Tensor> to_tensors(const Split& s, std::int64_t limit) {
  const std::int64_t n = limit > 0 ? std::min(limit, s.size()) : s.size();
  auto x = ::torch::from_blob(const_cast<std::uint8_t*>(s.images.data.data()), {n, 1, 28, 28}, ::torch::kUInt8)
               .to(::torch::kFloat)
               .div(255.0)
               .sub(0.2860)
               .div(0.3530);
  auto y = ::torch::from_blob(const_cast<std::uint8_t*>(s.labels.data.data()), {n}, ::torch::kUInt8).to(::torch::kLong);
  return {x, y};
}

// Sums every parameter's gradient over the ranks (in double, rank order: bitwise the same on every
// rank, so the replicas stay identical).
void all_reduce_grads(::torch::nn::Module& net, Communicator& comm) {
  std::vector<at::Tensor> grads;
  std::int64_t total = 0;
  for (auto& p : net.parameters())
    if (p.grad().defined()) {
      grads.push_back(p.grad());
      total += p.numel();
    }
  std::vector<double> flat(static_cast<std::size_t>(total));
  std::size_t at = 0;
  for (auto& g : grads) {
    auto c = g.contiguous().to(::torch::kDouble);
    std::copy(c.data_ptr<double>(), c.data_ptr<double>() + c.numel(), flat.begin() + static_cast<std::ptrdiff_t>(at));
    at += static_cast<std::size_t>(c.numel());
  }
  comm.all_reduce_sum(flat.data(), flat.size());
  at = 0;
  for (auto& g : grads) {
    auto src = ::torch::from_blob(flat.data() + at, g.sizes(), ::torch::kDouble);
    g.copy_(src);
    at += static_cast<std::size_t>(g.numel());
  }
}

int run(const Options& o, Communicator& comm) {
  const int R = comm.size(), rank = comm.rank();
  std::vector<std::int64_t> split = o.split;
  if (split.empty())
    for (int r = 0; r < R; ++r) split.push_back(o.batch / R + (r < o.batch % R ? 1 : 0));
  if (static_cast<int>(split.size()) != R)
    throw std::invalid_argument("--split: expected " + std::to_string(R) + " sizes (one per rank), got " +
                                std::to_string(split.size()));
  if (std::accumulate(split.begin(), split.end(), std::int64_t{0}) != o.batch)
    throw std::invalid_argument("--split: expected sizes summing to --batch " + std::to_string(o.batch));
  const std::int64_t lo = std::accumulate(split.begin(), split.begin() + rank, std::int64_t{0});
  const std::int64_t hi = lo + split[static_cast<std::size_t>(rank)];

  ::torch::set_num_threads(o.threads);
  set_num_threads(o.threads);
  const auto [train_x, train_y] = to_tensors(load_fashion_mnist(o.data_dir, true), o.train_limit);
  const auto [test_x, test_y] = to_tensors(load_fashion_mnist(o.data_dir, false), o.test_limit);
  ::torch::manual_seed(static_cast<std::uint64_t>(o.seed));  // the same weights and batches on every rank
  auto net = make_net(o, comm);
  ::torch::optim::SGD opt(net->parameters(), ::torch::optim::SGDOptions(o.lr).momentum(0.9));
  std::ofstream csv;
  if (rank == 0) {
    csv.open(o.out);
    if (!csv) throw std::invalid_argument("--out: cannot write '" + o.out + "'");
    csv << "step,loss\n";
  }
  const std::int64_t n = train_x.size(0), steps = n / o.batch;
  std::int64_t step = 0;
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    auto perm = ::torch::randperm(n, ::torch::kLong);
    for (std::int64_t b = 0; b < steps; ++b) {
      auto idx = perm.slice(0, b * o.batch + lo, b * o.batch + hi);
      auto logits = net->forward(train_x.index_select(0, idx));
      auto loss_sum = ::torch::nn::functional::cross_entropy(
          logits, train_y.index_select(0, idx), ::torch::nn::functional::CrossEntropyFuncOptions().reduction(::torch::kSum));
      opt.zero_grad();
      (loss_sum / static_cast<double>(o.batch)).backward();
      all_reduce_grads(*net, comm);
      opt.step();
      double loss = loss_sum.item<double>();
      comm.all_reduce_sum(&loss, 1);
      loss /= static_cast<double>(o.batch);
      ++step;
      if (rank == 0) {
        char line[64];
        std::snprintf(line, sizeof line, "%lld,%.9g\n", static_cast<long long>(step), loss);
        csv << line;
      }
    }
  }
  if (rank == 0) {
    ::torch::NoGradGuard g;
    net->eval();
    const double acc = static_cast<double>(net->forward(test_x).argmax(1).eq(test_y).sum().item<std::int64_t>()) /
                       static_cast<double>(test_x.size(0));
    std::cout << "bnorm-train --sync-bn: " << R << " rank(s), global batch " << o.batch << " split";
    for (auto s : split) std::cout << " " << s;
    std::cout << (o.local_bn ? ", per-rank BatchNorm (--local-bn)" : ", SyncBatchNorm") << ", " << step
              << " steps, test accuracy " << acc << "; losses in " << o.out << "\n";
  }
  return 0;
}

}  // namespace

int sync_bn_main(int argc, char** argv) {
  Options o;
  bool sync = false;
  CLI::App app{"bnorm-train --sync-bn: data-parallel training with SyncBatchNorm over MPI (run under mpirun)"};
  app.add_flag("--sync-bn", sync, "this mode");
  app.add_option("--data", o.data_dir, "folder with the Fashion-MNIST IDX files");
  app.add_option("--model", o.model, "cnn (seed 000) or mlp (seed 004)")->check(CLI::IsMember({"cnn", "mlp"}));
  app.add_option("--batch", o.batch, "global batch size, split over the ranks")->check(CLI::Range(2, 1000000));
  app.add_option("--split", o.split, "samples per rank (default: as even as possible), summing to --batch")
      ->delimiter(',');
  app.add_option("--epochs", o.epochs, "epochs")->check(CLI::Range(1, 100000));
  app.add_option("--lr", o.lr, "learning rate (SGD, momentum 0.9)")->check(CLI::PositiveNumber);
  app.add_option("--train-subset", o.train_limit, "use the first N training images (0 = all)");
  app.add_option("--test-subset", o.test_limit, "evaluate on the first N test images (0 = all)");
  app.add_option("--seed", o.seed, "random seed (the same on every rank)");
  app.add_option("--threads", o.threads, "threads per rank (torch and bnorm)")->check(CLI::Range(1, 1024));
  app.add_option("--out", o.out, "CSV of the loss per step (written by rank 0)");
  app.add_flag("--local-bn", o.local_bn, "per-rank BatchNorm instead of SyncBatchNorm (the unsynchronized control)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::cerr << "bnorm-train: error: " << e.what() << " (see --sync-bn --help)\n";
    return 2;
  }
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    MpiCommunicator comm;
    status = run(o, comm);
  } catch (const std::exception& e) {
    // The same error reaches every rank from the collective checks; a local one aborts the job so
    // that no rank waits for this one.
    std::cerr << "bnorm-train: error: " << e.what() << "\n";
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}

}  // namespace bnorm::train

#else  // built without MPI (BNORM_BUILD_MPI off or MPI not found)

#include <iostream>

namespace bnorm::train {
int sync_bn_main(int, char**) {
  std::cerr << "bnorm-train: error: --sync-bn needs MPI: configure with -DBNORM_BUILD_MPI=ON (Open MPI: "
               "libopenmpi-dev openmpi-bin) and run under mpirun; see docs/distributed.md\n";
  return 2;
}
}  // namespace bnorm::train

#endif
