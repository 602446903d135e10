#!/usr/bin/env python3
"""bnorm as a PyTorch user meets it: bnorm.torch's modules against torch's own, on the CPU.

    scripts/bench --torch [--quick]       # builds build/python (scripts/build_python), then runs this
    PYTHONPATH=build/python python3 bench/torch_bench.py [--quick] [--out FILE] [--sections 1,2,3,4]

1. module calls at small shapes, where the per-call cost (Python, autograd, argument checks)
   outweighs the kernels: training forward, training forward + backward, eval forward;
2. bnorm-bench's shapes (bench/options.cpp) through the modules: training forward, autograd
   backward, eval forward, NCHW and channels_last (what bnorm-bench measures in C++, plus Python);
3. torchvision models, torch's against bnorm.torch.convert's (and convert(fuse=True)'s where this
   bnorm has it): one SGD training step and an eval forward, both memory formats;
4. torch.compile of resnet18 both ways, and the output error of each at a large mean offset.

Each comparison alternates its implementations in one process (A, B, C, A, B, C, ...), so that a
change in the shared machine's load reaches all of them; the figures are medians. Only bnorm's
public API is used (bnorm.set_num_threads, bnorm.torch.BatchNorm1d/2d, bnorm.torch.convert), so the
script measures whatever bnorm.torch does inside. Markdown on stdout, progress on stderr, one JSON
object per row (after a first "meta" object) in --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import bnorm
import bnorm.torch as bt

THREADS = 2
# glibc's malloc serves a block above its mmap threshold with a fresh mmap, and the threshold
# grows with use up to 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); a new output that large
# page-faults in on first touch at every allocating call, whichever library computes it.
MMAP_THRESHOLD_MAX = 32 << 20

OPTIONS_CPP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "options.cpp")


def _options_source() -> str:
    with open(OPTIONS_CPP) as f:
        return f.read()


def _found(pattern: str, src: str, what: str):
    m = re.search(pattern, src, re.S)
    if m is None:
        raise RuntimeError(f"{OPTIONS_CPP}: cannot find {what} (pattern {pattern!r}); update {__file__}")
    return m


def named_shapes(name: str, src: str) -> list:
    """bnorm-bench's shapes for one --shapes word, read from bench/options.cpp (named_shapes there:
    "seed", "2d", "resnet50"), so that the Python harnesses share the C++ bench's list instead of
    keeping a copy of it; other words are shapes like 32x64x68x68 or 256x1024."""
    simple = dict(re.findall(r'if \(name == "(\w+)"\) return \{\{([\d, ]+)\}\};', src))
    if name in simple:
        return [tuple(int(d) for d in simple[name].split(","))]
    if name == "resnet50":
        table = _found(r"r50\[\]\[3\] = \{(.*?)\};", src, "the resnet50 table").group(1)
        batch = int(_found(r"v\.push_back\(\{(\d+), s\[0\]", src, "the resnet50 batch").group(1))
        return [(batch, *map(int, chw)) for chw in re.findall(r"\{(\d+), (\d+), (\d+)\}", table)]
    dims = tuple(int(d) for d in name.split("x"))
    if len(dims) not in (2, 4) or min(dims) < 1:
        raise ValueError(f"--shapes: expected seed, resnet50, 2d or NxC / NxCxHxW, got {name!r}")
    return [dims]


def bench_shapes(names: str | None = None) -> list:
    """bnorm-bench's shapes for a --shapes list (default: its default list, kDefaultShapes)."""
    src = _options_source()
    if names is None:
        names = _found(r'kDefaultShapes = "([^"]*)"', src, "kDefaultShapes").group(1)
    return [shape for name in names.split(",") if name for shape in named_shapes(name, src)]


def quick_bf16_shape() -> tuple:
    """The shape bnorm-bench --quick runs bf16 on (kQuickBf16Shape in bench/options.cpp)."""
    dims = _found(r"kQuickBf16Shape\{([\d, ]+)\}", _options_source(), "kQuickBf16Shape").group(1)
    return tuple(int(d) for d in dims.split(","))

