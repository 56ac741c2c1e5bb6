"""Write image-caption samples into webdataset tar shards plus an ``index.json``.

Layout of an output directory (the streaming pipeline relies on it exactly):

* ``{prefix}-{i:06d}.tar``: one tar per ``samples_per_shard`` samples, written with webdataset's
  ``TarWriter``; per sample the members ``{key}.jpg`` (JPEG bytes), ``{key}.txt`` (one UTF-8
  caption on one line) and ``{key}.json`` (a JSON object with extra fields plus the stored
  image's ``width``/``height``).
* ``index.json``: ``{"format": "slip-shards/1", "shards": [{"name": ..., "samples": n}, ...],
  "total_samples": N, "skipped": {reason: count}, "corpus": name-or-null}``, plus
  ``"captions": false`` for an image-only corpus (``write_shards(captions=False)``, written
  without ``.txt`` members, for self-supervised training alone).

Both are written crash-safely: a shard is written under a hidden temporary name and renamed
only once complete, and the index is written last, so an interrupted run never leaves a
truncated ``.tar`` with a final name, nor an index describing shards that do not exist.

Images are validated while writing: they are fully decoded, converted to RGB when needed and
re-encoded to JPEG only when the original bytes cannot be kept. Bad samples are skipped and
counted by reason (see :data:`SKIP_REASONS`); a bad sample is never fatal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Union

from PIL import Image, ImageOps
from tqdm import tqdm
from webdataset.writer import TarWriter

from slip.data.errors import (
    BAD_METADATA,
    CAPTION_NOT_UTF8,
    DUPLICATE_KEY,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    UNSUPPORTED_MODE,
    WRITE_SKIP_REASONS,
    SampleSkip,
)
from slip.data.images import (
    DEFAULT_MAX_PIXELS,
    decode_error,
    open_image,
    pixel_cap,
    to_rgb,
)
from slip.errors import UserError
from slip.fileio import atomic_path

logger = logging.getLogger(__name__)

INDEX_FORMAT = "slip-shards/1"
INDEX_NAME = "index.json"
# Matches img2dataset's default so re-encoded and downloaded images look alike.
DEFAULT_JPEG_QUALITY = 95
# A constant member mtime makes shards byte-identical across runs (reproducible corpora).
SHARD_MTIME = 0
# Long keys are shortened with a hash so member names stay well inside the USTAR name limit.
MAX_KEY_LENGTH = 64

# Reasons a sample is skipped; these strings are the keys of ``index["skipped"]``.
SKIP_REASONS = WRITE_SKIP_REASONS

ImageRef = Union[bytes, bytearray, memoryview, str, os.PathLike, Callable[[], bytes], None]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image-caption pair to be written.

    Attributes:
        key: identifier of the sample; characters other than ``[A-Za-z0-9_-]`` are replaced by
            ``_`` when written (webdataset splits member names at the first dot).
        image: the encoded image as bytes, a path to read it from (read in a worker process),
            a zero-argument callable returning the bytes (called in the writing process, in
            sample order, so it may use an open archive), or ``None`` if it is missing.
            ``FileNotFoundError`` from a path or callable counts as ``missing_image``, any other
            ``OSError`` as ``unreadable_image``.
        caption: the caption as ``str``, raw ``bytes`` (decoded as UTF-8 here) or ``None``.
        extra: JSON-serialisable fields stored in ``{key}.json``.
    """

    key: str
    image: ImageRef
    caption: str | bytes | None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """A validated image ready to be stored: JPEG bytes of an RGB image and its size."""

    data: bytes
    width: int
    height: int
    reencoded: bool


