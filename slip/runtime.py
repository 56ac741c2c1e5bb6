"""Where and how a job runs, decided once for pre-training, fine-tuning and evaluation.

:func:`start` picks the device (``cuda:LOCAL_RANK`` under torchrun, wrapping around the visible
GPUs, so two processes can share one GPU in tests), joins the process group torchrun
describes (:mod:`slip.distributed`), resolves the precision and returns a :class:`Runtime`
that makes autocast contexts, moves batches and wraps models in DDP. Device-specific branches
(CUDA) live here and in :mod:`slip.distributed`; the training loops stay device-neutral.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as D

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def pick_device(name: str | None = None, local_rank: int | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``; None or ``auto``: CUDA when available). A CUDA
    device without an index is ``cuda:LOCAL_RANK`` modulo the visible GPUs."""
    local_rank = D.env_local_rank() if local_rank is None else local_rank
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs that support it, else fp32; fp16 needs CUDA."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {'|'.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (its loss scaling is CUDA's); use bf16 or fp32 on CPU")
    return name


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (torch's CUDA ones too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def host_to_device(data, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (a host tensor, or numbers as ``torch.tensor`` takes them) on ``device`` without
    making the host wait for the device. On CUDA a copy from pageable memory -- what
    ``torch.tensor(..., device="cuda")`` and a plain ``.to("cuda")`` do -- first synchronises
    the stream; here the data goes through pinned memory with ``non_blocking`` (the caching host
    allocator keeps the pinned buffer until the copy has run). Elsewhere an ordinary copy."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if not isinstance(data, torch.Tensor):
        if not cuda:  # the common CPU case, as cheap as torch.tensor (per-sample augmentation calls it)
            return torch.tensor(data, dtype=dtype, device=device)
        data = torch.tensor(data, dtype=dtype)
    t = data if dtype is None else data.to(dtype)
    if cuda and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device is None else t.to(device)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch dict with its tensors (and lists of tensors) on ``device``; the rest as is."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job and how it computes."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str  # resolved: bf16 | fp16 | fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.precision]

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs its loss scaled (GradScaler); bf16 and fp32 do not."""
        return self.precision == "fp16"

    def autocast(self):
        """The mixed-precision context of the forward pass (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    def ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when there are several ranks, else itself.

        Buffers are broadcast from rank 0 once, when the model is wrapped, and not before every
        forward (torch >= 2.13's ``forward_sync_buffers=False``; older torch keeps broadcasting):
        slip keeps its buffers the same on every rank by construction (update counts, queues
        filled from keys gathered over ranks, synchronised BatchNorm's statistics, a tokenizer's
        codebook), or rank-local on purpose (MoCo v2's shuffled-BatchNorm key encoder, whose
        statistics no training step reads and whose rank-0 copy is saved). Broadcasting them at
        every forward would send MoCo v2's 32 MiB queue and BEiT's k-means codebook each step."""
        if self.world == 1:
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        keep = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else {}
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       **keep)

    def peak_memory_gib(self) -> float:
        """Peak CUDA memory allocated on a GPU; the process's peak resident size on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def start(device: str | None = None, precision: str = "auto") -> Runtime:
    """Pick the device, join torchrun's process group (if any) and resolve the precision.

    Raises ValueError naming the setting when the device or precision cannot be had.
    """
    D.adopt_launcher_env()  # srun: torchrun's variables from SLURM's
    local_rank = D.env_local_rank()
    dev = pick_device(device, local_rank)
    resolved = resolve_precision(precision, dev)  # before the group exists: a bad value fails fast
    rank, world = D.init_from_env(dev)
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=dev, precision=resolved)


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite losses); the message says why."""

    exit_code = 1


PREEMPTED_EXIT = 3  # the exit code of a run stopped by a signal after writing its checkpoint


class Preempted(RunStopped):
    """The run was asked to stop (SIGUSR1 / SIGTERM: a scheduler's notice) and wrote a checkpoint
    first; rerunning the same command resumes from it."""

    exit_code = PREEMPTED_EXIT


class StopSignals:
    """While active, SIGUSR1 and SIGTERM (what SLURM sends before a time limit or preemption, and
    torchrun forwards when it is stopped) do not kill the process: they are recorded, and the
    training loop stops at its next step boundary after writing a checkpoint. A second signal of
    the same kind while stopping is recorded too (the loop is already on its way out). Handlers
    can only be installed from the main thread; elsewhere this does nothing."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning("received %s: stopping after this step, with a checkpoint", self.received)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class NonFiniteGuard:
    """One behaviour for non-finite losses in every training loop: the step's update is
    skipped (every rank decides together, or DDP ranks would diverge); ``limit`` of them in a
    row stop the run with :class:`RunStopped` (or ``error``, a subclass) saying what is intact.
    """

    def __init__(self, limit: int, where: str, error: type[RunStopped] = RunStopped,
                 setting: str = "the limit") -> None:
        self.limit, self.where, self.error, self.setting = limit, where, error, setting
        self.in_a_row = 0
        self.skipped = 0

    def update_allowed(self, loss: torch.Tensor, step: int) -> bool:
        """Whether ``loss`` is finite on every rank (a collective: every rank must call it)."""
        return self.record(D.all_ranks_true(torch.isfinite(loss.detach())), step)

    def update_allowed_and_go_on(self, loss: torch.Tensor, step: int, stop: "StopSignals") -> tuple[bool, bool]:
        """(:meth:`update_allowed`, whether no rank received a stop signal), in one collective:
        every rank learns of a signal any rank received at the same step."""
        flags = torch.stack([torch.isfinite(loss.detach()).float(),
                             torch.tensor(float(stop.received is None), device=loss.device)])
        finite, go_on = D.all_ranks_true_each(flags)
        return self.record(finite, step), go_on

    def record(self, finite_everywhere: bool, step: int) -> bool:
        """Count a step whose finiteness over all ranks is already known; whether to update."""
        if finite_everywhere:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        logger.warning("step %d: non-finite loss, update skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise self.error(
                f"stopped at step {step}: {self.in_a_row} non-finite losses in a row ({self.setting}={self.limit}); the last "
                f"checkpoint in {self.where} is intact. Lower the learning rate or use bf16/fp32 precision.")
        return False

    def state_dict(self) -> dict:
        return {"skipped_updates": self.skipped, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped_updates", 0))
        self.in_a_row = int(state.get("nonfinite_in_a_row", 0))


def configure_logging(rank: int | None = None) -> None:
    """Console logging for a job's processes: rank 0 logs from INFO up; the other ranks log
    warnings and errors only, each line naming its rank. ``rank`` defaults to torchrun's RANK."""
    if rank is None:
        D.adopt_launcher_env()  # srun: the rank is SLURM's
        rank = int(os.environ.get("RANK", "0"))
    who = "" if rank == 0 else f"[rank {rank}] "
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s")
