"""Evaluation datasets: every catalog layout as a map-style ``Dataset`` of ``(image, label)``.

:func:`build_dataset` is the one entry point, shared by zero-shot evaluation and the linear
probe. It reads a catalog entry (see ``zero_shot/README.md``) and returns a dataset whose
items are ``(transform(image), label)``: ``label`` is an ``int`` class index in the order of
the benchmark's ``classnames``, or for VOC2007 a ``(20,)`` tensor (see
:class:`VOC2007Dataset`).

Layouts (the catalog ``type``):

* ``imagefolder``: ``{path}/{split}/{class folder}/**/{image}``; folders are mapped to label
  indices by :meth:`zero_shot.Benchmark.folder_to_index` (sorted names, or the benchmark's
  declared ``folder_names`` for Flowers-102 and Hateful Memes).
* ``filelist``: VISSL-style ``{path}/{split}_images.npy`` (image paths, relative ones taken
  from ``path``) and ``{split}_labels.npy`` (integer indices, or class-name strings such as
  CLEVR's ``count_10``).
* ``special``: CIFAR-10/100, MNIST and STL-10 read by torchvision from ``path``, never
  downloaded.
* ``wds``: webdataset tar shards ``{path}/{split}-*.tar`` or ``{path}/{split}/*.tar``; each
  sample has an image member (``{key}.jpg``, ``.png``, ...) and its label in ``{key}.cls`` or
  in the ``cls``/``label`` field of ``{key}.json``. The synthetic benchmark written by
  ``slip.data.synthetic`` is such a directory; :func:`load_benchmark_dir` reads its metadata.
* ``voc2007``: the PASCAL VOC 2007 devkit layout (multi-label).

Unreadable images never stop an evaluation: the item is returned as ``None`` with a logged
warning, and :func:`collate_skipping` drops it and counts it. Loaders built with
:func:`make_eval_loader` therefore yield ``(images, labels, indices, skipped)``.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tv_datasets

from zero_shot import Benchmark, load_benchmarks

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetNotFoundError",
    "FileListDataset",
    "ImageFolderDataset",
    "LocalBenchmark",
    "ShardedEvalSampler",
    "VOC2007Dataset",
    "VOC2007_CLASSES",
    "WebDatasetShards",
    "build_dataset",
    "collate_skipping",
    "load_benchmark_dir",
    "make_eval_loader",
    "resolve_split",
]

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, so a folder that worked with SLIP's loader works here.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What PIL raises for a broken, truncated or hostile file: OSError (incl. UnidentifiedImageError),
# SyntaxError/ValueError from some format plugins, DecompressionBombError for huge images.
BAD_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
)

# The split read for each role when the catalog entry does not name one.
_DEFAULT_SPLITS = {"train": "train", "test": "test"}

Transform = Callable[[Any], Any] | None


class DatasetNotFoundError(FileNotFoundError):
    """A catalog entry's files are not on disk; the message names the key and the expected layout."""


def resolve_split(entry: Mapping[str, str], split: str) -> str:
    """The on-disk split name for the role ``split`` ("train" or "test") of a catalog entry."""
    if split not in _DEFAULT_SPLITS:
        raise ValueError(f"split must be 'train' or 'test' (the catalog roles), got {split!r}")
    return entry.get(split, _DEFAULT_SPLITS[split])


