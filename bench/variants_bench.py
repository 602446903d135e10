"""Ghost BN and Batch Renorm on bnorm's kernels against the obvious torch compositions, at 2 threads.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=build/python python3 bench/variants_bench.py [--reps 30] [--out FILE]

(OMP_WAIT_POLICY=PASSIVE: on a machine shared with other work, runs without it gave times in steps
of whole scheduler slices, which fits OpenMP threads spinning at the end of a parallel region while
the next region's threads wait for a core; with it the figures were steadier. The output records
the setting.)

Per case, the median of --reps timed calls after 5 warm-up calls (the four calls of a case
interleaved), of a training forward and of a training forward + backward (input, weight and bias gradients), in both memory formats, float32:
  Ghost BN     bnorm.torch.GhostBatchNorm2d           against  a loop of torch's F.batch_norm per
                                                               virtual batch, then torch.cat
  Batch Renorm bnorm.torch.BatchRenorm2d              against  Algorithm 1 in torch ops (mean, var,
                                                               r and d detached, the affine, the
                                                               running update under no_grad)
Each cell is the median, then the minimum in parentheses: on a machine shared with other work the
minimum is the less disturbed figure. Writes a Markdown table (stdout, and --out).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sync_bench import cpu_name  # noqa: E402

import bnorm.torch as bt  # noqa: E402


class TorchGhost(torch.nn.BatchNorm2d):
    def __init__(self, C, vbs):
        super().__init__(C)
        self.vbs = vbs

    def forward(self, x):
        return torch.cat([F.batch_norm(p, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       self.momentum, self.eps) for p in x.split(self.vbs)])


class TorchRenorm(torch.nn.BatchNorm2d):
    def __init__(self, C, r_max=3.0, d_max=5.0):
        super().__init__(C)
        self.r_max, self.d_max = r_max, d_max

    def forward(self, x):
        shape = (1, -1, 1, 1)
        n = x.numel() // x.shape[1]
        var, mu = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        sigma_b = (var + self.eps).sqrt()
        sigma = (self.running_var + self.eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / self.r_max, self.r_max).detach()
        d = ((mu - self.running_mean) / sigma).clamp(-self.d_max, self.d_max).detach()
        y = (x - mu.reshape(shape)) * (self.weight * r / sigma_b).reshape(shape) + \
            (self.weight * d + self.bias).reshape(shape)
        with torch.no_grad():
            self.running_mean.lerp_(mu, self.momentum)
            self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
        return y


def closures(module, x, dy):
    """A training forward (no_grad) and a forward + backward of `module` on x."""
    def fwd():
        with torch.no_grad():
            module(x)

    xg = x.clone().requires_grad_()

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(dy)

    return [fwd, fwd_bwd]


def medians_ms(fns, reps):
    """Median of each function's times, the functions run in turn each repetition (interleaved, so
    that a change of load on a shared machine falls on all of them alike)."""
    for fn in fns:
        for _ in range(5):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "variants-bench.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.ops.bnorm._set_num_threads(2)  # the operators' copy of the library
    rows = []
    load_before = os.getloadavg()[0]
    shapes = [((64, 64, 28, 28), 16), ((128, 256, 14, 14), 32)]
    for (shape, vbs) in shapes:
        C = shape[1]
        for fmt, fname in [(torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")]:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            pairs = [
                (f"Ghost BN, vbs {vbs} ({shape[0] // vbs} virtual batches)", bt.GhostBatchNorm2d(C, vbs),
                 TorchGhost(C, vbs), "loop of F.batch_norm + cat"),
                ("Batch Renorm", bt.BatchRenorm2d(C), TorchRenorm(C), "torch ops (Algorithm 1)"),
            ]
            for name, ours, theirs, what in pairs:
                of, ob, tf, tb = medians_ms(closures(ours, x, dy) + closures(theirs, x, dy), args.reps)
                cells = []
                for t, o in [(tf, of), (tb, ob)]:  # (median, min) of torch's and of bnorm's
                    cells += [f"{t[0]:.2f} ({t[1]:.2f})", f"{o[0]:.2f} ({o[1]:.2f})",
                              f"{t[0] / o[0]:.2f}x ({t[1] / o[1]:.2f}x)"]
                rows.append(f"| {name} | {'x'.join(map(str, shape))} {fname} | {what} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    header = [
        "# Ghost BN and Batch Renorm against torch compositions",
        "",
        f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} PYTHONPATH=build/python python3 "
        f"bench/variants_bench.py --reps {args.reps}`; CPU: {cpu_name()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}; torch.set_num_threads(2) and bnorm at 2 threads; "
        "float32, training; medians (and minimums) in ms of "
        f"{args.reps} calls after 5 warm-up calls, the four calls of a row interleaved (forward under no_grad; forward + backward of input, weight and "
        "bias gradients).",
        "",
        f"Load average (1 min) {load_before:.2f} before the run and {os.getloadavg()[0]:.2f} after it, on "
        f"{os.cpu_count()} cores: above the core count the two threads of every parallel region wait for the "
        "scheduler at each barrier, and the figures are slower and noisier than on an idle machine; each row's "
        "calls are interleaved, so its ratios are the fairer figures.",
        "",
        "| variant | shape | torch composition | torch fwd | bnorm fwd | speed-up | torch fwd+bwd | bnorm fwd+bwd "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
