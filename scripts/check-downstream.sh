#!/usr/bin/env bash
# Checks that a separate project can use moca in the two supported ways:
#   1. installed: cmake --install <build> --prefix <tmp>, then find_package(moca 0.1) with
#      CMAKE_PREFIX_PATH=<tmp>;
#   2. vendored: add_subdirectory(<this checkout>).
# Each route configures, builds and runs tests/downstream. BUILD_DIR (default build) is the
# configured build tree to install from; it is configured here, without programs, if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)

build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-2}
work=$(mktemp -d "${TMPDIR:-/tmp}/moca-downstream.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ ! -f "$build_dir/cmake_install.cmake" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DMOCA_BUILD_TESTS=OFF -DMOCA_BUILD_EXAMPLES=OFF \
    -DMOCA_BUILD_BENCHMARKS=OFF
fi

args=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
# The vendored consumer builds moca with the CUDA setting of the checked build; the installed
# package records its own.
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$build_dir/CMakeCache.txt"; }
with_cuda=$(cache_value MOCA_WITH_CUDA)
subdir_args=(-DMOCA_WITH_CUDA="${with_cuda:-OFF}")
cuda_compiler=$(cache_value CMAKE_CUDA_COMPILER)
case "$cuda_compiler" in
  ""|*NOTFOUND) ;;
  *) subdir_args+=(-DCMAKE_CUDA_COMPILER="$cuda_compiler") ;;
esac

echo "== downstream: install $build_dir"
cmake --install "$build_dir" --prefix "$work/prefix" >"$work/install.log" \
  || { cat "$work/install.log"; exit 1; }

echo "== downstream: find_package(moca) from the install prefix"
cmake -S tests/downstream -B "$work/find" "${args[@]}" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
found=$(sed -n 's/^moca_DIR:PATH=//p' "$work/find/CMakeCache.txt")
case "$found" in
  "$work/prefix"/*) echo "moca found at $found" ;;
  *) echo "find_package(moca) found '$found', not the install prefix" >&2; exit 1 ;;
esac
cmake --build "$work/find" -j "$jobs"
"$work/find/downstream"

echo "== downstream: add_subdirectory(moca)"
cmake -S tests/downstream -B "$work/subdir" "${args[@]}" "${subdir_args[@]}" \
  -DMOCA_SOURCE_DIR="$src"
cmake --build "$work/subdir" -j "$jobs"
"$work/subdir/downstream"

echo "== downstream: both routes ok"