def _open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Decode an image fully (``load``) so a truncated file fails here, inside the skip guard."""
    if isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()
    return image.convert("RGB")


class _SkippingDataset(Dataset):
    """Base of the file-backed datasets: an unreadable image gives ``None`` plus a warning.

    Subclasses set ``targets`` (one label per item) and implement ``_read(index)`` (raw bytes
    or a path) and ``_describe(index)`` (for the warning).
    """

    targets: Sequence[Any]

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def _read(self, index: int) -> str | os.PathLike | bytes:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        try:
            image = _open_image(self._read(index))
        except BAD_IMAGE_ERRORS as e:
            logger.warning("skipping unreadable image %s: %s", self._describe(index), e)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ImageFolderDataset(_SkippingDataset):
    """``{root}/{class folder}/**/{image}``, labels from :meth:`Benchmark.folder_to_index`.

    Files are listed recursively in sorted order with :data:`IMAGE_EXTENSIONS` (as
    torchvision's ``ImageFolder`` does); hidden files and folders are ignored.
    """

    def __init__(self, root: str | os.PathLike, benchmark: Benchmark, transform: Transform = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        folders = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith("."))
        self.class_to_idx = benchmark.folder_to_index(folders)
        self.samples: list[tuple[str, int]] = []
        for folder in folders:
            label = self.class_to_idx[folder]
            for dirpath, dirnames, filenames in os.walk(self.root / folder, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), label))
        self.targets = [label for _, label in self.samples]

    def _read(self, index: int) -> str:
        return self.samples[index][0]

    def _describe(self, index: int) -> str:
        return self.samples[index][0]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        # Object arrays need pickle, which can run code; ask for a plain string array instead.
        raise ValueError(
            f"{path}: cannot be read without unpickling ({e}); re-save it as a string array, e.g. "
            f"np.save(p, np.load(p, allow_pickle=True).astype(str)) on a file you trust"
        ) from None


def _labels_to_indices(labels: np.ndarray, benchmark: Benchmark, source: object) -> list[int]:
    """File-list labels -> class indices.

    Integer arrays are indices. String arrays are matched by name first (class names and
    synonyms, so CLEVR's numeric-looking names "10", "3", ... are never misread as indices),
    then after dropping a ``word_`` prefix (VISSL's ``count_10``), and only then, if every
    label is a decimal integer, as indices.
    """
    n = benchmark.num_classes
    if np.issubdtype(labels.dtype, np.integer):
        out = [int(v) for v in labels]
    elif labels.dtype.kind in "US":
        strings = [v.decode() if isinstance(v, bytes) else str(v) for v in labels.tolist()]
        by_name = {name: i for i, synonyms in enumerate(benchmark.class_synonyms) for name in synonyms}
        prefix = re.compile(r"^[A-Za-z]+_(.+)$")

        def stripped(s: str) -> str:
            m = prefix.match(s)
            return m.group(1) if m else s

        if all(s in by_name for s in strings):
            out = [by_name[s] for s in strings]
        elif all(stripped(s) in by_name for s in strings):
            out = [by_name[stripped(s)] for s in strings]
        elif all(re.fullmatch(r"\d+", s) for s in strings):
            out = [int(s) for s in strings]
        else:
            unknown = sorted({s for s in strings if s not in by_name and stripped(s) not in by_name})
            raise ValueError(f"{source}: labels {unknown[:5]} are not class names of {benchmark.key}")
    else:
        raise ValueError(f"{source}: labels must be integers or strings, found dtype {labels.dtype}")
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise ValueError(f"{source}: label indices {bad[:5]} outside [0, {n}) for {benchmark.key}")
    return out


class FileListDataset(_SkippingDataset):
    """VISSL-style lists: ``images.npy`` (paths) and ``labels.npy`` of the same length."""

    def __init__(self, images_npy: str | os.PathLike, labels_npy: str | os.PathLike, benchmark: Benchmark,
                 transform: Transform = None, base_dir: str | os.PathLike | None = None) -> None:
        super().__init__(transform)
        images = _load_npy(Path(images_npy))
        labels = _load_npy(Path(labels_npy))
        if images.ndim != 1 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_npy} and {labels_npy} must be 1-D lists of the same length, "
                             f"got shapes {images.shape} and {labels.shape}")
        base = Path(base_dir) if base_dir is not None else Path(images_npy).parent
        self.paths = [str(p if os.path.isabs(p) else base / p) for p in map(str, images.tolist())]
        self.targets = _labels_to_indices(labels, benchmark, labels_npy)

    def _read(self, index: int) -> str:
        return self.paths[index]

    def _describe(self, index: int) -> str:
        return self.paths[index]


class TableDataset(_SkippingDataset):
    """A CSV or TSV of ``path,label`` rows (a header naming those columns); paths relative to the
    table's folder; labels class indices or class names (see :func:`_labels_to_indices`)."""

    def __init__(self, table: str | os.PathLike, benchmark: Benchmark, transform: Transform = None) -> None:
        import csv

        super().__init__(transform)
        table = Path(table)
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix == ".tsv" else ","))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{table}: expected a header with the columns path and label, and at least one row")
        self.paths = [str(Path(r["path"]) if os.path.isabs(r["path"]) else table.parent / r["path"]) for r in rows]
        self.targets = _labels_to_indices(np.array([r["label"].strip() for r in rows]), benchmark, table)

    def _read(self, index: int) -> str:
        return self.paths[index]

    def _describe(self, index: int) -> str:
        return self.paths[index]


# webdataset's sample grouping: the key is the member path up to the first "." of its base name.
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_WDS_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class _ShardMember:
    shard: int  # index into WebDatasetShards.shards
    offset: int  # byte offset of the member's data in the tar file
    size: int
    key: str


class WebDatasetShards(_SkippingDataset):
    """Labelled webdataset tar shards as a map-style dataset.

    The shards are indexed once (member offsets; labels read eagerly), so items can be read by
    index: a distributed sampler can then split them exactly, without duplicates.

    Raises:
        ValueError: for a sample without an image or without a label (a wrong dataset, not a
            bad image), or a label outside ``[0, num_classes)``.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], transform: Transform = None,
                 num_classes: int | None = None) -> None:
        super().__init__(transform)
        self.shards = [str(s) for s in shards]
        self.members: list[_ShardMember] = []
        self.targets: list[int] = []
        for shard_index, shard in enumerate(self.shards):
            self._index_shard(shard_index, shard, num_classes)

    def _index_shard(self, shard_index: int, shard: str, num_classes: int | None) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                m = _WDS_KEY.match(info.name)
                if not info.isfile() or m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = info
            for key in order:
                parts = groups[key]
                image_ext = next((e for e in _WDS_IMAGE_EXTS if e in parts), None)
                if image_ext is None:
                    raise ValueError(f"{shard}: sample {key!r} has no image member (one of {_WDS_IMAGE_EXTS})")
                label = self._read_label(tar, parts, f"{shard}: sample {key!r}")
                if num_classes is not None and not 0 <= label < num_classes:
                    raise ValueError(f"{shard}: sample {key!r} has label {label} outside [0, {num_classes})")
                info = parts[image_ext]
                self.members.append(_ShardMember(shard_index, info.offset_data, info.size, key))
                self.targets.append(label)

    @staticmethod
    def _read_label(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], where: str) -> int:
        def read(ext: str) -> bytes:
            f = tar.extractfile(parts[ext])
            assert f is not None  # regular files always have data
            return f.read()

        if "cls" in parts:
            text = read("cls").decode("utf-8").strip()
            if not re.fullmatch(r"-?\d+", text):
                raise ValueError(f"{where}: .cls holds {text!r}, not an integer class index")
            return int(text)
        if "json" in parts:
            meta = json.loads(read("json"))
            for field in ("cls", "label"):
                value = meta.get(field) if isinstance(meta, dict) else None
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        raise ValueError(f"{where}: no label (a .cls member, or an integer 'cls'/'label' field in .json)")

    def _read(self, index: int) -> bytes:
        m = self.members[index]
        with open(self.shards[m.shard], "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)

    def _describe(self, index: int) -> str:
        m = self.members[index]
        return f"{self.shards[m.shard]}:{m.key}"


# File-name ids of the VOC classes in benchmarks.json order (CLIP's order, which differs from
# the devkit's alphabetical one: dog, horse, ... come before diningtable and pottedplant).
VOC2007_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dog", "horse", "motorbike", "person", "sheep", "sofa", "diningtable", "pottedplant",
    "train", "tvmonitor",
)


class VOC2007Dataset(_SkippingDataset):
    """PASCAL VOC 2007 classification: ``{root}/JPEGImages/{id}.jpg`` and
    ``{root}/ImageSets/Main/{class}_{split}.txt`` (lines ``{id} {1|-1|0}``).

    Each label is an int64 ``(20,)`` tensor in :data:`VOC2007_CLASSES` order: 1 where the class
    is present, 0 where absent, and -1 where the image holds only "difficult" instances of it,
    which the VOC protocol leaves out of that class's AP (see
    :func:`slip.eval.zero_shot.compute_benchmark_metric`). A linear probe should treat -1 as
    "ignore" (or as present) rather than as a third class.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        ids: list[str] | None = None
        columns = []
        for name in VOC2007_CLASSES:
            rows = [line.split() for line in (self.root / "ImageSets" / "Main" / f"{name}_{split}.txt")
                    .read_text().splitlines() if line.strip()]
            these = [r[0] for r in rows]
            if ids is None:
                ids = these
            elif these != ids:
                raise ValueError(f"{self.root}: {name}_{split}.txt lists other images than {VOC2007_CLASSES[0]}_{split}.txt")
            codes = {"1": 1, "-1": 0, "0": -1}
            bad = [r for r in rows if len(r) != 2 or r[1] not in codes]
            if bad:
                raise ValueError(f"{self.root}: {name}_{split}.txt has malformed lines, e.g. {' '.join(bad[0])!r}")
            columns.append([codes[r[1]] for r in rows])
        self.ids = ids or []
        table = torch.tensor(columns, dtype=torch.int64).T.contiguous() if self.ids else torch.zeros(0, 20, dtype=torch.int64)
        self.targets = list(table)

    def _read(self, index: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def _describe(self, index: int) -> str:
        return str(self._read(index))


# --- torchvision datasets, read from local files only -------------------------------------
#
# torchvision verifies the md5 of every file of *both* splits before loading; STL-10's check
# even reads (and requires) the 2.6 GB unlabeled file to evaluate on the test split. Here
# only the presence of the files the requested split reads is checked; a truncated file still
# fails when torchvision reshapes its arrays.


def _load_cifar_pickle(path: str) -> dict:
    """One of CIFAR's python-format files, unpickled without running code.

    The files are (Python 2) pickles of dicts of strings, lists and uint8 arrays; torchvision
    opens them with ``pickle.load``, which would run whatever a tampered file asks for. Here
    :class:`slip.data.sources.RestrictedUnpickler` rebuilds only plain data and numeric numpy
    arrays and raises :class:`~slip.data.sources.SourceFormatError` (a ``ValueError``) naming
    the file for anything else.
    """
    from slip.data.sources import SourceFormatError, load_restricted_pickle, numeric_array_globals

    data = load_restricted_pickle(path, allowed=numeric_array_globals(), encoding="latin1")
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: expected a dict in a CIFAR python file, found {type(data).__name__}")
    return data


class _CIFAR10(tv_datasets.CIFAR10):
    # torchvision's __init__ and _load_meta unpickle the files with pickle.load; these read the
    # same layout through _load_cifar_pickle.
    def __init__(self, root: str, train: bool = True, transform: Transform = None, target_transform=None,
                 download: bool = False) -> None:
        if download:
            raise ValueError("slip never downloads datasets")
        tv_datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if not self._check_integrity():
            raise RuntimeError("Dataset not found")  # turned into DatasetNotFoundError by _build_special
        arrays: list[np.ndarray] = []
        self.targets: list[int] = []
        for name, _ in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, name)
            entry = _load_cifar_pickle(path)
            data = entry.get("data")
            labels = entry.get("labels", entry.get("fine_labels"))
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
            if not isinstance(labels, list) or len(labels) != len(data):
                raise ValueError(f"{path}: expected {len(data)} labels under 'labels' or 'fine_labels'")
            arrays.append(data)
            self.targets.extend(int(label) for label in labels)
        # Rows are channel-major 32 x 32 planes; images are served as HWC uint8.
        self.data = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self._load_meta()

    def _split_files(self) -> list[str]:
        files = [f for f, _ in (self.train_list if self.train else self.test_list)]
        return files + [self.meta["filename"]]

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in self._split_files())

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        data = _load_cifar_pickle(path)
        if not isinstance(data.get(self.meta["key"]), list):
            raise ValueError(f"{path}: expected the class names as a list under {self.meta['key']!r}")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100(_CIFAR10, tv_datasets.CIFAR100):
    pass


