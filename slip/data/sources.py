"""Readers that turn image-caption corpora on disk into streams of :class:`Sample`.

Each ``read_*`` function checks the input's structure up front and raises
:class:`SourceFormatError`, naming the file (and column or entry), when it is malformed; problems
with single images (missing, corrupt) are left to :func:`slip.data.shards.write_shards`, which
skips and counts them. Every reader is deterministic: the same input gives the same samples in
the same order.

Supported layouts:

* :func:`read_folder`: a directory tree of images with same-stem ``.txt`` captions.
* :func:`read_table`: a TSV/CSV/parquet table with an image-path and a caption column.
* :func:`read_yfcc`: SLIP's YFCC15M layout (``images/XX/YYY.zip`` + ``yfcc15m.pkl``).
* :func:`read_cc`: SLIP's CC3M/CC12M ``.npy`` arrays of dicts.
* :func:`read_coco`: COCO captions JSON (``captions_train2017.json``).

Pickled metadata (YFCC ``.pkl``, CC ``.npy`` object arrays) is loaded with
:class:`RestrictedUnpickler`, which only rebuilds plain data and refuses every other global, so a
tampered metadata file cannot run code. The evaluation datasets read CIFAR's pickled batches with
it too (:func:`numeric_array_globals`).
"""
from __future__ import annotations

import builtins
import codecs
import csv
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote_plus

import numpy as np

from slip.data.shards import Sample
from slip.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Column names tried, in this order, when a table's columns are not given explicitly.
IMAGE_COLUMN_CANDIDATES = ("filepath", "image_path", "image", "path", "file_name", "filename", "file")
CAPTION_COLUMN_CANDIDATES = ("caption", "title", "text")
YFCC_METADATA_NAME = "yfcc15m.pkl"
TABLE_SUFFIXES = {".tsv": "\t", ".tab": "\t", ".csv": ",", ".parquet": None, ".pq": None}


class SourceFormatError(UserError, ValueError):
    """The input corpus is malformed; the message names the offending file, column or entry."""


class SampleSource(Iterable[Sample]):
    """A re-iterable stream of samples with a description and, when known, its length.

    ``num_samples`` counts entries in the metadata, including ones the writer may later skip;
    :func:`~slip.data.shards.write_shards` uses it for the progress bar.
    """

    def __init__(
        self, name: str, factory: Callable[[], Iterator[Sample]], num_samples: int | None = None
    ) -> None:
        self.name = name
        self.num_samples = num_samples
        self._factory = factory

    def __iter__(self) -> Iterator[Sample]:
        return self._factory()

    def __repr__(self) -> str:
        return f"SampleSource({self.name!r}, num_samples={self.num_samples})"


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------

_PLAIN_BUILTINS = ("list", "tuple", "dict", "set", "frozenset", "str", "int", "float", "bool", "bytes", "bytearray", "complex")


def plain_data_globals() -> dict[tuple[str, str], Any]:
    """Globals a pickle of plain Python data may reference (builtin container/scalar types).

    ``__builtin__`` is the Python 2 module name that protocol 0-2 pickles use, and
    ``_codecs.encode`` is how those protocols rebuild ``bytes``.
    """
    allowed: dict[tuple[str, str], Any] = {}
    for name in _PLAIN_BUILTINS:
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)
    # Protocols 0-2 store bytes as _codecs.encode(text, "latin1"); codecs only transform data.
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


def numpy_array_globals() -> dict[tuple[str, str], Any]:
    """Plain-data globals plus the numpy functions that rebuild a pickled ndarray.

    ``np.save`` pickles an object array as the ndarray itself, which references
    ``multiarray._reconstruct``, ``ndarray`` and ``dtype`` (and ``scalar`` for numpy scalars such
    as ``np.int64`` ids). These only allocate arrays from data; they cannot run other code.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed = plain_data_globals()
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _Refused(ValueError):
    """Raised while unpickling for data that is refused; reported with the file's name."""


