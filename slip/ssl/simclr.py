"""SimCLR (Chen et al. 2020) as SLIP trains it: a 3-layer MLP head and NT-Xent at temperature 0.1."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import simclr_loss
from .base import SSLMethod, mlp, register_method


@register_method("simclr")
class SimCLR(SSLMethod):
    """Head ``image_mlp``: Linear-BN-ReLU-Linear-BN-ReLU-Linear (width -> 4096 -> 4096 -> 256),
    SLIP's module names, so its released weights load."""

    default_temperature = 0.1

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        mlp_dim, out_dim = head.mlp_dim, head.out_dim
        self.image_mlp = mlp([width, mlp_dim, mlp_dim, out_dim])

    def forward(self, feats: list[torch.Tensor], targets=None, patch_mask=None) -> dict:
        # One head call per view: BatchNorm must see each view's own batch statistics,
        # as in SLIP, where every view went through the head separately.
        return {"embeds": [self.image_mlp(f) for f in feats]}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        z1, z2 = out["embeds"]
        return simclr_loss(z1, z2, temperature=temperature or self.default_temperature)
