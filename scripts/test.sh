#!/usr/bin/env bash
# Configures (first time only) and builds build/, then runs the test suite with ctest.
#   scripts/test.sh [extra ctest arguments...]
# BUILD_DIR and JOBS override the build folder (build) and the parallelism (2).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-2}

if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOCA_BUILD_TESTS=ON
fi
cmake --build "$build_dir" -j "$jobs"
# Tests run one at a time: each already uses two OpenMP threads.
ctest --test-dir "$build_dir" --output-on-failure "$@"
