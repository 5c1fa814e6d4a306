#!/usr/bin/env python3
"""One MOCA iteration on the GPU, this library vs PyTorch on the same card, as ratios.

Usage: benchmarks/compare_moca_cuda.py [--bench build/benchmarks/moca_cuda_bench]
           [--configs vit_b16_b64,vit_s16_b64] [--steps 10] [--warmup 3] [--json FILE]
           [--device cuda|cpu] [--modes fp32,tf32,amp] [--ours fp32,tf32,bf16,bf16-mixed]
           [--skip-ours]

Our side is moca_cuda_bench: Moca<float, Cuda> in fp32, with TF32 tensor-core GEMMs, and with
bf16 Linear GEMMs (fp32 accumulation; attention's batched GEMMs in TF32); and Moca<bf16, Cuda>
("bf16-mixed": bf16 values and activations with fp32 parameter gradients, master weights,
moments and accumulation, the counterpart of AMP). The
PyTorch side is the project's PyTorch implementation of the same recipe
(tests/python/reference_moca.py: teacher EMA, codebook targets and refresh, both masking rounds
with the condenser decoder, L_IMG + L_LOC, backward, clipping, AdamW with the four groups) at the
same preset and batch, in three modes: fp32, TF32 (allow_tf32) and AMP (autocast to bf16 around
the forward passes, fp32 weights and optimiser), each with attention through
F.scaled_dot_product_attention (PyTorch's fused kernels, as timm uses) unless --plain-attention.
Every run warms up, then times `--steps` iterations between device synchronisations; model
FLOPs per step are the ones our side counts for the same model, so both sides' MFU use the same
numerator. `--device cpu` is a smoke test of the script itself (autocast on the CPU).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import compare_moca  # noqa: E402
import reference_vit as RV  # noqa: E402

CONFIGS = {
    "tiny_b128": dict(preset="tiny", batch=128,
                      model=dict(img_size=32, patch=4, in_chans=1, dim=192, depth=6, heads=3,
                                 dec_dim=128, dec_depth=2, dec_heads=4, early_layer=2,
                                 num_words=1024, skip_offset=1, words_per_iter=32)),
    "vit_s16_b64": dict(preset="vit-s16", batch=64,
                        model=dict(img_size=224, patch=16, in_chans=3, dim=384, depth=12, heads=6,
                                   dec_dim=512, dec_depth=2, dec_heads=16, early_layer=4,
                                   num_words=4096, skip_offset=2, words_per_iter=32)),
    "vit_b16_b64": dict(preset="vit-b16", batch=64,
                        model=dict(img_size=224, patch=16, in_chans=3, dim=768, depth=12, heads=12,
                                   dec_dim=512, dec_depth=2, dec_heads=16, early_layer=4,
                                   num_words=4096, skip_offset=2, words_per_iter=32)),
}


def sdpa_forward(self, x):
    """reference_vit.Attention.forward through PyTorch's fused attention (same maths)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TorchSide(compare_moca.TorchSide):
    """The PyTorch MOCA iteration for one configuration and mode (fp32, tf32, amp)."""

    def __init__(self, cfg, mode, device):
        self.mode, self.device = mode, device
        super().__init__(cfg, device=device, warmup=0)

    def autocast(self):
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.mode == "amp")

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def measure(self, warmup, steps):
        for _ in range(warmup):
            self.step()
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        self.sync()
        dt = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else 0.0
        return dict(side="pytorch", precision=self.mode, ms_per_step=1e3 * dt,
                    pairs_per_s=self.B / dt, peak_MiB=peak, loss=float(loss))


