"""One optimisation step's forward and backward: plain, or accumulated over micro-batches.

Accumulation keeps the contrastive losses over the whole batch (GradCache, Gao et al. 2021):
1. the towers run on every micro-batch without autograd and their features are kept (a few
   kilobytes per sample);
2. the projections, SSL head and losses run once on the concatenated features, so every
   negative of the global batch is present and BatchNorm in the SSL head sees the whole batch;
   backward stops at the features and leaves their gradients;
3. the towers run again per micro-batch with autograd and backpropagate those gradients.
The towers have no batch statistics and no randomness, so this equals one big batch exactly,
at the cost of a second tower forward. Targets without gradient are cached the same way: the
momentum tower's features (its projector, which has BatchNorm, runs in step 2 on the whole
batch), BEiT's tokenizer codes and patch masks, and the samples' global indices (PIRL's memory
bank), concatenated in micro-batch order so step 2 sees the whole batch's in its order. A view
whose method asks for more than the pooled feature (``SSLMethod.view_features``: AMDIM's local
feature maps) is a tuple of tensors, each cached, concatenated and given its gradient the same way.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models import SLIPModel

Objective = Callable[[dict], dict]


def model_inputs(batch: dict) -> dict:
    # ``index``: each sample's global index (the model hands it to a method that needs it, PIRL)
    return {k: batch[k] for k in ("image", "text", "views", "patch_mask", "index") if k in batch}


def batch_size_of(batch: dict) -> int:
    for key in ("image", "text"):
        if key in batch:
            return batch[key].shape[0]
    return batch["views"][0].shape[0]


_LISTS = ("views", "ssl_targets")  # feature entries holding one tensor per view
_TRAINED = ("image", "text", "views")  # entries that carry gradient back into the towers


def _cat(items: list):
    """Concatenate micro-batches' tensors, or their tuples of tensors element-wise."""
    if isinstance(items[0], tuple):
        return tuple(torch.cat(ts) for ts in zip(*items))
    return torch.cat(items)


def _concat_features(parts: list[dict]) -> dict:
    out: dict = {}
    for key in parts[0]:
        if key in _LISTS:
            out[key] = [_cat([p[key][i] for p in parts]) for i in range(len(parts[0][key]))]
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def _leaves(feats: dict) -> dict:
    def leaf(t, key: str):
        if isinstance(t, tuple):
            return tuple(leaf(x, key) for x in t)
        return t.detach().requires_grad_(key in _TRAINED)

    return {k: ([leaf(v, k) for v in vs] if k in _LISTS else leaf(vs, k)) for k, vs in feats.items()}


def _flat(feats: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for k in sorted(feats):
        if k in _TRAINED:
            for t in (feats[k] if k in _LISTS else [feats[k]]):
                out.extend(t if isinstance(t, tuple) else [t])
    return out


def plain_step(model: torch.nn.Module, batch: dict, objective: Objective, autocast, scale: Callable) -> dict:
    """Forward the whole (local) batch, compute the objective and backpropagate it."""
    with autocast():
        losses = objective(model(**model_inputs(batch)))
    scale(losses["loss"]).backward()
    return losses


def accumulated_step(model: SLIPModel, micro_batches: list[dict], objective: Objective, autocast,
                     scale: Callable, ) -> dict:
    """Forward/backward of ``micro_batches`` as one batch (see the module docstring).

    ``model`` is the bare model (not DDP-wrapped): gradients are synchronised by the caller.
    """
    with torch.no_grad(), autocast():
        cached = [model.forward_features(**model_inputs(mb)) for mb in micro_batches]
    feats = _leaves(_concat_features(cached))
    with autocast():
        losses = objective(model.forward_heads(feats))
    scale(losses["loss"]).backward()
    sizes = [batch_size_of(mb) for mb in micro_batches]
    # (a feature the loss did not use has no gradient and sends none back)
    grads = [g.grad.split(sizes) if g.grad is not None else None for g in _flat(feats)]
    for i, mb in enumerate(micro_batches):
        with autocast():
            again = _flat(model.forward_features(**model_inputs(mb), targets=False))
        surrogate = sum((f * g[i].to(f.dtype)).sum() for f, g in zip(again, grads) if g is not None)
        if torch.is_tensor(surrogate):
            surrogate.backward()
    return losses
