#!/usr/bin/env bash
# The main job on a fresh machine: installs the missing Debian packages (including the
# Fashion-MNIST data set), builds the `moca` program (Release) and pretrains the tiny preset on
# Fashion-MNIST for a bounded time, ending with the teacher's k-NN top-1 on the test set.
#   scripts/pretrain.sh [extra `moca pretrain` flags...]
# MINUTES (default 12) sets the training time, OUT (default runs/fashion-mnist-tiny) the run
# folder, BUILD_DIR (default build) and JOBS (default 2) the build. Run it again with --resume
# to continue an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-2}
minutes=${MINUTES:-12}
out=${OUT:-runs/fashion-mnist-tiny}

scripts/install-deps.sh
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  scripts/configure.sh "$build_dir"
fi
cmake --build "$build_dir" -j "$jobs" --target moca

# Spec §16's tiny preset with the short-budget settings of docs/results.md; the k-NN memory bank
# is the 60,000 training images and the queries the 10,000 test images.
extra=()
if [ "${1:-}" != "--resume" ]; then
  extra=(--minutes "$minutes")
fi
exec "$build_dir/examples/moca" pretrain --data fashion-mnist --preset tiny \
  --out "$out" "${extra[@]}" "$@"
