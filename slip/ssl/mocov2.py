"""MoCo v2 (Chen, Fan, Girshick, He 2020): a momentum key encoder, a queue of keys as negatives.

MoCo v2 is MoCo (He et al. 2020) with an MLP head, stronger augmentation (blur) and a cosine
learning rate. The query comes from the online tower on view 1, its key from the momentum
tower on view 2 (MoCo's loss is not symmetrised); the negatives are the keys of earlier batches,
kept in a first-in first-out queue that every rank holds identically (each step appends the
keys of the whole global batch, in rank order). The queue is a buffer of the model: it is
written in every checkpoint and restored on resume.

Shuffled BatchNorm (MoCo, Sec. 3.3): with a tower that has BatchNorm (a ResNet) on several
ranks, the key batch is shuffled across ranks before the momentum tower and unshuffled after,
so a query and its key are normalised with the statistics of different samples; the momentum
tower's BatchNorm stays per rank (the trainer does not synchronise it). With a single process
there is nothing to shuffle across, as in MoCo's own code (which requires several GPUs): its
keys are normalised over the whole local batch. A ViT tower has no BatchNorm and needs none of
this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import MethodViews, mocov2_views
from ..distributed import all_gather_no_grad, get_rank, get_world_size
from ..losses import mocov2_loss
from ..runtime import host_to_device
from .base import POOLED, TARGET, MomentumMethod, mlp, register_method


@register_method("mocov2")
class MoCoV2(MomentumMethod):
    """Projector: 2-layer MLP without BatchNorm (width -> hidden -> out; the paper's 2048 ->
    128 on a ResNet-50). Key encoder: a copy of the tower and projector, updated by EMA with a
    constant momentum of 0.999. Temperature 0.2, a queue of 65,536 keys (``ssl_head.queue_size``).
    """

    view_roles = (POOLED, TARGET)  # the query's view through the online tower, the key's through the momentum one
    default_temperature = 0.2
    default_momentum = 0.999
    momentum_schedule = "constant"
    head_defaults = {"queue_size": 65536}

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        if head.queue_size < 1:
            raise ValueError("MoCo v2 needs a queue of keys: ssl_head.queue_size must be >= 1")
        self.projector = mlp([width, head.mlp_dim, head.out_dim], bn=False)
        self._init_momentum_branch(encoder)
        # Shuffled BN normalises keys per rank; the trainer leaves this tower's BatchNorm unsynchronised.
        self.momentum_encoder.slip_local_batchnorm = True
        self.register_buffer("queue", F.normalize(torch.randn(head.queue_size, head.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # seeds the BN shuffle
        self._pending_keys: torch.Tensor | None = None

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=mocov2_views(image_size))

    @torch.no_grad()
    def target_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum tower's features of the key view (view 2), shuffled across ranks for a
        tower with BatchNorm (see the module docstring)."""
        x = views[1]
        if not (self._views_apart and get_world_size() > 1):
            return [self.momentum_encoder(x)]
        world, rank, n = get_world_size(), get_rank(), x.shape[0]
        everyone = all_gather_no_grad(x)
        generator = torch.Generator().manual_seed(self.host_count("num_updates"))  # the same permutation on every rank
        order = host_to_device(torch.randperm(world * n, generator=generator), x.device)
        keys = all_gather_no_grad(self.momentum_encoder(everyone[order[rank * n:(rank + 1) * n]]))
        unshuffled = torch.empty_like(keys)
        unshuffled[order] = keys
        return [unshuffled[rank * n:(rank + 1) * n]]

    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None, patch_mask=None) -> dict:
        if targets is None:
            raise RuntimeError("MoCo v2 needs the momentum keys (forward_features(..., targets=True))")
        (f1,), (t2,) = feats, targets
        with torch.no_grad():
            key = self.momentum_projector(t2)
        return {"query": self.projector(f1), "key": key}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        result = mocov2_loss(out["query"], out["key"], self.queue, temperature=temperature or self.default_temperature)
        # Enqueued after the optimizer step (on_step_end), so a skipped update leaves the queue alone.
        self._pending_keys = F.normalize(out["key"].detach().float(), dim=1)
        return result

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys`` (the global batch's, in rank order) to the queue, overwriting the oldest."""
        size, n = self.queue.shape[0], keys.shape[0]
        where = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        # As if written one after another: with more keys than places, the last ones stay.
        self.queue[where[-size:]] = keys[-size:].to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        out = super().on_step_end(step, total_steps, encoder, base_momentum)
        if self._pending_keys is not None:
            self.enqueue(all_gather_no_grad(self._pending_keys))
            self._pending_keys = None
        self.advance_count("num_updates")
        return out
