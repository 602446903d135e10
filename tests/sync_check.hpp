// The SyncBatchNorm checks, written once against the Communicator interface: the in-process thread
// group (test_sync.cpp, always built) and MPI (test_sync_mpi.cpp, under mpirun) run the same ones.
// Every rank builds the same global batch from the same seed, runs single-process BatchNorm on all
// of it and the float64 reference, takes its own slice of samples, and checks that SyncBatchNorm on
// the slices gives the slice of the single-process results.
#pragma once

#include <bnorm/distributed.hpp>

#include "test_util.hpp"

#include <cstring>
#include <numeric>

namespace bnorm::test {

// Splits of the global batch of 7 samples over R ranks: uneven, with ranks holding 1 and 0 samples.
inline std::vector<std::vector<std::int64_t>> splits_for(int R) {
  switch (R) {
    case 1: return {{7}};
    case 2: return {{6, 1}, {0, 7}, {4, 3}};
    case 3: return {{4, 0, 3}, {1, 5, 1}};
    case 4: return {{3, 1, 0, 3}, {0, 0, 7, 0}, {2, 2, 2, 1}};
    default: {
      std::vector<std::int64_t> s(static_cast<std::size_t>(R), 0);
      for (int i = 0; i < 7; ++i) ++s[static_cast<std::size_t>(i % R)];
      return {s};
    }
  }
}

// The global-batch shapes: spatial (S = 20), 3-d (S = 6) and (N, C) where a rank with 1 sample
// has a single value per channel.
inline std::vector<Dims> sync_shapes() { return {{{7, 3, 4, 5}}, {{7, 5}}, {{7, 2, 6}}}; }

template <class T>
std::vector<T> slice(const std::vector<T>& v, std::int64_t from, std::int64_t to) {
  return std::vector<T>(v.begin() + from, v.begin() + to);
}

// Gathers every rank's error message (cut to 511 bytes) and expects them all equal to this one.
inline void expect_same_message(Communicator& comm, const std::string& msg) {
  char mine[512] = {};
  std::memcpy(mine, msg.data(), std::min<std::size_t>(msg.size(), 511));
  std::vector<char> all(512 * static_cast<std::size_t>(comm.size()));
  comm.all_gather(mine, 512, all.data());
  for (int r = 0; r < comm.size(); ++r)
    EXPECT_STREQ(all.data() + 512 * r, mine) << "rank " << r << "'s message differs from rank " << comm.rank() << "'s";
}

// One configuration on this rank. With `layer` the SyncBatchNormT layer runs it, else the functional.
template <class T>
void check_sync(Communicator& comm, const Dims& d, const std::vector<std::int64_t>& split, Layout layout,
                Activation act, bool layer) {
  std::ostringstream what;
  what << "rank " << comm.rank() << "/" << comm.size() << " global " << d.str() << " split";
  for (std::int64_t s : split) what << " " << s;
  what << " " << to_string(layout) << (act == Activation::Relu ? " relu" : "") << (layer ? " layer" : " functional")
       << " " << to_string(dtype_of<T>());
  SCOPED_TRACE(what.str());
  const std::int64_t C = d.C(), per = d.C() * d.S();
  std::mt19937_64 rng(99);
  const std::vector<double> x = random_input<T>(d, rng), dy = random_input<T>(d, rng, 0.5);
  const std::vector<double> w = random_vector<T>(C, rng, 0.5, 1.5), b = random_vector<T>(C, rng, -0.5, 0.5);
  const std::vector<double> rm0 = random_vector<T>(C, rng, -1, 1), rv0 = random_vector<T>(C, rng, 0.5, 2);
  const std::vector<T> xm = to_layout<T>(x, d, layout), dym = to_layout<T>(dy, d, layout);
  const std::vector<T> wt = cast<T>(w), bt = cast<T>(b);

  // Single process on the concatenated batch.
  const Shape shape = d.view_shape();
  std::vector<T> y1(xm.size()), dx1(xm.size()), rm1 = cast<T>(rm0), rv1 = cast<T>(rv0);
  std::vector<T> sm1(static_cast<std::size_t>(C)), si1(sm1.size()), dw1(sm1.size()), db1(sm1.size());
  batch_norm(ConstTensorView(xm.data(), shape, layout), TensorView(y1.data(), shape, layout), {rm1, rv1}, {wt, bt},
             {.training = true, .activation = act}, {sm1, si1});
  batch_norm_backward(ConstTensorView(dym.data(), shape, layout),
                      {.input = ConstTensorView(xm.data(), shape, layout),
                       .output = ConstTensorView(y1.data(), shape, layout),
                       .weight = wt,
                       .saved = {sm1, si1}},
                      {.training = true, .activation = act}, TensorView(dx1.data(), shape, layout), {dw1, db1});
  // The float64 reference.
  const reference::Problem p{d.N(), d.C(), d.S(), true, 0.1, 1e-5, act == Activation::Relu};
  const reference::Forward rf = reference::forward(p, x, w, b, rm0, rv0);
  const reference::Backward rb = reference::backward(p, x, w, rf, dy);

  // This rank's samples: a contiguous range in either layout.
  const auto r = static_cast<std::size_t>(comm.rank());
  const std::int64_t first = std::accumulate(split.begin(), split.begin() + static_cast<std::ptrdiff_t>(r), std::int64_t{0});
  const std::int64_t n = split[r];
  std::vector<std::int64_t> ldims = d.shape;
  ldims[0] = n;
  const Dims ld{ldims};
  const Shape lshape = ld.view_shape();
  std::vector<T> xl = slice(xm, first * per, (first + n) * per), dyl = slice(dym, first * per, (first + n) * per);
  std::vector<T> yl(xl.size()), dxl(xl.size()), rm = cast<T>(rm0), rv = cast<T>(rv0);
  std::vector<T> sm(sm1.size()), si(sm1.size()), dw(sm1.size()), db(sm1.size());
  const ConstTensorView xv(xl.data(), lshape, layout), dyv(dyl.data(), lshape, layout);
  const TensorView yv(yl.data(), lshape, layout), dxv(dxl.data(), lshape, layout);
  if (layer) {
    BatchNormOptions o;
    o.activation = act;
    SyncBatchNormT<T> bn(C, comm, o);
    std::copy(wt.begin(), wt.end(), bn.weight().begin());
    std::copy(bt.begin(), bt.end(), bn.bias().begin());
    std::copy(rm.begin(), rm.end(), bn.running_mean().begin());
    std::copy(rv.begin(), rv.end(), bn.running_var().begin());
    bn.forward(xv, yv);
    bn.backward(xv, dyv, dxv, yv);
    rm.assign(bn.running_mean().begin(), bn.running_mean().end());
    rv.assign(bn.running_var().begin(), bn.running_var().end());
    dw.assign(bn.weight_grad().begin(), bn.weight_grad().end());
    db.assign(bn.bias_grad().begin(), bn.bias_grad().end());
    EXPECT_EQ(bn.num_batches_tracked(), 1);
  } else {
    sync_batch_norm(comm, xv, yv, {rm, rv}, {wt, bt}, {.training = true, .activation = act}, {sm, si});
    sync_batch_norm_backward(comm, dyv, {.input = xv, .output = yv, .weight = wt, .saved = {sm, si}},
                             {.training = true, .activation = act}, dxv, {dw, db});
  }
  // Parameter gradients: each rank holds its contribution; their sum is the global gradient.
  std::vector<double> dw_sum = widen(dw), db_sum = widen(db);
  comm.all_reduce_sum(dw_sum.data(), dw_sum.size());
  comm.all_reduce_sum(db_sum.data(), db_sum.size());

  const double t = 4 * tol<T>();
  auto near = [&](const std::vector<double>& got, const std::vector<double>& want, const char* name) {
    EXPECT_TRUE(close(got, want, t * std::max(1.0, max_abs(want)), t, name));
  };
  const auto from = static_cast<std::ptrdiff_t>(first * per), to = static_cast<std::ptrdiff_t>((first + n) * per);
  // Against single-process BatchNorm on the concatenated batch.
  near(widen(yl), widen(slice(y1, from, to)), "output vs single process");
  near(widen(dxl), widen(slice(dx1, from, to)), "grad_input vs single process");
  if (!layer) {  // the layer keeps its saved statistics private
    near(widen(sm), widen(sm1), "save_mean vs single process");
    near(widen(si), widen(si1), "save_invstd vs single process");
    near(widen(sm), rf.mean, "save_mean vs reference");
    near(widen(si), rf.invstd, "save_invstd vs reference");
  }
  near(widen(rm), widen(rm1), "running_mean vs single process");
  near(widen(rv), widen(rv1), "running_var vs single process");
  near(dw_sum, widen(dw1), "grad_weight (summed over ranks) vs single process");
  near(db_sum, widen(db1), "grad_bias (summed over ranks) vs single process");
  // Against the float64 reference (logical channels-first: the slice is contiguous there too).
  near(from_layout(yl, ld, layout), slice(rf.y, from, to), "output vs reference");
  near(from_layout(dxl, ld, layout), slice(rb.dx, from, to), "grad_input vs reference");
  near(widen(rm), rf.running_mean, "running_mean vs reference");
  near(widen(rv), rf.running_var, "running_var vs reference");
  near(dw_sum, rb.dweight, "grad_weight vs reference");
  near(db_sum, rb.dbias, "grad_bias vs reference");

  // Every rank holds bitwise the same statistics (merged in rank order from the same gathered data).
  if (!layer) {
    std::vector<T> all(sm.size() * static_cast<std::size_t>(comm.size()));
    comm.all_gather(sm.data(), sm.size() * sizeof(T), all.data());
    for (int q = 0; q < comm.size(); ++q)
      EXPECT_EQ(0, std::memcmp(all.data() + static_cast<std::size_t>(q) * sm.size(), sm.data(), sm.size() * sizeof(T)))
          << "save_mean of rank " << q << " differs bitwise";
  }
}

inline void check_sync_all(Communicator& comm) {
  for (const Dims& d : sync_shapes())
    for (const auto& split : splits_for(comm.size()))
      for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
        check_sync<float>(comm, d, split, layout, Activation::None, false);
        check_sync<float>(comm, d, split, layout, Activation::Relu, true);
        check_sync<double>(comm, d, split, layout, Activation::None, true);
      }
}