class _MNIST(tv_datasets.MNIST):
    # torchvision derives the folder from the class name; keep MNIST's, not this subclass's.
    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "processed")

    def _check_exists(self) -> bool:
        prefix = "train" if self.train else "t10k"
        return all(os.path.isfile(os.path.join(self.raw_folder, f"{prefix}-{kind}-idx{d}-ubyte"))
                   for kind, d in (("images", 3), ("labels", 1)))


class _STL10(tv_datasets.STL10):
    def _check_integrity(self) -> bool:
        files = self.test_list if self.split == "test" else self.train_list[:2]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in files)


def _special_layout(key: str, root: str, split: str) -> str:
    train = split == "train"
    return {
        "cifar10": f"{root}/cifar-10-batches-py/{'data_batch_1..5' if train else 'test_batch'} and batches.meta "
                   "(the extracted cifar-10-python.tar.gz)",
        "cifar100": f"{root}/cifar-100-python/{'train' if train else 'test'} and meta (the extracted cifar-100-python.tar.gz)",
        "mnist": f"{root}/MNIST/raw/{'train' if train else 't10k'}-images-idx3-ubyte and "
                 f"{'train' if train else 't10k'}-labels-idx1-ubyte (gunzipped)",
        "stl10": f"{root}/stl10_binary/{'train' if train else 'test'}_X.bin and {'train' if train else 'test'}_y.bin "
                 "(the extracted stl10_binary.tar.gz)",
    }[key]


