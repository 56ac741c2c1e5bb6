"""Optimizer and learning-rate schedule, from timm's building blocks."""
from __future__ import annotations

import math

import torch
from timm.optim import Lars, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .config import ConfigError, OptimConfig

OPTIMIZERS = ("adamw", "adam", "sgd", "lars")
SCHEDULES = ("cosine", "multistep")


def _param_groups(model: nn.Module, weight_decay: float, decay_1d: bool) -> list[dict]:
    """[undecayed group, decayed group] of the trainable parameters: timm's
    ``param_groups_weight_decay`` (matrices, conv and positional tensors decayed; biases, norms,
    the logit scale and other parameters of under two dimensions not), or with ``decay_1d`` every
    parameter of one dimension or more decayed and only 0-D ones (the logit scale) not."""
    if not decay_1d:
        return param_groups_weight_decay(model, weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim == 0], "weight_decay": 0.0},
            {"params": [p for p in trainable if p.ndim > 0], "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name``. In all three, weight decay falls only on parameters with
    two or more dimensions (matrices, conv and positional tensors), never on biases, norms, the
    logit scale or other 1-D parameters (timm's ``param_groups_weight_decay``); with
    ``cfg.decay_1d`` it falls on biases and norms too (every parameter but 0-D ones such as the
    logit scale). Frozen parameters are left out. ``fused`` asks for torch's fused kernels (CUDA)
    where the optimizer has them.

    * ``adamw`` (SLIP's): ``torch.optim.AdamW`` with ``betas`` and ``eps``.
    * ``adam``: ``torch.optim.Adam``, weight decay as an L2 term added to the gradient before the
      moment estimates (not AdamW's decoupled decay), as AMDIM's released code (weight decay 1e-5
      on every parameter, so its recipe sets ``decay_1d``) and Lightning-Bolts' AMDIM and CPC v2
      modules train.
    * ``sgd`` (MoCo v2's): ``torch.optim.SGD``, heavy-ball ``momentum``, no Nesterov, no dampening,
      weight decay as an L2 term added to the gradient. MoCo v2's ``main_moco.py`` decays every
      parameter, biases and BatchNorm included: its recipe sets ``decay_1d``.
    * ``lars`` (SwAV's, SimCLR's): timm's ``Lars`` (SGD + LARS adaptation, the apex LARC update
      without clipping): for an adapted parameter ``w`` with gradient ``g`` the step direction is
      ``(g + wd * w) * trust_coeff * |w| / (|g| + wd * |w| + eps)`` (ratio 1 if ``|w|`` or ``|g|``
      is 0), fed into the momentum buffer and scaled by ``lr``; ``trust_coeff`` is
      ``cfg.lars_trust_coeff`` (0.001). timm adapts a group when its ``weight_decay`` is non-zero
      or its ``always_adapt`` option is set, so the decayed group gets ``always_adapt=True``
      (adapted even when ``weight_decay`` is 0) and the other group weight decay 0 and
      ``always_adapt=False``: by default biases and norms take plain momentum-SGD steps, neither
      decayed nor adapted (SimCLR's exclusion); with ``decay_1d`` they are decayed and adapted as
      SwAV's ``main_swav.py`` does (LARC over ``model.parameters()``), which its recipe sets.
    """
    if cfg.name in ("adamw", "adam"):
        adam = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam  # decoupled decay or L2
        groups = _param_groups(model, cfg.weight_decay, cfg.decay_1d)
        return adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "sgd":
        groups = _param_groups(model, cfg.weight_decay, cfg.decay_1d)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False, fused=fused or None)
    if cfg.name == "lars":
        # Split with a non-zero rate: with 0, timm puts every parameter in one group, and the
        # matrices would lose their adaptation along with the (absent) decay.
        groups = _param_groups(model, 1.0, cfg.decay_1d)
        for group in groups:
            adapted = group["weight_decay"] != 0
            group["weight_decay"] = cfg.weight_decay if adapted else 0.0
            group["always_adapt"] = adapted
        return Lars(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coeff=cfg.lars_trust_coeff, trust_clip=False)
    raise ConfigError(f"optim.name: {cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")


def check_optim_config(cfg: OptimConfig) -> None:
    """Raise ConfigError naming the key when the optimizer settings cannot work."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: {cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {cfg.momentum}")
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must be 0 or more, got {cfg.weight_decay}")
    if not cfg.lars_trust_coeff > 0:
        raise ConfigError(f"optim.lars_trust_coeff: must be positive, got {cfg.lars_trust_coeff}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.schedule == "multistep":
        if not cfg.decay_epochs:
            raise ConfigError("optim.decay_epochs: the multistep schedule needs at least one epoch to decay after")
        if any(e <= 0 for e in cfg.decay_epochs) or list(cfg.decay_epochs) != sorted(cfg.decay_epochs):
            raise ConfigError(f"optim.decay_epochs: must be positive and increasing, got {list(cfg.decay_epochs)}")
        if not 0 < cfg.decay_rate <= 1:
            raise ConfigError(f"optim.decay_rate: must be in (0, 1], got {cfg.decay_rate}")
    elif cfg.decay_epochs:
        raise ConfigError(f"optim.decay_epochs: only the multistep schedule uses it (optim.schedule is {cfg.schedule!r})")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   steps_per_epoch: int) -> Scheduler:
    """Per-step schedule: linear warm-up from ``start_lr`` over ``warmup_epochs``, then, with
    ``cfg.schedule`` ``cosine``, cosine to ``min_lr`` at ``total_steps`` (SLIP's), or with
    ``multistep`` the rate times ``decay_rate`` for every one of ``decay_epochs`` already trained:
    the update after ``e * steps_per_epoch`` updates is the first decayed one, as torch's
    ``MultiStepLR`` stepped once per epoch. Call ``step_update(step)`` before each update."""
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    if cfg.schedule == "multistep":
        # timm applies a milestone m from update m - 1 on ("historical timm convention"), so each
        # is given one update later; counted from step 0, warm-up included (warmup_prefix off).
        milestones = [round(e * steps_per_epoch) + 1 for e in cfg.decay_epochs]
        return MultiStepLRScheduler(
            optimizer, decay_t=milestones, decay_rate=cfg.decay_rate, warmup_t=warmup,
            warmup_lr_init=cfg.start_lr, warmup_prefix=False, t_in_epochs=False,
        )
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
