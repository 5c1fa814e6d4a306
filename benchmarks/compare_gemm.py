#!/usr/bin/python3
"""GEMM GFLOP/s at the ViT step's shapes: this library, OpenBLAS (cblas_sgemm), oneDNN and torch.mm.

Usage: benchmarks/compare_gemm.py [--bench build/benchmarks/gemm_bench] [--threads 2]
                                  [--repeats 5]

The shapes are gemm_bench's: the three products of each Linear of the tiny preset (forward
x·Wᵀ, input gradient dy·W, weight gradient dyᵀ·x over 8192 token rows), a 1024³ square
product, and the batched attention products (torch.bmm; OpenBLAS has no batched call). The
gemm_bench's FMA peak of the cores is printed with them. The
three sides are measured in turns, `--repeats` rounds, and each figure is the median of its
rounds, so a slow spell of a shared machine hits all of them alike. OpenBLAS is Debian's
libopenblas0-pthread, called through ctypes with its own thread count set to --threads. oneDNN
is PyTorch's own build of it, called as `torch._C._nn.mkldnn_linear(x, w, b)` (C = x·wᵀ + b)
on operands converted to its blocked layout beforehand, each product's operands given in the
orientation that call wants (so its transposes are free) and a zero bias; its time includes
allocating the output, which that call always does.

The Linear products run again on bf16 operands with a bf16 result (rows `bf16_...`): gemm_bench's
BM_linear_bf16 against torch.mm and oneDNN on bf16 tensors (OpenBLAS has no such call here).
Where the CPU has AVX-512 BF16, oneDNN and this library both multiply with its dot-product
instruction.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import time

import torch

LINEAR = [(8192, 192, 576), (8192, 192, 192), (8192, 192, 768), (8192, 768, 192)]  # M, K, N
ATTENTION = (384, 65, 64)  # batch (images × heads), tokens, head dim


def products():
    """(name, trans_a, trans_b, M, N, K) in gemm_bench's naming, row-major like the library."""
    out = []
    for m, k, n in LINEAR:
        out.append((f"fwd/M:{m}/K:{k}/N:{n}", False, True, m, n, k))   # y = x · wᵀ
        out.append((f"dx/M:{m}/K:{k}/N:{n}", False, False, m, k, n))   # dx = dy · w
        out.append((f"dw/M:{m}/K:{k}/N:{n}", True, False, n, k, m))    # dw = dyᵀ · x
    out.append(("square_nn/M:1024/K:1024/N:1024", False, False, 1024, 1024, 1024))
    return out


def ours(bench):
    """One round of gemm_bench: {name: GFLOP/s}."""
    text = subprocess.run([bench, "--benchmark_format=json", "--benchmark_min_time=0.3"],
                          check=True, capture_output=True, text=True).stdout
    rates = {}
    for b in json.loads(text)["benchmarks"]:
        if b["name"].startswith("BM_fma_peak"):
            rates["fma_peak"] = b["flops"] / 1e9
            continue
        name = "/".join(b["name"].split("/")[1:-1])  # BM_linear/<name...>/real_time
        rates[name] = b["flops"] / 1e9
    return rates


def timed(fn, flops, min_time=0.3):
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return flops * n / dt / 1e9


class OpenBlas:
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self, threads):
        self.lib = ctypes.CDLL("libopenblas.so.0")
        self.lib.openblas_set_num_threads(threads)
        f = ctypes.c_float
        p = ctypes.c_void_p
        i = ctypes.c_int
        self.lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]

    def gflops(self, ta, tb, m, n, k, a, b, c):
        lib = self.lib
        args = (self.ROW_MAJOR, self.TRANS if ta else self.NO_TRANS,
                self.TRANS if tb else self.NO_TRANS, m, n, k, 1.0, a.data_ptr(),
                m if ta else k, b.data_ptr(), k if tb else n, 0.0, c.data_ptr(), n)
        return timed(lambda: lib.cblas_sgemm(*args), 2.0 * m * n * k)


def operands(ta, tb, m, n, k):
    a = torch.rand((k, m) if ta else (m, k)) * 2 - 1
    b = torch.rand((n, k) if tb else (k, n)) * 2 - 1
    return a, b, torch.empty(m, n)


def torch_gflops(ta, tb, m, n, k, a, b, c):
    a_op = a.t() if ta else a
    b_op = b.t() if tb else b
    return timed(lambda: torch.mm(a_op, b_op, out=c), 2.0 * m * n * k)