def _build_special(key: str, root: str, split: str, transform: Transform) -> Dataset:
    builders: dict[str, Callable[[], Dataset]] = {
        "cifar10": lambda: _CIFAR10(root, train=split == "train", transform=transform, download=False),
        "cifar100": lambda: _CIFAR100(root, train=split == "train", transform=transform, download=False),
        "mnist": lambda: _MNIST(root, train=split == "train", transform=transform, download=False),
        "stl10": lambda: _STL10(root, split="train" if split == "train" else "test", transform=transform, download=False),
    }
    if key not in builders:
        raise ValueError(f"catalog entry {key!r}: type 'special' is only for {sorted(builders)}")
    try:
        return builders[key]()
    except RuntimeError as e:
        if "not found" in str(e):
            raise DatasetNotFoundError(
                f"catalog entry {key!r} (type special): dataset not found; expected "
                f"{_special_layout(key, root, split)}. Nothing is downloaded.") from None
        raise


def _wds_shards(root: Path, split: str) -> list[Path]:
    """Shards of a split: ``{root}/{split}-*.tar``, else every tar in ``{root}/{split}/``."""
    shards = sorted(root.glob(f"{glob.escape(split)}-*.tar"))
    if not shards and (root / split).is_dir():
        shards = sorted((root / split).glob("*.tar"))
    return shards


