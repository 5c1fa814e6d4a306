#!/usr/bin/env bash
# Everything that needs a GPU, in one bounded run (a few minutes on an H100/H200):
#   1. the card, driver and toolkit;
#   2. the CUDA tests: every op against the CPU (test_ops_cuda) and the whole MOCA step against
#      the CPU step, the tiny preset learning on the device, no allocation per step (test_moca_cuda);
#   3. the MOCA step benchmark beside PyTorch on the same card (benchmarks/compare_moca_cuda.py),
#      the attention alone beside PyTorch's (benchmarks/compare_attention_cuda.py), where the
#      ViT-B/16 step's time goes (moca_cuda_bench --profile), the fused attention's kernels,
#      tiles and block sizes timed against each other, the products' algorithms tuned or not, the
#      column sums chunked or not, uploads staged or waited for, the bias gradients from the
#      column sums or the products' epilogue, and the residual added by the product or after it;
#   4. where the build has them, the command-line tests' GPU cases (`moca pretrain --device cuda`,
#      `moca knn --device cuda`, `moca extract --device cuda`);
#   5. compute-sanitizer: memcheck over the op tests and the MOCA parity test, racecheck over the
#      fused attention's shared memory (three small shapes: racecheck is slow).
#
#   scripts/gpu-check.sh [--build-dir DIR (default build-gpu)] [--out DIR (default gpu-check)]
#                        [--configs vit_b16_b64,vit_s16_b64] [--budget SECONDS (default 480)]
#                        [--only STAGE,STAGE,...]
#
# --only runs the named stages alone (device, build, test-ops, test-moca, products, profile, bench,
# attention, tiles, test-cli, memcheck-ops, memcheck-moca, racecheck), in the order above.
#
# The stages run in that order, most informative first, within --budget seconds in all: a stage
# gets its own limit or what is left of the budget, whichever is less, and is skipped (and
# reported so) when under 20 seconds are left.
#
# Uses the programs already in the build folder when they are there (built on a CPU-only machine
# with nvcc and copied over: tests/test_ops_cuda, tests/test_moca_cuda, benchmarks/moca_cuda_bench,
# and for the CLI stage examples/moca, tests/test_cli_pretrain, tests/test_cli_knn and
# tests/test_cli_extract, about 35 MB in all; nothing else of the build folder is read); otherwise configures and builds them for the
# card present (compute capability from nvidia-smi: sm_90 on H100/H200), which needs the
# project's build dependencies (scripts/install-deps.sh). Every stage has a time limit; the
# script goes on after a failed stage, prints a summary and exits non-zero when any stage failed.
# The output folder gets two files, written as the stages run (so that a run stopped part-way
# keeps what it did): gpu-check.log (every stage's output and the summary) and bench.jsonl (one
# line per timing).
#
# MOCA_REQUIRE_CUDA=1 is set for the tests: a GPU test that finds no usable device fails here
# instead of skipping, and so does a filter that selects no test case.
set -uo pipefail
cd "$(dirname "$0")/.."

build_dir=build-gpu
out=gpu-check
configs=vit_b16_b64,vit_s16_b64
budget=480
only=
while [ $# -gt 0 ]; do
  case $1 in
    --build-dir) build_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PATH="/usr/local/cuda/bin:$PATH"
export MOCA_REQUIRE_CUDA=1

# The CUDA libraries the programs link (libcudart, libcublas, libcublasLt): where the loader does
# not know them already, the folder that holds them goes on LD_LIBRARY_PATH (and only then, so
# that PyTorch keeps loading its own copies).
for lib in libcublas.so.13 libcublas.so.12; do
  ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {found = 1} END {exit !found}' && break
  dir=$(find /usr/local/cuda/ /usr/local/cuda*/ /opt -name "$lib" 2>/dev/null | head -1)
  if [ -n "$dir" ]; then
    export LD_LIBRARY_PATH="$(dirname "$dir")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    break
  fi
done

