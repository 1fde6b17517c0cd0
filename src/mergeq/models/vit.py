"""A CPU-sized Vision Transformer (Dosovitskiy et al., ICLR 2021) for the E-PMQ setting.

Patch embedding (a ``Conv2d`` with kernel = stride = patch), a learned class token and
position embeddings, ``depth`` pre-norm encoder layers (LayerNorm -> multi-head
self-attention -> residual, LayerNorm -> MLP with GELU -> residual), a final LayerNorm and
a ``Linear`` head on the class token. Attention is written with plain ``nn.Linear``
projections (``qkv`` and ``proj``) instead of ``nn.MultiheadAttention``, so every weight
matrix is an ``nn.Linear`` that quantizers (GPTQ, E-PMQ, RTN) see, as in CLIP's ViT.
The head is the last ``nn.Linear`` in module order (SHOT freezes it: ``get_classifier``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """``ViT(num_classes, image_size=32, patch=4, dim=64, depth=4, heads=4, mlp_ratio=2)``."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, in_channels: int = 3) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} must be a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token (the input of ``head``)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def vit_tiny(num_classes: int = 10, **kw) -> ViT:
    """Patch 4, width 64, 4 layers, 4 heads, MLP 128 (~0.14M parameters)."""
    return ViT(num_classes, **kw)
