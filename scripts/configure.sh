#!/usr/bin/env bash
# Configures a Release build of everything (tests, examples, benchmarks) with Ninja, with the CUDA
# backend when nvcc is found on PATH or in /usr/local/cuda/bin.
#   scripts/configure.sh [build-dir (default build)] [extra cmake arguments...]
# MOCA_CUDA=ON|OFF overrides the nvcc detection.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${1:-build}
shift $(( $# > 0 ? 1 : 0 ))

# CMake's check_language(CUDA) only looks on PATH; the toolkit's default home is not on it.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cuda=${MOCA_CUDA:-auto}
if [ "$cuda" = auto ]; then
  if command -v nvcc >/dev/null 2>&1; then cuda=ON; else cuda=OFF; fi
fi
cuda_args=(-DMOCA_WITH_CUDA="$cuda")
if [ "$cuda" = ON ]; then
  cuda_args+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
fi
echo "configure: $build_dir (CUDA $cuda)"

cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DMOCA_BUILD_TESTS=ON -DMOCA_BUILD_EXAMPLES=ON -DMOCA_BUILD_BENCHMARKS=ON \
  "${cuda_args[@]}" "$@"