summary=()
failed=0
t_start=$SECONDS
# stage <name> <seconds> <command...>: runs one stage under a time limit (its own, or what is left
# of the budget), logged to $out/<name>.log.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  if [ -n "$only" ] && [[ "$only" != *",$name,"* ]]; then
    summary+=("$(printf '  %-14s not selected' "$name")")
    return
  fi
  local left=$((budget - (SECONDS - t_start)))
  if [ "$left" -lt 20 ]; then
    summary+=("$(printf '  %-14s SKIPPED (budget spent)' "$name")")
    failed=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  printf '\n==== %s (limit %ss)\n' "$name" "$limit" | tee -a "$log"
  : > "$tmp/$name.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" "$tmp/$name.log"
  rc=${PIPESTATUS[0]}
  # doctest passes a filter that matches nothing: that is a failure here.
  if [ "$rc" -eq 0 ] && grep -qE '\[doctest\] test cases: +0 \|' "$tmp/$name.log"; then
    echo "$name: no test case matched the filter" | tee -a "$log"
    rc=3
  fi
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    summary+=("$(printf '  %-14s ok     %4ds' "$name" "$took")")
  else
    [ "$rc" -eq 124 ] && echo "$name: stopped at its ${limit}s limit" | tee -a "$log"
    summary+=("$(printf '  %-14s FAILED %4ds (exit %d)' "$name" "$took" "$rc")")
    failed=1
  fi
}

