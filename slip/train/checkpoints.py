"""Training checkpoints: periodic, atomic, the last K kept, and automatic resume.

A checkpoint is a project checkpoint (``slip.load_pretrained`` opens it) whose extra entries
hold the training state: optimizer, loss scaler, step, epoch, the resolved config, and per
rank the RNG states and the data loader's position. Every entry is a tensor or a plain
container, so ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class CheckpointManager:
    """``output_dir/checkpoints/step-XXXXXXXX.pt``, newest last."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def path_for(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.pt"

    def save(self, model, step: int, /, **state) -> Path:
        """Write atomically (a kill mid-save leaves the previous checkpoints intact), then prune."""
        path = self.path_for(step)
        self._write(model, path, step=step, **state)
        logger.info("checkpoint written: %s", path)
        for old in self.paths()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def _write(self, model, path: Path, /, **state) -> None:
        save_checkpoint(model, path, **state)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of saves that were killed midway (never valid checkpoints)."""
        if self.dir.is_dir():
            for p in self.dir.glob(".step-*.tmp"):
                p.unlink(missing_ok=True)

    def latest(self):
        """The newest checkpoint that opens, as a LoadedCheckpoint, or None. A damaged newest
        file (it should not happen with atomic saves, but disks fail) falls back to the previous."""
        for path in reversed(self.paths()):
            try:
                return read_checkpoint(path), path
            except CheckpointError as e:
                logger.warning("skipping unreadable checkpoint: %s", e)
        return None
