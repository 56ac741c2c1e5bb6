"""SwAV (Caron et al. 2020): online clustering with swapped prediction over multi-crop views.

Every crop's embedding (projector, L2-normalised) is scored against L2-normalised prototypes.
The codes of each large crop come from the Sinkhorn-Knopp algorithm over the global batch
(:func:`slip.losses.sinkhorn`, float32, row and total sums all-reduced over ranks), and every
other crop predicts them (:func:`slip.losses.swav_loss`). Settings from the paper and its
released ``main_swav.py``: 2 x 224 px + 6 x 96 px crops, projector 2048 -> 128, 3000
prototypes, temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, prototypes frozen for the
first epoch (``objective.freeze_prototypes_epochs``), and for small batches a queue of earlier
embeddings (``ssl_head.queue_size``, 3840 in the paper) that joins the Sinkhorn batch once full,
filled from ``objective.queue_start_epoch`` on.

The queue here holds the embeddings of the global batch (every rank keeps the same copy, written
in checkpoints); each rank scores its own share of it (every world-th row), so the ranks
together run Sinkhorn over the whole queue plus the whole batch, and any number of ranks gives
the codes of one process. (SwAV keeps a per-rank queue of its own embeddings: the same set of
columns, split otherwise.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import MethodViews, swav_views
from ..distributed import all_gather_no_grad, get_rank, get_world_size
from ..losses import sinkhorn, swav_loss
from .base import POOLED, SSLMethod, mlp, register_method

LARGE_CROPS, SMALL_CROPS = 2, 6


@register_method("swav")
class SwAV(SSLMethod):
    """Projector: Linear-BN-ReLU-Linear (width -> ``mlp_dim`` -> ``out_dim``), run once over all
    crops together as SwAV does; ``prototypes``: a bias-free linear layer whose rows are
    re-normalised after every step."""

    view_roles = (POOLED,) * (LARGE_CROPS + SMALL_CROPS)
    default_temperature = 0.1
    head_defaults = {"prototypes": 3000, "queue_size": 0}

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)  # a ViT's; None for a ResNet
        self._patch_size = int(patch[0]) if patch is not None else 16
        self.projector = mlp([width, head.mlp_dim, head.out_dim])
        self.prototypes = nn.Linear(head.out_dim, head.prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(LARGE_CROPS, head.queue_size, head.out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows written so far
        self.epsilon, self.iterations = 0.05, 3
        self.freeze_steps, self.queue_start_step = 0, 0
        self._pending: torch.Tensor | None = None

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=swav_views(image_size, large=LARGE_CROPS, small=SMALL_CROPS,
                                                     patch_size=patch_size))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        """The small crops in whole patches of this tower's ViT (e.g. 98 px for ViT-L/14 at 224)."""
        return self.declare_views(image_size, patch_size=self._patch_size)

    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        self.epsilon, self.iterations = objective.sinkhorn_epsilon, objective.sinkhorn_iterations
        self.freeze_steps = math.ceil(objective.freeze_prototypes_epochs * steps_per_epoch)
        self.queue_start_step = math.ceil(objective.queue_start_epoch * steps_per_epoch)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, feats: list[torch.Tensor], targets=None, patch_mask=None) -> dict:
        sizes = [f.shape[0] for f in feats]
        embeds = F.normalize(self.projector(torch.cat(feats)), dim=1)
        return {"embeds": list(embeds.split(sizes)), "scores": list(self.prototypes(embeds).split(sizes))}

    @property
    def queue_in_use(self) -> bool:
        """The queue joins the codes' batch once it is full (SwAV's rule)."""
        return self.queue.shape[1] > 0 and self.host_count("queue_filled") >= self.queue.shape[1]

    def codes(self, scores: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn codes of one large crop's (B, K) scores, with this rank's share of the queue
        in the batch when it is in use."""
        scores = scores.detach().float()
        n = scores.shape[0]
        if self.queue_in_use:
            mine = self.queue[crop, get_rank()::get_world_size()]
            scores = torch.cat([mine @ self.prototypes.weight.detach().float().t(), scores])
        return sinkhorn(scores, self.epsilon, self.iterations)[-n:]

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        scores = out["scores"]
        codes = [self.codes(scores[i], i) for i in range(LARGE_CROPS)]
        if self.queue.shape[1] > 0:
            self._pending = torch.stack([e.detach().float() for e in out["embeds"][:LARGE_CROPS]])
        return swav_loss(scores, codes, temperature=temperature or self.default_temperature)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_steps:  # SwAV's freeze_prototypes_niters: no update at all, no weight decay
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def enqueue(self, embeds: torch.Tensor) -> None:
        """Put ``embeds`` (the large crops' of the global batch, (2, N, D)) at the front of the
        queue, pushing the oldest out of its end (SwAV's order)."""
        size = self.queue.shape[1]
        n = min(embeds.shape[1], size)
        self.queue[:, n:] = self.queue[:, :size - n].clone()
        self.queue[:, :n] = embeds[:, embeds.shape[1] - n:].to(self.queue.dtype)
        self.advance_count("queue_filled", n, limit=size)

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        self.normalize_prototypes()
        if self._pending is not None and step > self.queue_start_step:
            self.enqueue(torch.stack([all_gather_no_grad(e) for e in self._pending]))
        self._pending = None
        return {"queue_in_use": float(self.queue_in_use)} if self.queue.shape[1] > 0 else {}