def onednn_operands(ta, tb, a, b):
    """op(A) [M, K] and op(B)ᵀ [N, K] for mkldnn_linear, contiguous and in oneDNN's layout."""
    x = (a.t() if ta else a).contiguous()
    w = (b if tb else b.t()).contiguous()
    bias = torch.zeros(w.shape[0], dtype=x.dtype)
    return x.to_mkldnn(), w.to_mkldnn(), bias.to_mkldnn()


def onednn_gflops(m, n, k, x, w, bias):
    return timed(lambda: torch._C._nn.mkldnn_linear(x, w, bias), 2.0 * m * n * k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/benchmarks/gemm_bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    blas = OpenBlas(args.threads)
    shapes = products()
    data = {name: operands(ta, tb, m, n, k) for name, ta, tb, m, n, k in shapes}
    has_onednn = torch.backends.mkldnn.is_available()
    dnn = {name: onednn_operands(ta, tb, *data[name][:2])
           for name, ta, tb, *_ in shapes} if has_onednn else {}
    half = [(f"bf16_{name}", ta, tb, m, n, k) for name, ta, tb, m, n, k in shapes
            if not name.startswith("square")]
    data16 = {f"bf16_{name}": tuple(t.bfloat16() for t in data[name]) for name, *_ in shapes}
    dnn16 = {name: onednn_operands(ta, tb, *data16[name][:2])
             for name, ta, tb, *_ in half} if has_onednn else {}
    b_, t_, d_ = ATTENTION
    q, kk, s = torch.rand(b_, t_, d_), torch.rand(b_, t_, d_), torch.empty(b_, t_, t_)
    att_flops = 2.0 * b_ * t_ * t_ * d_
    rounds = {"ours": {}, "openblas": {}, "onednn": {}, "torch": {}}
    for _ in range(args.repeats):
        for name, rate in ours(args.bench).items():
            rounds["ours"].setdefault(name, []).append(rate)
        for name, ta, tb, m, n, k in shapes:
            a, b, c = data[name]
            rounds["openblas"].setdefault(name, []).append(blas.gflops(ta, tb, m, n, k, a, b, c))
            rounds["torch"].setdefault(name, []).append(torch_gflops(ta, tb, m, n, k, a, b, c))
            if has_onednn:
                rounds["onednn"].setdefault(name, []).append(onednn_gflops(m, n, k, *dnn[name]))
        for name, ta, tb, m, n, k in half:
            a, b, c = data16[name]
            rounds["torch"].setdefault(name, []).append(torch_gflops(ta, tb, m, n, k, a, b, c))
            if has_onednn:
                rounds["onednn"].setdefault(name, []).append(onednn_gflops(m, n, k, *dnn16[name]))
        rounds["torch"].setdefault("qk", []).append(
            timed(lambda: torch.bmm(q, kk.transpose(1, 2), out=s), att_flops))
        rounds["torch"].setdefault("pv", []).append(
            timed(lambda: torch.bmm(s, kk, out=q), att_flops))
    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in rounds.items()}
    print(f"threads {args.threads}, torch {torch.__version__}, GFLOP/s, medians of "
          f"{args.repeats} rounds")
    print(f"{'product':<32}{'moca':>8}{'OpenBLAS':>10}{'oneDNN':>10}{'torch.mm':>10}"
          f"{'moca/best':>11}")
    rows = [name for name, *_ in shapes]
    rows += [f"qk/batch:{b_}/T:{t_}/hd:{d_}", f"pv/batch:{b_}/T:{t_}/hd:{d_}"]
    rows += [name for name, *_ in half]
    for name in rows:
        key = name.split("/")[0] if name.startswith(("qk", "pv")) else name
        mine = med["ours"].get(name)
        theirs = [med[side][key] for side in ("openblas", "onednn", "torch") if key in med[side]]
        others = [med[side].get(key) for side in ("openblas", "onednn", "torch")]
        cells = [f"{x:>8.1f}" if x is not None else f"{'-':>8}" for x in (mine,)]
        cells += [f"{x:>10.1f}" if x is not None else f"{'-':>10}" for x in others]
        ratio = f"{mine / max(theirs):>11.2f}" if mine and theirs else f"{'-':>11}"
        print(f"{name:<32}{''.join(cells)}{ratio}")
    if "fma_peak" in med["ours"]:
        peak = med["ours"]["fma_peak"]
        best = max(med["ours"][name] for name, *_ in shapes)
        print(f"FMA peak of the cores (gemm_bench BM_fma_peak): {peak:.1f} GFLOP/s; "
              f"the fastest moca product above reaches {100 * best / peak:.0f}% of it")


if __name__ == "__main__":
    main()