// Runs f on this rank (which may throw on purpose), expects every rank to throw bnorm::Error with
// the same message containing each fragment, and returns it.
template <class F>
std::string expect_error_everywhere(Communicator& comm, F f, std::initializer_list<std::string> fragments) {
  std::string msg;
  try {
    f();
    ADD_FAILURE() << "rank " << comm.rank() << ": expected bnorm::Error, got none";
  } catch (const Error& e) {
    msg = e.what();
  }
  for (const std::string& frag : fragments)
    EXPECT_NE(msg.find(frag), std::string::npos) << "rank " << comm.rank() << ": '" << msg << "' lacks '" << frag << "'";
  expect_same_message(comm, msg);
  return msg;
}

// Mismatches and failed checks on one rank: every rank throws the same error, writes nothing,
// and the group stays usable (a correct call afterwards succeeds).
inline void check_sync_errors(Communicator& comm) {
  const int R = comm.size(), me = comm.rank(), last = R - 1;
  const std::string lastname = "rank " + std::to_string(last) + " of " + std::to_string(R);
  std::vector<float> x(2 * 4 * 3), y(x.size(), 7.f), rm(4, 0.5f), rv(4, 2.f), w(4, 1.f), b(4, 0.f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 5);
  std::vector<float> x5(2 * 5 * 3, 1.f), y5(x5.size()), rm5(5, 0.5f), rv5(5, 2.f);
  const std::vector<float> rm_before = rm, rv_before = rv, y_before = y;
  auto good = [&]() {
    return std::make_tuple(ConstTensorView(x.data(), {2, 4, 3}), TensorView(y.data(), {2, 4, 3}));
  };

  // Channel count differs on the last rank.
  expect_error_everywhere(
      comm,
      [&] {
        if (me == last)
          sync_batch_norm(comm, ConstTensorView(x5.data(), {2, 5, 3}), TensorView(y5.data(), {2, 5, 3}), {rm5, rv5}, {},
                          {.training = true});
        else
          sync_batch_norm(comm, std::get<0>(good()), std::get<1>(good()), {rm, rv}, {w, b}, {.training = true});
      },
      {"bnorm::sync_batch_norm: " + lastname, "input channels (dim 1): expected 4 (rank 0's), got 5"});
  EXPECT_EQ(rm, rm_before);
  EXPECT_EQ(rv, rv_before);
  EXPECT_EQ(y, y_before);

  // A local check fails on the last rank (weight of the wrong length): its message, everywhere.
  expect_error_everywhere(
      comm,
      [&] {
        std::vector<float> w3(3, 1.f);
        sync_batch_norm(comm, std::get<0>(good()), std::get<1>(good()), {rm, rv},
                        {me == last ? ConstVectorView(w3) : ConstVectorView(w), b}, {.training = true});
      },
      {"bnorm::sync_batch_norm: " + lastname, "weight: expected 4 values (one per channel), got 3"});
  EXPECT_EQ(rm, rm_before);

  // Mode and eps mismatches.
  expect_error_everywhere(
      comm,
      [&] {
        sync_batch_norm(comm, std::get<0>(good()), std::get<1>(good()), {rm, rv}, {w, b}, {.training = me != last});
      },
      {lastname, "training: expected true (rank 0's), got false"});
  expect_error_everywhere(comm,
                          [&] {
                            sync_batch_norm(comm, std::get<0>(good()), std::get<1>(good()), {rm, rv}, {w, b},
                                            {.training = true, .eps = me == last ? 1e-3 : 1e-5});
                          },
                          {lastname, "eps: expected 1.0000000000000001e-05 (rank 0's), got 0.001"});
  EXPECT_EQ(rm, rm_before);

  // One value per channel over all ranks: the training error on every rank.
  std::vector<float> x1(4, 1.f), y1(4);
  expect_error_everywhere(
      comm,
      [&] {
        const std::int64_t n = me == 0 ? 1 : 0;
        sync_batch_norm(comm, ConstTensorView(x1.data(), {n, 4}), TensorView(y1.data(), {n, 4}), {rm, rv}, {w, b},
                        {.training = true});
      },
      {"Expected more than 1 value per channel when training, got 1 value(s) per channel over all ranks"});
  EXPECT_EQ(rm, rm_before);

  // The layer: wrong channel count on the last rank, then backward before any forward there.
  SyncBatchNorm bn(4, comm);
  expect_error_everywhere(
      comm,
      [&] {
        if (me == last)
          bn.forward(ConstTensorView(x5.data(), {2, 5, 3}), TensorView(y5.data(), {2, 5, 3}));
        else
          bn.forward(std::get<0>(good()), std::get<1>(good()));
      },
      {"bnorm::SyncBatchNorm::forward: " + lastname, "input: expected 4 channels (num_features) in dim 1, got 5"});
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  std::vector<float> dx(x.size());
  expect_error_everywhere(
      comm,
      [&] { bn.backward(std::get<0>(good()), std::get<0>(good()), TensorView(dx.data(), {2, 4, 3})); },
      {"bnorm::SyncBatchNorm::backward: rank 0 of", "state: expected a forward call before backward, got none"});

  // Backward: a grad_output of the wrong shape on the last rank.
  std::vector<float> sm(4), si(4);
  sync_batch_norm(comm, std::get<0>(good()), std::get<1>(good()), {rm, rv}, {w, b}, {.training = true}, {sm, si});
  expect_error_everywhere(
      comm,
      [&] {
        const ConstTensorView dy = me == last ? ConstTensorView(x5.data(), {2, 5, 3}) : std::get<0>(good());
        sync_batch_norm_backward(comm, dy, {.input = std::get<0>(good()), .weight = w, .saved = {sm, si}},
                                 {.training = true}, TensorView(dx.data(), {2, 4, 3}));
      },
      {"bnorm::sync_batch_norm_backward: " + lastname, "grad_output: expected the shape of input"});

  // The group is still in step: a correct collective call works.
  EXPECT_NO_THROW(bn.forward(std::get<0>(good()), std::get<1>(good())));
  EXPECT_EQ(bn.num_batches_tracked(), 1);
}

}  // namespace bnorm::test