# --------------------------------------------------------------------------------------------
# Image validation and conversion (runs in worker processes)
# --------------------------------------------------------------------------------------------


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """Size with the shorter side equal to ``max_side``, or None when no downscale is needed."""
    if max_side is None or min(width, height) <= max_side:
        return None
    if width <= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def prepare_image(
    data: bytes,
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quality: int = DEFAULT_JPEG_QUALITY,
) -> PreparedImage:
    """Validate encoded image bytes and return JPEG bytes of an RGB image.

    The image is fully decoded (so truncated files are caught). The original bytes are kept
    when they already are an RGB JPEG without an EXIF rotation and need no resizing; otherwise
    the image is converted to RGB (CMYK, palette, grayscale, 16-bit; alpha composited on white),
    rotated upright according to EXIF, downscaled so that its shorter side is ``max_side`` if it
    is longer, and re-encoded as JPEG with ``quality``.

    Raises:
        SampleSkip: with the reason the bytes cannot be used.
    """
    img = open_image(data, max_pixels)  # the header, the pixel cap, PNG checksums
    with pixel_cap(max_pixels), img:
        fmt = img.format
        width, height = img.size
        target = _target_size(width, height, max_side)
        if target is not None and fmt == "JPEG":
            # DCT-domain downscaling while decoding: large photos decode several times
            # faster; the result stays at least as large as the target.
            img.draft(None, target)
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not worth dropping the image
            orientation = 1
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: OSError, SyntaxError...
            raise decode_error(exc) from None
        drafted = img.size != (width, height)
        out = img
        transposed = orientation not in (None, 1)
        if transposed:
            try:
                out = ImageOps.exif_transpose(out)
            except (ValueError, OSError) as exc:  # as to_rgb: what PIL raises for modes it cannot handle
                raise SampleSkip(UNSUPPORTED_MODE, f"{img.mode}: {exc!r}") from None
        out, converted = to_rgb(out)
        resize_to = _target_size(out.width, out.height, max_side)
        if resize_to is not None:
            out = out.resize(resize_to, Image.Resampling.LANCZOS)
        if fmt == "JPEG" and not (converted or transposed or drafted or resize_to is not None):
            return PreparedImage(data, width, height, reencoded=False)
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=quality)
        return PreparedImage(buffer.getvalue(), out.width, out.height, reencoded=True)


