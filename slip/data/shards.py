"""Write image-caption samples into webdataset tar shards plus an ``index.json``.

Layout of an output directory (the streaming pipeline relies on it exactly):

* ``{prefix}-{i:06d}.tar``: one tar per ``samples_per_shard`` samples, written with webdataset's
  ``TarWriter``; per sample the members ``{key}.jpg`` (JPEG bytes), ``{key}.txt`` (one UTF-8
  caption on one line) and ``{key}.json`` (a JSON object with extra fields plus the stored
  image's ``width``/``height``).
* ``index.json``: ``{"format": "slip-shards/1", "shards": [{"name": ..., "samples": n}, ...],
  "total_samples": N, "skipped": {reason: count}, "corpus": name-or-null}``.

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
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from webdataset.writer import TarWriter

from slip.data.errors import SampleSkip
from slip.fileio import atomic_path

logger = logging.getLogger(__name__)

INDEX_FORMAT = "slip-shards/1"
INDEX_NAME = "index.json"
# PIL's own default cap (about 89.5 megapixels); larger images are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
# Matches img2dataset's default so re-encoded and downloaded images look alike.
DEFAULT_JPEG_QUALITY = 95
# A constant member mtime makes shards byte-identical across runs (reproducible corpora).
SHARD_MTIME = 0
# Long keys are shortened with a hash so member names stay well inside the USTAR name limit.
MAX_KEY_LENGTH = 64

# Reasons a sample is skipped; these strings are the keys of ``index["skipped"]``.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
UNSUPPORTED_MODE = "unsupported_mode"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
BAD_METADATA = "bad_metadata"
DUPLICATE_KEY = "duplicate_key"
SKIP_REASONS = (
    EMPTY_FILE,
    NOT_AN_IMAGE,
    CORRUPT_IMAGE,
    TOO_MANY_PIXELS,
    UNSUPPORTED_MODE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    CAPTION_NOT_UTF8,
    BAD_METADATA,
    DUPLICATE_KEY,
)

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


@contextlib.contextmanager
def _pixel_cap(max_pixels: int) -> Iterator[None]:
    # PIL refuses images above 2 * MAX_IMAGE_PIXELS inside Image.open; raising the global to our
    # cap keeps PIL from rejecting images we allow, and our own check rejects those above it.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Corrupt EXIF blocks and bomb warnings would otherwise flood stderr from the workers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """Size with the shorter side equal to ``max_side``, or None when no downscale is needed."""
    if max_side is None or min(width, height) <= max_side:
        return None
    if width <= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (nearly white images), so rescale first.
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        arr = np.nan_to_num(arr)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    else:
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            full = 65535.0
        else:
            # 32-bit "I" holds 16-bit PNG data in some Pillow versions and 8-bit data in others.
            full = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
        scale = 255.0 / full
    arr8 = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8).convert("RGB")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any PIL mode to RGB; returns the image and whether a conversion happened."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img, False
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_depth_to_rgb(img), True
    if _has_alpha(img):
        # Transparent regions become white, which is what viewers show for most web images.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB"), True
    return img.convert("RGB"), True


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
    if not data:
        raise SampleSkip(EMPTY_FILE)
    with _pixel_cap(max_pixels):
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise SampleSkip(TOO_MANY_PIXELS, str(exc)) from None
        except UnidentifiedImageError:
            raise SampleSkip(NOT_AN_IMAGE) from None
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on corrupt headers
            raise SampleSkip(CORRUPT_IMAGE, repr(exc)) from None
        with img:
            fmt = img.format
            width, height = img.size
            if width <= 0 or height <= 0:
                raise SampleSkip(CORRUPT_IMAGE, f"size {width}x{height}")
            if width * height > max_pixels:
                raise SampleSkip(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels}")
            if fmt == "PNG":
                # Pillow's PNG decoder ignores chunk checksums, so corrupted pixel data would
                # decode to garbage silently; verify() checks every chunk's CRC.
                try:
                    with Image.open(io.BytesIO(data)) as check:
                        check.verify()
                except Exception as exc:  # noqa: BLE001 - verify raises SyntaxError, OSError...
                    raise SampleSkip(CORRUPT_IMAGE, repr(exc)) from None
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
            except Image.DecompressionBombError as exc:
                raise SampleSkip(TOO_MANY_PIXELS, str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: OSError, SyntaxError...
                raise SampleSkip(CORRUPT_IMAGE, repr(exc)) from None
            drafted = img.size != (width, height)
            try:
                out = img
                transposed = orientation not in (None, 1)
                if transposed:
                    out = ImageOps.exif_transpose(out)
                out, converted = _to_rgb(out)
            except Exception as exc:  # noqa: BLE001 - exotic modes PIL cannot convert
                raise SampleSkip(UNSUPPORTED_MODE, f"{img.mode}: {exc!r}") from None
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
    caption: str
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

    def add(self, key: str, jpg: bytes, txt: bytes, meta: bytes) -> bool:
        """Append a sample; returns False (nothing written) if ``key`` repeats within the shard."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        if key in self._keys:
            # Adjacent members with the same key would be merged into one sample by readers.
            return False
        self._writer.write({"__key__": key, "jpg": jpg, "txt": txt, "json": meta})
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


def load_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``index.json`` of a shard directory.

    Raises:
        ValueError: naming the file when it is not a ``slip-shards/1`` index.
    """
    path = Path(out_dir) / INDEX_NAME
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a {INDEX_FORMAT} index")
    for field in ("shards", "total_samples", "skipped"):
        if field not in index:
            raise ValueError(f"{path}: missing field {field!r}")
    return index


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
            if not sink.add(meta.key, result.data, meta.caption.encode("utf-8"), payload.encode("utf-8")):
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
                caption = normalise_caption(sample.caption)
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