def build_dataset(key: str, entry: Mapping[str, str], split: str, transform: Transform,
                  benchmark: Benchmark | None = None) -> Dataset:
    """The ``split`` ("train" or "test") of the catalog entry ``entry`` for benchmark ``key``.

    Args:
        key: benchmark key (``benchmarks.json``); selects the torchvision class for
            ``special`` and the class order for ``imagefolder``/``filelist``.
        entry: catalog entry (``path``, ``type``, optional ``train``/``test`` split names).
        split: the catalog role, "train" or "test"; the entry's field gives the on-disk name.
        transform: applied to each PIL image (RGB).
        benchmark: metadata to use instead of ``load_benchmarks()[key]`` (for a benchmark
            that is not in ``benchmarks.json``, e.g. from :func:`load_benchmark_dir`).

    Returns:
        A dataset of ``(image, label)``; items of unreadable images are ``None`` (use
        :func:`collate_skipping` or :func:`make_eval_loader`).

    Raises:
        DatasetNotFoundError: (a ``FileNotFoundError``) when the files are not there; the
            message names ``key`` and the layout that was expected.
        ValueError: for a malformed dataset (wrong class folders, labels out of range ...).
    """
    kind = entry.get("type")
    root = str(entry.get("path", ""))
    split_name = resolve_split(entry, split)
    if benchmark is None and kind in ("imagefolder", "filelist", "wds", "table"):
        benchmarks = load_benchmarks()
        if key not in benchmarks:
            raise ValueError(f"unknown benchmark {key!r}; known benchmarks: {', '.join(benchmarks)}")
        benchmark = benchmarks[key]

    def missing(what: str, layout: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(f"catalog entry {key!r} (type {kind}): {what} not found; expected {layout}")

    if kind == "imagefolder":
        assert benchmark is not None
        folder = Path(root) / split_name
        if not folder.is_dir():
            raise missing(f"directory {folder}", f"{root}/{split_name}/<class folder>/<images>")
        return ImageFolderDataset(folder, benchmark, transform)
    if kind == "filelist":
        assert benchmark is not None
        images, labels = Path(root) / f"{split_name}_images.npy", Path(root) / f"{split_name}_labels.npy"
        for f in (images, labels):
            if not f.is_file():
                raise missing(str(f), f"{root}/{split_name}_images.npy and {root}/{split_name}_labels.npy")
        return FileListDataset(images, labels, benchmark, transform, base_dir=root)
    if kind == "table":
        assert benchmark is not None
        found = [Path(root) / f"{split_name}{ext}" for ext in (".csv", ".tsv") if (Path(root) / f"{split_name}{ext}").is_file()]
        if not found:
            raise missing(f"{root}/{split_name}.csv", f"{root}/{split_name}.csv or .tsv with columns path,label")
        return TableDataset(found[0], benchmark, transform)
    if kind == "special":
        return _build_special(key, root, split, transform)
    if kind == "wds":
        assert benchmark is not None
        shards = _wds_shards(Path(root), split_name)
        if not shards:
            raise missing(f"shards of split {split_name!r} in {root}",
                          f"{root}/{split_name}-*.tar or {root}/{split_name}/*.tar")
        return WebDatasetShards(shards, transform, num_classes=benchmark.num_classes)
    if kind == "voc2007":
        base = Path(root)
        if not (base / "ImageSets").is_dir() and (base / "VOC2007" / "ImageSets").is_dir():
            base = base / "VOC2007"  # the VOCdevkit folder was given
        name = entry.get(split, "test" if split == "test" else "trainval")
        first = base / "ImageSets" / "Main" / f"{VOC2007_CLASSES[0]}_{name}.txt"
        if not first.is_file():
            raise missing(str(first), f"{root}/JPEGImages/<id>.jpg and {root}/ImageSets/Main/<class>_{name}.txt")
        return VOC2007Dataset(base, name, transform)
    raise ValueError(f"catalog entry {key!r}: type {kind!r} is not an image-classification layout")


# --- loading -----------------------------------------------------------------------------


def collate_skipping(batch: Sequence[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Collate ``(index, item)`` pairs into ``(images, labels, indices, skipped)``.

    ``None`` items (unreadable images) are dropped and counted in ``skipped``; the count rides
    along with the batch so it reaches the main process from worker processes too. Labels are
    an int64 ``(B,)`` tensor, or ``(B, C)`` stacked for multi-label datasets.
    """
    kept = [(i, item) for i, item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), skipped
    indices = torch.tensor([i for i, _ in kept], dtype=torch.int64)
    images = torch.stack([item[0] for _, item in kept])
    labels = [item[1] for _, item in kept]
    if isinstance(labels[0], torch.Tensor):
        label_tensor = torch.stack(labels).to(torch.int64)
    else:
        label_tensor = torch.tensor([int(v) for v in labels], dtype=torch.int64)
    return images, label_tensor, indices, skipped


class _WithIndex(Dataset):
    """Pairs each item with its dataset index, so gathered results can be put back in order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every item on exactly one rank, none repeated.

    Unlike ``DistributedSampler`` nothing is padded, so ranks may get one item more or less,
    and the union over ranks is exactly the dataset (results stay exact).
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_eval_loader(dataset: Dataset, batch_size: int = 256, workers: int = 0,
                     rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader yielding ``(images, labels, indices, skipped)`` over this rank's share of ``dataset``."""
    return DataLoader(
        _WithIndex(dataset),
        batch_size=batch_size,
        sampler=ShardedEvalSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=False,
        persistent_workers=False,
    )


# --- benchmark directories (the synthetic benchmark) ---------------------------------------

SYNTHETIC_BENCHMARK_FORMAT = "slip-synthetic-benchmark/1"


@dataclass(frozen=True)
class LocalBenchmark:
    """A benchmark described by a ``benchmark.json`` beside its shards.

    Attributes:
        benchmark: class names, templates and metric, as for ``benchmarks.json`` entries.
        entry: a catalog entry for :func:`build_dataset` (type ``wds``).
        groups: named subsets of class indices reported separately (``held_out`` and
            ``seen`` for the synthetic benchmark).
    """

    benchmark: Benchmark
    entry: dict[str, str]
    groups: dict[str, tuple[int, ...]]


def load_benchmark_dir(path: str | os.PathLike, key: str = "synthetic") -> LocalBenchmark:
    """Read the benchmark written by ``slip.data.synthetic`` (``OUT/benchmark``).

    ``benchmark.json`` gives the classes (label order), the prompt templates and the held-out
    classes; the images are the labelled ``test-*.tar`` shards beside it.

    Raises:
        DatasetNotFoundError: if ``benchmark.json`` is missing.
        ValueError: if it is not a ``slip-synthetic-benchmark/1`` file.
    """
    root = Path(path)
    meta_path = root / "benchmark.json"
    if not meta_path.is_file():
        raise DatasetNotFoundError(f"{meta_path} not found; expected a benchmark directory written by "
                                   "'slip make-synthetic OUT' (OUT/benchmark)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != SYNTHETIC_BENCHMARK_FORMAT:
        raise ValueError(f"{meta_path}: not a {SYNTHETIC_BENCHMARK_FORMAT} file")
    classes = tuple(str(c) for c in meta["classes"])
    name = "Synthetic shapes" if key == "synthetic" else f"Synthetic shapes ({key})"
    benchmark = Benchmark(key=key, name=name, classnames=classes,
                          templates=tuple(meta["templates"]), metric="top1")
    held = tuple(int(i) for i in meta.get("held_out_indices", ()))
    groups = {"held_out": held, "seen": tuple(i for i in range(len(classes)) if i not in set(held))} if held else {}
    return LocalBenchmark(benchmark, {"path": str(root), "type": "wds", "test": "test"}, groups)
