#!/usr/bin/env python3
"""Inductor as a third peer: torch eager, torch.compile'd F.batch_norm and bnorm's operators on bnorm-bench's shapes.

    scripts/bench [--quick]              # runs this beside bnorm-bench (after it)
    PYTHONPATH=build/python python3 bench/inductor_bench.py [--quick] [--shapes LIST] [--dtypes f32,bf16]

For every shape of bnorm-bench (read from bench/options.cpp, see torch_bench.bench_shapes), layout
(contiguous and channels_last for rank 4; a 2-D shape once, NC), dtype (f32; bf16 activations with
float32 weight, bias and running statistics, as in bnorm-bench) and mode, three implementations of
the same call on the same inputs, at 2 threads (torch.set_num_threads, bnorm.set_num_threads):

- eager: torch.nn.functional.batch_norm;
- inductor: torch.compile(fullgraph=True, dynamic=False) of a function calling F.batch_norm (and
  F.relu for BN+ReLU), compiled once per (shape, layout, dtype, mode) with an emptied private cache
  (TORCHINDUCTOR_CACHE_DIR: scripts/bench empties build/inductor-cache-bench), so the compile times
  shown are cold ones; torch._dynamo.reset() between cases, so no case runs a dynamic-shape graph;
- bnorm: torch.ops.bnorm.batch_norm / batch_norm_relu (import bnorm.torch).

Modes: train_fwd (training=True, running statistics updated, inputs not requiring grad); infer
(training=False); infer_relu (relu(batch_norm(training=False)), one operator for bnorm, one fused
graph for inductor); backward (training): one forward with x, weight and bias requiring grad is
kept, and the timed call is `torch.autograd.grad(out, (x, weight, bias), g, retain_graph=True)`,
that is the autograd backward alone: for inductor the backward graph AOTAutograd compiled, for
bnorm its batch_norm_backward operator, for eager ATen's native_batch_norm_backward. Every call of
every implementation allocates its outputs (a tensor over 32 MiB: a fresh glibc mmap each call,
marked *). Timing: torch_bench.alternate (the three interleaved, batches of ~20 ms, median).

Numerics (f32 rows): x = m_c + randn with per-channel m_c = +-1e4 (|mean|/std = 1e4), each
implementation's output (dx, dweight, dbias for backward) against F.batch_norm in float64 on the
same stored input, as bnorm-bench checks: max |out - ref| / max(1, max |ref|) (the largest of the
three for backward). In infer modes the running statistics are that input's channel mean and
variance. bf16 rows have none: bf16 holds 8 significant bits, so 1e4 + randn is stored to within
2^-8 relative, about 40, forty times the std: the input would not be the data.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

# Before any OpenMP runtime starts (torch's bundled libgomp and bnorm's): idle OpenMP threads sleep
# instead of spinning. The three implementations alternate call by call, on 2 threads on a shared
# 2-CPU machine; a runtime spinning after its region would take the CPUs the next call's threads
# need (see variants_bench.py: times in steps of scheduler slices without it). The output says
# which policy ran; set OMP_WAIT_POLICY to choose another.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torch_bench as tb  # noqa: E402
from torch_bench import log, num, sci  # noqa: E402

MODES = ("train_fwd", "infer", "infer_relu", "backward")
IMPLS = ("eager", "inductor", "bnorm")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
MOMENTUM, EPS = 0.1, 1e-5
OFFSET = 1e4
F32_BOUND = 1e-4  # bnorm-bench's check bound for f32
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "inductor-bench.md")


def eager_bn(x, w, b, rm, rv, training):
    return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def eager_bn_relu(x, w, b, rm, rv, training):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS))


def bnorm_bn(x, w, b, rm, rv, training):
    return torch.ops.bnorm.batch_norm(x, w, b, rm, rv, training, MOMENTUM, EPS)


def bnorm_bn_relu(x, w, b, rm, rv, training):
    return torch.ops.bnorm.batch_norm_relu(x, w, b, rm, rv, training, MOMENTUM, EPS)


def functions(mode: str) -> dict:
    """impl -> f(x, w, b, rm, rv, training); inductor's compiled afresh (dynamo reset by the caller)."""
    relu = mode == "infer_relu"
    eager = eager_bn_relu if relu else eager_bn
    return {"eager": eager, "inductor": torch.compile(eager, fullgraph=True, dynamic=False),
            "bnorm": bnorm_bn_relu if relu else bnorm_bn}


