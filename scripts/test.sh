#!/usr/bin/env bash
# Builds and runs the test suite: installs missing Debian packages, configures build/ the first
# time (scripts/configure.sh: tests, examples, benchmarks, CUDA when nvcc is found), builds it
# and runs ctest.
#   scripts/test.sh [extra ctest arguments...]
# BUILD_DIR and JOBS override the build folder (build) and the build parallelism (2).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-2}

scripts/install-deps.sh
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  scripts/configure.sh "$build_dir"
fi
cmake --build "$build_dir" -j "$jobs"
# Tests run one at a time: each already uses two OpenMP threads.
ctest --test-dir "$build_dir" --output-on-failure "$@"