def _read_image_ref(ref: bytes | str) -> bytes:
    if isinstance(ref, bytes):
        return ref
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise SampleSkip(MISSING_IMAGE, ref) from None
    except OSError as exc:
        raise SampleSkip(UNREADABLE_IMAGE, f"{ref}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _ImageOptions:
    max_side: int | None
    max_pixels: int
    quality: int


def _prepare_chunk(
    refs: list[bytes | str], options: _ImageOptions
) -> list[PreparedImage | tuple[str, str]]:
    """Worker entry point: prepare a chunk of images, returning a skip (reason, detail) per failure."""
    results: list[PreparedImage | tuple[str, str]] = []
    for ref in refs:
        try:
            results.append(
                prepare_image(
                    _read_image_ref(ref),
                    max_side=options.max_side,
                    max_pixels=options.max_pixels,
                    quality=options.quality,
                )
            )
        except SampleSkip as skip:
            results.append((skip.reason, skip.detail))
    return results


# --------------------------------------------------------------------------------------------
# Sample checks done in the writing process (cheap, before any image work)
# --------------------------------------------------------------------------------------------

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def clean_key(key: str) -> str:
    """Make ``key`` safe as a webdataset key: only ``[A-Za-z0-9_-]``, at most 64 characters.

    Dots would make webdataset split the member name at the wrong place and slashes would create
    directories, so both (and anything else unusual) become ``_``. Over-long keys keep a prefix
    plus a hash of the full key so they remain distinct.
    """
    key = str(key)
    if not key:
        raise ValueError("sample key must be a non-empty string")
    cleaned = _KEY_UNSAFE.sub("_", key)
    if len(cleaned) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        cleaned = f"{cleaned[: MAX_KEY_LENGTH - 17]}_{digest}"
    return cleaned


def normalise_caption(caption: str | bytes | None) -> str:
    """Return the caption as one line of text (whitespace runs collapsed to single spaces).

    Raises:
        SampleSkip: ``missing_caption`` for None, ``caption_not_utf8`` for bytes that are not
            UTF-8 (or text that cannot be encoded as UTF-8), ``empty_caption`` for blank text.
    """
    if caption is None:
        raise SampleSkip(MISSING_CAPTION)
    if isinstance(caption, (bytes, bytearray, memoryview)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleSkip(CAPTION_NOT_UTF8, str(exc)) from None
    if not isinstance(caption, str):
        raise TypeError(f"caption must be str, bytes or None, not {type(caption).__name__}")
    text = " ".join(caption.removeprefix("\ufeff").split())
    if not text:
        raise SampleSkip(EMPTY_CAPTION)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from surrogateescape'd file names
        raise SampleSkip(CAPTION_NOT_UTF8, str(exc)) from None
    return text


def _resolve_image_ref(image: ImageRef) -> bytes | str:
    """Turn a Sample.image into bytes or a path string that a worker process can use."""
    if image is None:
        raise SampleSkip(MISSING_IMAGE)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if callable(image):
        try:
            data = image()
        except FileNotFoundError as exc:
            raise SampleSkip(MISSING_IMAGE, str(exc)) from None
        except OSError as exc:
            raise SampleSkip(UNREADABLE_IMAGE, str(exc)) from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"image callable returned {type(data).__name__}, expected bytes")
        return bytes(data)
    raise TypeError(f"unsupported image reference of type {type(image).__name__}")


@dataclasses.dataclass
class _Pending:
    key: str
    caption: str | None  # None: an image-only corpus (no .txt member)
    extra: Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# Shard output
# --------------------------------------------------------------------------------------------

_TAR_NAME = "{prefix}-{index:06d}.tar"


def shard_name(prefix: str, index: int) -> str:
    """Final file name of shard number ``index``: ``{prefix}-{index:06d}.tar``."""
    return _TAR_NAME.format(prefix=prefix, index=index)


class _ShardSink:
    """Writes samples into consecutive shards, each under a temporary name until complete."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int) -> None:
        self.out_dir = out_dir
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._stack: contextlib.ExitStack | None = None
        self._writer: TarWriter | None = None
        self._keys: set[str] = set()

    def add(self, key: str, jpg: bytes, txt: bytes | None, meta: bytes) -> bool:
        """Append a sample (without a ``.txt`` member when ``txt`` is None); returns False
        (nothing written) if ``key`` repeats within the shard."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        if key in self._keys:
            # Adjacent members with the same key would be merged into one sample by readers.
            return False
        members = {"__key__": key, "jpg": jpg, "json": meta}
        if txt is not None:
            members["txt"] = txt
        self._writer.write(members)
        self._keys.add(key)
        if len(self._keys) >= self.samples_per_shard:
            self._close()
        return True

    def _open(self) -> None:
        name = shard_name(self.prefix, len(self.shards))
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.out_dir / name))
            handle = stack.enter_context(open(tmp, "wb"))
            writer = TarWriter(handle, encoder=False, mtime=SHARD_MTIME)
            # LIFO: the tar end-of-archive blocks are written before the file is closed, which
            # happens before atomic_path fsyncs and renames it.
            stack.callback(writer.close)
        except BaseException:
            stack.close()
            raise
        self._stack, self._writer, self._keys = stack, writer, set()

    def _close(self) -> None:
        assert self._stack is not None
        name = shard_name(self.prefix, len(self.shards))
        count = len(self._keys)
        stack, self._stack, self._writer = self._stack, None, None
        stack.close()
        self.shards.append({"name": name, "samples": count})
        logger.debug("completed shard %s with %d samples", name, count)

    def finish(self) -> None:
        """Complete the last, possibly short, shard."""
        # A shard is only opened by add(), so an open shard always holds at least one sample.
        if self._stack is not None:
            self._close()

    def abort(self, exc: BaseException) -> None:
        """Drop the shard in progress because of ``exc`` (its temporary file is removed)."""
        if self._stack is None:
            return
        stack, self._stack, self._writer = self._stack, None, None
        # Passing the exception makes atomic_path delete the temporary file instead of renaming.
        stack.__exit__(type(exc), exc, exc.__traceback__)


