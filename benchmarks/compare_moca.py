#!/usr/bin/python3
"""One MOCA iteration, this library vs PyTorch on the same machine, as a ratio.

Usage: benchmarks/compare_moca.py [--bench build/benchmarks/moca_bench] [--threads 2]
                                  [--repeats 3] [--configs tiny_b128,vit_s16_b16]
                                  [--precision fp32|bf16]

The PyTorch side is the project's float32 PyTorch implementation of the same recipe
(tests/python/reference_moca.py): teacher EMA, codebook targets and refresh, both masking rounds
with the condenser decoder, L_IMG + L_LOC, backward, clipping, AdamW with the four groups —
the same presets, batch and thread count. The two sides run in turns (ours, then PyTorch, then
ours again...), each turn a timed run of at least 10 s after warm-up, so that the slow and fast
spells of a shared machine fall on both; printed are the medians of the turns and the median of
the per-turn ratios. With --precision bf16 our side is Moca<bf16> (bf16 storage, float master
weights, moments and sums; moca_bench's `_bf16` runs) and PyTorch's runs its forward passes under
CPU autocast to bfloat16 (its Linear layers then multiply in bf16; its parameters stay float).
Needs Python with torch (Debian: /usr/bin/python3 with python3-torch) on an optimised BLAS
(Debian: libopenblas0-pthread; with only the reference libblas3, PyTorch's GEMMs run ~40x slower
and the ratio means nothing). PyTorch uses threads = cores.
"""
import argparse
import contextlib
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

import reference_moca as R  # noqa: E402

CONFIGS = {
    "tiny_b128": dict(model=dict(img_size=32, patch=4, in_chans=1, dim=192, depth=6, heads=3,
                                 dec_dim=128, dec_depth=2, dec_heads=4, early_layer=2,
                                 num_words=1024, skip_offset=1, words_per_iter=32), batch=128),
    "vit_s16_b16": dict(model=dict(img_size=224, patch=16, in_chans=3, dim=384, depth=12, heads=6,
                                   dec_dim=512, dec_depth=2, dec_heads=16, early_layer=4,
                                   num_words=4096, skip_offset=2, words_per_iter=16), batch=16),
}


class TorchSide:
    """The PyTorch MOCA iteration for one configuration, built once and timed turn by turn.

    Tensors are created on PyTorch's default device; the model is moved to `device` (its sin-cos
    tables come from NumPy, on the CPU). `autocast()` wraps the forward passes (no-op here;
    compare_moca_cuda.py's AMP mode overrides it)."""

    def __init__(self, cfg, device="cpu", warmup=2, bf16=False):
        mcfg, B = cfg["model"], cfg["batch"]
        self.bf16 = bf16
        self.B = B
        self.model = model = R.Moca(**mcfg).to(device)
        model.init_weights()
        self.opt = R.make_optimizer(model)
        self.L, self.knew = model.L, mcfg["words_per_iter"]
        self.inner = R.inner_patches(mcfg["img_size"] // mcfg["patch"], mcfg["skip_offset"])
        shape = (B, mcfg["in_chans"], mcfg["img_size"], mcfg["img_size"])
        self.x1, self.x2 = torch.rand(shape) * 2 - 1, torch.rand(shape) * 2 - 1
        for _ in range(warmup):
            self.step()

    def autocast(self):
        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self):
        """train_iteration without recording the gradients (the fixture generator needs them);
        returns the loss."""
        model, opt, B, L = self.model, self.opt, self.B, self.L
        R.set_schedule(opt, 1e-4, 0.05)
        model.update_teacher(0.994)
        edict = model.bow._embedding.detach().clone()
        with self.autocast():
            rec = R.teacher_targets(model, self.x1, self.x2, edict)
            upd = rec["teacher_out1"] if torch.rand(()) < 0.5 else rec["teacher_out2"]
            model.bow.update(upd, torch.randperm(B)[:self.knew],
                             torch.randint(len(self.inner), (self.knew,)))
            Q, Y = torch.cat([rec["q1"], rec["q2"]]), torch.cat([rec["y2"], rec["y1"]])
            s1 = torch.argsort(torch.rand(2 * B, L), dim=1)
            s2 = R.complementary_second_round(s1, model.lk[0], model.ld[0], model.lk[1])
            masks = [(s1, model.lk[0], model.ld[0]), (s2, model.lk[1], model.ld[1])]
            opt.zero_grad(set_to_none=True)
            out = R.student_losses(model, torch.cat([self.x1, self.x2]), masks, Q, Y, edict)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in model.trainable()], R.CLIP_MAX_NORM)
        opt.step()
        return out["loss"]

    def pairs_per_s(self, min_time=10.0):
        n, t0 = 0, time.perf_counter()
        while True:
            self.step()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                return n * self.B / dt


def ours(bench, name):
    """One turn of our side: a fresh moca_bench run of `name` (warm-up, then at least 10 s)."""
    out = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_filter=/{name}/"],
                         check=True, capture_output=True, text=True).stdout
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type") == "iteration":
            return b["pairs_per_s"], b["peak_step_MiB"]
    raise RuntimeError(f"moca_bench printed no result for {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/benchmarks/moca_bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    bf16 = args.precision == "bf16"
    names = args.configs.split(",")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, {args.repeats} turns per side, "
          f"{args.precision}" + (" (PyTorch: CPU autocast to bfloat16)" if bf16 else ""))
    print(f"{'config':<14}{'moca pairs/s':>14}{'peak MiB':>10}{'torch pairs/s':>15}"
          f"{'ratio':>8}  per-turn ratios")
    for name in names:
        theirs_side = TorchSide(CONFIGS[name], bf16=bf16)
        mine, theirs, peaks = [], [], []
        for _ in range(args.repeats):
            rate, peak = ours(args.bench, name + ("_bf16" if bf16 else ""))
            mine.append(rate)
            peaks.append(peak)
            theirs.append(theirs_side.pairs_per_s())
        ratios = [m / t for m, t in zip(mine, theirs)]
        turns = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{name:<14}{statistics.median(mine):>14.1f}{max(peaks):>10.0f}"
              f"{statistics.median(theirs):>15.1f}{statistics.median(ratios):>8.2f}  {turns}",
              flush=True)


if __name__ == "__main__":
    main()
