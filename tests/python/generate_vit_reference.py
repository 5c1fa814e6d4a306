#!/usr/bin/env python3
"""Writes tests/data/vit_reference.safetensors: a small ViT computed by PyTorch in float64, for
tests/vit_reference_test.cpp.

Contents (all float64 unless noted):
  weights under timm names (incl. the frozen pos_embed), `input` [N, C, H, W],
  `ids_keep` [N, K] int64, output gradients `r0`, `r2`,
  `out_full` (unmasked forward, final norm), `out0` / `out2` (masked forward, offsets 0 and 2),
  `loss` = <r0, out0> + <r2, out2>, `grad.input`, `grad.<name>` for every trainable parameter,
  then three AdamW steps (decay / no-decay groups, warmup-cosine lr, cosine weight decay, global
  norm clipping at 0.1) on the same loss: `step<i>.lr`, `step<i>.wd`, `step<i>.loss`,
  `step<i>.grad_norm` and `after.<name>` for every parameter.

The fixture is committed; CI needs no Python. To regenerate (torch from Debian's python3-torch,
safetensors from PyPI):
    python3 -m venv --system-site-packages .venv && .venv/bin/pip install safetensors
    .venv/bin/python tests/python/generate_vit_reference.py
"""
import math
import pathlib

import torch
from safetensors.torch import save_file

from reference_vit import VisionTransformer

CONFIG = dict(img_size=8, patch=2, in_chans=2, dim=16, depth=3, heads=2, mlp_ratio=4.0)
N, K = 3, 7
PEAK_LR, WARMUP, MAX_EPOCHS, LR_MUL, ITERS_PER_EPOCH = 1e-2, 1.0, 3.0, 1.25, 2
WD_START, WD_END, CLIP = 0.05, 0.20, 0.1


def warmup_cosine_lr(e):
    horizon = int(MAX_EPOCHS * LR_MUL)
    if e < WARMUP:
        return PEAK_LR * e / WARMUP
    if e > horizon:
        return 0.0
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * (e - WARMUP) / (horizon - WARMUP)))


def cosine_wd(e):
    return WD_END - 0.5 * (1 + math.cos(math.pi * e / MAX_EPOCHS)) * (WD_END - WD_START)


def main():
    torch.manual_seed(0)
    model = VisionTransformer(**CONFIG)
    model.init_weights()
    model = model.double()
    with torch.no_grad():  # non-trivial norms and biases, so every path carries gradient
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.3, 0.3)
    L = (CONFIG["img_size"] // CONFIG["patch"]) ** 2
    x = torch.rand(N, CONFIG["in_chans"], CONFIG["img_size"], CONFIG["img_size"],
                   dtype=torch.float64) * 2 - 1
    ids = torch.stack([torch.randperm(L)[:K] for _ in range(N)])
    r0 = torch.rand(N, 1 + K, CONFIG["dim"], dtype=torch.float64) * 2 - 1
    r2 = torch.rand(N, 1 + K, CONFIG["dim"], dtype=torch.float64) * 2 - 1

    out = {name: p.detach().clone() for name, p in model.state_dict().items()}
    out.update(input=x, ids_keep=ids, r0=r0, r2=r2)
    with torch.no_grad():
        out["out_full"] = model(x)[0]

    xg = x.clone().requires_grad_(True)
    outs = model(xg, ids, offsets=(0, 2))
    loss = (outs[0] * r0).sum() + (outs[2] * r2).sum()
    loss.backward()
    out.update(out0=outs[0].detach(), out2=outs[2].detach(), loss=loss.detach().reshape(1),
               **{"grad.input": xg.grad})
    for name, p in model.named_parameters():
        if p.requires_grad:
            out["grad." + name] = p.grad.detach().clone()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in trainable if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    for it in range(3):
        e = it / ITERS_PER_EPOCH
        lr, wd = warmup_cosine_lr(e), cosine_wd(e)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        opt.zero_grad()
        outs = model(x, ids, offsets=(0, 2))
        loss = (outs[0] * r0).sum() + (outs[2] * r2).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], CLIP)
        opt.step()
        for key, v in (("lr", lr), ("wd", wd), ("loss", loss.item()), ("grad_norm", norm.item())):
            out[f"step{it}.{key}"] = torch.tensor([v], dtype=torch.float64)
    for name, p in model.state_dict().items():
        out["after." + name] = p.detach().clone()

    path = pathlib.Path(__file__).resolve().parent.parent / "data" / "vit_reference.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata={"generator": "tests/python/generate_vit_reference.py",
                        "torch": torch.__version__})
    print(f"wrote {path} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