def _prepare_output_dir(out_dir: Path, prefix: str, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_NAME
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar$")
    existing = sorted(p for p in out_dir.iterdir() if pattern.match(p.name))
    if not overwrite and (existing or index_path.exists()):
        raise FileExistsError(
            f"{out_dir} already holds shards or an {INDEX_NAME}; "
            "pass overwrite=True (--overwrite) to replace them"
        )
    if overwrite:
        # Index first: a crash while deleting must not leave an index naming missing shards.
        index_path.unlink(missing_ok=True)
        for path in existing:
            path.unlink()
        leftovers = re.compile(rf"^\.{re.escape(prefix)}-\d{{6,}}\.tar\..*\.tmp$")
        for path in out_dir.iterdir():
            if leftovers.match(path.name):
                path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON via a temporary file, fsync and rename (crash-safe)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ShardIndexError(UserError, ValueError):
    """An ``index.json`` that is not a readable ``slip-shards/1`` index; the message names the file."""


def load_index(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``slip-shards/1`` index: ``path`` is the file or a directory holding
    ``index.json``. The one reader for shard writing and the training loader.

    Checked: a JSON object with the format tag and a list of shards (names as strings or
    ``{"name": ..., "samples": n}``); ``total_samples`` and ``skipped`` when present (written by
    ``make-shards``, optional in a hand-written index listing existing shards) must be a count
    and a mapping of counts.

    Raises:
        ShardIndexError: naming the file and what is wrong.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardIndexError(f"{path}: not a {INDEX_FORMAT} index (invalid JSON: {exc})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardIndexError(f"{path}: not a {INDEX_FORMAT} index (its \"format\" must be {INDEX_FORMAT!r})")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardIndexError(f"{path}: \"shards\" must be a list of shard names")
    for i, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name:
            raise ShardIndexError(f"{path}: shards[{i}] must be a file name or an object with a \"name\"")
    total = index.get("total_samples")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise ShardIndexError(f"{path}: \"total_samples\" must be a count, got {total!r}")
    skipped = index.get("skipped")
    if skipped is not None and not (isinstance(skipped, dict) and all(isinstance(v, int) for v in skipped.values())):
        raise ShardIndexError(f"{path}: \"skipped\" must map reasons to counts")
    return index


def shard_sample_counts(index: Mapping[str, Any], path: str | os.PathLike = INDEX_NAME) -> list[tuple[str, int]]:
    """(name, samples) of every shard an index (as :func:`load_index` returns it) lists, in its
    order: what the loader's global sample indices are counted from
    (:mod:`slip.data.pipeline`, "Sample indices").

    Raises:
        ShardIndexError: a shard without a sample count (an index written by hand may list bare
            names), or a shard listed twice (its samples would have two indices); the message
            names ``path`` and the shard.
    """
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, entry in enumerate(index["shards"]):
        name = entry.get("name") if isinstance(entry, dict) else entry
        samples = entry.get("samples") if isinstance(entry, dict) else None
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ShardIndexError(f"{path}: shards[{i}] ({name}) has no sample count (\"samples\": n), got {samples!r}")
        if name in seen:
            raise ShardIndexError(f"{path}: lists shard {name} twice")
        seen.add(name)
        out.append((name, samples))
    return out


def _sample_count(samples: Iterable[Sample]) -> int | None:
    count = getattr(samples, "num_samples", None)
    if count is None and hasattr(samples, "__len__"):
        try:
            count = len(samples)  # type: ignore[arg-type]
        except TypeError:
            count = None
    return count


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    corpus: str | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    overwrite: bool = False,
    total: int | None = None,
    captions: bool = True,
) -> dict[str, Any]:
    """Validate ``samples`` and write them as shards plus ``index.json`` into ``out_dir``.

    Args:
        samples: the samples, consumed once, in order; the shard contents follow this order
            exactly whatever ``workers`` is.
        out_dir: output directory (created). It must not already hold an index or shards with
            this prefix unless ``overwrite`` is set, in which case those are deleted first.
        prefix: shard file name prefix (``{prefix}-{i:06d}.tar``).
        samples_per_shard: samples per shard; the last shard may hold fewer.
        max_side: if given, images whose shorter side is longer are downscaled to it.
        workers: processes decoding/validating images; 1 does everything in this process.
        corpus: name recorded in the index.
        progress: show a tqdm bar (only when stderr is a terminal).
        max_pixels: images with more pixels are skipped as decompression bombs.
        jpeg_quality: quality for images that must be re-encoded.
        overwrite: replace an existing index and shards with this prefix.
        total: number of samples for the progress bar; taken from ``samples.num_samples`` or
            ``len(samples)`` when not given.
        captions: False writes an image-only corpus (for self-supervised training alone, e.g.
            an ImageNet-style folder): no ``.txt`` member, captions neither read nor required,
            and ``"captions": false`` in the index.

    Returns:
        The index written to ``out_dir/index.json``.

    Raises:
        FileExistsError: ``out_dir`` already holds output and ``overwrite`` is false.
        Any exception raised while iterating ``samples``; completed shards stay in place, the
        shard in progress is removed and no index is written.
    """
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"invalid shard prefix {prefix!r}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    if max_side is not None and max_side < 1:
        raise ValueError("max_side must be positive")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    out = Path(out_dir)
    _prepare_output_dir(out, prefix, overwrite)

    options = _ImageOptions(max_side=max_side, max_pixels=max_pixels, quality=jpeg_quality)
    skipped: Counter[str] = Counter()
    reencoded = 0
    sink = _ShardSink(out, prefix, samples_per_shard)
    bar = tqdm(
        total=total if total is not None else _sample_count(samples),
        unit="img",
        desc=f"writing {out}",
        disable=not (progress and sys.stderr.isatty()),
    )
    executor = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    # Chunks amortise inter-process overhead; the bound on chunks in flight keeps memory flat
    # on corpora of millions of images while the workers stay busy.
    chunk_size = 16 if executor is not None else 1
    max_in_flight = 4 * workers
    in_flight: deque[tuple[Future[list[Any]], list[_Pending]]] = deque()
    chunk_refs: list[bytes | str] = []
    chunk_meta: list[_Pending] = []

    def skip(key: str, reason: str, detail: str = "") -> None:
        skipped[reason] += 1
        logger.debug("skipping sample %s: %s %s", key, reason, detail)

    def store(results: list[Any], metas: list[_Pending]) -> None:
        nonlocal reencoded
        for result, meta in zip(results, metas):
            bar.update(1)
            if isinstance(result, tuple):
                skip(meta.key, *result)
                continue
            fields = dict(meta.extra)
            fields["width"], fields["height"] = result.width, result.height
            try:
                payload = json.dumps(fields, ensure_ascii=False, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                skip(meta.key, BAD_METADATA, str(exc))
                continue
            txt = None if meta.caption is None else meta.caption.encode("utf-8")
            if not sink.add(meta.key, result.data, txt, payload.encode("utf-8")):
                skip(meta.key, DUPLICATE_KEY)
                continue
            reencoded += result.reencoded

    def flush_chunk() -> None:
        nonlocal chunk_refs, chunk_meta
        if not chunk_refs:
            return
        if executor is None:
            store(_prepare_chunk(chunk_refs, options), chunk_meta)
        else:
            in_flight.append((executor.submit(_prepare_chunk, chunk_refs, options), chunk_meta))
            while len(in_flight) > max_in_flight:
                future, metas = in_flight.popleft()
                store(future.result(), metas)
        chunk_refs, chunk_meta = [], []

    try:
        for sample in samples:
            key = clean_key(sample.key)
            try:
                caption = normalise_caption(sample.caption) if captions else None
                ref = _resolve_image_ref(sample.image)
            except SampleSkip as exc:
                skip(key, exc.reason, exc.detail)
                bar.update(1)
                continue
            if not isinstance(sample.extra, Mapping):
                raise TypeError(f"sample {sample.key!r}: extra must be a mapping")
            chunk_refs.append(ref)
            chunk_meta.append(_Pending(key, caption, sample.extra))
            if len(chunk_refs) >= chunk_size:
                flush_chunk()
        flush_chunk()
        while in_flight:
            future, metas = in_flight.popleft()
            store(future.result(), metas)
        sink.finish()
    except BaseException as exc:
        sink.abort(exc)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
            executor = None
        raise
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True)

    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "shards": sink.shards,
        "total_samples": sum(s["samples"] for s in sink.shards),
        "skipped": dict(sorted(skipped.items())),
        "corpus": corpus,
    }
    if not captions:
        index["captions"] = False
    write_json_atomic(out / INDEX_NAME, index)
    logger.info(
        "wrote %d samples in %d shards to %s (%d re-encoded)",
        index["total_samples"],
        len(sink.shards),
        out,
        reencoded,
    )
    if skipped:
        logger.warning("skipped %d samples: %s", sum(skipped.values()), index["skipped"])
    if not sink.shards:
        logger.warning("no sample could be written to %s", out)
    return index
