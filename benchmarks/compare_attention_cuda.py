#!/usr/bin/env python3
"""The fused attention of bf16 heads alone on the GPU, this library vs PyTorch, as ratios.

Usage: benchmarks/compare_attention_cuda.py [--bench build/benchmarks/moca_cuda_bench]
           [--shapes 128,12,197,64;128,12,89,64;...] [--steps 20] [--warmup 5] [--json FILE]

Our side is `moca_cuda_bench --attention B,H,S,hd`: ops::attention_forward and
attention_backward on bf16 heads read in place from the qkv projection's output [B, S, 3·H·hd],
on the register-fragment kernels (the default) and on the block programs (--flash-mma 0). The
PyTorch side is what timm's Attention runs under AMP: q, k, v as views of the same [B, S, 3, H,
hd] tensor, F.scaled_dot_product_attention (PyTorch picks its fused kernel), the backward
through autograd into that tensor. Both sides time forward and backward separately between CUDA
events and report medians; TFLOP/s count 4·B·H·S²·hd for the forward and 2.5 times that for
the backward on both sides. The default shapes are the attention calls of the ViT-B/16 MOCA step
with 64 pairs (128 images): the full 197 tokens (teacher), the student's 89 and 50 (88 and 49
visible patches and the class token), and the condenser decoder's 16 heads of 32 features at
128 and 89 positions.
"""
import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

SHAPES = "128,12,197,64;128,12,89,64;128,12,50,64;128,16,128,32;128,16,89,32"


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def time_ms(fn, warmup, steps):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + steps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    return median(times)


def torch_side(B, H, S, hd, warmup, steps):
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = (torch.rand(B, S, 3, H, hd, device="cuda", generator=gen) * 4 - 2).to(torch.bfloat16)
    qkv.requires_grad_(True)
    dout = (torch.rand(B, H, S, hd, device="cuda", generator=gen) * 2 - 1).to(torch.bfloat16)
    scale = hd ** -0.5

    def attend():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def forward():
        with torch.no_grad():
            attend()

    out = attend()

    def backward():
        torch.autograd.grad(out, qkv, dout, retain_graph=True)

    return time_ms(forward, warmup, steps), time_ms(backward, warmup, steps)


def ours(bench, B, H, S, hd, fragments, warmup, steps):
    cmd = [bench, "--attention", f"{B},{H},{S},{hd}", "--steps", str(steps), "--warmup",
           str(warmup), "--flash-mma", "1" if fragments else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/benchmarks/moca_cuda_bench")
    ap.add_argument("--shapes", default=SHAPES, help="B,H,S,hd;B,H,S,hd;...")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write every result here, one per line")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_attention_cuda: no CUDA device")
    sink = open(args.json, "a") if args.json else None
    print(f"card: {torch.cuda.get_device_name()}; PyTorch {torch.__version__}")
    print(f"{'B,H,S,hd':>16} {'side':>22} {'fwd ms':>8} {'TFLOP/s':>8} {'bwd ms':>8} "
          f"{'TFLOP/s':>8}")
    for spec in args.shapes.split(";"):
        B, H, S, hd = (int(x) for x in spec.split(","))
        flops = 4.0 * B * H * S * S * hd
        fwd, bwd = torch_side(B, H, S, hd, args.warmup, args.steps)
        rows = [dict(side="pytorch", kernels="sdpa", B=B, H=H, S=S, hd=hd, forward_ms=fwd,
                     backward_ms=bwd, forward_tflops=flops / fwd / 1e9,
                     backward_tflops=2.5 * flops / bwd / 1e9)]
        for fragments in (True, False):
            rows.append(ours(args.bench, B, H, S, hd, fragments, args.warmup, args.steps))
        for r in rows:
            print(f"{spec:>16} {r['side'] + ' ' + r['kernels']:>22} {r['forward_ms']:8.3f} "
                  f"{r['forward_tflops']:8.1f} {r['backward_ms']:8.3f} "
                  f"{r['backward_tflops']:8.1f}", flush=True)
            if sink:
                sink.write(json.dumps(r) + "\n")
                sink.flush()
        t, f = rows[0], rows[1]
        print(f"{'':>16} ratio fragments / sdpa: forward {t['forward_ms'] / f['forward_ms']:.2f}, "
              f"backward {t['backward_ms'] / f['backward_ms']:.2f}", flush=True)


if __name__ == "__main__":
    main()
