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

Seekable uncompressed shards are parsed here header by header (:class:`_TarMembers`: about 4x
less CPU per sample than Python's ``tarfile`` stream mode, which matters once decoding leaves
the workers), anything else by ``tarfile``.

Each sample also carries its ordinal in its shard (``__ordinal__``: the number of sample groups
before it in the tar, in file order, whatever becomes of them later) and, when the reader is
given the shards' numbering from their ``index.json``, its global index (``__index__``: the
global index of the shard's first sample plus the ordinal; see "Sample indices" in
:mod:`slip.data.pipeline`).
"""
from __future__ import annotations

import logging
import re
import struct
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


def _is_member(name: str, regular: bool) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a member named ``name`` that webdataset would
    read (a regular file, not a ``__meta__`` entry), else None."""
    if not regular or not name:
        return None
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    prefix, suffix = base_plus_ext(name)
    if prefix is None:
        return None
    return prefix, suffix.lower()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# Magic numbers of the compressions tarfile's "r|*" mode recognises (gzip, bzip2, xz, zstd).
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_CHECKSUM = struct.Struct("148B8x356B")
_CHECKSUM_SIGNED = struct.Struct("148b8x356b")
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old-style regular file, contiguous file
_EXTENDED = (b"L", b"K", b"x", b"g")  # GNU long name/link, pax header, pax global header


def _nts(field: bytes) -> str:
    """A NUL-terminated header string, decoded as tarfile decodes member names."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes, at: int) -> int:
    """A numeric header field: octal text, or base-256 when its first byte says so (GNU)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number {text!r} in the tar header at byte {at}") from None


class _TarMembers:
    """The members of an uncompressed tar, read straight from a seekable binary stream by
    parsing its 512-byte headers: ustar, GNU (long names, base-256 sizes) and pax (``path`` and
    ``size`` records), as Python's ``tarfile`` reads them, at a fraction of its cost per member.

    Iterating yields ``(name, regular, offset)``: the member's name, whether it is a regular
    file, and where its first header (a long-name or pax header, if it has one) lies, in bytes
    from where reading began. :meth:`data` reads the current member's bytes; members not read
    are skipped. A header that is cut short or fails its checksum, a bad number and data cut
    short raise ``tarfile.ReadError`` (``tarfile``'s stream mode ends quietly at the first two
    instead, unless they are the first header); an empty stream and one that begins with the
    end-of-archive block raise it too, as ``tarfile`` does.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pos = 0  # bytes consumed from where reading began
        self._size = 0  # the current member's data size
        self._left = 0  # its data and padding, not yet consumed

    def __iter__(self) -> Iterator[tuple[str, bool, int]]:
        name: str | None = None  # from a long-name or pax header, for the next member
        size: int | None = None
        first: int | None = None  # where the next member's first header lies
        while True:
            self._skip()
            at = self.pos
            header = self.stream.read(_BLOCK)
            if len(header) < _BLOCK:
                if header or at == 0:
                    raise tarfile.ReadError("empty file" if not header else f"tar header cut short at byte {at}")
                return
            if header == _ZERO_BLOCK:
                if at == 0:
                    raise tarfile.ReadError("end of file header")
                return
            stored = _number(header[148:156], at)
            if stored != 256 + sum(_CHECKSUM.unpack(header)) and stored != 256 + sum(_CHECKSUM_SIGNED.unpack(header)):
                raise tarfile.ReadError(f"bad tar header checksum at byte {at}")
            self.pos += _BLOCK
            kind = header[156:157]
            extended = kind in _EXTENDED
            # A pax header's size is the next member's, not another extended header's.
            self._size = _number(header[124:136], at) if size is None or extended else size
            self._left = (self._size + _BLOCK - 1) // _BLOCK * _BLOCK
            if kind != b"g":  # a global header belongs to no member (tarfile's offsets agree)
                first = at if first is None else first
            if extended:
                data = self.data()
                if kind == b"L":
                    name = _nts(data)
                elif kind == b"x":
                    name, size = self._pax(data, name, size, at)
                continue
            member = _nts(header[0:100])
            prefix = _nts(header[345:500])
            if prefix and kind != b"S":  # an old GNU sparse header keeps other fields there
                member = prefix + "/" + member
            directory = kind == b"5" or (kind == b"\x00" and member.endswith("/"))
            regular = kind in _REGULAR and not directory
            if directory:
                member = member.rstrip("/")
            yield (member if name is None else name), regular, first
            name = size = first = None

    def data(self) -> bytes:
        """The current member's bytes (each member's at most once)."""
        data = self.stream.read(self._size)
        if len(data) < self._size:
            raise tarfile.ReadError(f"unexpected end of data at byte {self.pos + len(data)}")
        self.pos += self._size
        self._left -= self._size
        self._size = 0
        return data

    def _skip(self) -> None:
        if self._left:
            self.stream.seek(self._left, 1)
            self.pos += self._left
            self._left = self._size = 0

    @staticmethod
    def _pax(data: bytes, name: str | None, size: int | None, at: int) -> tuple[str | None, int | None]:
        """The ``path`` and ``size`` of a pax extended header's records (``"%d %s=%s\\n"``)."""
        pos = 0
        while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
            space = data.find(b" ", pos)
            try:
                length = int(data[pos:space])
            except ValueError:
                raise tarfile.ReadError(f"invalid pax header at byte {at}") from None
            record = data[space + 1 : pos + length - 1]
            key, _, value = record.partition(b"=")
            if key == b"path":
                name = value.decode("utf-8", "surrogateescape")
            elif key == b"size":
                size = int(value)
            pos += length
        return name, size


def _compressed(stream: BinaryIO) -> bool:
    """Whether the seekable stream, at its start, holds a compressed tar (it is put back)."""
    head = stream.read(6)
    stream.seek(0)
    return any(head.startswith(magic) for magic in _COMPRESSED)


def _members(stream: BinaryIO, seekable: bool) -> Iterator[tuple[str, bool, int, Callable[[], bytes]]]:
    """``(name, regular, offset, read)`` for each member of the tar on ``stream`` from its current
    position: :class:`_TarMembers` on a ``seekable`` uncompressed stream, else Python's
    ``tarfile`` in stream mode (which detects compression). ``read()`` returns the member's
    bytes."""
    if seekable:
        members = _TarMembers(stream)
        for name, regular, offset in members:
            yield name, regular, offset, members.data
        return
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            yield info.name, info.isreg(), info.offset, lambda info=info: tar.extractfile(info).read()
            tar.members = []  # the stream reader would otherwise keep every header


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
            # A resume offset only exists for a seekable uncompressed shard; in a compressed one
            # offsets would be into the decompressed stream.
            addressable = bool(offset) or (_seekable(stream) and not _compressed(stream))
            if not addressable:
                self.next = None
            for name, regular, header_at, read in _members(stream, addressable):
                named = _is_member(name, regular)
                if named is None:
                    continue
                key, ext = named
                at = offset + header_at if addressable else None
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
                data = read()
                if current is None:
                    current = {"__key__": key, "__url__": url, "__offset__": at, "__ordinal__": ordinal}
                    if span is not None:
                        current["__index__"] = span[0] + ordinal
                if ext in current:
                    self.handler(ValueError(f"{name}: duplicate file name in tar file @ {url}"))
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
        for name, regular, _, read in _members(stream, seekable=True):
            named = _is_member(name, regular)
            if named is None:
                continue
            if named[0] != key:
                break
            data = read()
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
