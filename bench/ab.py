# Alternating A/B runs of two bnorm-bench builds, summarized per row (bnorm rows only):
#   bench/ab.py OUT.md A1.jsonl B1.jsonl A2.jsonl B2.jsonl ...   (A = old build, B = new, in run order)
# Per row: the median over the runs of each build, their ratio, and the range of the ratios of the
# pairs run back to back; then the geometric mean and median of the ratios.
import json, sys, statistics as st
out = sys.argv[1]; files = sys.argv[2:]
runs = {'A': [], 'B': []}
for i, f in enumerate(files):
    rows = {}
    for line in open(f):
        r = json.loads(line)
        if r.get('impl') != 'bnorm': continue
        key = (r['shape'], r['layout'], r['op'], r['dtype'], r['threads'])
        rows[key] = r['median_ms']
    runs['A' if i % 2 == 0 else 'B'].append(rows)
keys = sorted(set(runs['A'][0]) & set(runs['B'][0]), key=lambda k: (k[3], k[2], k[1], k[0], k[4]))
lines = ['| shape | layout | op | dtype | threads | old ms (median of %d) | new ms | new/old | min..max new/old of pairs |' % len(runs['A']), '|---|---|---|---|---:|---:|---:|---:|---:|']
ratios = []
for k in keys:
    a = [r[k] for r in runs['A'] if k in r]; b = [r[k] for r in runs['B'] if k in r]
    ma, mb = st.median(a), st.median(b)
    pr = [bb / aa for aa, bb in zip(a, b)]
    ratios.append(mb / ma)
    lines.append('| %s | %s | %s | %s | %d | %.3f | %.3f | %.3f | %.2f..%.2f |' % (k[0], k[1], k[2], k[3], k[4], ma, mb, mb / ma, min(pr), max(pr)))
import math
g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
lines.append('')
lines.append('rows: %d; geometric mean new/old %.3f; median %.3f; rows outside 0.9..1.1: %d' % (len(ratios), g, st.median(ratios), sum(1 for r in ratios if not 0.9 <= r <= 1.1)))
open(out, 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines[-1:]))
