#!/usr/bin/env python3
"""Folding BatchNorm away (issue 15): eval time and correctness, bnorm's folding against torch's and
onnxoptimizer's.

    PYTHONPATH=build/python python3 bench/fold_bench.py [--reps 15] [--out bench/results/fold-bench.md]

1. torch eval forward of torchvision resnet18 and mobilenet_v2 (random running statistics), unfolded,
   folded by bnorm.torch.fold, and fused by torch.fx.experimental.optimization.fuse (torch.fx's
   fuse_conv_bn_eval pass): BNs left, max error against the unfolded model in float64, median time.
2. the same models exported to ONNX (torch.onnx.export, BNs preserved) and run in onnxruntime with its
   graph optimizations off (what folding itself gains) and at their default (ORT fuses Conv+BN
   itself), unfolded, folded by bnorm.onnx.fold and by onnxoptimizer's fuse_bn_into_conv.
3. the patterns the peers get wrong: Linear on (N, C, L) + BatchNorm1d, grouped ConvTranspose2d +
   BatchNorm2d, in torch (torch.fx fuse, torch.ao.quantization.fuse_modules) and in ONNX (onnxoptimizer),
   against bnorm.

The implementations of a row alternate (A, B, C, A, B, C, ...) in one process, so that a change of
the shared machine's load reaches all of them; the figures are medians. Markdown on stdout and in --out.
"""

from __future__ import annotations

import argparse
import copy
import io
import platform
import statistics
import subprocess
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx.experimental.optimization as fx_opt
import torch.nn as nn
import torchvision

import bnorm
import bnorm.onnx
import bnorm.torch as bt

try:
    import onnxoptimizer
except ImportError:  # the ONNX columns then say so
    onnxoptimizer = None

THREADS = 2
MODELS = ["resnet18", "mobilenet_v2"]
BATCH, IMAGE = 8, 112


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def bn_count(model):
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, bt.FrozenBatchNorm)) for m in model.modules())


def onnx_bn_count(model):
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def medians(fns, reps):
    """Median seconds of each function, calls alternating."""
    times = [[] for _ in fns]
    for f in fns:  # warm-up
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def torch_section(reps, lines):
    lines += ["## 1. torch eval forward (batch %d, %dx%d, float32, %d threads)" % (BATCH, IMAGE, IMAGE, THREADS), "",
              "| model | variant | BNs left | max rel. error vs float64 | median ms |", "|---|---|---|---|---|"]
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    for name in MODELS:
        model = randomize(getattr(torchvision.models, name)())
        with torch.no_grad():
            reference = copy.deepcopy(model).double()(x.double()).numpy()
        variants = {"unfolded": model, "bnorm.torch.fold": bt.fold(model, (x,)),
                    "torch.fx fuse (fuse_conv_bn_eval)": fx_opt.fuse(copy.deepcopy(model))}
        calls = [lambda m=m: m(x) for m in variants.values()]
        with torch.no_grad():
            errors = [rel_error(m(x).numpy(), reference) for m in variants.values()]
            times = medians(calls, reps)
        for (variant, m), err, t in zip(variants.items(), errors, times):
            lines.append(f"| {name} | {variant} | {bn_count(m)} | {err:.1e} | {t * 1e3:.1f} |")
    lines.append("")


def export(model, x):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(f.getvalue())


def session(model, optimize):
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_section(reps, lines):
    peer = "onnxoptimizer fuse_bn_into_conv" if onnxoptimizer else "onnxoptimizer (not installed)"
    lines += ["## 2. onnxruntime (batch %d, %dx%d, float32, %d threads, %s)" % (
        BATCH, IMAGE, IMAGE, THREADS, f"onnxruntime {ort.__version__}"), "",
        "| model | variant | BNs left | max rel. error vs unfolded | median ms, ORT optimizations off | "
        "median ms, ORT optimizations on |", "|---|---|---|---|---|---|"]
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    feed = {"x": x.numpy()}
    for name in MODELS:
        model = export(randomize(getattr(torchvision.models, name)()), x)
        variants = {"unfolded": model, "bnorm.onnx.fold": bnorm.onnx.fold(model)}
        if onnxoptimizer:
            variants[peer] = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
        reference = session(model, False).run(None, feed)[0]
        rows = {}
        for optimize in (False, True):
            sessions = {v: session(m, optimize) for v, m in variants.items()}
            calls = [lambda s=s: s.run(None, feed) for s in sessions.values()]
            for v, t in zip(sessions, medians(calls, reps)):
                rows.setdefault(v, []).append(t)
        for v, m in variants.items():
            err = rel_error(session(m, False).run(None, feed)[0], reference)
            lines.append(f"| {name} | {v} | {onnx_bn_count(m)} | {err:.1e} | {rows[v][0] * 1e3:.1f} | "
                         f"{rows[v][1] * 1e3:.1f} |")
    if not onnxoptimizer:
        lines.append("\nonnxoptimizer is not installed here (`pip install onnxoptimizer`): its rows are missing.")
    lines.append("")