# The card, and a preflight: the programs find their libraries, and PyTorch (the benchmark's
# other side) imports and multiplies on the card under this environment.
stage device 60 bash -c "set -e; nvidia-smi; nvcc --version | tail -2
  echo \"LD_LIBRARY_PATH=\${LD_LIBRARY_PATH:-}\"
  for p in '$build_dir/tests/test_ops_cuda' '$build_dir/benchmarks/moca_cuda_bench'; do
    [ -x \"\$p\" ] || continue
    if ldd \"\$p\" | grep 'not found'; then echo \"\$p: libraries not found\"; exit 1; fi
  done
  python3 -c 'import torch; a = torch.ones(64, 64, device=\"cuda\");
print(\"torch\", torch.__version__, float((a @ a).sum()))'"

programs=("$build_dir/tests/test_ops_cuda" "$build_dir/tests/test_moca_cuda"
          "$build_dir/benchmarks/moca_cuda_bench")
missing=0
for p in "${programs[@]}"; do [ -x "$p" ] || missing=1; done
if [ $missing -eq 1 ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  stage build 900 bash -c "scripts/configure.sh '$build_dir' -DCMAKE_CUDA_ARCHITECTURES=${cap:-90} \
    && cmake --build '$build_dir' -j \$(nproc) --target test_ops_cuda test_moca_cuda moca_cuda_bench"
fi

stage test-ops 90 "$build_dir/tests/test_ops_cuda"
stage test-moca 120 "$build_dir/tests/test_moca_cuda"
# The bf16 ViT-B/16 step as it runs by default, then with one setting changed at a time:
# cuBLASLt's heuristic choice of algorithm for every product against the fastest of up to 8 of
# its candidates, timed on the first step; the column sums (bias and LayerNorm gradients) element
# by element instead of chunked; every upload waiting for the stream instead of staged; the bias
# gradients from the products' epilogue instead of the column sums; the residual added in a pass
# of its own instead of as the second MLP product stores its output. First among the timings:
# the first line is the step as it ships.
stage products 170 bash -c "for run in '0 1 1 0 1' '8 1 1 0 1' '0 0 1 0 1' '0 1 0 0 1' \
    '0 1 1 1 1' '0 1 1 0 0'; do set -- \$run;
  '$build_dir/benchmarks/moca_cuda_bench' --preset vit-b16 --batch 64 --steps 5 --warmup 2 \
    --precision bf16 --gemm-tuning \$1 --column-chunks \$2 --staged-uploads \$3 \
    --fused-bias-grads \$4 --fused-residual \$5 || exit 1; done"
# Where the ViT-B/16 step's device time goes in bf16 mixed precision, scope by scope: timed on
# the stream by CUDA events, then by waiting for the device at every scope boundary.
stage profile 90 bash -c "for mode in --profile --profile-sync; do
  '$build_dir/benchmarks/moca_cuda_bench' --preset vit-b16 --batch 64 --steps 3 --precision bf16 \
    \$mode || exit 1; done"
# The modes that decide the targets (TF32 against TF32, bf16 mixed precision against AMP); fp32
# against fp32 was 0.99× and 1.08× on the last card and costs the most time.
stage bench 180 python3 -u benchmarks/compare_moca_cuda.py \
  --bench "$build_dir/benchmarks/moca_cuda_bench" --configs "$configs" \
  --ours tf32,bf16,bf16-mixed --modes tf32,amp --json "$out/bench.jsonl"
# The attention alone at the ViT-B/16 step's shapes, beside PyTorch's fused attention.
stage attention 60 python3 -u benchmarks/compare_attention_cuda.py \
  --bench "$build_dir/benchmarks/moca_cuda_bench" --json "$out/bench.jsonl"
# The fused attention's launch, timed (bf16 step): the register-fragment kernels (the default)
# against the block programs at their default (largest tile, four warps), 32-row tiles and eight
# warps.
stage tiles 90 bash -c "for launch in '0 128 1' '0 128 0' '32 128 0' '0 256 0'; do set -- \$launch;
  '$build_dir/benchmarks/moca_cuda_bench' --preset vit-b16 --batch 64 --steps 5 --warmup 2 \
    --precision bf16 --flash-tile \$1 --flash-threads \$2 --flash-mma \$3 || exit 1; done"
# The program on the GPU, driven as a user would (only where the build made the CLI and its tests).
if [ -x "$build_dir/examples/moca" ] && [ -x "$build_dir/tests/test_cli_pretrain" ] &&
   [ -x "$build_dir/tests/test_cli_knn" ] && [ -x "$build_dir/tests/test_cli_extract" ]; then
  export MOCA_CLI_PROGRAM="$(cd "$build_dir" && pwd)/examples/moca"
  stage test-cli 120 bash -c "'$build_dir/tests/test_cli_pretrain' --test-case='*--device*' &&
    '$build_dir/tests/test_cli_knn' --test-case='moca knn reports*' --subcase='--device cuda*' &&
    '$build_dir/tests/test_cli_extract' --test-case='moca extract writes*' --subcase='--device cuda*'"
fi
# compute-sanitizer needs the device's debugging interface, which some sandboxed runtimes refuse
# ("Device not supported"): there its stages are reported as unavailable, not as failures.
sanitizer=1
sanitize() {  # sanitize <name> <seconds> <command...>, as stage
  local name=$1 failed_before=$failed
  if [ $sanitizer -eq 0 ]; then
    summary+=("$(printf '  %-14s UNAVAILABLE (compute-sanitizer refused the device)' "$name")")
    return
  fi
  stage "$@"
  if grep -qs "Device not supported" "$tmp/$name.log"; then
    sanitizer=0
    failed=$failed_before
    unset 'summary[${#summary[@]}-1]'
    summary+=("$(printf '  %-14s UNAVAILABLE (compute-sanitizer refused the device)' "$name")")
  fi
}
# memcheck: out-of-bounds and misaligned accesses, and CUDA API errors, in every kernel the tests
# launch (leak checking off: the context's scratch buffer and cuBLAS live until exit by design).
# The test that fills the device on purpose is left out: its first cudaMalloc fails by design.
sanitize memcheck-ops 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$build_dir/tests/test_ops_cuda" --test-case-exclude="*pool has cached*"
sanitize memcheck-moca 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$build_dir/tests/test_moca_cuda" --test-case="*three MOCA steps*"
# Shared-memory hazards (a missing __syncthreads or __syncwarp) in the fused attention: the block
# programs on float heads and 80-wide bf16 ones, the register-fragment kernels on bf16 heads of 8
# and 64 features (three tiles: the double buffers), on small shapes (racecheck is slow).
sanitize racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 \
  "$build_dir/tests/test_ops_cuda" \
  --test-case="*fused attention forward and backward*,*fused attention in bf16 storage*" \
  --subcase="B=2 S=17 H=3 hd=8,B=1 S=65 H=2 hd=16,B=2 S=30 H=3 hd=64,B=1 S=33 H=1 hd=80,B=1 S=130 H=2 hd=64"

{
  echo
  # The step timings of the tiles and products stages side by side, one line per setting.
  for name in tiles products; do
    [ -s "$tmp/$name.log" ] || continue
    echo "==== $name: ms/step by setting"
    python3 - "$tmp/$name.log" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith('{"side": "moca"'):
        continue
    r = json.loads(line)
    keys = ("flash_tile", "flash_threads", "fragment_passes", "gemm_tuning", "column_chunks",
            "staged_uploads", "fused_bias_grads", "fused_residual")
    print("  %8.2f ms  MFU %5.1f%%  waits/step %5s  host busy %7s ms  %s" % (
        r["ms_per_step"], 100 * r["mfu"], r.get("host_waits_per_step", "-"),
        r.get("host_busy_ms_per_step", "-"),
        " ".join("%s=%s" % (k, r[k]) for k in keys if k in r)))
PY
  done
  echo "==== summary (total $((SECONDS - t_start))s)"
  printf '%s\n' "${summary[@]}"
  if [ $failed -ne 0 ]; then
    echo "==== FAILED"
  elif [ -n "$only" ]; then
    echo "==== all selected stages passed"
  else
    echo "==== all stages passed"
  fi
} | tee -a "$log"
exit $failed
