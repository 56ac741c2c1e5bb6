"""Shard specs: which tar shards a training run reads, with mixing weights (the grammar is in
:mod:`slip.data.pipeline`'s docstring)."""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import braceexpand

from slip.data.shards import INDEX_NAME, load_index
from slip.errors import UserError

SpecLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, tuple[Union[str, os.PathLike], float]]]]


class ShardSpecError(UserError, ValueError):
    """A shard spec that names no readable shards (or a malformed one); the message names it."""


@dataclass(frozen=True)
class ShardSource:
    """One corpus of shards.

    Attributes:
        urls: shard paths or URLs, in the order given (sorted for directories).
        weight: relative mixing weight.
        corpus: corpus name from the index (``yfcc15m``, ``cc3m``, ...) or None.
        num_samples: total samples from the index, or None when unknown.
        name: the spec text this source came from.
        captions: False when the index says the corpus is image-only (``make-shards --no-captions``).
    """

    urls: tuple[str, ...]
    weight: float = 1.0
    corpus: str | None = None
    num_samples: int | None = None
    name: str = ""
    captions: bool = True


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside braces (brace patterns use commas for alternatives)."""
    parts, depth, current = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _split_weight(part: str) -> tuple[str, float]:
    if "::" in part:
        head, _, tail = part.rpartition("::")
        try:
            weight = float(tail)
        except ValueError:
            return part, 1.0  # "::" belongs to the source (webdataset URL lists), no weight
        return head, weight
    return part, 1.0


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _source_from_index(path: str, weight: float, name: str) -> ShardSource:
    index = load_index(path)
    base = path if os.path.isdir(path) else os.path.dirname(path)
    urls = []
    for entry in index["shards"]:
        shard = entry["name"] if isinstance(entry, dict) else str(entry)
        urls.append(shard if os.path.isabs(shard) or _is_remote(shard) else os.path.join(base, shard))
    if not urls:
        raise ShardSpecError(f"{path}: the index lists no shards")
    total = index.get("total_samples")
    return ShardSource(tuple(urls), weight, index.get("corpus"), int(total) if total is not None else None, name,
                       captions=index.get("captions", True) is not False)


def _resolve_source(text: str, weight: float) -> ShardSource:
    if not weight > 0 or not math.isfinite(weight):
        raise ShardSpecError(f"shard spec {text!r}: weight must be a positive number, got {weight}")
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX_NAME)):
            return _source_from_index(path, weight, text)
        urls = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not urls:
            raise ShardSpecError(f"shard spec {text!r}: directory holds no index.json and no .tar files")
        return ShardSource(tuple(urls), weight, None, None, text)
    if path.endswith(".json") and os.path.isfile(path):
        return _source_from_index(path, weight, text)
    urls = list(braceexpand.braceexpand(path))
    local = [u for u in urls if not _is_remote(u)]
    if local and not any(os.path.exists(u) for u in local):
        raise FileNotFoundError(f"shard spec {text!r}: none of its {len(urls)} shards exist")
    return ShardSource(tuple(urls), weight, None, None, text)


def parse_shard_spec(spec: SpecLike) -> list[ShardSource]:
    """Resolve a shard spec (see the module docstring) into weighted sources.

    Raises:
        ValueError: malformed spec, non-positive weight, empty directory or bad index.
        FileNotFoundError: a local pattern matches no existing file.
    """
    items: list[tuple[str, float]] = []
    if isinstance(spec, (str, os.PathLike)):
        for part in _split_top_level(os.fspath(spec)):
            items.append(_split_weight(part))
    else:
        for entry in spec:
            if isinstance(entry, tuple):
                text, weight = entry
                items.append((os.fspath(text), float(weight)))
            else:
                items.append(_split_weight(os.fspath(entry)))
    if not items:
        raise ShardSpecError(f"empty shard spec {spec!r}")
    return [_resolve_source(text, weight) for text, weight in items]


