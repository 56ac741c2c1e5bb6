"""CLIP's text transformer, with attention through ``scaled_dot_product_attention``.

Parameter names follow CLIP/SLIP (``attn.in_proj_weight``, ``mlp.c_fc`` ...), so released
checkpoints load without renaming. The layout is batch-first and the causal mask is never
materialised: ``is_causal=True`` lets PyTorch pick a fused kernel.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token i sees tokens 0..i. Input and output: (N, L, D)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        # Same names and layout as nn.MultiheadAttention: q, k, v stacked along dim 0.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


def activation(name: str) -> nn.Module:
    """An MLP activation by its config name (:data:`slip.models.presets.ACTIVATIONS`)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}: gelu or quick_gelu")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), MLP ratio 4 with ``act`` (CLIP: QuickGELU)."""

    def __init__(self, width: int, heads: int, act: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", activation(act)),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """A stack of causal blocks under ``resblocks`` (CLIP's name). Input and output: (N, L, D)."""

    def __init__(self, width: int, layers: int, heads: int, act: str = "quick_gelu"):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
