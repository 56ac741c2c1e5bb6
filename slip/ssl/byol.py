"""BYOL (Grill et al. 2020): online projector + predictor regress an EMA target's projection."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import byol_loss
from .base import MomentumMethod, mlp, register_method


@register_method("byol")
class BYOL(MomentumMethod):
    """Projector and predictor: 2-layer MLPs with BN (width -> 4096 -> 256, 256 -> 4096 -> 256).
    The target is an EMA copy of the image tower and projector, momentum rising from 0.996 to 1
    on a cosine schedule. Loss: symmetrised 2 - 2 cos(prediction, target of the other view)."""

    default_momentum = 0.996

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        mlp_dim, out_dim = head.mlp_dim, head.out_dim
        self.projector = mlp([width, mlp_dim, out_dim])
        self.predictor = mlp([out_dim, mlp_dim, out_dim])
        self._init_momentum_branch(encoder)  # BYOL's "target network"

    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None, patch_mask=None) -> dict:
        if targets is None:
            raise RuntimeError("BYOL needs the target projections (forward_features(..., targets=True))")
        return {"predictions": [self.predictor(self.projector(f)) for f in feats],
                "targets": self.momentum_projections(targets)}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        (p1, p2), (z1, z2) = out["predictions"], out["targets"]
        return byol_loss(p1, p2, z1, z2)
