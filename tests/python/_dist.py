"""Multi-process tests over torch.distributed (Gloo on loopback), started with torch.multiprocessing.

run_ranks(fn, world, *args) runs fn(rank, world, *args) in `world` fresh processes that share one
process group, and returns what each rank's fn returned (it must be picklable), in rank order.

Why the teardown is spelled out: a Gloo process group lives as long as the last object that holds
it (DistributedDataParallel's reducer does). Left to interpreter shutdown, its worker threads can be
torn down mid-flight, which ends the process with "terminate called without an active exception"
(SIGABRT) at random, after the test itself has passed. So each rank drops fn's objects and collects
cycles, waits for the others at a barrier, destroys the group, and leaves with os._exit: nothing of
torch runs during interpreter finalization.
"""

import datetime
import gc
import os
import pickle
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Long enough for a loaded 2-core machine, short enough that a test with a dead rank fails in time.
TIMEOUT = datetime.timedelta(seconds=60)


def _rank_main(rank, world, init, result_dir, fn, args, timeout):
    import bnorm

    # One thread per rank for torch and bnorm: several ranks share 2 cores, and OpenMP threads that
    # spin after a kernel would starve the other ranks' communication threads.
    torch.set_num_threads(1)
    bnorm.set_num_threads(1)
    status = 1
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
        result = fn(rank, world, *args)
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        del result
        gc.collect()
        dist.barrier()
        status = 0
    except BaseException:
        traceback.print_exc()
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            gc.collect()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


def run_ranks(fn, world, *args, timeout=TIMEOUT, expect_failure=False):
    """fn's results, one per rank. A rank that raised, died or hung fails the test with the ranks'
    tracebacks, unless expect_failure: then the per-rank outcomes are returned, each a traceback
    string for a rank that raised, fn's result wrapped as ("returned", result) for one that
    succeeded, or the int exit code of one that died without a traceback. Every rank is waited for: none is killed for another's failure
    (the point of the error tests is that each rank raises by itself)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/rendezvous"
        procs = [ctx.Process(target=_rank_main, args=(r, world, init, d, fn, args, timeout)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 3 * timeout.total_seconds()
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

        def outcome(r):
            err = os.path.join(d, f"rank{r}.err")
            if os.path.exists(err):
                with open(err) as f:
                    return f.read()
            return None if procs[r].exitcode == 0 else procs[r].exitcode

        outcomes = [outcome(r) for r in range(world)]
        if hung:
            raise AssertionError(f"ranks {hung} of {world} still ran after {3 * timeout.total_seconds():.0f} s: "
                                 f"outcomes {outcomes}")
        if not expect_failure and any(o is not None for o in outcomes):
            raise AssertionError("a rank failed:\n" + "\n".join(f"rank {r}: {o}" for r, o in enumerate(outcomes)
                                                                if o is not None))
        results = []
        for r in range(world):
            if outcomes[r] is not None:
                results.append(outcomes[r])
                continue
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                result = pickle.load(f)
            results.append(("returned", result) if expect_failure else result)
        return results
