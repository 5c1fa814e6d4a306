#!/usr/bin/python3
"""ViT forward+backward, this library vs PyTorch on the same machine, as a ratio.

Usage: benchmarks/compare_vit.py [--bench build/benchmarks/vit_bench] [--threads 2] [--repeats 5]

Runs the C++ benchmark (Google Benchmark, JSON output, `--repeats` repetitions) and the same
configurations in PyTorch (same model structure, batch, thread count; medians of `--repeats`
timed runs after warm-up) and prints images/s for both and their ratio. PyTorch uses threads =
cores and needs an optimised BLAS (Debian: libopenblas0-pthread; with only the reference
libblas3 its GEMMs run ~40x slower and the ratio means nothing).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# OpenBLAS detects the CPU itself; forcing a core type it lacks (e.g. SkylakeX without AVX-512)
# ends in an illegal instruction. PyTorch must use an optimised BLAS (Debian: libopenblas0-pthread),
# not the reference libblas3, or the comparison is meaningless.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import torch  # noqa: E402

from reference_vit import VisionTransformer  # noqa: E402

CONFIGS = {
    "tiny_b128": dict(img_size=32, patch=4, in_chans=1, dim=192, depth=6, heads=3, batch=128),
    "vit_s16_b16": dict(img_size=224, patch=16, in_chans=3, dim=384, depth=12, heads=6, batch=16),
}


def torch_images_per_s(cfg, repeats, min_time=3.0):
    batch = cfg["batch"]
    model = VisionTransformer(**{k: v for k, v in cfg.items() if k != "batch"})
    model.init_weights()
    x = torch.rand(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"]) * 2 - 1
    g = torch.rand(batch, 1 + (cfg["img_size"] // cfg["patch"]) ** 2, cfg["dim"]) * 2 - 1

    def step():
        model.zero_grad(set_to_none=False)
        out = model(x)[0]
        out.backward(g)

    for _ in range(2):
        step()
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(n * batch / dt)
    return statistics.median(rates)


def ours_images_per_s(bench, repeats):
    out = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_repetitions={repeats}",
                          "--benchmark_report_aggregates_only=false"],
                         check=True, capture_output=True, text=True).stdout
    rates = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        name = b["name"].split("/")[1]  # vit_train_step/<config>/min_time:.../real_time
        rates.setdefault(name, []).append((b["images_per_s"], b.get("peak_MiB", 0.0)))
    return {k: (statistics.median(r for r, _ in v), max(m for _, m in v)) for k, v in rates.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/benchmarks/vit_bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    ours = ours_images_per_s(args.bench, args.repeats)
    print(f"threads {args.threads}, torch {torch.__version__}, medians of {args.repeats} runs")
    print(f"{'config':<14}{'moca img/s':>12}{'peak MiB':>10}{'torch img/s':>13}{'ratio':>8}")
    for name, cfg in CONFIGS.items():
        theirs = torch_images_per_s(cfg, args.repeats)
        rate, peak = ours[name]
        print(f"{name:<14}{rate:>12.1f}{peak:>10.0f}{theirs:>13.1f}{rate / theirs:>8.2f}")


if __name__ == "__main__":
    main()
