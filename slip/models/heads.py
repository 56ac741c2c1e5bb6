"""Projection heads for the self-supervised branch."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def ssl_mlp(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's head as SLIP builds it: Linear-BN-ReLU-Linear-BN-ReLU-Linear.

    Module names (``layer1``, ``bn1``, ...) match SLIP's ``image_mlp`` so released weights load.
    BatchNorm1d here; the trainer converts it to SyncBatchNorm under DDP, as SLIP trains it.
    Shapes: (N, in_dim) -> (N, out_dim).
    """
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, mlp_dim)),
        ("bn1", nn.BatchNorm1d(mlp_dim)),
        ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(mlp_dim, mlp_dim)),
        ("bn2", nn.BatchNorm1d(mlp_dim)),
        ("relu2", nn.ReLU(inplace=True)),
        ("layer3", nn.Linear(mlp_dim, out_dim)),
    ]))