QUICK_BENCH_SHAPES = [(32, 256, 14, 14), (32, 512, 7, 7)]

SMALL_CASES = [("BatchNorm2d", (4, 256, 7, 7)), ("BatchNorm2d", (1, 64, 56, 56)),
               ("BatchNorm2d", (8, 64, 28, 28)), ("BatchNorm2d", (32, 16, 8, 8)),
               ("BatchNorm1d", (2, 32)), ("BatchNorm1d", (64, 128))]

MODELS = [("resnet18", 16), ("resnet50", 8), ("mobilenet_v2", 16)]  # (torchvision name, batch)
IMAGE = 112
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --- timing ----------------------------------------------------------------------------------


def _batch_ns(fn, calls: int) -> int:
    """Wall time of `calls` back-to-back calls of fn. The garbage collector is off meanwhile (as
    in timeit): a collection would be charged to whichever implementation happened to run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        return time.perf_counter_ns() - start
    finally:
        if was_enabled:
            gc.enable()


class Timed:
    """One variant's outcome: the median ns per call, the first call's result and duration (for a
    compiled model, its compilation), or the first line of the exception that dropped it."""

    def __init__(self):
        self.median_ns = None
        self.samples_ns = []  # per round, in round order (paired_ratio pairs them across variants)
        self.first_ns = None
        self.first_result = None
        self.error = None


class Comparison:
    """What alternate() measured: name -> Timed, the calls per batch, and `others`: the CPUs that
    other processes kept busy meanwhile (the machine is shared; 2 threads on 2 CPUs leave no room,
    so a busy neighbour shows as waits of a scheduler slice)."""

    def __init__(self, names):
        self.timed = {name: Timed() for name in names}
        self.calls = 1
        self.others = None

    def medians(self, unit_ns: float) -> dict:
        """name -> median per call in units of unit_ns (None where the variant failed)."""
        return {n: (t.median_ns / unit_ns if t.median_ns is not None else None) for n, t in self.timed.items()}

    def first_results(self) -> dict:
        return {n: t.first_result for n, t in self.timed.items()}

    def first_s(self) -> dict:
        return {n: (t.first_ns / 1e9 if t.first_ns is not None else None) for n, t in self.timed.items()}

    def errors(self) -> dict:
        return {n: t.error for n, t in self.timed.items() if t.error}

    def drop_results(self):
        for t in self.timed.values():
            t.first_result = None  # large tensors: let them go


def _cpu_s():
    """(seconds of CPU time the whole machine spent busy, seconds this process spent), from
    /proc/stat (idle, iowait and steal excluded) and os.times()."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    own = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def alternate(variants: dict, rounds: int, warmup: int = 1, target_ns: int = 0) -> Comparison:
    """Times the variants (name -> callable without arguments) against each other.

    Warm-up: `warmup` calls of each. Calls per batch: as many as make the fastest variant's batch
    last target_ns (at least 1), the same for every variant. Then `rounds` rounds, each timing one
    batch of every variant in turn, so that the variants share the machine's ups and downs. A
    variant that raises is dropped from then on, its exception kept.
    """
    result = Comparison(variants)
    live = dict(variants)

    def guarded(name, step):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported, and the other variants go on
            result.timed[name].error = first_line(e)
            log(f"  {name}: {result.timed[name].error}")
            del live[name]

    def first(name, fn):
        start = time.perf_counter_ns()
        result.timed[name].first_result = fn()
        result.timed[name].first_ns = time.perf_counter_ns() - start
        for _ in range(warmup - 1):
            fn()

    for name, fn in list(live.items()):
        guarded(name, lambda: first(name, fn))
    if target_ns and live:
        # From three more calls of each, not the first (allocator, compilation), and the fastest
        # of them: one call that a neighbour delayed would otherwise leave a batch of one call.
        fastest = min(_batch_ns(fn, 1) for fn in live.values() for _ in range(3))
        result.calls = max(1, round(target_ns / max(fastest, 1)))
    samples = {name: [] for name in live}
    busy0, own0, wall0 = *_cpu_s(), time.perf_counter()
    for _ in range(rounds):
        for name, fn in list(live.items()):
            guarded(name, lambda: samples[name].append(_batch_ns(fn, result.calls) / result.calls))
    busy1, own1, wall1 = *_cpu_s(), time.perf_counter()
    if wall1 > wall0:
        result.others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    for name, values in samples.items():
        if name in live and values:
            result.timed[name].median_ns = statistics.median(values)
            result.timed[name].samples_ns = values
    return result


