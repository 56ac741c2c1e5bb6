"""The one exception type for a sample that cannot be used, shared by shard writing and loading."""
from __future__ import annotations


class SampleSkip(Exception):
    """A sample cannot be used; ``reason`` is a short counter key, ``detail`` a human note."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
