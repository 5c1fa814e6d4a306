"""A plain-PyTorch Vision Transformer with timm's structure and state-dict names.

It is the reference the C++ ViT is checked and benchmarked against (timm is not a Debian
package). The module mirrors timm's VisionTransformer as MOCA uses it (moca-spec §1): fused
qkv with [q | k | v] head-major layout, pre-norm blocks, exact GELU, LayerNorm eps 1e-6,
fixed 2-D sin-cos positions added before masking, optional masking by kept patch indices,
final norm on the last block only, and outputs addressed by offsets counted from the end.
"""
import math

import numpy as np
import torch
import torch.nn as nn


def sincos_2d(dim, grid, cls_token=True):
    """Spec §1.2: first half of the channels encodes the column, second half the row."""
    F = dim // 4
    omega = 1.0 / 10000 ** (np.arange(F, dtype=np.float32) / np.float32(F))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32),
                             indexing="ij")
    def enc(pos):
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega.astype(np.float64))
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    table = np.concatenate([enc(cols), enc(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch=16, in_chans=3, dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = img_size // patch
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid).float().unsqueeze(0), requires_grad=False)
        self.patch_embed = PatchEmbed(in_chans, patch, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)

    def init_weights(self):
        """Spec §1.6 (values differ from the C++ generator; fixtures carry the weights)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x, ids_keep=None, offsets=(0,)):
        """Returns {offset: tensor}; offset 0 is after the final norm, k > 0 the raw output of
        block depth-1-k. ids_keep [N, K] (long) keeps those patches in that order."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        depth = len(self.blocks)
        want = {depth - 1 - k: k for k in offsets}
        outs = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in want:
                outs[want[i]] = self.norm(x) if want[i] == 0 else x
        return outs
