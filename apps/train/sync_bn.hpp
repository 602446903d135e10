// bnorm-train --sync-bn: data-parallel training over MPI with SyncBatchNorm (apps/train/sync_bn.cpp).
#pragma once

namespace bnorm::train {

// Entered from bnorm-train's main when the command line holds --sync-bn; parses its own options and
// returns the exit status. Run it under `mpirun -np R`; see docs/distributed.md.
int sync_bn_main(int argc, char** argv);

}  // namespace bnorm::train
