"""Run training jobs one after another in this process (under torchrun: on every rank) and
record, at each optimizer step, the gradients the optimizer is about to apply and, on request,
the batches the data loader handed out.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/record_training.py JOBS.json

``JOBS.json`` is a list of ``{"config": YAML path or null, "overrides": ["key=value", ...],
"out": directory or null, "batches": bool}``. Each job builds ``slip.train.trainer.Trainer``
from its config, runs it, and (with an ``out``) writes ``out/rank{R}.pt`` (read it with
:func:`load`): ``world``; ``grads`` (rank 0 only, [] elsewhere), one ``{name: gradient}`` per
optimizer step; ``fingerprints``, per step ``{name: (sum, norm)}`` in float64 on every rank
(equal gradients on all ranks give equal fingerprints); ``batches`` (with ``"batches": true``),
the loader's batches on this rank in the order it handed them out.

Tests import :func:`recording` and :func:`replaying` to do the same in their own process, and
to feed a one-process trainer the global batches a multi-rank run read.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


@contextlib.contextmanager
def _patched_iter(fn):
    # On the class: whichever object of the trainer holds the loader, iterating it goes here.
    from slip.data.pipeline import SlipLoader

    real = SlipLoader.__iter__
    SlipLoader.__iter__ = lambda self: fn(self, real)
    try:
        yield
    finally:
        SlipLoader.__iter__ = real


class Recording:
    def __init__(self, full_grads: bool):
        self.full_grads = full_grads
        self.grads: list[dict[str, torch.Tensor]] = []
        self.fingerprints: list[dict[str, tuple[float, float]]] = []
        self.batches: list[dict] = []


@contextlib.contextmanager
def recording(trainer, *, full_grads: bool = True, batches: bool = False):
    """While active, every ``trainer.optimizer.step`` records the parameters' gradients first
    (as the optimizer sees them), and with ``batches`` every batch the loader yields."""
    rec = Recording(full_grads)
    model = trainer.model

    def before_step(optimizer, args, kwargs):
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        rec.fingerprints.append({n: (g.double().sum().item(), g.double().norm().item()) for n, g in grads.items()})
        if rec.full_grads:
            rec.grads.append(grads)

    def record_batches(loader, real_iter):
        for batch in real_iter(loader):
            rec.batches.append({k: _clone(v) for k, v in batch.items()})
            yield batch

    handle = trainer.optimizer.register_step_pre_hook(before_step)
    try:
        with (_patched_iter(record_batches) if batches else contextlib.nullcontext()):
            yield rec
    finally:
        handle.remove()


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Token batches are cut after their last end-of-text token, so ranks' widths can differ:
    # pad with the padding token (0) to the widest, as one batch of all the rows would be cut.
    width = max(t.shape[-1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tensors])


def global_batches(per_rank: list[list[dict]]) -> list[dict]:
    """Step by step, the ranks' batches concatenated in rank order (the global batch)."""
    out = []
    for parts in zip(*per_rank):
        batch = {}
        for key, first in parts[0].items():
            if isinstance(first, torch.Tensor):
                batch[key] = _cat([p[key] for p in parts]) if key == "text" else torch.cat([p[key] for p in parts])
            elif isinstance(first, list) and first and isinstance(first[0], torch.Tensor):
                batch[key] = [torch.cat([p[key][i] for p in parts]) for i in range(len(first))]
            else:
                batch[key] = [x for p in parts for x in p[key]]
        out.append(batch)
    return out


@contextlib.contextmanager
def replaying(batches: list[dict]):
    """Every loader yields ``batches`` instead of reading its shards, continuing across
    iterations (epochs) where the previous one stopped."""
    remaining = iter(batches)

    def replay(loader, real_iter):
        yield from remaining

    with _patched_iter(replay):
        yield


def _compact(g: torch.Tensor):
    # The token embedding's gradient is zero outside the batch's tokens: keep the other rows.
    if g.dim() >= 2:
        rows = g.flatten(1).any(dim=1).nonzero().flatten()
        if rows.numel() < g.shape[0] // 2:
            return {"rows": rows, "values": g[rows], "shape": list(g.shape)}
    return g


def _expand(g) -> torch.Tensor:
    if isinstance(g, dict):
        return torch.zeros(g["shape"], dtype=g["values"].dtype).index_copy_(0, g["rows"], g["values"])
    return g


def load(path) -> dict:
    """A record :func:`run_job` wrote, with full gradient tensors."""
    record = torch.load(path, weights_only=True)
    record["grads"] = [{n: _expand(g) for n, g in step.items()} for step in record["grads"]]
    return record


def run_job(job: dict) -> None:
    from slip.distributed import get_rank, get_world_size
    from slip.train.config import load_config
    from slip.train.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(load_config(job.get("config"), job["overrides"]))
    rank = get_rank()
    with recording(trainer, full_grads=rank == 0, batches=job.get("batches", False)) as rec:
        trainer.run()
    if job.get("out"):
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        grads = [{n: _compact(g) for n, g in step.items()} for step in rec.grads]
        torch.save({"world": get_world_size(), "grads": grads, "fingerprints": rec.fingerprints,
                    "batches": rec.batches}, out / f"rank{rank}.pt")
    if rank == 0:
        print(f"record_training: job done in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    for job in json.loads(Path(argv[0]).read_text()):
        run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