class Inputs:
    """One case's tensors: x in the layout and dtype, float32 vectors, and an upstream gradient."""

    def __init__(self, x: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed)
        c = x.shape[1]
        self.x = x
        self.w = torch.rand(c, generator=gen) + 0.5
        self.b = torch.randn(c, generator=gen)
        self.g = torch.randn(x.shape, generator=gen).to(dtype=x.dtype, memory_format=fmt_of(x))
        xd = x.double().transpose(0, 1).reshape(c, -1)
        self.rm = xd.mean(1).float()  # the running statistics: this input's own (what eval sees)
        self.rv = xd.var(1).float()


def fmt_of(x):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def make_x(shape, fmt, dtype, offset: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if offset:
        sign = torch.where(torch.arange(shape[1]) % 2 == 0, 1.0, -1.0)
        x += (OFFSET * sign).view(1, -1, *([1] * (len(shape) - 2)))
    return x.to(dtype=dtype, memory_format=fmt)


def call(fn, inp: Inputs, mode: str):
    """The timed call of one implementation in one mode (see the top of this file)."""
    rm, rv = inp.rm.clone(), inp.rv.clone()
    if mode == "train_fwd":
        return lambda: fn(inp.x, inp.w, inp.b, rm, rv, True)
    if mode in ("infer", "infer_relu"):
        def infer():
            with torch.no_grad():
                return fn(inp.x, inp.w, inp.b, rm, rv, False)
        return infer
    x, w, b = (t.detach().requires_grad_() for t in (inp.x, inp.w, inp.b))
    out = fn(x, w, b, rm, rv, True)

    def backward():
        return torch.autograd.grad(out, (x, w, b), inp.g, retain_graph=True)
    return backward


def reference(inp: Inputs, mode: str):
    """F.batch_norm (with relu for infer_relu) in float64 on the stored inputs."""
    x, w, b, rm, rv = (t.double() for t in (inp.x, inp.w, inp.b, inp.rm, inp.rv))
    if mode != "backward":
        out = F.batch_norm(x, rm, rv, w, b, mode == "train_fwd", MOMENTUM, EPS)
        return (F.relu(out) if mode == "infer_relu" else out,)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS), (x, w, b), inp.g.double())


def error(result, ref) -> float:
    """bnorm-bench's check measure: max |out - ref| / max(1, max |ref|), the largest over the outputs."""
    outs = result if isinstance(result, tuple) else (result,)
    return max((o.detach().double() - r).abs().max().item() / max(1.0, r.abs().max().item())
               for o, r in zip(outs, ref))


def run_case(shape, fmt, dtype_name, mode, rounds, warmup, batch_ns):
    """Times the three implementations in one case; for f32 also their error at the 1e4 offset."""
    torch._dynamo.reset()
    fns = functions(mode)
    dtype = DTYPES[dtype_name]
    inp = Inputs(make_x(shape, fmt, dtype, False, 1), 2)
    calls, made_s = {}, {}
    for n, f in fns.items():  # backward: the kept forward compiles inductor's forward and backward graphs
        t = time.perf_counter()
        calls[n] = call(f, inp, mode)
        made_s[n] = time.perf_counter() - t
    timed = tb.alternate(calls, rounds, warmup, batch_ns)
    compile_s = timed.first_s()["inductor"]
    compile_s = None if compile_s is None else compile_s + made_s["inductor"]
    first = timed.first_results()
    ref = reference(inp, mode)
    check = {n: (error(r, ref) if r is not None else None) for n, r in first.items()}
    timed.drop_results()
    del first, inp
    errs = {}
    if dtype_name == "f32":  # the same shapes, strides and dtypes: inductor's graphs are reused
        off = Inputs(make_x(shape, fmt, dtype, True, 3), 4)
        ref = reference(off, mode)
        for n, f in fns.items():
            if n in timed.errors():
                errs[n] = None
                continue
            errs[n] = error(call(f, off, mode)(), ref)
    return timed, check, errs, compile_s


