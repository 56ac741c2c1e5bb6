"""Reading webdataset tar shards with the byte offset of every sample, so that a stream can be
restored by seeking instead of re-reading what came before.

A shard is a tar archive whose members are grouped into samples by their name up to the first
dot (``0001.jpg`` + ``0001.txt`` -> sample ``0001``), as webdataset groups them. Tar members
start at 512-byte boundaries; :class:`ReadShards` records where each sample's first member
header lies (``__offset__``) and, while it reads, where the next sample begins. Both are byte
offsets into the shard, valid when the shard was opened as a seekable, uncompressed file (local
paths, ``file://`` URLs, any webdataset opener that returns a seekable stream); for ``pipe:``
or HTTP streams and compressed tars they are None and a resumed stream must be re-read from the
start of its epoch (:class:`slip.data.pipeline.SlipLoader` does that, and logs why).

Each sample also carries its ordinal in its shard (``__ordinal__``: the number of sample groups
before it in the tar, in file order, whatever becomes of them later) and, when the reader is
given the shards' numbering from their ``index.json``, its global index (``__index__``: the
global index of the shard's first sample plus the ordinal; see "Sample indices" in
:mod:`slip.data.pipeline`).
"""
from __future__ import annotations

import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger(__name__)

# Members webdataset skips: "__name__" at the top level and anything under a "__x__" prefix.
_META = re.compile(r"__[^/]*__($|/)")

# A ReadShards position's "next" when the current shard has been read to its end (or none begun).
SHARD_DONE = -1


def open_shard(url: str) -> BinaryIO:
    """Open a shard URL for reading as webdataset does (local paths, ``file://``, ``pipe:``,
    ``http(s)://`` and its other schemes)."""
    return gopen(url, "rb")


