// The roofline: a copy of the tensor's bytes (x -> y) by `threads` threads, each a contiguous part.
// Two kinds, both timed, the faster one is the roofline: memcpy (glibc's: ordinary stores, so the
// destination is read for ownership first, 3B of real traffic for 2B counted) and a streaming copy
// with non-temporal stores (2B of real traffic, what a kernel that streams its output achieves).
#pragma once

#include "data.hpp"
#include "report.hpp"
#include "timing.hpp"

#include <array>
#include <string>

namespace bench {

// The copy rows of one (shape, dtype, threads) block. Each kind is timed before and after the block
// (the machine may be shared: the better median of the two counts).
class Roofline {
 public:
  Roofline(ShapeData& sd, const std::string& shape, int threads, const Repetitions& reps);
  // Times both copies; the first call keeps its rows, later ones keep the better median of each kind.
  void time();
  // The faster copy's GB/s (100 %roof); sets each copy row's %roof.
  double finish();
  const std::array<Row, 2>& rows() const { return rows_; }  // copy (memcpy), copy-nt (streaming)

 private:
  ShapeData& sd_;
  std::string shape_;
  int threads_;
  Repetitions reps_;
  bool timed_ = false;
  std::array<Row, 2> rows_;
};

}  // namespace bench
