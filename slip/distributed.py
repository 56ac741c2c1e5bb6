"""Every ``torch.distributed`` call of slip: process-group start and the collectives.

No other module calls a collective (a test enforces it). Each helper is a no-op (or the
obvious value) in a single process, and each puts its tensors where the process group's
backend can take them (:func:`collective_device`): NCCL takes CUDA tensors only, so a
bookkeeping tensor built on the CPU is moved to the GPU for the collective and its result
copied back. On GPUs the group is started as ``cpu:gloo,cuda:nccl`` (gloo for CPU tensors,
NCCL for CUDA ones), so CPU-side bookkeeping needs no GPU round trip at all.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist

# Set to choose the process-group backend instead of the default (e.g. ``gloo`` to run two
# processes on one GPU, where NCCL refuses to share a device).
BACKEND_ENV = "SLIP_DIST_BACKEND"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _several() -> bool:
    return is_distributed() and get_world_size() > 1


# --- starting the process group -------------------------------------------------------------


def default_backend(device: torch.device) -> str:
    """The backend a job on ``device`` starts its group with (``SLIP_DIST_BACKEND`` overrides)."""
    if os.environ.get(BACKEND_ENV):
        return os.environ[BACKEND_ENV]
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[01-04,07],cpu3`` -> ``gpu01``."""
    found = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not found:
        raise ValueError(f"SLURM node list {nodelist!r}: no host in it")
    prefix, ranges = found.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


SLURM_PORT_BASE = 15000  # the rendezvous port under srun: base + job id mod 20000, unless MASTER_PORT is set


def launcher_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a process
    that srun started: derived from SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
    SLURM_LOCALID, the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) and a port from
    SLURM_JOB_ID. Empty when torchrun's variables are there (they take precedence) or when the
    process is not one of several SLURM tasks."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return {}
    world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is")
    port = environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist), "MASTER_PORT": port}


def adopt_launcher_env() -> None:
    """Under srun, set torchrun's variables from SLURM's (see :func:`launcher_env`), so that
    everything reading RANK / WORLD_SIZE / LOCAL_RANK (the process group, the data loader's
    rank split) sees the same job as under torchrun."""
    os.environ.update(launcher_env())


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT); nothing to join when WORLD_SIZE is absent or 1.

    ``device`` is this process's device: a CUDA device is made current before the group
    exists (NCCL binds to it). Returns (rank, world_size).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(default_backend(device))
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
                raise
            from .errors import UserError

            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UserError(f"MASTER_ADDR:MASTER_PORT {where}: the port is already in use (another job?); "
                            "choose a free one, e.g. torchrun --master-port PORT or --rdzv-endpoint HOST:PORT") from None
    return get_rank(), get_world_size()


def shutdown() -> None:
    """Leave the process group (at the end of a command that joined it)."""
    if is_distributed():
        dist.destroy_process_group()


# --- where collective tensors live --------------------------------------------------------


def backend_device_types(config: str) -> set[str]:
    """Device types a backend configuration takes tensors of: ``"cpu:gloo,cuda:nccl"`` ->
    {cpu, cuda}; a bare name is NCCL's {cuda} or, for gloo and MPI, {cpu, cuda}."""
    types: set[str] = set()
    for part in config.split(","):
        part = part.strip()
        if ":" in part:
            types.add(part.split(":", 1)[0])
        elif part == "nccl":
            types.add("cuda")
        elif part:
            types.update(("cpu", "cuda"))
    return types


def collective_device(device: torch.device, config: str, cuda_index: int = 0) -> torch.device:
    """Where a tensor on ``device`` must be for a collective of a group with backend ``config``:
    where it is if the backend takes that device type, else the current CUDA device (a CPU
    tensor under NCCL), else the CPU."""
    types = backend_device_types(config)
    if device.type in types:
        return device
    if "cuda" in types:
        return torch.device("cuda", cuda_index)
    return torch.device("cpu")


def _place(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the device the running group's backend takes (itself when it already is)."""
    cuda_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return t.to(collective_device(t.device, dist.get_backend_config(), cuda_index))


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over ranks in place (``op``: sum, min, max, mean) and return it."""
    if not _several():
        return t
    placed = _place(t)
    dist.all_reduce(placed, op=getattr(dist.ReduceOp, _OPS.get(op, "SUM")))
    if op == "mean":
        placed /= get_world_size()
    if placed is not t:
        t.copy_(placed)
    return t


def all_ranks_true(flag: torch.Tensor) -> bool:
    """Whether a boolean (or 0/1) tensor is true on every rank; one collective, one sync."""
    return all_ranks_true_each(flag)[0]


def all_ranks_true_each(flags: torch.Tensor) -> list[bool]:
    """For each of several boolean (or 0/1) flags, whether it is true on every rank; one
    collective and one host read for all of them."""
    return [v >= 1 for v in all_reduce_(flags.detach().float().reshape(-1).clone(), op="min").tolist()]


@torch.no_grad()
def global_sum(value: float | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The sum of a (count-like) value over ranks, as a float64 tensor without gradient on
    ``device`` (default: the value's device, the CPU for a Python number)."""
    if isinstance(value, torch.Tensor):
        return all_reduce_(value.detach().to(device or value.device, torch.float64).clone())
    # a Python number: filled on the device (torch.as_tensor would copy it from the host, a sync on CUDA)
    return all_reduce_(torch.full((), float(value), dtype=torch.float64, device=device))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each named number (e.g. each rank's loss over its own rows ->
    the global-batch loss), in one collective."""
    if not _several() or not values:
        return dict(values)
    t = all_reduce_(torch.tensor([float(v) for v in values.values()], dtype=torch.float64), op="mean")
    return dict(zip(values, t.tolist()))


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place, in one flat collective (gradient sync by hand)."""
    if not _several() or not tensors:
        return
    flat = all_reduce_(torch.cat([t.reshape(-1) for t in tensors]), op="mean")
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --- differentiable collectives -----------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own slice.

    Every rank computes a loss over the gathered batch, so a rank's slice receives gradient
    from every rank's loss: backward sums the incoming gradients over ranks (all_reduce) and
    keeps the local rows. all_reduce is used rather than reduce_scatter so gloo works too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        placed = _place(x.contiguous())
        parts = [torch.empty_like(placed) for _ in range(get_world_size())]
        dist.all_gather(parts, placed)
        return torch.cat(parts).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = all_reduce_(grad.contiguous().clone())
        start = get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, differentiable.

    All ranks must pass the same local batch size.
    """
    if not _several():
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's output depends on every input, so backward sums too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(grad.clone())


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over ranks; ``x`` itself in a single process."""
    if not _several():
        return x
    return _AllReduceSumWithGrad.apply(x)


# --- modules and objects --------------------------------------------------------------------


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (what DDP does at construction)."""
    if not _several():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            placed = _place(t.data)
            dist.broadcast(placed, src)
            if placed is not t.data:
                t.data.copy_(placed)


def barrier() -> None:
    if _several():
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process. (torch puts the
    pickled bytes on the backend's device itself.)"""
    if not _several():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, WITHOUT gradient: the result is
    a constant for autograd, this rank's own rows included (SLIP's ``utils.all_gather_batch``).

    In a single process ``x`` itself is returned, gradient and all, as SLIP's helper does.
    All ranks must pass the same local batch size.
    """
    if not _several():
        return x
    with torch.no_grad():
        placed = _place(x.detach().contiguous())
        parts = [torch.empty_like(placed) for _ in range(get_world_size())]
        dist.all_gather(parts, placed)
        return torch.cat(parts).to(x.device)
