#!/bin/sh
# bnorm-train's bad inputs: each must end with exit status 2 and exactly ONE line on stderr,
# "bnorm-train: error: ..." naming the problem (never a crash, a stack trace or a silent default).
# Then two tiny runs with the same seed must log the same steps (determinism).
# Usage: train_errors.sh BNORM_TRAIN [DATA]   (DATA: the real Fashion-MNIST folder, for the last checks)
set -u
exe=$1; data=${2:-/usr/share/datasets/fashion-mnist}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0

# expect NAME PATTERN ARGS...: exit 2, one stderr line matching PATTERN (grep -E), nothing on stdout.
expect() {
  name=$1; pattern=$2; shift 2
  case " $* " in *" --out "*) ;; *) set -- --out "$tmp/out" "$@" ;; esac
  "$exe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
  rc=$?
  lines=$(wc -l <"$tmp/stderr")
  if [ "$rc" -eq 2 ] && [ "$lines" -eq 1 ] && grep -qE "^bnorm-train: error: .*$pattern" "$tmp/stderr" &&
     [ ! -s "$tmp/stdout" ]; then
    echo "ok   $name: $(cat "$tmp/stderr")"
  else
    echo "FAIL $name: exit $rc, $lines stderr lines (want exit 2, 1 line matching '$pattern'):"
    sed 's/^/     | /' "$tmp/stderr" "$tmp/stdout"
    fails=$((fails + 1))
  fi
}

# Hand-made IDX files: a good tiny set, one with a bad magic, one shorter than its header says.
idx_header() {  # TYPE NDIMS DIMS... as big-endian bytes
  t=$1; nd=$2; shift 2
  printf "\\000\\000\\$(printf %03o "$t")\\$(printf %03o "$nd")"
  for d in "$@"; do
    printf "\\$(printf %03o $((d >> 24 & 255)))\\$(printf %03o $((d >> 16 & 255)))"
    printf "\\$(printf %03o $((d >> 8 & 255)))\\$(printf %03o $((d & 255)))"
  done
}
mkdir -p "$tmp/good" "$tmp/magic" "$tmp/short" "$tmp/empty"
for split in train t10k; do
  { idx_header 8 3 4 28 28; head -c 3136 /dev/zero; } >"$tmp/good/$split-images-idx3-ubyte"
  { idx_header 8 1 4; printf '\001\002\003\004'; } >"$tmp/good/$split-labels-idx1-ubyte"
