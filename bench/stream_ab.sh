#!/usr/bin/env bash
# The stream threshold A/B (BENCHMARKS.md, "Non-temporal stores"): bnorm-stream-ab with every output
# streamed (BNORM_STREAM_BYTES=0) and with none (a threshold past any size), alternating processes
# `rounds` times, then the median of each size's medians and their ratio. Below 1: streaming wins.
#   bench/stream_ab.sh [build folder] [rounds] [reps] [MiB...]
set -euo pipefail
build=${1:-build}; rounds=${2:-4}; reps=${3:-30}; shift $(( $# < 3 ? $# : 3 ))
bin="$build/bench/bnorm-stream-ab"
out=$(mktemp -d)
for ((r = 0; r < rounds; r++)); do
  BNORM_STREAM_BYTES=0 "$bin" "$reps" "$@" >> "$out/streamed"
  BNORM_STREAM_BYTES=1000000000000000 "$bin" "$reps" "$@" >> "$out/cached"
done
python3 - "$out" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(lambda: collections.defaultdict(list))
for kind in ("streamed", "cached"):
    for line in open(f"{sys.argv[1]}/{kind}"):
        f = line.split()
        d[int(f[0])][kind].append(float(f[2]))
print("| output | cached stores: median ms (range) | streamed: median ms (range) | streamed / cached |")
print("|---:|---|---|---:|")
for mib in sorted(d):
    c, s = d[mib]["cached"], d[mib]["streamed"]
    print(f"| {mib} MiB | {statistics.median(c):.3f} ({min(c):.3f}-{max(c):.3f}) | {statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) | {statistics.median(s) / statistics.median(c):.2f} |")
PY
rm -rf "$out"
