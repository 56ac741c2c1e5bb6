"""MoCo v3 (Chen, Xie, He 2021) for ViTs: momentum tower + projector, predictor, InfoNCE at 0.2."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import mocov3_loss
from .base import MomentumMethod, mlp, register_method


@register_method("mocov3")
class MoCoV3(MomentumMethod):
    """Projector: 3-layer MLP (hidden 4096, out 256, BN after the hidden layers and a non-affine BN
    at the output). Predictor: 2-layer MLP (256 -> 4096 -> 256, BN after the hidden layer). The
    momentum branch is a copy of the image tower and projector, updated by EMA with momentum
    rising from 0.99 to 1 on a cosine schedule. Queries come from the online branch, keys from
    the momentum branch of the other view."""

    default_temperature = 0.2
    default_momentum = 0.99

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        mlp_dim, out_dim = head.mlp_dim, head.out_dim
        self.projector = mlp([width, mlp_dim, mlp_dim, out_dim], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([out_dim, mlp_dim, out_dim])
        self._init_momentum_branch(encoder)

    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None, patch_mask=None) -> dict:
        if targets is None:
            raise RuntimeError("MoCo v3 needs the momentum keys (forward_features(..., targets=True))")
        queries = [self.predictor(self.projector(f)) for f in feats]
        return {"queries": queries, "keys": self.momentum_projections(targets)}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        (q1, q2), (k1, k2) = out["queries"], out["keys"]
        return mocov3_loss(q1, q2, k1, k2, temperature=temperature or self.default_temperature)