def pattern_models():
    torch.manual_seed(3)  # the layers' initial weights
    g = torch.Generator().manual_seed(3)
    cases = {
        "Linear(4, 4) on (N, C, L) = (2, 4, 4) + BatchNorm1d(4)": (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (2, 4, 4)),
        "ConvTranspose2d(4, 8, 3, groups=2) + BatchNorm2d(8)": (
            nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), (1, 4, 5, 5)),
        "Conv2d(4, 8, 3) + BatchNorm2d(8)": (nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)), (1, 4, 5, 5)),
    }
    out = {}
    for name, (m, shape) in cases.items():
        out[name] = (randomize(m.double()), torch.randn(shape, generator=g, dtype=torch.float64))
    return out


def outcome(fn, model, x):
    """'BNs left, error' of a folding function on (model, x), or what it raised."""
    try:
        folded = fn(copy.deepcopy(model))
        with torch.no_grad():
            err = rel_error(folded(x).numpy(), model(x).numpy())
        return f"{bn_count(folded)} BN left, error {err:.1e}" + (" (wrong)" if err > 1e-9 else "")
    except Exception as e:
        return f"raises {type(e).__name__}"


def pattern_section(lines):
    lines += ["## 3. The patterns the peers get wrong (float64 models; error: max relative, vs unfolded)", "",
              "| pattern | bnorm.torch.fold | torch.fx fuse | torch.ao.quantization.fuse_modules | "
              "bnorm.onnx.fold | onnxoptimizer fuse_bn_into_conv |", "|---|---|---|---|---|---|"]
    for name, (model, x) in pattern_models().items():
        cells = [outcome(lambda m: bt.fold(m, (x,)), model, x), outcome(fx_opt.fuse, model, x),
                 outcome(lambda m: torch.ao.quantization.fuse_modules(m, [["0", "1"]]), model, x)]
        exported = export(model.float(), x.float())
        model.double()
        feed = {"x": x.float().numpy()}
        reference = session(exported, False).run(None, feed)[0]
        folders = [("bnorm", bnorm.onnx.fold)]
        if onnxoptimizer:
            folders.append(("onnxoptimizer", lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])))
        for _, folder in folders:
            try:
                folded = folder(exported)
                err = rel_error(session(folded, False).run(None, feed)[0], reference)
                cells.append(f"{onnx_bn_count(folded)} BN left, error {err:.1e}" + (" (wrong)" if err > 1e-5 else ""))
            except Exception as e:
                cells.append(f"raises {type(e).__name__}")
        if not onnxoptimizer:
            cells.append("not installed")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="bench/results/fold-bench.md")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)  # the models' initial weights
    bnorm.set_num_threads(THREADS)
    lines = ["# Folding BatchNorm away: bench/fold_bench.py", "",
             f"CPU: {cpu_name()}; torch {torch.__version__}, torchvision {torchvision.__version__}, onnx "
             f"{onnx.__version__}, onnxruntime {ort.__version__}, onnxoptimizer "
             f"{onnxoptimizer.__version__ if onnxoptimizer else 'not installed'}; {args.reps} timed calls each, "
             f"alternating; command: `PYTHONPATH=build/python python3 bench/fold_bench.py --reps {args.reps}`", ""]
    torch_section(args.reps, lines)
    onnx_section(args.reps, lines)
    pattern_section(lines)
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