def _member_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a member webdataset would read, else None."""
    name = info.name
    if not info.isreg() or not name:
        return None
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    prefix, suffix = base_plus_ext(name)
    if prefix is None:
        return None
    return prefix, suffix.lower()


class ReadShards:
    """Pipeline stage: ``{"url": ...}`` shard dicts -> raw samples (``__key__``, ``__url__``,
    ``__offset__``, ``__ordinal__``, ``__index__`` when numbered, and one entry per member
    extension, as webdataset's tar reading gives them).

    Errors are reported to ``handler`` (a callable taking the exception) once per shard: a
    shard that cannot be opened, or whose reading fails, ends there (samples read before the
    failure are kept); a member whose extension repeats within a sample is reported and
    dropped. Samples never span shards.

    Numbering: ``index`` maps each shard URL to (global index of its first sample, its sample
    count) as its ``index.json`` says (:meth:`slip.data.specs.SampleIndex.spans`); each sample
    then gets ``__index__`` = first + its ordinal in the shard. A shard holding more samples than
    its count ends at its count, reported to ``handler`` once (the samples past it would take the
    next shard's indices): the index is stale, rebuild it. A shard holding fewer leaves unused
    indices. Without ``index`` samples carry no ``__index__``.

    State: :meth:`state` is where the stage stands after the sample it yielded last, as plain
    types: how many shards of this pass it has begun, the current shard's URL, the byte
    offset where its next sample begins (``SHARD_DONE`` once read to its end, None when the
    shard cannot be read from an offset) and that sample's ordinal in the shard. Set
    :attr:`restore` to such a state before the stage's next pass and it skips the shards before
    that one without opening them and continues the current shard from that offset, counting
    ordinals on from the saved one (a state without one, from an older slip, leaves the rest of
    that shard's ordinals unknown: None, and no ``__index__``; a numbered pipeline replays such
    a state instead, see :class:`slip.data.pipeline.SlipLoader`).
    """

    def __init__(self, handler: Callable[[BaseException], Any], index: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.handler = handler
        self.index = index
        self.restore: dict[str, Any] | None = None
        self.shards, self.url, self.next = 0, None, SHARD_DONE
        self.ordinal: int | None = 0

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "url": self.url, "next": self.next, "ordinal": self.ordinal}

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # The state is reset when the pass begins, not when its first sample is asked for: a
        # source of a mixture may not be read for a while, and its state must not be the last pass's.
        restore, self.restore = self.restore, None
        self.shards, self.url, self.next, self.ordinal = 0, None, SHARD_DONE, 0
        return self._samples(iter(src), restore)

    def _samples(self, shards: Iterator[dict[str, Any]], restore: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        if restore is not None and restore["shards"] > 0:
            for _ in range(restore["shards"] - 1):  # shards finished before the checkpoint
                if next(shards, None) is None:
                    return
            current = next(shards, None)
            if current is None:
                return
            self.shards, self.url = restore["shards"], current["url"]
            offset, ordinal = restore["next"], restore.get("ordinal")
            if current["url"] != restore["url"]:
                logger.warning("resume position names shard %s where this epoch's shard list has %s (the corpus "
                               "changed since the checkpoint?): reading %s from its start; batches differ from "
                               "an uninterrupted run", restore["url"], current["url"], current["url"])
                offset, ordinal = 0, 0
            if offset is not None and offset != SHARD_DONE:
                yield from self._read(current["url"], offset, None if ordinal is None else int(ordinal))
        for shard in shards:
            self.shards += 1
            self.url = shard["url"]
            yield from self._read(self.url, 0, 0)

    def _span(self, url: str) -> tuple[int, int] | None:
        if self.index is None:
            return None
        span = self.index.get(url)
        if span is None:  # the numbering is built from the very URLs the shard stages hand out
            raise KeyError(f"shard {url} is missing from the sample numbering of its source")
        return span

    def _read(self, url: str, offset: int, ordinal: int | None) -> Iterator[dict[str, Any]]:
        self.next, self.ordinal = offset, ordinal
        span = self._span(url)
        if span is not None and ordinal is None:
            raise ValueError(f"{url}: continuing at byte {offset} needs the ordinal of the sample there")
        try:
            stream = open_shard(url)
            if offset:
                stream.seek(offset)
        except Exception as exn:  # noqa: BLE001 -- reported and counted; the stream goes on
            self.next = SHARD_DONE
            self.handler(_with_url(exn, url))
            return
        error: BaseException | None = None
        current: dict[str, Any] | None = None
        try:
            addressable = bool(offset) or _seekable(stream)
            with tarfile.open(fileobj=stream, mode="r|" if offset else "r|*") as tar:
                if getattr(tar.fileobj, "comptype", "tar") != "tar":
                    addressable = False  # offsets would be into the decompressed stream
                if not addressable:
                    self.next = None
                for info in tar:
                    named = _member_key(info)
                    if named is None:
                        continue
                    key, ext = named
                    at = offset + info.offset if addressable else None
                    if current is not None and key != current["__key__"]:
                        if ordinal is not None:
                            ordinal += 1
                        self.next, self.ordinal = at, ordinal  # the next sample begins at this header
                        yield current
                        current = None
                    if current is None and span is not None and ordinal >= span[1]:
                        error = ValueError(
                            f"the shard holds more samples than its index.json says ({span[1]}): the samples from "
                            f"{key!r} (number {ordinal + 1}) on are dropped, their sample indices would be the next "
                            f"shard's; rebuild the index (slip make-shards)")
                        break
                    data = tar.extractfile(info).read()
                    tar.members = []  # the stream reader would otherwise keep every header
                    if current is None:
                        current = {"__key__": key, "__url__": url, "__offset__": at, "__ordinal__": ordinal}
                        if span is not None:
                            current["__index__"] = span[0] + ordinal
                    if ext in current:
                        self.handler(ValueError(f"{info.name}: duplicate file name in tar file @ {url}"))
                        continue
                    current[ext] = data
        except Exception as exn:  # noqa: BLE001 -- the first read error ends the shard
            error = exn
        finally:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001 -- a pipe: command that failed says so here
                error = error or exn
        self.next = SHARD_DONE
        if error is not None:
            self.handler(_with_url(error, url))
        if current is not None:
            self.ordinal = None if ordinal is None else ordinal + 1
            yield current


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _with_url(exn: BaseException, url: str) -> BaseException:
    """Name the shard in the exception's message, as webdataset does (``... @ URL``)."""
    if exn.args and isinstance(exn.args[0], str):
        if url not in exn.args[0]:
            exn.args = (f"{exn.args[0]} @ {url}", *exn.args[1:])
    else:
        exn.args = (*exn.args, url)
    return exn


def read_sample(stream: BinaryIO, url: str, offset: int, key: str) -> dict[str, Any] | None:
    """The sample ``key`` whose first member header is at byte ``offset`` of the open shard
    ``stream`` (seekable, uncompressed), as :class:`ReadShards` yielded it; None when no member
    of that key starts there (the shard changed). A read error ends the sample where the first
    reading ended it; repeated extensions are dropped as they were then."""
    stream.seek(offset)
    sample: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                named = _member_key(info)
                if named is None:
                    continue
                if named[0] != key:
                    break
                data = tar.extractfile(info).read()
                tar.members = []
                if sample is None:
                    sample = {"__key__": key, "__url__": url, "__offset__": offset}
                sample.setdefault(named[1], data)
    except (tarfile.TarError, OSError, EOFError):
        pass  # the same error the first reading met (and reported); the sample ends here
    return sample


def fetch_samples(refs: Sequence[Sequence[Any]]) -> tuple[list[dict[str, Any] | None], dict[str, float]]:
    """Read the samples named by ``refs`` (``[url, offset, key, corpus, ordinal, index]`` each, as
    :meth:`slip.data.stages.SampleShuffle.state` lists them; the last two are absent from the
    states of an older slip and then left unset), opening each shard once and reading its samples
    in file order; returns them in the order of ``refs`` (None for a sample that can no longer be
    read where it was: its shard is gone or changed) and what it cost (``bytes`` read, ``shards``
    opened, ``seconds``)."""
    start = time.monotonic()
    by_url: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_url.setdefault(str(ref[0]), []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(refs)
    read = 0
    for url, indices in by_url.items():
        try:
            stream = open_shard(url)
        except OSError as exn:
            logger.warning("resume: cannot open %s to restore %d buffered samples: %s", url, len(indices), exn)
            continue
        with stream:
            for i in sorted(indices, key=lambda i: int(refs[i][1])):
                ref = refs[i]
                offset, key, corpus = int(ref[1]), str(ref[2]), ref[3]
                sample = read_sample(stream, url, offset, key)
                read += stream.tell() - offset
                if sample is not None:
                    sample["__corpus__"] = corpus
                    if len(ref) > 4:
                        sample["__ordinal__"] = ref[4]
                        if ref[5] is not None:
                            sample["__index__"] = int(ref[5])
                out[i] = sample
    return out, {"bytes": float(read), "shards": float(len(by_url)), "seconds": time.monotonic() - start}
