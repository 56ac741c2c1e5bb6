"""Optimizer and learning-rate schedule, from timm's building blocks."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with two or more dimensions (matrices, conv and
    positional tensors), never on biases, norms, the logit scale or other 1-D parameters."""
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step schedule: linear warm-up from ``start_lr`` over ``warmup_epochs``, then cosine to
    ``min_lr`` at ``total_steps`` (SLIP's). Call ``step_update(step)`` before each update."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup), lr_min=cfg.min_lr,
        warmup_t=warmup, warmup_lr_init=cfg.start_lr, warmup_prefix=True, t_in_epochs=False,
    )


def schedule_steps(samples_per_epoch: int, global_batch: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps): a step is one global batch; a partial last batch is dropped."""
    per_epoch = samples_per_epoch // global_batch
    if per_epoch < 1:
        raise ValueError(f"an epoch of {samples_per_epoch} samples is smaller than one global batch of {global_batch}")
    return per_epoch, max(1, math.ceil(per_epoch * epochs))
