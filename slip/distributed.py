"""Distributed helpers; each is a no-op (or the obvious value) in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own slice.

    Every rank computes a loss over the gathered batch, so a rank's slice receives gradient
    from every rank's loss: backward sums the incoming gradients over ranks (all_reduce) and
    keeps the local rows. all_reduce is used rather than reduce_scatter so gloo works too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        x = x.contiguous()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, differentiable.

    All ranks must pass the same local batch size.
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
