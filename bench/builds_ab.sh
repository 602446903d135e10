#!/usr/bin/env bash
# An A/B of two or more revisions of the kernels, in one process, call by call (bench/builds_ab.cpp says
# why): builds libbnorm of each revision in its own folder under $BNORM_AB_DIR (default
# /tmp/bnorm-builds-ab; "." is the working tree, built in build/), links each into a shared library
# with -Bsymbolic, and runs bnorm-builds-ab over them.
#   bench/builds_ab.sh SHAPE ROUNDS REV_A REV_B [REV ...]      e.g. bench/builds_ab.sh 32x64x112x112 21 HEAD~1 .
#   env OPS, LAYOUTS, DTYPES select rows (see builds_ab.cpp); BNORM_STREAM_BYTES is worth fixing.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 4 ]] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
shape=$1; rounds=$2; shift 2
dir=${BNORM_AB_DIR:-/tmp/bnorm-builds-ab}
mkdir -p "$dir"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_BENCH=ON >/dev/null
cmake --build build --target bnorm-builds-ab >/dev/null
libs=()
for rev in "$@"; do
  if [[ $rev == . ]]; then
    name=worktree; lib=build/libbnorm.a
    cmake --build build --target bnorm >/dev/null
  else
    name=$(git rev-parse --short "$rev"); lib=$dir/build-$name/libbnorm.a
    [[ -d $dir/src-$name ]] || git worktree add --detach "$dir/src-$name" "$rev" >/dev/null 2>&1
    cmake -S "$dir/src-$name" -B "$dir/build-$name" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_TESTS=OFF \
      -DBNORM_BUILD_APPS=OFF >/dev/null
    cmake --build "$dir/build-$name" --target bnorm >/dev/null
  fi
  g++ -shared -Wl,-Bsymbolic -fopenmp -o "$dir/$name.so" -Wl,--whole-archive "$lib" -Wl,--no-whole-archive
  libs+=("$dir/$name.so")
done
build/bench/bnorm-builds-ab "$shape" "$rounds" "${libs[@]}"
