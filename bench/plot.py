#!/usr/bin/env python3
"""Turns `bnorm-bench --json` output into a picture: % of the copy roofline per shape.

    scripts/bench --json > bench.jsonl
    python3 bench/plot.py bench.jsonl [-o roofline.png]
    python3 bench/plot.py bench.jsonl --summary [--threads 2]   # a Markdown summary table instead
    python3 bench/plot.py bench.jsonl --overview [--threads 2]   # bnorm against the peers, per dtype/threads/op/layout
    python3 bench/plot.py bench.jsonl --misses [--threads 2]     # the rows that miss the targets, one line each
    python3 bench/plot.py --refresh BENCHMARKS.md [--check]       # rewrite (or check) the page's generated tables

The input may be gzipped (a name ending in .gz). BENCHMARKS.md's tables are generated: each sits between a line
`<!-- generated: bench/plot.py ARGS -->` and `<!-- end generated -->`, and --refresh reruns ARGS for each.

One row of panels per (dtype, op), one column per (threads, layout); in each, one group of bars per shape: bnorm, torch (the _out
call with preallocated outputs), torch-alloc, oneDNN in the same plain layout, and oneDNN's blocked
layout (nChw16c, in the NCHW panels). The 2-D shape's rows (layout NC) sit in the NCHW panels.
Each dtype (f32, bf16) has its own panels: its %roof is against a copy of its own bytes (bf16: half
of f32's). Rows without a timing (errors, "unsupported") are left out of the plot; --summary shows
them as "unsupp." / "error".
Needs matplotlib (`python3 -m pip install matplotlib`).
"""
import argparse
import gzip
import json
import sys

# The targets (BENCHMARKS.md): a training forward or backward row at least 1.3x faster than the fastest peer,
# an inference row faster than it.
TARGET_RATIO = {"train_fwd": 1 / 1.3, "backward": 1 / 1.3, "infer_fwd": 1.0}  # a row misses above its ratio

IMPLS = [  # (impl, label, colour, hatch)
    ("bnorm", "bnorm", "#1f77b4", None),
    ("torch-out", "torch (_out)", "#d62728", None),
    ("torch-alloc", "torch (allocating)", "#ff9896", None),
    ("onednn", "oneDNN", "#2ca02c", None),
    ("onednn-blocked", "oneDNN nChw16c", "#98df8a", "//"),
]
DTYPES = ["f32", "bf16"]
OPS = [("train_fwd", "training forward (3B)"), ("infer_fwd", "inference forward (2B)"), ("backward", "backward (5B)")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="?", help="bnorm-bench --json output (default: stdin)")
    ap.add_argument("-o", "--output", default="roofline.png")
    ap.add_argument("--summary", action="store_true", help="print a Markdown summary table (no matplotlib needed)")
    ap.add_argument("--threads", type=int, help="--summary, --overview, --misses: only this thread count")
    ap.add_argument("--overview", action="store_true", help="print the Markdown overview table (no matplotlib needed)")
    ap.add_argument("--misses", action="store_true", help="print the rows that miss the targets (no matplotlib needed)")
    ap.add_argument("--refresh", metavar="PAGE", help="rewrite PAGE's generated tables from the raw runs they name")
    ap.add_argument("--check", action="store_true", help="--refresh: change nothing, fail if a table is out of date")
    args = ap.parse_args()
    if args.refresh:
        sys.exit(refresh(args.refresh, args.check))
    if args.summary or args.overview or args.misses:
        rows = read_rows(args.jsonl)
        if args.overview:
            overview([r for r in rows if not args.threads or r["threads"] == args.threads])
        elif args.misses:
            misses([r for r in rows if not args.threads or r["threads"] == args.threads])
        else:
            summary(rows, args.threads)
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot.py needs matplotlib: python3 -m pip install matplotlib")

    rows = [r for r in read_rows(args.jsonl) if r.get("op") != "copy" and r.get("roofline_pct") is not None
            and r.get("median_ms") is not None]
    if not rows:
        sys.exit("plot.py: no benchmark rows in the input")

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    threads = sorted({r["threads"] for r in rows}, reverse=True)
    dtype_of = lambda r: r.get("dtype", "f32")
    dtypes = [d for d in DTYPES if any(dtype_of(r) == d for r in rows)]
    dtypes += sorted({dtype_of(r) for r in rows} - set(dtypes))
    ops = [(d, op, label) for d in dtypes for op, label in OPS if any(r["op"] == op and dtype_of(r) == d for r in rows)]
    panel_layout = lambda r: "NHWC" if r["layout"] == "NHWC" else "NCHW"  # NC and nChw16c go with NCHW
    layouts = [l for l in ("NCHW", "NHWC") if any(panel_layout(r) == l for r in rows)]
    impls = [i for i in IMPLS if any(r["impl"] == i[0] for r in rows)]
    value = {(dtype_of(r), r["op"], r["threads"], panel_layout(r), r["shape"], r["impl"]): r["roofline_pct"]
             for r in rows}

    cols = [(t, l) for t in threads for l in layouts]
    fig, axes = plt.subplots(len(ops), len(cols), figsize=(6.5 * len(cols), 4.2 * len(ops)), squeeze=False,
                             sharey="row")
    width = 0.8 / max(1, len(impls))
    for i, (dtype, op, op_label) in enumerate(ops):
        for j, (t, layout) in enumerate(cols):
            ax = axes[i][j]
            here = [sh for sh in shapes if any(key[:4] == (dtype, op, t, layout) and key[4] == sh for key in value)]
            for k, (impl, label, colour, hatch) in enumerate(impls):
                xs, ys = [], []
                for s, shape in enumerate(here):
                    v = value.get((dtype, op, t, layout, shape, impl))
                    if v is not None:
                        xs.append(s + (k - (len(impls) - 1) / 2) * width)
                        ys.append(v)
                ax.bar(xs, ys, width, label=label, color=colour, hatch=hatch, edgecolor="white" if not hatch else "#555")
            ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
            ax.set_title(f"{dtype} {op_label}, {layout}, {t} thread{'s' if t > 1 else ''}", fontsize=10)
            ax.set_xticks(range(len(here)))
            ax.set_xticklabels(here, rotation=60, ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("% of copy roofline")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"BatchNorm {' and '.join(dtypes)}: GB/s of minimal traffic as % of a copy of the same bytes "
                 "(dashed: 100%)",
                 y=0.995, fontsize=13)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(impls), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


