"""Data-parallel training on CPUs with synchronized BatchNorm: DDP over Gloo + bnorm.torch.SyncBatchNorm.

A small CNN on Fashion-MNIST. Each process trains on its own shard of every global batch; the
BatchNorm statistics are those of the whole global batch (every rank's shard together), as if one
process trained on it, which torch.nn.SyncBatchNorm gives only on GPUs.

One machine, 2 processes:

    PYTHONPATH=build/python torchrun --nproc-per-node 2 examples/ddp_syncbn.py

Several machines (here 2, each with 2 processes): the same command on every machine, with the
number of machines and one address that all of them reach (the first machine's, any free port):

    PYTHONPATH=build/python torchrun --nnodes 2 --nproc-per-node 2 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29400 examples/ddp_syncbn.py

Options: --steps N (default 300), --batch B (global batch, default 128), --lr, --threads (per
process, default 1), --data DIR (default /usr/share/datasets/fashion-mnist: Debian's
dataset-fashion-mnist package). Rank 0 prints the loss every 50 steps and the test accuracy at the end.
"""

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import bnorm.torch as bt


def read_idx(path):
    """An IDX file (the MNIST format), gzipped: its array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: expected an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, got {body.size}")
    return body.reshape(dims)


def load(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


def model():
    # Convolutions without bias: BatchNorm's shift makes it redundant (seed 004).
    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(inplace=True)]

    return torch.nn.Sequential(*block(1, 16), torch.nn.MaxPool2d(2), *block(16, 32), torch.nn.MaxPool2d(2),
                               *block(32, 32), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(32, 10))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128, help="global batch size (split over the ranks)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    if "RANK" not in os.environ:
        sys.exit("examples/ddp_syncbn.py: start it with torchrun (see its docstring)")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.batch < world:
            raise ValueError(f"--batch: expected at least one sample per rank ({world}), got {args.batch}")
        x_train, y_train = load(args.data, "train")
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        net = bt.SyncBatchNorm.convert_sync_batchnorm(model())
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
        g = torch.Generator().manual_seed(1)  # the same global batches on every rank
        # This rank's rows of each global batch (uneven when world does not divide it).
        lo, hi = rank * args.batch // world, (rank + 1) * args.batch // world
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(len(x_train), (args.batch,), generator=g)[lo:hi]
            opt.zero_grad()
            # DDP averages the ranks' gradients: scaling each rank's summed loss by world / batch makes
            # the average the gradient of the global batch's mean loss, for uneven shards too.
            loss = torch.nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx], reduction="sum")
            (loss * (world / args.batch)).backward()
            opt.step()
            if rank == 0 and (step % 50 == 0 or step == args.steps):
                print(f"step {step:5d}  loss {loss.item() / (hi - lo):.4f}  ({time.perf_counter() - start:.1f} s)",
                      flush=True)
        if rank == 0:
            x_test, y_test = load(args.data, "test")
            net.eval()  # running statistics: no communication
            with torch.no_grad():
                correct = sum(int((net(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                              for i in range(0, len(x_test), 1000))
            print(f"test accuracy {correct / len(x_test):.4f} after {args.steps} steps of {args.batch} "
                  f"over {world} ranks", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
