"""Training logs: JSON lines and TensorBoard on rank 0, and a console display that is a live
progress line on a terminal and plain periodic lines otherwise (CI, log files)."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger("slip.train")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricLogger:
    """Writes each record to ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

    Only the main process should build one with ``enabled=True``; the others log nothing.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 stream: IO[str] | None = None, total_steps: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSON lines carry the same data
                logger.warning("tensorboard is not installed, so no TensorBoard logs are written (metrics.jsonl "
                               "holds the same figures): pip install 'slip[tensorboard]'")
            else:
                self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict, step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3),
                  **{k: v for k, v in record.items() if v is not None}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._print(record, step, kind)

    def _print(self, record: dict, step: int, kind: str) -> None:
        shown = {k: v for k, v in record.items() if k not in ("kind", "step", "time")}
        parts = [f"{k} {_fmt(v)}" for k, v in shown.items()]
        total = f"/{self.total_steps}" if self.total_steps else ""
        line = f"[{kind}] step {step}{total}  " + "  ".join(parts)
        if self.live and kind == "train":
            width = 200
            self.stream.write("\r" + line[:width].ljust(width))
        else:
            if self.live:
                self.stream.write("\n")
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line for people (start, resume, stop reasons), on the console only."""
        if self.enabled:
            self.stream.write(("\n" if self.live else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self.live:
            self.stream.write("\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)
