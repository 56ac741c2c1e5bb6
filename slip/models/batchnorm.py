"""BatchNorm over the global batch of all ranks, for the SSL heads.

SLIP normalises its SSL head with SyncBatchNorm. PyTorch's SyncBatchNorm runs only on GPUs,
so on CPU (gloo) this module does the same job with two differentiable all-reduces; the
trainer picks torch's on CUDA and this one elsewhere (:func:`sync_batchnorm`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad, get_world_size, is_distributed


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics cover the batch of every rank. (N, C) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = torch.tensor([float(x.shape[0])], device=x.device)
        stats = all_reduce_sum_with_grad(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)  # unbiased
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm in ``module`` use global-batch statistics under torch.distributed:
    torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm1d` elsewhere. Weights are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            # The same Parameter objects, as torch's convert_sync_batchnorm does: a frozen
            # BatchNorm (a momentum branch's) stays frozen, and optimizers built earlier still hold them.
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