done
cp "$tmp"/good/* "$tmp/magic/"; cp "$tmp"/good/* "$tmp/short/"
{ printf '\001\000\010\003'; head -c 3148 /dev/zero; } >"$tmp/magic/train-images-idx3-ubyte"
{ idx_header 8 3 4 28 28; head -c 3000 /dev/zero; } >"$tmp/short/train-images-idx3-ubyte"

expect "missing dataset" "no such file.*dataset-fashion-mnist" --data "$tmp/empty"
expect "wrong IDX magic" "train-images-idx3-ubyte: not a valid IDX file: bad magic" --data "$tmp/magic"
expect "wrong IDX size" "announces 3136 data bytes, the file has 3000" --data "$tmp/short"
expect "unknown model" "unknown model 'resnet'" --data "$tmp/good" --model resnet
expect "unknown variant" "unknown variant 'bn_middle'" --data "$tmp/good" --variants none,bn_middle
expect "lr = 0" "learning rate must be > 0.*got 0" --data "$tmp/good" --lr 0
expect "lr < 0" "learning rate must be > 0.*got -0.1" --data "$tmp/good" --lr=-0.1
expect "lr nan" "learning rate must be > 0" --data "$tmp/good" --lr nan
expect "lr not a number" "--lr" --data "$tmp/good" --lr fast
expect "batch 1 with BN (MLP)" "m = batch = 1, so the variance is 0" --data "$tmp/good" --model mlp --variants bn_before --batch 1
expect "batch 0" "--batch" --data "$tmp/good" --batch 0
expect "threads 0" "--threads" --data "$tmp/good" --threads 0
expect "unknown option" "--learning-rate" --data "$tmp/good" --learning-rate 0.1
expect "init scale 0" "--init-scale must be > 0" --data "$tmp/good" --init-scale 0
expect "unknown optimizer" "unknown optimizer 'adam'" --data "$tmp/good" --optimizer momentum,adam
expect "depth 1" "--depth must be between 2 and 200.*got 1" --data "$tmp/good" --model plain --depth 2,1
expect "depth not a number" "--depth" --data "$tmp/good" --model plain --depth deep
expect "width 0" "--width" --data "$tmp/good" --model plain --width 0
expect "loss threshold 0" "--loss-threshold must be > 0" --data "$tmp/good" --loss-threshold 0
expect "unknown design" "unknown --design 'huge' \(expected quick, demo, full, precise-bn or precise-bn-quick\)" --data "$tmp/good" --design huge
expect "design with a grid option" "--design demo fixes the grid; --lr is for a grid" --data "$tmp/good" --design demo --lr 0.1
expect "validation split too large" "--val must be >= 0 and leave training images.*got 4" --data "$tmp/good" --val 4
expect "max minutes < 0" "--max-minutes" --data "$tmp/good" --max-minutes=-1
expect "seed not a number" "--seed" --data "$tmp/good" --seeds 1,two
expect "train eval subset < 0" "--train-eval-subset must be >= 0" --data "$tmp/good" --train-eval-subset=-1
expect "batch larger than the data" "larger than the training set" --data "$tmp/good" --batch 64
touch "$tmp/file"
expect "unwritable output folder" "cannot write to the output folder" --data "$tmp/good" --out "$tmp/file/sub"
mkdir -p "$tmp/ro"; chmod 555 "$tmp/ro"
if [ "$(id -u)" -ne 0 ]; then  # root writes anywhere
  expect "read-only output folder" "cannot write to the output folder" --data "$tmp/good" --out "$tmp/ro/out"
fi

# The tiny hand-made set trains (batch 1 on the CNN is allowed: its BatchNorm2d has m = 28 x 28 per channel).
"$exe" --data "$tmp/good" --model cnn --variants bn_after --batch 1 --epochs 1 --out "$tmp/cnn1" \
  >/dev/null 2>"$tmp/stderr" || { echo "FAIL cnn batch 1:"; cat "$tmp/stderr"; fails=$((fails + 1)); }

# --resume: a grid stopped midway and continued gives what one uninterrupted run gives. The stop is made by
# hand: runs.txt keeps its header, two finished runs and half of the third line (a kill during the write), and
# steps.csv keeps every run's rows, so --resume must drop the unfinished runs' rows and train those runs again.
resume_args="--data $tmp/good --model plain --depth 2 --variants none,bn_after --lr 0.01,0.1 --batch 2 --epochs 2 --eval-every 1"
# shellcheck disable=SC2086
"$exe" $resume_args --out "$tmp/whole" >/dev/null 2>"$tmp/stderr" || { echo "FAIL resume, whole run:"; cat "$tmp/stderr"; fails=$((fails + 1)); }
mkdir -p "$tmp/cut"; cp "$tmp/whole/steps.csv" "$tmp/cut/"
{ head -n 3 "$tmp/whole/runs.txt"; sed -n 4p "$tmp/whole/runs.txt" | cut -c1-40 | tr -d '\n'; } >"$tmp/cut/runs.txt"
# shellcheck disable=SC2086
"$exe" $resume_args --out "$tmp/cut" --resume >/dev/null 2>"$tmp/stderr" || { echo "FAIL resume run:"; cat "$tmp/stderr"; fails=$((fails + 1)); }
for d in whole cut; do
  cut -d, -f1-5 "$tmp/$d/steps.csv" | sort >"$tmp/$d.steps"
  grep '^| plain2 ' "$tmp/$d/results.md" | cut -d'|' -f1-11 >"$tmp/$d.table"
done
cp "$tmp/stderr" "$tmp/resume1"
# shellcheck disable=SC2086
"$exe" $resume_args --out "$tmp/cut" --resume >/dev/null 2>"$tmp/stderr"  # again: every run is in runs.txt now
if grep -q "2 of 4 runs were finished" "$tmp/resume1" && grep -q "4 of 4 runs were finished" "$tmp/stderr" && cmp -s "$tmp/whole.steps" "$tmp/cut.steps" &&
   [ -s "$tmp/whole.table" ] && cmp -s "$tmp/whole.table" "$tmp/cut.table" && [ "$(wc -l <"$tmp/cut/runs.txt")" -eq 5 ]; then
  echo "ok   --resume after a stop: 2 runs kept, 2 trained again, the same steps.csv and results as one run"
else
  echo "FAIL --resume:"; cat "$tmp/resume1" "$tmp/stderr"; diff "$tmp/whole.steps" "$tmp/cut.steps" | head; diff "$tmp/whole.table" "$tmp/cut.table"
  fails=$((fails + 1))
fi
expect "resume with other settings" "--resume: .*runs.txt was made with other settings" \
  --data "$tmp/good" --model plain --depth 2 --variants none --batch 2 --epochs 3 --out "$tmp/cut" --resume

# A failed rewrite of runs.txt (a full disk: here its temporary file is a link to /dev/full) stops with an
# error and leaves runs.txt as it was, with no temporary file left behind.
cp "$tmp/cut/runs.txt" "$tmp/runs.before"
ln -s /dev/full "$tmp/cut/runs.txt.tmp"
# shellcheck disable=SC2086
"$exe" $resume_args --out "$tmp/cut" --resume >/dev/null 2>"$tmp/stderr"
rc=$?
if [ "$rc" -ne 0 ] && grep -q "runs.txt is unchanged" "$tmp/stderr" && cmp -s "$tmp/runs.before" "$tmp/cut/runs.txt" &&
   [ ! -e "$tmp/cut/runs.txt.tmp" ] && [ ! -L "$tmp/cut/runs.txt.tmp" ]; then
  echo "ok   --resume on a full disk: exit $rc, runs.txt unchanged"
else
  echo "FAIL --resume on a full disk: exit $rc"; cat "$tmp/stderr"; diff "$tmp/runs.before" "$tmp/cut/runs.txt" | head
  fails=$((fails + 1))
fi

# Determinism: the same command twice gives the same logged losses and accuracies (all columns but wall_s).
if [ -e "$data/train-images-idx3-ubyte.gz" ] || [ -e "$data/train-images-idx3-ubyte" ]; then
  for i in 1 2; do
    "$exe" --data "$data" --model mlp,cnn --variants bn_before,torch_bn --lr 0.1 --epochs 1 \
      --train-subset 320 --test-subset 200 --eval-every 1 --seed 7 --out "$tmp/det$i" >/dev/null 2>"$tmp/stderr" ||
      { echo "FAIL determinism run $i:"; cat "$tmp/stderr"; fails=$((fails + 1)); }
    cut -d, -f1-5 "$tmp/det$i/steps.csv" >"$tmp/det$i.cut"
  done
  if cmp -s "$tmp/det1.cut" "$tmp/det2.cut" && [ "$(wc -l <"$tmp/det1.cut")" -gt 20 ]; then
    echo "ok   determinism: two runs with --seed 7 logged the same $(wc -l <"$tmp/det1.cut") lines"
  else
    echo "FAIL determinism:"; diff "$tmp/det1.cut" "$tmp/det2.cut" | head; fails=$((fails + 1))
  fi
  # The plain CNN: per seed, every variant starts from the same conv/linear weights (results.md's last column).
  "$exe" --data "$data" --model plain --depth 3 --variants none,bn_before,bn_after,torch_bn,torch_bn_before \
    --lr 0.1 --seeds 1,2 --epochs 1 --train-subset 128 --test-subset 100 --out "$tmp/plain" >/dev/null 2>"$tmp/stderr" ||
    { echo "FAIL plain run:"; cat "$tmp/stderr"; fails=$((fails + 1)); }
  sums=$(awk -F'|' 'NF == 16 && $2 ~ /plain3/ { print $7, $(NF-1) }' "$tmp/plain/results.md" | sort -u)
  if [ "$(echo "$sums" | wc -l)" -eq 2 ] && [ "$(echo "$sums" | cut -d' ' -f2 | sort -u | wc -l)" -eq 2 ]; then
    echo "ok   same initial weights per seed across the 5 variants:" $sums
  else
    echo "FAIL initial weights differ across variants of a seed (seed, sum |w|):"; echo "$sums"; fails=$((fails + 1))
  fi
  for m in mlp cnn; do
    [ -s "$tmp/det1/plot_$m.png" ] || ! command -v gnuplot >/dev/null ||
      { echo "FAIL no plot_$m.png"; fails=$((fails + 1)); }
  done
fi

[ "$fails" -eq 0 ] && echo "all bad-input checks passed" || { echo "$fails check(s) failed"; exit 1; }
