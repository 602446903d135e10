#!/usr/bin/env bash
# Installs the built library into a temporary prefix and builds a small consumer against it twice:
# with CMake's find_package(bnorm) and with pkg-config. Arguments: build dir, source dir.
set -euo pipefail
build=$1
src=$2
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
consumer="$src/tests/install_consumer"
cmake -S "$consumer" -B "$prefix/consumer-build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$prefix/consumer-build" >/dev/null
"$prefix/consumer-build/consumer"
PKG_CONFIG_PATH="$(dirname "$(find "$prefix" -name bnorm.pc)")" c++ -std=c++20 "$consumer/main.cpp" -o "$prefix/consumer-pc" \
  $(PKG_CONFIG_PATH="$(dirname "$(find "$prefix" -name bnorm.pc)")" pkg-config --cflags --libs bnorm)
"$prefix/consumer-pc"
echo "install check passed: find_package(bnorm) and pkg-config bnorm"
