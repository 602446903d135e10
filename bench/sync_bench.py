"""What synchronized BatchNorm costs per training step on CPUs: DDP over Gloo with 2 processes.

    PYTHONPATH=build/python python3 bench/sync_bench.py [--model example|seed000] [--steps 60] [--batch 128] [--out FILE]

Per variant, one SGD step of a CNN on 28x28 inputs (--model example: examples/ddp_syncbn.py's, 3
conv + BN + ReLU blocks; seed000: bnorm-train's seed 000 CNN, Conv -> ReLU -> BN -> MaxPool twice,
then Linear, the model of the MPI path's `bnorm-train --sync-bn`), global batch split evenly over
the ranks, 1 thread per rank, timed on rank 0 as the median of --steps steps after 10 warm-up steps
(the ranks are in step: each step ends in DDP's all-reduce):
  torch BN     torch.nn.BatchNorm2d, per rank (what DDP on CPUs gives today)
  bnorm BN     bnorm.torch.BatchNorm2d, per rank
  bnorm SyncBN bnorm.torch.SyncBatchNorm over the default (Gloo) group
Also the time of the SyncBatchNorm collectives alone: one forward + backward of a lone
SyncBatchNorm(32) on a tiny input, against the same with per-rank BN.
Writes a Markdown table (stdout, and --out).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from torch_bench import cpu_model  # noqa: E402  (bench/ is on the path: the script's own folder)


def timed_steps(model, x, y, steps, warmup=10):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def seed000_cnn():
    layers = []
    for cin, cout in ((1, 16), (16, 32)):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(cout),
                   torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10))


def worker(rank, world, init, steps, batch, model_name, queue):
    import bnorm.torch as bt
    import ddp_syncbn

    import bnorm

    torch.set_num_threads(1)
    bnorm.set_num_threads(1)  # one thread per rank for both libraries (2 ranks on 2 cores)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch // world, 1, 28, 28, generator=g)
    y = torch.randint(10, (batch // world,), generator=g)
    variants = {
        "torch BN": lambda m: m,
        "bnorm BN": bt.convert,
        "bnorm SyncBN": bt.SyncBatchNorm.convert_sync_batchnorm,
    }
    rows = {}
    # Alternating rounds, so that a slow phase of the shared machine hits every variant alike.
    for _ in range(3):
        for name, convert in variants.items():
            torch.manual_seed(0)
            net = ddp_syncbn.model() if model_name == "example" else seed000_cnn()
            ddp = torch.nn.parallel.DistributedDataParallel(convert(net))
            rows.setdefault(name, []).extend(timed_steps(ddp, x, y, steps // 3))
            del ddp
    # The collectives alone: a lone BN layer on a tiny input (its compute is negligible).
    lone = {}
    xs = torch.randn(2, 32, 4, 4)
    for name, bn in (("per-rank BN", bt.BatchNorm2d(32)), ("SyncBN", bt.SyncBatchNorm(32))):
        t = []
        for i in range(10 + steps):
            xi = xs.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            bn(xi).sum().backward()
            if i >= 10:
                t.append(time.perf_counter() - t0)
        lone[name] = t
    dist.barrier()
    if rank == 0:
        queue.put((rows, lone))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("example", "seed000"), default="example")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out")
    args = p.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    init = f"file:///tmp/bnorm-sync-bench-{os.getpid()}"
    procs = [ctx.Process(target=worker, args=(r, world, init, args.steps, args.batch, args.model, queue)) for r in range(world)]
    for pr in procs:
        pr.start()
    rows, lone = queue.get()
    for pr in procs:
        pr.join()
    if os.path.exists(init[len("file://"):]):
        os.remove(init[len("file://"):])
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; {world} processes x 1 thread, Gloo "
        f"on loopback; model {args.model}; global batch {args.batch}; median of {len(next(iter(rows.values())))} steps per variant "
        "(3 alternating rounds)",
        "",
        "| variant | ms per SGD step | vs torch BN | vs bnorm BN |",
        "|---|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {v / med['torch BN']:.3f} | {v / med['bnorm BN']:.3f} |")
    lmed = {k: statistics.median(v) * 1e6 for k, v in lone.items()}
    lines += [
        "",
        "| lone BN layer (2x32x4x4), forward + backward | µs |",
        "|---|---|",
    ]
    for k, v in lmed.items():
        lines.append(f"| {k} | {v:.0f} |")
    lines.append(f"| SyncBN's 4 collectives (difference) | {lmed['SyncBN'] - lmed['per-rank BN']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