def paired_ratio(result: Comparison, num: str, den: str):
    """The median over rounds of num's time / den's time in the same round, with a 95% interval
    for that median from order statistics (the ranks n/2 -+ 0.98 sqrt(n): distribution-free, and
    the rounds' pairing cancels the machine's slow drift); None where either variant failed. With
    fewer than 6 rounds the interval is the whole range."""
    a, b = result.timed[num].samples_ns, result.timed[den].samples_ns
    if not a or len(a) != len(b):
        return None
    q = sorted(x / y for x, y in zip(a, b))
    n = len(q)
    lo = max(0, int((n / 2 - 0.98 * n ** 0.5) // 1))
    hi = min(n - 1, -int(-(n / 2 + 0.98 * n ** 0.5) // 1))
    return {"median": statistics.median(q), "low": q[lo], "high": q[hi], "rounds": n}


def interval(r, digits=2):
    """A paired_ratio as 'median [low, high]'."""
    if r is None:
        return "-"
    return f"{r['median']:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}]"


def ratio(a, b):
    return a / b if a is not None and b is not None else None


def max_abs_diff(a, b):
    if a is None or b is None:
        return None
    return (a.detach().double() - b.detach().double()).abs().max().item()


# --- output ----------------------------------------------------------------------------------


class Report:
    """JSON lines into --out as rows come, and one Markdown table per section on stdout."""

    def __init__(self, path: str, meta: dict):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w")
        self.path = path
        self.write({"kind": "meta", **meta})

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @staticmethod
    def table(headers, rows, left: int):
        """Markdown; the first `left` columns left-aligned, the (numeric) rest right-aligned."""
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(flush=True)


def num(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def sci(v):
    return "-" if v is None else f"{v:.1e}"


# --- sections 1 and 2: one module ------------------------------------------------------------


def module_pair(kind: str, channels: int, guard: bool = False) -> dict:
    """torch.nn.<kind> with non-trivial parameters and running statistics, and bnorm.torch.<kind>
    loaded with the same state, so that both compute the same values; with guard, also a third,
    bnorm's with skip_nonfinite=True (the non-finite guard, docs/running-statistics.md)."""
    ref = getattr(torch.nn, kind)(channels)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ours = getattr(bt, kind)(channels)
    ours.load_state_dict(ref.state_dict())
    if not guard:
        return {"torch": ref, "bnorm": ours}
    guarded = getattr(bt, kind)(channels)
    guarded.load_state_dict(ref.state_dict())
    guarded.skip_nonfinite = True
    return {"torch": ref, "bnorm": ours, "bnorm guard": guarded}


def module_call(mod, x, g, mode: str):
    """The call timed for `mode`; it returns what the implementations are compared on.

    The parameters require grad, as in a model, so a training forward records its autograd graph
    as it would in a training step. Gradients are reset to None before each backward: otherwise
    every call after the first would add into the previous ones (an extra pass over dx)."""
    if mode == "train_fwd":
        mod.train()
        return lambda: mod(x)
    if mode == "eval_fwd":
        mod.eval()

        def infer():
            with torch.no_grad():
                return mod(x)
        return infer
    mod.train()
    xg = x.detach().requires_grad_()  # a leaf per module, so that the two do not share x.grad
    if mode == "train_fwd_bwd":
        def step():
            mod.zero_grad(set_to_none=True)
            xg.grad = None
            mod(xg).backward(g)
            return xg.grad
        return step
    assert mode == "backward"
    out = mod(xg)  # one forward; its graph is kept (retain_graph) and run backward on every call

    def backward():
        mod.zero_grad(set_to_none=True)
        xg.grad = None
        out.backward(g, retain_graph=True)
        return xg.grad
    return backward


def compare_module(kind, shape, fmt, mode, rounds, warmup, target_ns, guard=False):
    """torch's module against bnorm's (and bnorm's with the guard) on one input; returns the
    Comparison and the largest difference between torch's and bnorm's first results."""
    mods = module_pair(kind, shape[1], guard and mode != "eval_fwd")
    x = torch.randn(shape).to(memory_format=fmt)
    g = torch.randn_like(x)  # randn_like keeps x's memory format: the upstream gradient matches
    result = alternate({name: module_call(m, x, g, mode) for name, m in mods.items()}, rounds, warmup, target_ns)
    first = result.first_results()
    diff = max_abs_diff(first["torch"], first["bnorm"])
    result.drop_results()
    return result, diff


def failures(label: str, result: Comparison, notes: list):
    notes += [f"- {label}: {name} failed and was dropped: {err}" for name, err in result.errors().items()]


def print_notes(notes: list):
    if notes:
        print("\n".join(notes) + "\n")


OTHERS_NOTE = ("others: CPUs kept busy by other processes while the row was timed (from /proc/stat); "
               "above ~0.3 the row is disturbed, since the 2 threads have no CPU to spare.")


def section_small(report, quick, guard=False):
    rounds, target = (15, 1_000_000) if quick else (30, 2_000_000)
    print("## 1. Module calls at small shapes (µs per call)\n")
    print(f"Median over {rounds} batches of calls (each batch ~{target // 1_000_000} ms, the two "
          "modules' batches alternating); training forward with the parameters requiring grad (the "
          "graph is recorded); forward + backward: `m(x).backward(g)`, gradients reset to None "
          "each call; eval: under `torch.no_grad()`. 4-D shapes in both memory formats. torch/bnorm: "
          "the median of the rounds' paired ratios with its 95% interval; > 1: bnorm faster. max|diff|: "
          f"bnorm against torch, first call. {OTHERS_NOTE}"
          + (" --guard: the training rows also time bnorm's module with skip_nonfinite=True (the "
             "non-finite guard), alternating with the other two; guard/bnorm > 1: the guard costs." if guard else "")
          + "\n")
    rows, notes = [], []
    for kind, shape in SMALL_CASES:
        # 4-D inputs in both memory formats: channels_last is what a model converted with
        # .to(memory_format=torch.channels_last) hands its BatchNorm2d layers.
        layouts = [("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)] if len(shape) == 4 \
            else [("NC", torch.contiguous_format)]
        for layout, fmt in layouts:
            for mode in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
                log(f"[1] {kind} {shape} {layout} {mode}")
                result, diff = compare_module(kind, shape, fmt, mode, rounds, 2, target, guard)
                us = result.medians(1e3)
                r = ratio(us["torch"], us["bnorm"])
                paired = paired_ratio(result, "torch", "bnorm")
                report.write({"kind": "module", "module": kind, "shape": list(shape), "layout": layout, "mode": mode,
                              "us": us, "torch_over_bnorm": r, "paired_ratio": paired, "calls_per_batch": result.calls,
                              "batches": rounds, "others": result.others, "max_abs_diff": diff,
                              "errors": result.errors()})
                label = "x".join(map(str, shape))
                guarded = ([num(us["bnorm guard"]), num(ratio(us["bnorm guard"], us["bnorm"]), 3)]
                           if "bnorm guard" in us else ["", ""]) if guard else []
                rows.append([kind, label, layout, mode, num(us["torch"]), num(us["bnorm"]), interval(paired),
                             *guarded, sci(diff), num(result.others, 2)])
                failures(f"{kind} {label} {layout} {mode}", result, notes)
    Report.table(["module", "shape", "layout", "mode", "torch µs", "bnorm µs", "torch/bnorm [95%]",
                  *(["bnorm guard µs", "guard/bnorm"] if guard else []), "max|diff|", "others"], rows, 4)
    print_notes(notes)


def section_shapes(report, quick):
    shapes = QUICK_BENCH_SHAPES if quick else bench_shapes()
    rounds, warmup = (5, 1) if quick else (20, 2)
    print("## 2. bnorm-bench's shapes through the modules (f32, ms per call)\n")
    print(f"Median over {rounds} batches (a batch: calls enough for ~20 ms, at least one). "
          "train_fwd: training forward (graph recorded); backward: `out.backward(g)` on one kept "
          "graph (`retain_graph=True`), gradients reset to None each call; eval_fwd: under "
          "`torch.no_grad()`. A 2-D shape runs once (NC). Marked * : a tensor over 32 MiB, above "
          "glibc's largest mmap threshold, so every allocating call (torch's and bnorm's alike: "
          "both return fresh tensors) gets its output from a fresh mmap and page-faults it in; "
          f"bnorm-bench's torch-out and bnorm rows do not pay that. {OTHERS_NOTE}\n")
    rows, notes = [], []
    for shape in shapes:
        layouts = [("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)] if len(shape) == 4 \
            else [("NC", torch.contiguous_format)]
        kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
        nbytes = 4 * torch.Size(shape).numel()
        over = nbytes > MMAP_THRESHOLD_MAX
        label = "x".join(map(str, shape)) + (" *" if over else "")
        for layout, fmt in layouts:
            for mode in ("train_fwd", "backward", "eval_fwd"):
                log(f"[2] {shape} {layout} {mode}")
                result, diff = compare_module(kind, shape, fmt, mode, rounds, warmup, 20_000_000)
                ms = result.medians(1e6)
                r = ratio(ms["torch"], ms["bnorm"])
                report.write({"kind": "shape", "shape": list(shape), "layout": layout, "op": mode, "dtype": "f32",
                              "ms": ms, "torch_over_bnorm": r, "paired_ratio": paired_ratio(result, "torch", "bnorm"),
                              "calls_per_batch": result.calls, "batches": rounds,
                              "others": result.others, "tensor_mib": nbytes / 2**20, "over_mmap_threshold": over,
                              "max_abs_diff": diff, "errors": result.errors()})
                rows.append([label, layout, mode, num(nbytes / 2**20), num(ms["torch"], 3), num(ms["bnorm"], 3),
                             num(r, 2), sci(diff), num(result.others, 2)])
                failures(f"{label} {layout} {mode}", result, notes)
    Report.table(["shape", "layout", "op", "MiB", "torch ms", "bnorm ms", "torch/bnorm", "max|diff|", "others"],
                 rows, 3)
    print_notes(notes)


# --- sections 3 and 4: models ----------------------------------------------------------------


def base_model(name: str, batch: int):
    """A torchvision model (weights=None) whose running statistics are not the initial 0 and 1:
    one training-mode forward on random data (no gradient) sets them."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        model.train()
        model(torch.randn(batch, 3, IMAGE, IMAGE))
    return model


def fused(model):
    """bnorm.torch.convert(model, fuse=True), or None and why where this bnorm has no fuse."""
    try:
        return bt.convert(model, fuse=True), None
    except TypeError as e:
        return None, first_line(e)


def train_step(model, x, labels):
    """One SGD step (lr 0.01, no momentum: nothing but the weights changes between steps) with a
    cross-entropy loss on fixed labels; returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # mobilenet_v2's Dropout: the same mask for every variant (the check)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def eval_forward(model, x):
    def infer():
        with torch.no_grad():
            return model(x)
    return infer


def inputs(batch: int, fmt):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen).to(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), generator=gen)
    return x, labels


def compare_models(variants: dict, mode: str, x, labels, rounds: int, warmup: int):
    """The models' train steps or eval forwards, alternated. Returns the Comparison and, per
    variant after the first, its check against the first: eval max |output difference|, train
    |first loss difference|."""
    calls = {}
    for name, model in variants.items():
        model.train(mode == "train")
        calls[name] = train_step(model, x, labels) if mode == "train" else eval_forward(model, x)
    result = alternate(calls, rounds, warmup)
    first = result.first_results()
    ref_name = next(iter(variants))
    checks = {n: max_abs_diff(first[ref_name], r) for n, r in first.items() if n != ref_name}
    result.drop_results()
    return result, checks


def section_models(report, quick):
    models = MODELS[:1] if quick else MODELS
    rounds = 3 if quick else 20
    print("## 3. torchvision models (ms per call)\n")
    print(f"Input {IMAGE}x{IMAGE}, weights=None, running statistics set by one training forward. "
          "train: one SGD step (zero_grad, forward, cross-entropy on fixed labels, backward, "
          f"step; lr 0.01); eval: forward under `torch.no_grad()`. Median of {rounds} runs, the "
          "variants interleaved (torch, bnorm, bnorm-fused, torch, ...) after one warm-up each; "
          "torch/bnorm: the median of the rounds' ratios with its 95% interval (order statistics: "
          "an interval wholly above 1 means bnorm is faster beyond the noise). "
          "bnorm: `bnorm.torch.convert(copy.deepcopy(model))`; bnorm-fused: the same with "
          "`fuse=True` where bnorm.torch has it. check: eval max|out - torch's|, train |loss - "
          f"torch's| on the first step. {OTHERS_NOTE}\n")
    rows, notes = [], []
    for name, batch in models:
        base = base_model(name, batch)
        for fmt_name, fmt in FORMATS.items():
            variants = {"torch": copy.deepcopy(base).to(memory_format=fmt),
                        "bnorm": bt.convert(copy.deepcopy(base)).to(memory_format=fmt)}
            fused_model, why = fused(copy.deepcopy(base))
            if fused_model is not None:
                variants["bnorm-fused"] = fused_model.to(memory_format=fmt)
            else:
                note = f"- bnorm-fused skipped: `bnorm.torch.convert(model, fuse=True)` raised {why}"
                if note not in notes:
                    notes.append(note)
            x, labels = inputs(batch, fmt)
            for mode in ("eval", "train"):  # eval first: the weights are still the shared start
                log(f"[3] {name} {fmt_name} {mode}")
                result, checks = compare_models(variants, mode, x, labels, rounds, 1)
                ms = result.medians(1e6)
                r_bnorm = paired_ratio(result, "torch", "bnorm")
                r_fused = paired_ratio(result, "torch", "bnorm-fused") if "bnorm-fused" in ms else None
                report.write({"kind": "model", "model": name, "batch": batch, "format": fmt_name, "mode": mode,
                              "ms": ms, "rounds": rounds, "torch_over_bnorm": r_bnorm, "torch_over_fused": r_fused,
                              "others": result.others, "first_call_s": result.first_s(),
                              "check_vs_torch": checks, "errors": result.errors()})
                bf = ms.get("bnorm-fused")
                rows.append([name, str(batch), fmt_name, mode, num(ms["torch"]), num(ms["bnorm"]), interval(r_bnorm),
                             num(bf), interval(r_fused), sci(checks.get("bnorm")), sci(checks.get("bnorm-fused")),
                             num(result.others, 2)])
                failures(f"{name} {fmt_name} {mode}", result, notes)
    Report.table(["model", "batch", "format", "mode", "torch ms", "bnorm ms", "torch/bnorm [95%]", "fused ms",
                  "torch/fused [95%]", "check bnorm", "check fused", "others"], rows, 4)
    print_notes(notes)


def graph_breaks(model, x):
    """How dynamo splits the model's eval forward: (graphs, graph breaks, the first break's reason),
    or (None, None, why explain failed). torch._dynamo.explain resets dynamo's caches, so this runs
    before anything is compiled."""
    model.eval()
    try:
        with torch.no_grad():
            found = torch._dynamo.explain(model)(x)
    except Exception as e:  # noqa: BLE001 - reported instead
        return None, None, first_line(e)
    reason = str(found.break_reasons[0].reason).strip().splitlines()[0] if found.break_reasons else None
    return found.graph_count, found.graph_break_count, reason


def section_compile(report, quick):
    rounds = 2 if quick else 10
    name, batch = MODELS[0]
    print("## 4. torch.compile\n")
    print(f"{name}, batch {batch}, {IMAGE}x{IMAGE}, contiguous: `torch.compile(model)` (default "
          "mode, inductor) of torch's model and of the bnorm-converted one, torch's eager model "
          f"alongside; median of {rounds} interleaved runs after 3 warm-up calls (the first "
          "compiles, the later ones catch recompilations). compile s: the first call's time. "
          "check: against torch's compiled model, as in section 3. graphs: what dynamo makes of "
          "the eval forward (`torch._dynamo.explain`): graphs and graph breaks. dynamo's own "
          "warnings (recompilations, recompile_limit) go to stderr.\n")
    base = base_model(name, batch)
    x, labels = inputs(batch, torch.contiguous_format)
    eager = {"torch": copy.deepcopy(base), "bnorm": bt.convert(copy.deepcopy(base))}
    rows, notes = [], []
    split = {}
    for vname, model in eager.items():
        log(f"[4] torch._dynamo.explain of the {vname} model")
        split[vname] = graph_breaks(model, x)
        graphs, breaks, reason = split[vname]
        report.write({"kind": "graph_breaks", "model": name, "impl": vname, "graphs": graphs,
                      "graph_breaks": breaks, "first_reason": reason})
        if reason:
            notes.append(f"- {vname} model: {'explain failed' if graphs is None else 'first graph break'}: {reason}")
    variants = {"torch-compiled": torch.compile(eager["torch"]), "bnorm-compiled": torch.compile(eager["bnorm"]),
                "torch-eager": copy.deepcopy(base)}
    fused_model, why = fused(copy.deepcopy(base))
    if fused_model is not None:
        variants["bnorm-fused-compiled"] = torch.compile(fused_model)
    else:
        notes.append(f"- bnorm-fused-compiled skipped: {why}")
    modes = ("eval", "train")
    if quick:  # compiling the training step (forward and backward graphs) would double the time
        modes = ("eval",)
        notes.append("- --quick: the compiled training step is left to the full run (compiling a model "
                     "takes some 25-50 s on 2 CPUs, per variant and mode)")
    for mode in modes:
        log(f"[4] {name} compiled {mode} (compiling: tens of seconds)")
        result, checks = compare_models(variants, mode, x, labels, rounds, 3)
        ms, first = result.medians(1e6), result.first_s()
        report.write({"kind": "compile", "model": name, "batch": batch, "format": "contiguous", "mode": mode,
                      "ms": ms, "rounds": rounds, "others": result.others, "first_call_s": first,
                      "check_vs_torch_compiled": checks, "errors": result.errors()})
        fused_ms = ms.get("bnorm-fused-compiled")
        rows.append([name, mode, num(ms["torch-eager"]), num(ms["torch-compiled"]), num(ms["bnorm-compiled"]),
                     num(ratio(ms["torch-compiled"], ms["bnorm-compiled"]), 2), num(fused_ms),
                     num(ratio(ms["torch-compiled"], fused_ms) if fused_ms else None, 2), num(first["torch-compiled"]),
                     num(first["bnorm-compiled"]), sci(checks.get("bnorm-compiled")),
                     sci(checks.get("bnorm-fused-compiled")), num(result.others, 2)])
        failures(f"{name} {mode}", result, notes)
    Report.table(["model", "torch graphs / breaks", "bnorm graphs / breaks"],
                 [[f"{name} eval"] + [f"{split[v][0]} / {split[v][1]}" for v in ("torch", "bnorm")]], 1)
    Report.table(["model", "mode", "torch eager ms", "torch compiled ms", "bnorm compiled ms",
                  "compiled torch/bnorm", "bnorm fused compiled ms", "compiled torch/fused", "torch compile s",
                  "bnorm compile s", "check bnorm", "check fused", "others"], rows, 2)
    print_notes(notes)
    section_offset(report, quick)


def section_offset(report, quick):
    """Output error of training-mode BatchNorm2d where |mean|/std = 1e4: in float32 a variance
    computed as E[x^2] - E[x]^2 keeps none of its digits there, so this separates the algorithms."""
    shape = (8, 64, 34, 34) if quick else (32, 64, 68, 68)
    c = shape[1]
    torch.manual_seed(2)
    x = 1e4 + torch.randn(shape)
    reference = torch.nn.BatchNorm2d(c, dtype=torch.float64).train()(x.double()).detach()
    variants = {"torch eager": torch.nn.BatchNorm2d(c).train(),
                "torch.compile(torch BN)": torch.compile(torch.nn.BatchNorm2d(c).train()),
                "bnorm.torch.BatchNorm2d": bt.BatchNorm2d(c).train()}
    rows = []
    print(f"Error at a large offset: x = 1e4 + randn{shape} (f32, |mean|/std = 1e4), BatchNorm2d "
          "in training mode (weight 1, bias 0), max |output - float64 reference| (torch's "
          "BatchNorm2d on x.double()).\n")
    for vname, m in variants.items():
        log(f"[4] offset error: {vname}")
        try:
            err = max_abs_diff(m(x), reference)
            failure = None
        except Exception as e:  # noqa: BLE001 - a compile failure is a result to report
            err, failure = None, first_line(e)
        report.write({"kind": "offset_error", "shape": list(shape), "impl": vname, "max_abs_err": err,
                      "error": failure})
        rows.append([vname, sci(err) if failure is None else f"failed: {failure}"])
    Report.table(["implementation", "max abs error"], rows, 1)


# --- main ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def meta(args) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except ImportError:
            return None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torchvision": version("torchvision"), "bnorm": bnorm.__version__, "python": platform.python_version(),
            "commit": commit, "threads": THREADS, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "loadavg": os.getloadavg()[0], "quick": args.quick, "guard": getattr(args, "guard", False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few shapes and repetitions, resnet18 only")
    parser.add_argument("--out", default="build/torch_bench.jsonl", help="JSON lines (default %(default)s)")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections, comma separated (default %(default)s)")
    parser.add_argument("--guard", action="store_true",
                        help="section 1's training rows also with skip_nonfinite=True (the non-finite guard's cost)")
    args = parser.parse_args()
    sections = {s for s in args.sections.split(",") if s}

    torch.set_num_threads(THREADS)
    bnorm.set_num_threads(THREADS)  # bnorm's default is OpenMP's maximum: the same threads as torch
    info = meta(args)
    report = Report(args.out, info)
    start = time.time()
    print("# bnorm through PyTorch (bench/torch_bench.py)\n")
    print(f"- {info['date']}, commit {info['commit']}{', --quick' if args.quick else ''}")
    print(f"- CPU: {info['cpu']} ({info['cpus']} CPUs); threads: torch {THREADS}, bnorm {THREADS}; "
          f"load average {info['loadavg']:.2f} at start")
    print(f"- torch {info['torch']}, torchvision {info['torchvision']}, bnorm {info['bnorm']}, "
          f"Python {info['python']}; GLIBC_TUNABLES {info['glibc_tunables'] or 'unset'}\n")

    if "1" in sections:
        section_small(report, args.quick, args.guard)
    if "2" in sections:
        section_shapes(report, args.quick)
    if sections & {"3", "4"} and info["torchvision"] is None:
        print("Sections 3 and 4 skipped: torchvision is not installed "
              "(`pip install --no-deps torchvision` of the version matching torch).\n")
    else:
        if "3" in sections:
            section_models(report, args.quick)
        if "4" in sections:
            section_compile(report, args.quick)
    print(f"{time.time() - start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end; "
          f"JSON rows in {report.path}")


if __name__ == "__main__":
    main()
