"""Writes tests/data/bf16_reference.txt: float bit patterns and the bfloat16 bits PyTorch rounds
them to (torch.Tensor.bfloat16), for tests/bf16_test.cpp.

    /usr/bin/python3 tests/python/generate_bf16_reference.py

The values cover the cases a rounding can get wrong: exact ties (to even, up and down), one ulp
either side of a tie, carries into the next binade, the largest finite values and overflow to
infinity, subnormals and the smallest normals, signed zeros, infinities, and random floats
across the whole exponent range.
"""
import os
import struct

import torch


def bits_of(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def float_of(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def main():
    patterns = set()
    for hi in [0x0000, 0x0001, 0x0080, 0x3F80, 0x3F81, 0x3FFF, 0x4049, 0x7F7E, 0x7F7F, 0x007F,
               0x8000, 0xBF80, 0xFF7F, 0x1234, 0x4B00]:
        for lo in [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000]:
            for sign in [0, 0x80000000]:
                patterns.add(((hi << 16) | lo) ^ sign)
    patterns.update([0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001,
                     0x007FFFFF, 0x00800000, 0x3DCCCCCD])  # infinities, float max, 0.1f
    gen = torch.Generator().manual_seed(2024)
    for b in torch.randint(0, 0x7F800000, (400,), generator=gen, dtype=torch.int64).tolist():
        patterns.add(b)
        patterns.add(b | 0x80000000)
    rows = sorted(patterns)
    values = torch.tensor([float_of(b) for b in rows], dtype=torch.float32)
    rounded = values.bfloat16().view(torch.int16).tolist()
    out = os.path.join(os.path.dirname(__file__), "..", "data", "bf16_reference.txt")
    with open(out, "w") as f:
        f.write("# float bits, bfloat16 bits from torch %s (hex)\n" % torch.__version__)
        for b, r in zip(rows, rounded):
            f.write("%08x %04x\n" % (b, r & 0xFFFF))
    print("wrote %d rows to %s" % (len(rows), os.path.normpath(out)))


if __name__ == "__main__":
    main()
