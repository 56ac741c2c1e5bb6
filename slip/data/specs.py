"""Shard specs: which tar shards a training run reads, with mixing weights (the grammar is in
:mod:`slip.data.pipeline`'s docstring), and how their samples are numbered by the shards'
``index.json`` (:class:`SampleIndex`; "Sample indices" in the same docstring)."""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import braceexpand

from slip.data.shards import (
    INDEX_NAME,
    ShardIndexError,
    load_index,
    shard_sample_counts,
)
from slip.errors import UserError

SpecLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, tuple[Union[str, os.PathLike], float]]]]


class ShardSpecError(UserError, ValueError):
    """A shard spec that names no readable shards (or a malformed one); the message names it."""


class SampleIndexError(UserError, ValueError):
    """Global sample indices were asked for where a source has no ``index.json`` with sample
    counts; the message names the source and the index it lacks."""


@dataclass(frozen=True)
class SourceIndex:
    """How a source's samples are numbered by its shards' ``index.json``.

    Attributes:
        path: the index file.
        shards: ``(url, first, samples)`` for each of the source's shard URLs, as the source
            lists them: ``first`` is the number of samples the index lists before that shard,
            ``samples`` the shard's own count.
        total: the samples the index lists over all its shards: the source's share of the
            global numbering (a brace pattern naming some of the index's shards still spans
            the whole index, so its samples keep the corpus's numbers).
    """

    path: str
    shards: tuple[tuple[str, int, int], ...]
    total: int


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
        index: the numbering of the source's samples by its ``index.json``, or None (then
            ``unindexed`` says why).
        unindexed: why the source has no ``index``, naming the index it lacks (empty when it has one).
    """

    urls: tuple[str, ...]
    weight: float = 1.0
    corpus: str | None = None
    num_samples: int | None = None
    name: str = ""
    captions: bool = True
    index: SourceIndex | None = None
    unindexed: str = ""


@dataclass(frozen=True)
class SampleIndex:
    """The global sample indices of a spec's sources: a sample's index is its source's offset
    plus the samples its source's index lists before its shard plus its ordinal in the shard
    (every sample group of the tar in file order, counted whether or not it is later skipped).

    Attributes:
        sources: each source's :class:`SourceIndex`, in the spec's order.
        offsets: the first index of each source: the totals of the sources before it.
        size: the number of indices, the totals of all sources: every index lies in
            ``range(size)`` (a memory bank of one row per sample has this many rows).
    """

    sources: tuple[SourceIndex, ...]
    offsets: tuple[int, ...]
    size: int

    def spans(self, source: int) -> dict[str, tuple[int, int]]:
        """Shard URL -> (global index of its first sample, its sample count) for source number ``source``."""
        offset = self.offsets[source]
        return {url: (offset + first, count) for url, first, count in self.sources[source].shards}


def sample_index(sources: Sequence[ShardSource]) -> SampleIndex | None:
    """The global numbering of the samples of ``sources`` (as :func:`parse_shard_spec` gives
    them), or None when one of them has no index (see :func:`require_sample_index`)."""
    if not sources or any(s.index is None for s in sources):
        return None
    indices = tuple(s.index for s in sources if s.index is not None)
    offsets, total = [], 0
    for index in indices:
        offsets.append(total)
        total += index.total
    return SampleIndex(indices, tuple(offsets), total)


def require_sample_index(sources: Sequence[ShardSource], who: str = "this run") -> SampleIndex:
    """:func:`sample_index`, or a :class:`SampleIndexError` naming each source without an index
    and why (``who`` is what needs the indices, e.g. a method's name)."""
    index = sample_index(sources)
    if index is None:
        missing = "; ".join(f"{s.name or ', '.join(s.urls[:1])}: {s.unindexed}" for s in sources if s.index is None)
        raise SampleIndexError(
            f"{who} needs each sample's global index (batch['index']), which is counted from the shards' "
            f"{INDEX_NAME} (written by slip make-shards, with each shard's sample count); without it: {missing}")
    return index


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


def _index_file(path: str) -> str:
    return os.path.join(path, INDEX_NAME) if os.path.isdir(path) else path


def _shard_url(base: str, shard: str) -> str:
    return shard if os.path.isabs(shard) or _is_remote(shard) else os.path.join(base, shard)


def _numbering(index: dict, index_path: str, base: str) -> tuple[dict[str, tuple[int, int]], int] | str:
    """Shard URL -> (samples the index lists before it, its samples), and the index's total; or
    why the index cannot number its samples."""
    try:
        counts = shard_sample_counts(index, index_path)
    except ShardIndexError as exc:
        return f"{exc}: its samples have no global index"
    spans, first, paths = {}, 0, set()
    for shard, count in counts:
        url = _shard_url(base, shard)
        path = url if _is_remote(url) else os.path.normpath(os.path.abspath(url))
        if path in paths:  # two names of one file: its samples would have two indices
            return f"{index_path}: lists shard {shard} twice: its samples have no global index"
        paths.add(path)
        spans[url] = (first, count)
        first += count
    return spans, first


def _source_from_index(path: str, weight: float, name: str) -> ShardSource:
    index = load_index(path)
    base = path if os.path.isdir(path) else os.path.dirname(path)
    urls = [_shard_url(base, entry["name"] if isinstance(entry, dict) else str(entry)) for entry in index["shards"]]
    if not urls:
        raise ShardSpecError(f"{path}: the index lists no shards")
    total = index.get("total_samples")
    numbering = _numbering(index, _index_file(path), base)
    source_index, unindexed = None, ""
    if isinstance(numbering, str):
        unindexed = numbering
    else:
        spans, count = numbering
        source_index = SourceIndex(_index_file(path), tuple((u, *spans[u]) for u in urls), count)
    return ShardSource(tuple(urls), weight, index.get("corpus"), int(total) if total is not None else None, name,
                       captions=index.get("captions", True) is not False, index=source_index, unindexed=unindexed)


def _pattern_index(urls: Sequence[str]) -> tuple[SourceIndex | None, str]:
    """The numbering of a brace pattern's shards by the index.json of the folder holding them
    all, when it lists every one of them; else (None, why not)."""
    if any(_is_remote(u) for u in urls):
        return None, (f"a pattern of remote shards has no {INDEX_NAME}: list them in one (shard names may be "
                      f"URLs) and give that file as the spec")
    folders = {os.path.dirname(os.path.abspath(u)) for u in urls}
    if len(folders) != 1:
        return None, f"its shards lie in {len(folders)} folders: no one {INDEX_NAME} covers them"
    folder = folders.pop()
    index_path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(index_path):
        return None, f"no {index_path}"
    try:
        numbering = _numbering(load_index(index_path), index_path, folder)
    except (ShardIndexError, OSError) as exc:
        return None, f"{exc}: its samples have no global index"
    if isinstance(numbering, str):
        return None, numbering
    spans, total = numbering
    by_path = {os.path.normpath(os.path.abspath(u)): span for u, span in spans.items()}
    missing = [u for u in urls if os.path.normpath(os.path.abspath(u)) not in by_path]
    if missing:
        return None, f"{index_path} does not list {missing[0]}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
    return SourceIndex(index_path, tuple((u, *by_path[os.path.normpath(os.path.abspath(u))]) for u in urls), total), ""


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
        return ShardSource(tuple(urls), weight, None, None, text, unindexed=f"no {os.path.join(path, INDEX_NAME)}")
    if path.endswith(".json") and os.path.isfile(path):
        return _source_from_index(path, weight, text)
    urls = list(braceexpand.braceexpand(path))
    local = [u for u in urls if not _is_remote(u)]
    if local and not any(os.path.exists(u) for u in local):
        raise FileNotFoundError(f"shard spec {text!r}: none of its {len(urls)} shards exist")
    index, unindexed = _pattern_index(urls)
    return ShardSource(tuple(urls), weight, None, None, text, index=index, unindexed=unindexed)


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


