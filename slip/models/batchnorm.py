"""BatchNorm over the global batch of all ranks, for the SSL heads and BatchNorm towers (ResNet).

SLIP normalises its SSL head with SyncBatchNorm. PyTorch's SyncBatchNorm runs only on GPUs,
so on CPU (gloo) this module does the same job with two differentiable all-reduces (sums, then
squares about the global mean); the
trainer picks torch's on CUDA and this one elsewhere (:func:`sync_batchnorm`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_sum_with_grad, get_world_size, is_distributed


class _GlobalStatistics:
    """Training statistics over the batch of every rank for a BatchNorm of any dimension: per
    channel (dim 1), over the batch and every spatial position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float().transpose(0, 1).reshape(c, -1)  # (C, N * spatial)
        count = torch.tensor([float(xf.shape[1])], device=x.device)
        sums = all_reduce_sum_with_grad(torch.cat([xf.sum(1), count]))
        n = sums[-1]
        mean = sums[:c] / n
        # Two passes (the squares about the global mean), not E[x^2] - mean^2, which cancels
        # catastrophically in float32 when the mean is large against the spread.
        centred = xf - mean[:, None]
        var = all_reduce_sum_with_grad((centred * centred).sum(1)) / n  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)  # unbiased
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics cover the batch of every rank. (N, C) input."""


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics cover the batch of every rank (a ResNet
    tower's, on CPU ranks). (N, C, H, W) input."""


def _synchronised(bn: nn.modules.batchnorm._BatchNorm, device: torch.device) -> nn.Module | None:
    """``bn`` with global-batch statistics (None for a kind this module does not convert)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    globalised = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d}.get(type(bn))
    if globalised is None:
        return None
    new = globalised(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    # The same Parameter objects, as torch's convert_sync_batchnorm does: a frozen BatchNorm (a
    # momentum branch's) stays frozen, and optimizers built earlier still hold them.
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    return new


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm in ``module`` use global-batch statistics under torch.distributed:
    torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm1d` elsewhere. Weights are kept.
    Sub-modules marked ``slip_local_batchnorm = True`` keep per-rank statistics (MoCo v2's
    shuffled-BN key encoder)."""
    for name, child in module.named_children():
        if getattr(child, "slip_local_batchnorm", False):
            continue
        synchronised = _synchronised(child, device) if isinstance(child, nn.modules.batchnorm._BatchNorm) else None
        if synchronised is not None:
            setattr(module, name, synchronised)
        else:
            sync_batchnorm(child, device)
    return module