def _numeric_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused(f"refusing an array of Python objects (dtype {dtype}); only numeric arrays are loaded")
    return dtype


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle, where it may only be the type argument of
    ``_reconstruct``: calling ``numpy.ndarray(shape, "O")`` directly would build an object array."""


def _numeric_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    if subtype is not _NdarrayToken:
        raise _Refused(f"refusing to rebuild an array of type {subtype!r}")
    return multiarray._reconstruct(np.ndarray, shape, _numeric_dtype(typecode))


def numeric_array_globals() -> dict[tuple[str, str], Any]:
    """Plain-data globals plus what rebuilds a *numeric* ndarray, as in CIFAR's python batches.

    CIFAR's files are Python 2 pickles of dicts of lists, strings and uint8 arrays, which
    reference ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``;
    pickles written by Python 3 at protocol 5 rebuild arrays with ``numpy._core.numeric._frombuffer``.
    ``dtype`` and ``_reconstruct`` are wrapped, and ``ndarray`` resolves to a token that builds
    nothing, so that an array of Python objects (dtype ``O``) is refused however a pickle asks.
    """
    try:
        from numpy._core import numeric
    except ImportError:  # numpy < 2
        from numpy.core import numeric  # type: ignore[no-redef]
    allowed = numpy_array_globals()
    allowed[("numpy", "dtype")] = _numeric_dtype
    allowed[("numpy", "ndarray")] = _NdarrayToken
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _numeric_reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only whitelisted globals.

    Arbitrary code execution through pickle always goes through a global (``os.system``,
    ``builtins.eval``, a class with ``__reduce__``...), so refusing every global not in
    ``allowed`` leaves only the construction of plain data.
    """

    def __init__(
        self, file: IO[bytes], *, allowed: Mapping[tuple[str, str], Any], source: str, encoding: str = "ASCII"
    ) -> None:
        # encoding: how Python 2 ``str`` objects are decoded ("latin1" for numpy arrays).
        super().__init__(file, encoding=encoding)
        self._allowed = dict(allowed)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise SourceFormatError(
                f"{self._source}: refusing to unpickle {module}.{name}; only plain data (lists, tuples, "
                "dicts, str, bytes, numbers and, where expected, numpy arrays) is loaded from this file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise SourceFormatError(f"{self._source}: refusing persistent id in pickle")


def load_restricted_pickle(
    path: str | os.PathLike, *, allowed: Mapping[tuple[str, str], Any] | None = None, encoding: str = "ASCII"
) -> Any:
    """Unpickle ``path`` allowing only plain builtin data (or the given ``allowed`` globals).

    ``encoding`` decodes Python 2 ``str`` objects (``"latin1"`` for Python 2 numpy arrays).

    Raises:
        SourceFormatError: naming the file, for a refused global or an unreadable pickle.
    """
    with open(path, "rb") as f:
        return _restricted_load(f, str(path), plain_data_globals() if allowed is None else allowed, encoding)


def _restricted_load(
    f: IO[bytes], source: str, allowed: Mapping[tuple[str, str], Any], encoding: str = "ASCII"
) -> Any:
    try:
        return RestrictedUnpickler(f, allowed=allowed, source=source, encoding=encoding).load()
    except SourceFormatError:
        raise
    except _Refused as exc:
        raise SourceFormatError(f"{source}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise SourceFormatError(f"{source}: cannot unpickle: {exc!r}") from None


def load_npy_records(path: str | os.PathLike) -> list[Any]:
    """Load a 1-D ``.npy`` object array (e.g. SLIP's ``cc3m.npy``) safely, as a list.

    ``np.load(allow_pickle=True)`` would unpickle arbitrary objects; instead the header is parsed
    with numpy's header reader and the payload is unpickled with :class:`RestrictedUnpickler`.

    Raises:
        SourceFormatError: naming the file if it is not an object-array ``.npy`` or holds
            anything but plain data.
    """
    source = str(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise SourceFormatError(f"{source}: unsupported .npy format version {version}")
        except ValueError as exc:
            if isinstance(exc, SourceFormatError):
                raise
            raise SourceFormatError(f"{source}: not a .npy file ({exc})") from None
        if dtype != np.dtype(object):
            raise SourceFormatError(f"{source}: expected an object array of dicts, found dtype {dtype}")
        array = _restricted_load(f, source, numpy_array_globals())
    if isinstance(array, np.ndarray):
        if array.dtype != np.dtype(object) or array.shape != tuple(shape):
            raise SourceFormatError(f"{source}: payload does not match the .npy header")
        if array.ndim == 0:
            array = array.item()
        elif array.ndim == 1:
            return list(array)
        else:
            raise SourceFormatError(f"{source}: expected a 1-D array, found shape {array.shape}")
    if isinstance(array, list):
        return array
    raise SourceFormatError(f"{source}: expected an array of records, found {type(array).__name__}")


# --------------------------------------------------------------------------------------------
# Folder of images with .txt captions
# --------------------------------------------------------------------------------------------


def _read_optional_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def read_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> SampleSource:
    """Images found recursively under ``root``, each captioned by the same-stem ``.txt`` file.

    Traversal is sorted (deterministic); hidden files and directories are ignored. An image
    without a caption file yields a sample with ``caption=None`` (skipped as
    ``missing_caption``). Keys are the relative paths without suffix; json holds ``path``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceFormatError(f"{root}: not a directory")
    wanted = {e.lower() for e in extensions}

    def generate() -> Iterator[Sample]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or path.suffix.lower() not in wanted:
                    continue
                rel = path.relative_to(root)
                yield Sample(
                    key=rel.with_suffix("").as_posix(),
                    image=path,
                    caption=_read_optional_bytes(path.with_suffix(".txt")),
                    extra={"path": rel.as_posix()},
                )

    return SampleSource(f"folder:{root}", generate)


# --------------------------------------------------------------------------------------------
# Tables (TSV / CSV / parquet)
# --------------------------------------------------------------------------------------------


def _pick_column(
    columns: Sequence[str], requested: str | None, candidates: Sequence[str], role: str, path: Path, option: str
) -> str:
    listing = ", ".join(columns)
    if requested is not None:
        if requested not in columns:
            raise SourceFormatError(f"{path}: no {role} column {requested!r} (columns: {listing})")
        return requested
    found = [c for c in candidates if c in columns]
    if not found:
        raise SourceFormatError(
            f"{path}: no {role} column found among ({', '.join(candidates)}); pass {option} "
            f"(columns: {listing})"
        )
    if len(found) > 1:
        raise SourceFormatError(f"{path}: several possible {role} columns ({', '.join(found)}); pass {option}")
    return found[0]


def _json_scalar(value: Any) -> Any:
    # Table cells may be timestamps, decimals or bytes, which JSON cannot hold as such.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_scalar(v) for v in value]
    return str(value)


def _image_cell(value: Any, base: Path, path: Path, row: int, column: str) -> Any:
    if value is None:
        return None
    if isinstance(value, dict) and "bytes" in value:  # parquet image structs {bytes, path}
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else None
    text = str(value).strip()
    if not text:
        return None
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        raise SourceFormatError(
            f"{path}, row {row}: column {column!r} holds a URL ({text}); download the images "
            "first (e.g. with img2dataset) and convert its output"
        )
    image = Path(text)
    return image if image.is_absolute() else base / image


def read_table(
    path: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    extra_columns: Sequence[str] = (),
) -> SampleSource:
    """Rows of a TSV/CSV (header row required) or parquet table as samples.

    Args:
        path: the table; ``.tsv``/``.tab`` are tab-separated, ``.csv`` comma-separated,
            ``.parquet``/``.pq`` need pyarrow. Other suffixes need ``delimiter``.
        image_column: column with image paths (relative ones are resolved against
            ``image_root``, default the table's directory) or, in parquet, image bytes. When
            None, the single present column of :data:`IMAGE_COLUMN_CANDIDATES` is used.
        caption_column: caption column; when None, the single present column of
            :data:`CAPTION_COLUMN_CANDIDATES`.
        image_root: directory relative image paths are resolved against.
        delimiter: field separator overriding the one implied by the suffix.
        extra_columns: columns copied into each sample's json.

    Keys are the zero-based row numbers (``000000042``). A URL in the image column raises
    :class:`SourceFormatError` (this tool does not download).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if delimiter is None and suffix not in TABLE_SUFFIXES:
        raise SourceFormatError(f"{path}: unknown table type {suffix!r}; pass a delimiter")
    is_parquet = delimiter is None and TABLE_SUFFIXES.get(suffix) is None
    if not path.is_file():
        raise SourceFormatError(f"{path}: no such table file")
    base = Path(image_root) if image_root is not None else path.parent

    if is_parquet:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
            raise SourceFormatError(f"{path}: not a readable parquet file ({exc})") from None
        columns = list(parquet.schema_arrow.names)
        num_rows: int | None = parquet.metadata.num_rows
    else:
        sep = delimiter if delimiter is not None else TABLE_SUFFIXES[suffix]
        assert sep is not None
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader(f, delimiter=sep), None)
        if not header:
            raise SourceFormatError(f"{path}: empty table (a header row is required)")
        columns = [c.strip() for c in header]
        num_rows = None

    image_col = _pick_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image", path, "image_column (--image-column)")
    caption_col = _pick_column(
        columns, caption_column, CAPTION_COLUMN_CANDIDATES, "caption", path, "caption_column (--caption-column)"
    )
    for column in extra_columns:
        if column not in columns:
            raise SourceFormatError(f"{path}: no column {column!r} (columns: {', '.join(columns)})")

    def rows() -> Iterator[dict[str, Any]]:
        if is_parquet:
            wanted = list(dict.fromkeys([image_col, caption_col, *extra_columns]))
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=wanted):
                yield from batch.to_pylist()
        else:
            # Long captions exceed csv's default 128 KiB field limit.
            csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                reader = csv.reader(f, delimiter=sep)
                next(reader, None)
                for values in reader:
                    if not values:
                        continue
                    yield {c: (values[i] if i < len(values) else None) for i, c in enumerate(columns)}

    def generate() -> Iterator[Sample]:
        for row_number, row in enumerate(rows()):
            caption = row.get(caption_col)
            if caption is not None and not isinstance(caption, (str, bytes)):
                caption = str(caption)
            yield Sample(
                key=f"{row_number:09d}",
                image=_image_cell(row.get(image_col), base, path, row_number, image_col),
                # Text read with surrogateescape keeps invalid UTF-8 visible to the writer.
                caption=caption.encode("utf-8", "surrogateescape") if isinstance(caption, str) else caption,
                extra={c: _json_scalar(row.get(c)) for c in extra_columns},
            )

    return SampleSource(f"table:{path}", generate, num_rows)


# --------------------------------------------------------------------------------------------
# YFCC15M (SLIP layout)
# --------------------------------------------------------------------------------------------


def yfcc_image_location(index: int) -> tuple[str, str]:
    """Zip archive (relative to the YFCC root) and member name holding image ``index``.

    The 8-digit zero-padded index XXYYYZZZ lives in ``images/XX/YYY.zip`` as ``ZZZ.jpg``.
    """
    if not 0 <= index < 10**8:
        raise ValueError(f"YFCC image index {index} out of range")
    digits = f"{index:08d}"
    return f"images/{digits[:2]}/{digits[2:5]}.zip", f"{digits[5:]}.jpg"


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_PLUS_BETWEEN_CHARS = re.compile(r"[^+\s]\+[^+\s]")


def _looks_url_quoted(text: str) -> bool:
    # Raw YFCC100M fields are URL-quoted: no whitespace at all, '+' for spaces and %XX escapes.
    # Text that contains whitespace (or only '+' runs like "C++") was already decoded.
    if not text or any(ch.isspace() for ch in text):
        return False
    return bool(_PERCENT_ESCAPE.search(text) or _PLUS_BETWEEN_CHARS.search(text))


def decode_yfcc_text(text: str, unquote: bool | None = None) -> str:
    """Decode a YFCC title/description; ``unquote`` None decodes only text that looks quoted.

    SLIP's ``make_dataset.py`` already unquotes titles and descriptions before pickling them, but
    metadata built straight from ``yfcc100m_dataset`` keeps the URL quoting; decoding such text
    twice would turn a literal '+' into a space, hence the default check.
    """
    if unquote is None:
        unquote = _looks_url_quoted(text)
    return unquote_plus(text) if unquote else text


def load_yfcc_metadata(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Load SLIP's ``yfcc15m.pkl`` (a list of ``(index, title, description)``) safely.

    Raises:
        SourceFormatError: naming the file and entry if the pickle holds anything else.
    """
    data = load_restricted_pickle(path)
    if not isinstance(data, (list, tuple)):
        raise SourceFormatError(f"{path}: expected a list of (index, title, description), found {type(data).__name__}")
    records: list[tuple[int, str, str]] = []
    for position, entry in enumerate(data):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise SourceFormatError(f"{path}: entry {position} is not an (index, title, description) triple")
        index, title, description = entry
        if isinstance(index, str) and index.isdigit():
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 10**8:
            raise SourceFormatError(f"{path}: entry {position} has an invalid image index {index!r}")
        for name, value in (("title", title), ("description", description)):
            if value is not None and not isinstance(value, str):
                raise SourceFormatError(f"{path}: entry {position} has a non-string {name} ({type(value).__name__})")
        records.append((index, title or "", description or ""))
    return records


class _YfccZipReader:
    """Reads YFCC images, keeping the most recently used zip open.

    The metadata is ordered by index, so consecutive images mostly share an archive and
    reopening a 1000-image zip per image would dominate the conversion time.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._name: str | None = None
        self._zip: zipfile.ZipFile | None = None
        # A missing or broken archive is remembered so its other images fail fast.
        self._error: tuple[type[OSError], str] | None = None

    def read(self, index: int) -> bytes:
        name, member = yfcc_image_location(index)
        if name != self._name:
            self.close()
            self._name = name
            path = self.root / name
            try:
                self._zip = zipfile.ZipFile(path)
            except FileNotFoundError:
                self._error = (FileNotFoundError, f"{path}: no such zip archive")
            except (zipfile.BadZipFile, OSError) as exc:
                self._error = (OSError, f"{path}: unreadable zip archive ({exc})")
        if self._error is not None:
            error_type, message = self._error
            raise error_type(message)
        assert self._zip is not None
        try:
            return self._zip.read(member)
        except KeyError:
            raise FileNotFoundError(f"{self.root / name}: no member {member}") from None
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:  # CRC/zlib errors
            raise OSError(f"{self.root / name}:{member}: {exc}") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._name, self._zip, self._error = None, None, None


def read_yfcc(
    root: str | os.PathLike,
    *,
    metadata: str | os.PathLike | None = None,
    unquote: bool | None = None,
) -> SampleSource:
    """SLIP's YFCC15M: images in ``{root}/images/XX/YYY.zip`` and a metadata pickle.

    Args:
        root: directory holding ``images/``.
        metadata: the ``(index, title, description)`` pickle; default ``{root}/yfcc15m.pkl``.
        unquote: URL-decode titles/descriptions (``urllib.parse.unquote_plus``): True always,
            False never, None (default) only text that looks URL-quoted (see
            :func:`decode_yfcc_text`).

    The ``.txt`` caption is the title, or the description when the title is empty; json holds
    both (``title``, ``description``) so the training pipeline can pick one at random as SLIP
    does. Keys are the 8-digit image indices; samples follow the metadata order.
    """
    root = Path(root)
    meta_path = Path(metadata) if metadata is not None else root / YFCC_METADATA_NAME
    if not meta_path.is_file():
        raise SourceFormatError(f"{meta_path}: YFCC metadata pickle not found")
    if not (root / "images").is_dir():
        raise SourceFormatError(f"{root}: no images/ directory (expected images/XX/YYY.zip)")
    records = load_yfcc_metadata(meta_path)

    def generate() -> Iterator[Sample]:
        reader = _YfccZipReader(root)
        try:
            for index, raw_title, raw_description in records:
                title = decode_yfcc_text(raw_title, unquote).strip()
                description = decode_yfcc_text(raw_description, unquote).strip()
                yield Sample(
                    key=f"{index:08d}",
                    image=lambda index=index: reader.read(index),
                    caption=title or description,
                    extra={"title": title, "description": description},
                )
        finally:
            reader.close()

    return SampleSource(f"yfcc:{root}", generate, len(records))


# --------------------------------------------------------------------------------------------
# CC3M / CC12M (SLIP .npy layout)
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):  # np.int64 ids and the like
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_cc_record(entry: Any, position: int, source: str, image_field: str | None) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise SourceFormatError(f"{source}: entry {position} is a {type(entry).__name__}, expected a dict")
    record: dict[str, Any] = {}
    for key, value in entry.items():
        if not isinstance(key, str):
            raise SourceFormatError(f"{source}: entry {position} has a non-string key {key!r}")
        value = _plain(value)
        is_str_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not (value is None or isinstance(value, (str, int, float)) or is_str_list):
            raise SourceFormatError(
                f"{source}: entry {position} field {key!r} has unsupported type {type(value).__name__}"
            )
        record[key] = value
    fields = (image_field,) if image_field else ("image_name", "image_id")
    if not any(record.get(f) not in (None, "") for f in fields):
        raise SourceFormatError(f"{source}: entry {position} has no {' or '.join(repr(f) for f in fields)}")
    captions = record.get("captions", record.get("caption"))
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        raise SourceFormatError(f"{source}: entry {position} has no 'captions' list")
    record["captions"] = captions
    return record


def read_cc(
    metadata: str | os.PathLike,
    root: str | os.PathLike,
    *,
    image_field: str | None = None,
    path_template: str | None = None,
) -> SampleSource:
    """SLIP's CC3M/CC12M metadata: a ``.npy`` array of dicts with images under ``root``.

    Each dict has ``captions`` (a list of str; a single ``caption`` str is accepted too) and an
    image name: CC12M's ``image_name`` (e.g. ``'0.jpg'``) or CC3M's ``image_id`` (e.g.
    ``1510438788``), preferred in that order unless ``image_field`` names one. The image path is
    ``{root}/{name}`` as in SLIP's loader, or ``path_template.format(root=root, **entry)`` (e.g.
    ``"{root}/{image_id}.jpg"``) when given.

    The array is unpickled with :class:`RestrictedUnpickler`; entries must be dicts whose values
    are str, numbers or lists of str. ``.txt`` is the first caption; json ``captions`` holds all
    and ``image`` the image name. Keys are the entries' positions (``000000042``).
    """
    source = str(metadata)
    root = Path(root)
    records = [
        _check_cc_record(entry, position, source, image_field)
        for position, entry in enumerate(load_npy_records(metadata))
    ]

    def image_path(record: dict[str, Any], position: int) -> Path:
        if path_template is not None:
            try:
                return Path(path_template.format(root=root, **record))
            except (KeyError, IndexError, ValueError) as exc:
                raise SourceFormatError(
                    f"{source}: entry {position} does not fit path template {path_template!r} ({exc!r})"
                ) from None
        fields = (image_field,) if image_field else ("image_name", "image_id")
        name = next(record[f] for f in fields if record.get(f) not in (None, ""))
        return root / str(name)

    def generate() -> Iterator[Sample]:
        for position, record in enumerate(records):
            captions = [c.strip() for c in record["captions"] if c.strip()]
            path = image_path(record, position)
            yield Sample(
                key=f"{position:09d}",
                image=path,
                caption=captions[0] if captions else "",
                extra={"captions": captions, "image": os.path.relpath(path, root)},
            )

    return SampleSource(f"cc:{metadata}", generate, len(records))


# --------------------------------------------------------------------------------------------
# COCO captions
# --------------------------------------------------------------------------------------------


def read_coco(
    annotations: str | os.PathLike,
    root: str | os.PathLike,
    *,
    split: str = "train2017",
    path_template: str | None = None,
) -> SampleSource:
    """COCO captions (``captions_train2017.json``): one sample per image with all its captions.

    Images are at ``{root}/{split}/{image_id:012d}.jpg`` (SLIP's convention) or at
    ``path_template.format(root=root, split=split, image_id=id)``. Samples are ordered by
    image id; ``.txt`` is the image's first caption (annotation order), json ``captions`` holds
    all of them and ``image_id`` the id. Keys are the 12-digit ids.
    """
    source = str(annotations)
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceFormatError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SourceFormatError(f"{source}: expected an object with an 'annotations' list")
    grouped: dict[int, list[str]] = {}
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise SourceFormatError(f"{source}: annotations[{position}] is not an object")
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise SourceFormatError(f"{source}: annotations[{position}] has no integer 'image_id'")
        if not isinstance(caption, str):
            raise SourceFormatError(f"{source}: annotations[{position}] has no string 'caption'")
        grouped.setdefault(image_id, []).append(caption)
    root = Path(root)

    def generate() -> Iterator[Sample]:
        for image_id in sorted(grouped):
            captions = [" ".join(c.split()) for c in grouped[image_id]]
            captions = [c for c in captions if c]
            if path_template is not None:
                path = Path(path_template.format(root=root, split=split, image_id=image_id))
            else:
                path = root / split / f"{image_id:012d}.jpg"
            yield Sample(
                key=f"{image_id:012d}",
                image=path,
                caption=captions[0] if captions else "",
                extra={"captions": captions, "image_id": image_id},
            )

    return SampleSource(f"coco:{annotations}", generate, len(grouped))


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------

SOURCE_FORMATS = ("folder", "table", "yfcc", "cc", "coco")


def detect_format(path: str | os.PathLike) -> str:
    """Guess the source format of ``path``: one of :data:`SOURCE_FORMATS`.

    A directory with an ``images/`` subdirectory and a ``.pkl`` file is YFCC, any other
    directory a folder of images; files are recognised by suffix (``.pkl`` YFCC metadata,
    ``.npy`` CC metadata, ``.json`` COCO annotations, ``.tsv``/``.csv``/``.parquet`` tables).

    Raises:
        SourceFormatError: when the kind cannot be told from the path.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "images").is_dir() and any(path.glob("*.pkl")):
            return "yfcc"
        return "folder"
    if not path.exists():
        raise SourceFormatError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "yfcc"
    if suffix == ".npy":
        return "cc"
    if suffix == ".json":
        return "coco"
    if suffix in TABLE_SUFFIXES:
        return "table"
    raise SourceFormatError(f"{path}: cannot tell the source format from the name; pass --format")


def find_yfcc_metadata(root: str | os.PathLike) -> Path:
    """The metadata pickle in a YFCC root: ``yfcc15m.pkl`` or else the only ``.pkl`` there."""
    root = Path(root)
    default = root / YFCC_METADATA_NAME
    if default.is_file():
        return default
    candidates = sorted(root.glob("*.pkl"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceFormatError(f"{root}: no {YFCC_METADATA_NAME} (or other .pkl) metadata found")
    names = ", ".join(p.name for p in candidates)
    raise SourceFormatError(f"{root}: several metadata pickles ({names}); pass the one to use")


def default_coco_root(annotations: str | os.PathLike) -> Path:
    """COCO root for an annotations file: ``coco/`` for ``coco/annotations/captions_*.json``."""
    parent = Path(annotations).resolve().parent
    return parent.parent if parent.name == "annotations" else parent


__all__ = [
    "CAPTION_COLUMN_CANDIDATES",
    "IMAGE_COLUMN_CANDIDATES",
    "IMAGE_EXTENSIONS",
    "SOURCE_FORMATS",
    "RestrictedUnpickler",
    "SampleSource",
    "SourceFormatError",
    "decode_yfcc_text",
    "default_coco_root",
    "detect_format",
    "find_yfcc_metadata",
    "load_npy_records",
    "load_restricted_pickle",
    "load_yfcc_metadata",
    "numeric_array_globals",
    "numpy_array_globals",
    "plain_data_globals",
    "read_cc",
    "read_coco",
    "read_folder",
    "read_table",
    "read_yfcc",
    "yfcc_image_location",
]
