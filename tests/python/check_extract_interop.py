#!/usr/bin/python3
"""End-to-end interop: weights saved by PyTorch under timm's names feed `moca extract`, whose
features must equal PyTorch's own forward pass.

    tests/python/check_extract_interop.py [path/to/moca] [--prefix encoder_teacher.]

Needs torch and the safetensors package (see generate_vit_reference.py). Not part of CI, which
checks the same paths through committed fixtures (tests/vit_reference_test.cpp).
"""
import pathlib
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reference_vit import VisionTransformer  # noqa: E402

CFG = dict(img_size=32, patch=4, in_chans=1, dim=192, depth=6, heads=3)


def main():
    moca = sys.argv[1] if len(sys.argv) > 1 else "build/examples/moca"
    prefix = "encoder_teacher."
    torch.manual_seed(0)
    model = VisionTransformer(**CFG)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.uniform_(-0.5, 0.5) if name.endswith("bias") else p.uniform_(0.5, 1.5)
    images = torch.randn(10, 1, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "w.safetensors"))
        save_file({"images": images}, str(tmp / "x.safetensors"))
        subprocess.run([moca, "extract", "--weights", str(tmp / "w.safetensors"), "--prefix", prefix,
                        "--input", str(tmp / "x.safetensors"), "--output", str(tmp / "f.safetensors"),
                        "--img-size", "32", "--patch", "4", "--in-chans", "1", "--embed-dim", "192",
                        "--depth", "6", "--heads", "3", "--batch", "4"], check=True)
        got = load_file(str(tmp / "f.safetensors"))
    with torch.no_grad():
        out = model(images)[0]
    ref = {"cls": out[:, 0], "avg": out[:, 1:].mean(dim=1)}
    worst = 0.0
    for k in ("cls", "avg"):
        err = ((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
        worst = max(worst, err)
        print(f"{k}: shape {tuple(got[k].shape)}, max relative error {err:.2e}")
    if worst > 1e-4:
        sys.exit(f"features differ from PyTorch by {worst:.2e}")
    print("moca extract agrees with PyTorch")


if __name__ == "__main__":
    main()
