#!/usr/bin/env python3
"""Writes tests/data/io/torch_reference.safetensors with PyTorch and the reference safetensors
package, for tests/io_test.cpp: the C++ reader must read these values and the C++ writer must
reproduce the file byte for byte (header order, padding, F16/BF16 rounding).

Needs torch and safetensors (e.g. a venv made with --system-site-packages over Debian's
python3-torch, then `pip install safetensors`). The values are listed again in io_test.cpp;
change both together.

    python3 tests/python/make_io_fixture.py [output path]
"""
import math
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

# float32 values converted by torch (round to nearest even) to F16 and BF16.
F16_SOURCE = [1.0, -2.5, 65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
              1.0 / 3.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -0.0, math.inf, math.nan]
BF16_SOURCE = [1.0, -2.5, 1.0 / 3.0, math.pi, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.4e38,
               2.0**-133, -math.inf]
# No NaN here: torch's vectorised float→bfloat16 path writes NaN as 0xffff, not a canonical NaN.


def tensors():
    return {
        "f32": torch.tensor([1.0, -2.5, 0.1, 65504.0, 1e-30, -0.0], dtype=torch.float32).reshape(2, 3),
        "f64": torch.tensor([1.0 / 3.0, -1e300, 5e-324, 0.1], dtype=torch.float64),
        "f16": torch.tensor(F16_SOURCE, dtype=torch.float32).to(torch.float16).reshape(2, 7),
        "bf16": torch.tensor(BF16_SOURCE, dtype=torch.float32).to(torch.bfloat16).reshape(3, 3),
        "i64": torch.tensor([0, -1, 2**62, -2**63], dtype=torch.int64).reshape(2, 2),
        "i32": torch.tensor([7, -2**31, 2**31 - 1], dtype=torch.int32),
        "u8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 2, 2),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "blocks.0.attn.qkv.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8,
    }


def main():
    here = pathlib.Path(__file__).resolve().parent
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else \
        here.parent / "data" / "io" / "torch_reference.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    t = tensors()
    save_file(t, str(out), metadata={"format": "pt"})
    back = load_file(str(out))
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].view(-1)[~torch.isnan(back[k].view(-1).float())],
                           v.view(-1)[~torch.isnan(v.view(-1).float())]), k
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    for k, v in t.items():
        if v.dtype in (torch.float16, torch.bfloat16):
            bits = v.view(torch.int16).view(-1).tolist()
            print(k, [f"0x{b & 0xffff:04x}" for b in bits])


if __name__ == "__main__":
    main()