GENERATED, END = "<!-- generated: bench/plot.py ", "<!-- end generated -->"


def refresh(page, check):
    """Reruns the plot.py command named at the top of each generated block of `page` and puts its output
    in the block. With check, writes nothing and returns 1 when a block differs."""
    import contextlib
    import io
    import shlex

    lines = open(page).read().split("\n")
    out, i, stale = [], 0, []
    while i < len(lines):
        out.append(lines[i])
        if not lines[i].startswith(GENERATED):
            i += 1
            continue
        argv = shlex.split(lines[i][len(GENERATED):].removesuffix("-->"))
        end = lines.index(END, i + 1)
        sub = argparse.Namespace(threads=None, overview=False, misses=False)
        opts = iter(argv)
        for a in opts:
            if a == "--threads":
                sub.threads = int(next(opts))
            elif a in ("--overview", "--misses"):
                setattr(sub, a[2:], True)
            else:
                sub.jsonl = a
        rows = [r for r in read_rows(sub.jsonl) if not sub.threads or r["threads"] == sub.threads]
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            (overview if sub.overview else misses)(rows)
        block = text.getvalue().rstrip("\n").split("\n")
        if block != lines[i + 1:end]:
            stale.append(f"{page}:{i + 1}: bench/plot.py {' '.join(argv)}")
        out += block
        i = end
    if check:
        for s in stale:
            print(f"out of date (rerun bench/plot.py --refresh {page}): {s}", file=sys.stderr)
        return 1 if stale else 0
    open(page, "w").write("\n".join(out))
    return 0


def read_rows(path):
    """The JSON rows of bnorm-bench's output (a file, gzipped or not, or stdin); other lines are skipped."""
    if not path:
        lines = sys.stdin
    else:
        lines = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    return [json.loads(line) for line in lines if line.strip().startswith("{")]


