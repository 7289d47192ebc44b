"""ViT-Tiny for small images: patch 4, dim 192, depth 12, 3 heads, pre-norm, no cls token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidpipe.models.cnn import _check_image


def patch_size_for(h: int, w: int, max_patch: int = 4) -> int:
    """Largest patch <= max_patch dividing both sides (28 -> 4, 30 -> 2, 7 -> 1)."""
    return next(p for p in range(max_patch, 0, -1) if h % p == 0 and w % p == 0)


class PatchEmbed(nn.Module):
    """Conv2d patchify -> (B, N, D) tokens + learnable position embedding."""

    def __init__(self, in_shape: tuple[int, int, int], dim: int, patch: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.proj = nn.Conv2d(c, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (h // patch) * (w // patch), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention; causal=True: each token attends to itself and earlier ones
    (the language model, sidpipe/models/gpt.py)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} attention heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x)); no dropout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_vit(m: nn.Module) -> None:
    # timm-style init: small truncated-normal Linear weights, zero biases
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vit_tiny_layers(
    in_shape: tuple[int, ...],
    dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    mlp_ratio: int = 4,
    max_patch: int = 4,
) -> list[nn.Module]:
    """Twelve natural layers = the transformer blocks; patch embed (+pos) prepended to the first."""
    c, h, w = _check_image(in_shape, "vit_tiny")
    embed = PatchEmbed((c, h, w), dim, patch_size_for(h, w, max_patch))
    layers: list[nn.Module] = [TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)]
    for layer in layers:
        layer.apply(_init_vit)
    layers[0] = nn.Sequential(embed, layers[0])
    return layers