def ours(bench, cfg, precision, steps, warmup):
    cmd = [bench, "--preset", cfg["preset"], "--batch", str(cfg["batch"]), "--steps", str(steps),
           "--warmup", str(warmup)]
    cmd += ["--precision", "bf16"] if precision == "bf16-mixed" else ["--matmul", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def set_tf32(on):
    """TF32 for float matrix products and convolutions, through the API this PyTorch has (the
    fp32_precision settings replace allow_tf32 from 2.9 on; the two must not be mixed)."""
    matmul = torch.backends.cuda.matmul
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 9):
        matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def report(row, name, card, sink):
    """Prints one result as soon as it is measured and appends it to the JSONL file, so a run
    stopped part-way keeps what it finished."""
    row["config"], row["card"] = name, card
    print(f"{name}: {row['side']} {row['precision']}: {row['ms_per_step']:.2f} ms/step, "
          f"{row['pairs_per_s']:.1f} pairs/s", flush=True)
    if sink:
        sink.write(json.dumps(row) + "\n")
        sink.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/benchmarks/moca_cuda_bench")
    ap.add_argument("--configs", default="vit_b16_b64,vit_s16_b64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write every result here, one per line")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--plain-attention", action="store_true",
                    help="PyTorch attention as explicit matmul + softmax instead of SDPA")
    ap.add_argument("--skip-ours", action="store_true", help="time the PyTorch side only")
    ap.add_argument("--modes", default="fp32,tf32,amp", help="PyTorch modes to time")
    ap.add_argument("--ours", default="fp32,tf32,bf16,bf16-mixed",
                    help="our modes to time: fp32, tf32, bf16 (float storage, bf16 Linears), "
                         "bf16-mixed (bf16 storage)")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_moca_cuda: PyTorch sees no CUDA device")
    if args.device != "cpu":
        torch.set_default_device(args.device)  # every tensor the reference creates lands there
    if not hasattr(F, "scaled_dot_product_attention"):
        args.plain_attention = True  # PyTorch before 2.0
    if not args.plain_attention:
        RV.Attention.forward = sdpa_forward
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"card: {card}; PyTorch {torch.__version__}; attention: "
          f"{'explicit' if args.plain_attention else 'scaled_dot_product_attention'}", flush=True)

    sink = open(args.json, "w") if args.json else None
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        rows, flops = [], None
        if not args.skip_ours:
            for precision in args.ours.split(","):
                try:
                    r = ours(args.bench, cfg, precision, args.steps, args.warmup)
                    flops = r["gflop_per_step"] * 1e9
                    rows.append(r)
                    report(r, name, card, sink)
                except Exception as e:  # noqa: BLE001 - report and go on with the other runs
                    print(f"{name} moca {precision}: {e}", flush=True)
        for mode in args.modes.split(","):
            try:
                set_tf32(mode == "tf32")
                torch.manual_seed(0)
                r = TorchSide(cfg, mode, args.device).measure(args.warmup, args.steps)
                if flops:
                    r["tflops"] = flops / (r["ms_per_step"] * 1e-3) / 1e12
                rows.append(r)
                report(r, name, card, sink)
            except Exception as e:  # noqa: BLE001
                print(f"{name} pytorch {mode}: {type(e).__name__}: {e}", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        print(f"\n{name} (batch {cfg['batch']} pairs"
              + (f", {flops / 1e9:.0f} GFLOP per step" if flops else "") + ")")
        print(f"  {'side':8} {'precision':10} {'ms/step':>9} {'pairs/s':>9} {'TFLOP/s':>8} "
              f"{'peak MiB':>9}", flush=True)
        for r in rows:
            peak = r.get("peak_MiB", r.get("peak_tensor_MiB", 0.0))
            tfl = r.get("tflops", float("nan"))
            print(f"  {r['side']:8} {r['precision']:10} {r['ms_per_step']:9.2f} "
                  f"{r['pairs_per_s']:9.1f} {tfl:8.1f} {peak:9.0f}", flush=True)
        by = {(r["side"], r["precision"]): r for r in rows}
        for a, b in (("fp32", "fp32"), ("tf32", "tf32"), ("tf32", "amp"), ("bf16", "amp"),
                     ("bf16-mixed", "amp")):
            if ("moca", a) in by and ("pytorch", b) in by:
                ratio = by[("moca", a)]["pairs_per_s"] / by[("pytorch", b)]["pairs_per_s"]
                print(f"  ratio moca {a} / pytorch {b}: {ratio:.2f}", flush=True)
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
