#!/bin/sh
# A short real training run: 300 steps of the MLP with bnorm's BN (before ReLU) on 9600 Fashion-MNIST
# images. The first logged train loss (steps 1-10, starting near ln 10 = 2.3) must be above 1.0 and the
# last one below 0.7, so the test fails when training is broken. With --precise-bn, the test accuracy with
# precise BN statistics (recomputed over 4096 training images) must be a trained net's too (>= 0.7).
# Usage: train_smoke.sh BNORM_TRAIN [DATA]
set -eu
exe=$1; data=${2:-/usr/share/datasets/fashion-mnist}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
"$exe" --data "$data" --model mlp --variants bn_before --lr 0.1 --epochs 2 --batch 64 --train-subset 9600 \
  --test-subset 1000 --eval-every 10 --threads 2 --precise-bn --out "$out" >/dev/null 2>"$out/log" || { cat "$out/log"; exit 1; }
awk -F, 'NR > 1 && $4 != "" { n++; if (n == 1) first = $4; last = $4 }
  END { printf "first logged loss %.4f, last %.4f, %d logs\n", first, last, n;
        exit !(n >= 5 && first > 1.0 && last < 0.7) }' "$out/steps.csv"
awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "test_accuracy") t = i; if ($i == "precise_test_accuracy") p = i } }
  NR == 2 { printf "test accuracy: moving averages %s, precise BN %s\n", $t, $p; exit !(p && $p >= 0.7) }' "$out/runs.csv"