def run_all(shapes, dtypes, modes, quick, timing, report, rows, notes, summary):
    """Every case in turn; its row into rows (the table), summary (ratios, errors) and the JSON."""
    rounds, warmup, batch_ns = timing
    for shape in shapes:
        layouts = [("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)] if len(shape) == 4 \
            else [("NC", torch.contiguous_format)]
        for dtype_name in dtypes:
            these = layouts[:1] if quick else layouts  # --quick: one layout
            nbytes = DTYPES[dtype_name].itemsize * torch.Size(shape).numel()
            label = "x".join(map(str, shape)) + (" *" if nbytes > tb.MMAP_THRESHOLD_MAX else "")
            for layout, fmt in these:
                for mode in modes:
                    log(f"[inductor] {label} {layout} {dtype_name} {mode}")
                    timed, check, errs, compile_s = run_case(shape, fmt, dtype_name, mode, rounds, warmup, batch_ns)
                    ms = timed.medians(1e6)
                    r_ind, r_eag = tb.ratio(ms["bnorm"], ms["inductor"]), tb.ratio(ms["bnorm"], ms["eager"])
                    report.write({"kind": "case", "shape": list(shape), "layout": layout, "dtype": dtype_name,
                                  "mode": mode, "ms": ms, "bnorm_over_inductor": r_ind, "bnorm_over_eager": r_eag,
                                  "compile_s": compile_s, "check": check, "err_offset_1e4": errs,
                                  "calls_per_batch": timed.calls, "batches": rounds, "others": timed.others,
                                  "errors": timed.errors()})
                    summary.append((dtype_name, mode, layout, r_ind, errs))
                    worst_check = max((v for v in check.values() if v is not None), default=None)
                    rows.append([label, layout, dtype_name, mode, num(ms["eager"], 3), num(ms["inductor"], 3),
                                 num(ms["bnorm"], 3), num(r_ind, 2), num(r_eag, 2), sci(worst_check),
                                 *(sci(errs.get(n)) if dtype_name == "f32" else "-" for n in IMPLS),
                                 num(compile_s, 1), num(timed.others, 2)])
                    log("  " + " | ".join(rows[-1]))
                    tb.failures(f"{label} {layout} {dtype_name} {mode}", timed, notes)


def interrupted(signum, frame):
    raise KeyboardInterrupt


class Tee:
    """stdout that also goes into the Markdown file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: bnorm-bench --quick's bf16 shape only, one layout (NCHW), "
                             "few repetitions")
    parser.add_argument("--shapes", help="bnorm-bench's --shapes words (default: its default list)")
    parser.add_argument("--dtypes", default="f32,bf16", help="f32,bf16 (default %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="default %(default)s")
    parser.add_argument("--md-out", help=f"the Markdown also into this file (default: {DEFAULT_OUT} for a full "
                                         "run with the default shapes, none otherwise)")
    parser.add_argument("--out", default="build/inductor_bench.jsonl", help="JSON lines (default %(default)s)")
    args = parser.parse_args()
    aliases = {"float32": "f32", "bfloat16": "bf16"}  # bnorm-bench's --dtypes words
    dtypes = [aliases.get(d, d) for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: expected f32 or bf16, got {d!r}")
    for m in modes:
        if m not in MODES:
            parser.error(f"--modes: expected one of {', '.join(MODES)}, got {m!r}")
    if args.quick:
        shapes = [tb.quick_bf16_shape()] if args.shapes is None else tb.bench_shapes(args.shapes)
        rounds, warmup, batch_ns = 3, 1, 5_000_000
    else:
        shapes = tb.bench_shapes(args.shapes)
        rounds, warmup, batch_ns = 9, 2, 10_000_000
    md_out = args.md_out or (DEFAULT_OUT if not args.quick and args.shapes is None and args.dtypes == "f32,bf16"
                             and args.modes == ",".join(MODES) else None)
    md = open(md_out, "w") if md_out else None
    if md:
        sys.stdout = Tee(sys.stdout, md)
    say = print

    signal.signal(signal.SIGTERM, interrupted)
    torch.set_num_threads(tb.THREADS)
    tb.bnorm.set_num_threads(tb.THREADS)
    info = tb.meta(args)
    report = tb.Report(args.out, {**info, "harness": "inductor_bench"})
    start = time.time()
    say("# Inductor as a peer (bench/inductor_bench.py)\n")
    say(f"- {info['date']}, commit {info['commit']}{', --quick' if args.quick else ''}")
    say(f"- CPU: {info['cpu']} ({info['cpus']} CPUs); threads: torch {tb.THREADS}, bnorm {tb.THREADS}; "
        f"load average {info['loadavg']:.2f} at start")
    say(f"- torch {info['torch']}, bnorm {info['bnorm']}, Python {info['python']}; "
        f"GLIBC_TUNABLES {info['glibc_tunables'] or 'unset'}; OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}; "
        f"TORCHINDUCTOR_CACHE_DIR {os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'unset (torch default)'}\n")
    say(
        f"ms per call, median of {rounds} interleaved batches (~{batch_ns // 1_000_000} ms each, at least one call) after {warmup} "
        "warm-up call(s), the first of which compiles inductor's graph (compile s; for backward the kept forward's compilation of the forward and backward graphs). eager: `F.batch_norm`; "
        "inductor: `torch.compile(fullgraph=True, dynamic=False)` of it; bnorm: `torch.ops.bnorm.batch_norm` / "
        "`batch_norm_relu`. bnorm/ind < 1: bnorm faster than inductor. backward: "
        "`torch.autograd.grad(out, (x, w, b), g, retain_graph=True)` on one kept training forward (the "
        "backward alone). check: the largest of the three implementations' max|out - ref| / max(1, max|ref|) "
        "against float64 on ordinary data. err@1e4 (f32): the same measure on x = +-1e4 + randn per channel "
        f"(|mean|/std = 1e4); bnorm-bench's f32 bound is {F32_BOUND:g}. bf16 has none: bf16 stores 1e4 + randn "
        "only to within 2^-8 relative (~40, forty standard deviations), so the input is not the data. "
        "Every call allocates its outputs; * : a tensor over 32 MiB (each call's output a fresh mmap). "
        f"{tb.OTHERS_NOTE}\n")

    rows, notes, summary = [], [], []
    try:
        run_all(shapes, dtypes, modes, args.quick, (rounds, warmup, batch_ns), report, rows, notes, summary)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the tables of the rows done so far
        notes.append(f"- interrupted after {len(rows)} rows: the run is partial")
    table = tb.Report.table
    table(["shape", "layout", "dtype", "mode", "eager ms", "inductor ms", "bnorm ms", "bnorm/ind", "bnorm/eager",
           "check", "err@1e4 eager", "err@1e4 inductor", "err@1e4 bnorm", "compile s", "others"], rows, 4)
    if notes:
        say("\n".join(notes) + "\n")

    # Per (dtype, mode, layout): how many rows bnorm is ahead of inductor, the median and worst ratio;
    # per f32 mode, the largest error at the offset of each implementation.
    groups = {}
    for dtype_name, mode, layout, r, errs in summary:
        groups.setdefault((dtype_name, mode, layout), []).append(r)
    body = []
    for (dtype_name, mode, layout), rs in groups.items():
        rs = sorted(r for r in rs if r is not None)
        ahead = sum(r < 1 for r in rs)
        body.append([dtype_name, mode, layout, f"{ahead} / {len(rs)}",
                     num(rs[len(rs) // 2] if rs else None, 2), num(rs[-1] if rs else None, 2)])
    say("## Summary: bnorm against inductor\n")
    table(["dtype", "mode", "layout", "rows bnorm ahead", "median bnorm/ind", "worst bnorm/ind"], body, 3)
    worst = {}
    for dtype_name, mode, _layout, _r, errs in summary:
        if dtype_name == "f32":
            for n, e in errs.items():
                if e is not None:
                    worst[(mode, n)] = max(worst.get((mode, n), 0.0), e)
    if worst:
        say(f"Largest err@1e4 per mode (f32, every shape and layout; bnorm-bench's bound {F32_BOUND:g}):\n")
        table(["mode", *IMPLS], [[m, *(sci(worst.get((m, n))) for n in IMPLS)] for m in modes], 1)
    total = sum(len(v) for v in groups.values())
    ahead = sum(r is not None and r < 1 for v in groups.values() for r in v)
    say(f"Target \"every row ahead of inductor\": {ahead} of {total} rows ahead"
        f" ({'met' if ahead == total else 'not met'}).\n")
    say(f"{time.time() - start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end; JSON rows in {report.path}"
        + (f"; Markdown in {md_out}" if md_out else ""))
    if md:
        sys.stdout = sys.stdout.streams[0]
        md.close()


if __name__ == "__main__":
    sys.exit(main())
