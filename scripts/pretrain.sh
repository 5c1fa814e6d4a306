#!/usr/bin/env bash
# The main job on a fresh machine: installs the missing Debian packages (including the
# Fashion-MNIST data set), builds the `moca` program (Release) and pretrains the tiny preset on
# Fashion-MNIST for a bounded time, ending with the teacher's k-NN top-1 on the test set.
#   scripts/pretrain.sh [extra `moca pretrain` flags...]
# MINUTES (default 9) sets the training time, OUT (default runs/fashion-mnist-tiny) the run
# folder, BUILD_DIR (default build) and JOBS (default 2) the build. Run it again with --resume
# to continue an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-2}
minutes=${MINUTES:-9}
out=${OUT:-runs/fashion-mnist-tiny}

scripts/install-deps.sh
if ! grep -qs '^MOCA_BUILD_EXAMPLES:BOOL=ON' "$build_dir/CMakeCache.txt"; then
  scripts/configure.sh "$build_dir"
fi
cmake --build "$build_dir" -j "$jobs" --target moca

# Spec §16's tiny preset with the short-budget settings of spec §16.1 (docs/results.md): a
# 128-wide, 4-deep encoder and a 96-wide, 1-block decoder take about half the time per step, the
# teacher momentum runs 0.99 -> 0.999 over the run and dist_norm follows a faster EMA. The k-NN
# evaluation at the end uses the full protocol: the 60,000 training
# images as the memory bank, the 10,000 test images as queries.
if [ "${1:-}" = "--resume" ]; then
  exec "$build_dir/examples/moca" pretrain --out "$out" "$@"
fi
exec "$build_dir/examples/moca" pretrain --data fashion-mnist --preset tiny --minutes "$minutes" \
  --embed-dim 128 --depth 4 --heads 4 --dec-dim 96 --dec-depth 1 --dec-heads 4 \
  --momentum 0.99 --momentum-end 0.999 --dist-norm-decay 0.9 \
  --knn-k 10,20 --out "$out" "$@"