def summary(rows, threads):
    """Per (shape, dtype, op, layout, threads): ms of bnorm, the faster torch call, oneDNN (plain and
    blocked), bnorm's % of the copy roofline (the copy of that dtype's bytes) and its ratio to the faster
    peer. An implementation that errored or has no kernel for the dtype shows "error" / "unsupp."."""
    copy = {}
    for r in rows:
        if r["op"] == "copy" and r.get("gbps") is not None:
            key = (r["shape"], r.get("dtype", "f32"), r["threads"])
            copy[key] = max(copy.get(key, 0), r["gbps"])
    groups = {}
    for r in rows:
        if r["op"] == "copy" or (threads and r["threads"] != threads):
            continue
        layout = "NCHW" if r["layout"] == "nChw16c" else r["layout"]
        groups.setdefault((r["shape"], r.get("dtype", "f32"), r["threads"], r["op"], layout), {})[r["impl"]] = r

    def ms(g, *impls):
        got = [g[i]["median_ms"] for i in impls if i in g and g[i].get("median_ms") is not None]
        if got:
            return f"{min(got):.3f}"
        marks = {"unsupp." if g[i].get("check") == "unsupported" else "error" for i in impls if i in g}
        return "/".join(sorted(marks)) or "-"

    print("| shape | dtype | thr | op | layout | bnorm ms | torch ms (faster call) | oneDNN ms | oneDNN nChw16c ms "
          "| copy GB/s | bnorm % roof | bnorm vs faster peer | others (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (shape, dtype, thr, op, layout), g in groups.items():
        b = g.get("bnorm")
        timed = [g[i] for i in ("torch-out", "torch-alloc") if i in g and g[i].get("median_ms") is not None]
        torch = min(timed, key=lambda r: r["median_ms"], default=None)
        tname = "" if torch is None else (" (out)" if torch["impl"] == "torch-out" else " (alloc)")
        others = max((r.get("others_cpus") or 0) for r in g.values())
        head = f"| {shape} | {dtype} | {thr} | {op} | {layout} | {ms(g, 'bnorm')} "
        if b and b.get("ratio_to_best_peer") is not None:
            print(head + f"| {ms(g, 'torch-out', 'torch-alloc')}{tname} | {ms(g, 'onednn')} | {ms(g, 'onednn-blocked')} "
                  f"| {copy.get((shape, dtype, thr), 0):.1f} | {b['roofline_pct']:.0f}% "
                  f"| {b['ratio_to_best_peer']:.2f}x | {others:.1f} |")
        else:
            print(head + f"| {ms(g, 'torch-out', 'torch-alloc')} | {ms(g, 'onednn')} | {ms(g, 'onednn-blocked')} "
                  f"| - | - | - | {others:.1f} |")


def overview(rows):
    """Per (dtype, threads, op, layout), over the shapes: how often bnorm is faster than every peer and
    at least 1.5x faster (ratio <= 1/1.5), the median and worst ratio to the fastest peer, and the
    median and lowest % of the copy roofline."""
    groups = {}
    for r in rows:
        if r["impl"] != "bnorm" or r.get("ratio_to_best_peer") is None or r.get("roofline_pct") is None:
            continue
        groups.setdefault((r.get("dtype", "f32"), r["threads"], r["op"], r["layout"]), []).append(r)

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    print("| dtype | threads | op | layout | shapes | faster than every peer | at least 1.5x faster "
          "| bnorm / fastest peer: median (worst, shape) | % of copy roofline: median (lowest, shape) |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = lambda k: (DTYPES.index(k[0]) if k[0] in DTYPES else 9, -k[1], [o for o, _ in OPS].index(k[2]), k[3])
    for key in sorted(groups, key=order):
        g = groups[key]
        ratios = [r["ratio_to_best_peer"] for r in g]
        worst = max(g, key=lambda r: r["ratio_to_best_peer"])
        lowest = min(g, key=lambda r: r["roofline_pct"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | {sum(x < 1 for x in ratios)} "
              f"| {sum(x <= 1 / 1.5 for x in ratios)} | {median(ratios):.2f}x ({worst['ratio_to_best_peer']:.2f}x, "
              f"{worst['shape']}) | {median([r['roofline_pct'] for r in g]):.0f}% ({lowest['roofline_pct']:.0f}%, "
              f"{lowest['shape']}) |")


def misses(rows):
    """One line per bnorm row that misses its target (TARGET_RATIO), worst ratio first: the fastest peer
    and its time, bnorm's time and % of the copy roofline, and the other processes' load while it ran."""
    peers = {}
    for r in rows:
        if r["impl"] != "bnorm" and r.get("median_ms") is not None:
            peers[(r["shape"], r.get("dtype", "f32"), r["threads"], r["op"], r["layout"], r["impl"])] = r
    missed = [r for r in rows if r["impl"] == "bnorm" and r.get("ratio_to_best_peer") is not None
              and r["ratio_to_best_peer"] > TARGET_RATIO.get(r["op"], 1.0)]
    missed.sort(key=lambda r: -r["ratio_to_best_peer"])
    slower = sum(r["ratio_to_best_peer"] >= 1 for r in missed)
    total = sum(r["impl"] == "bnorm" and r.get("ratio_to_best_peer") is not None for r in rows)
    print(f"{len(missed)} of {total} rows miss the targets; {slower} of them no faster than the fastest peer.")
    print()
    print("| dtype | thr | op | layout | shape | bnorm ms | fastest peer ms | bnorm / peer | target | bnorm % roof | others |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in missed:
        dtype = r.get("dtype", "f32")
        peer = peers.get((r["shape"], dtype, r["threads"], r["op"], r["layout"], r["best_peer"]))
        peer_ms = f"{peer['median_ms']:.3f} ({r['best_peer']})" if peer else r["best_peer"] or "-"
        print(f"| {dtype} | {r['threads']} | {r['op']} | {r['layout']} | {r['shape']} | {r['median_ms']:.3f} "
              f"| {peer_ms} | {r['ratio_to_best_peer']:.2f}x | {'<' if r['op'] == 'infer_fwd' else '<='} {TARGET_RATIO.get(r['op'], 1.0):.2f}x "
              f"| {r['roofline_pct']:.0f}% | {r.get('others_cpus') or 0:.1f} |")


if __name__ == "__main__":
    main()
