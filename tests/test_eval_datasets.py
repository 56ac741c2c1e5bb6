"""Evaluation datasets (slip/eval/datasets.py): every catalog layout, class order, bad images."""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from slip.eval.datasets import (
    VOC2007_CLASSES,
    DatasetNotFoundError,
    ShardedEvalSampler,
    build_dataset,
    collate_skipping,
    load_benchmark_dir,
    make_eval_loader,
)
from slip.data.sources import SourceFormatError
from zero_shot import Benchmark, load_benchmarks

TOY = Benchmark(key="toy", name="Toy", classnames=("red", "green", "blue"), templates=("a {}.",), metric="top1")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _png_bytes(colour: tuple[int, int, int], size: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(colour))


def _mean_colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0).round())


# --- image folders --------------------------------------------------------------------------


def test_image_folder_labels_follow_sorted_folders_and_recurse(tmp_path):
    # Folder names sort into class order (as for CUB's "001.xxx"); images may sit in subfolders.
    _write_image(tmp_path / "test" / "0_red" / "a.png", COLOURS["red"])
    _write_image(tmp_path / "test" / "1_green" / "sub" / "b.png", COLOURS["green"])
    _write_image(tmp_path / "test" / "2_blue" / "c.png", COLOURS["blue"])
    (tmp_path / "test" / "2_blue" / "notes.txt").write_text("not an image")
    ds = build_dataset("toy", {"path": str(tmp_path), "type": "imagefolder", "test": "test"}, "test", None,
                       benchmark=TOY)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [label for _, label in items] == [0, 1, 2]
    assert [_mean_colour(img) for img, _ in items] == [COLOURS["red"], COLOURS["green"], COLOURS["blue"]]


def test_flowers_folders_map_by_number_not_string_sort(tmp_path):
    flowers = load_benchmarks()["flowers"]
    root = tmp_path / "flowers"
    for i in range(1, 103):
        (root / "test" / str(i)).mkdir(parents=True)
    for folder in ("1", "2", "10", "100"):
        _write_image(root / "test" / folder / "x.png", (int(folder), 0, 0))
    ds = build_dataset("flowers", {"path": str(root), "type": "imagefolder", "test": "test"}, "test", None)
    by_red = {_mean_colour(ds[i][0])[0]: ds[i][1] for i in range(len(ds))}
    # String sorting would put "10" at index 2 and "100" at index 3.
    assert by_red == {1: 0, 2: 1, 10: 9, 100: 99}
    assert flowers.classnames[9] == "globe thistle"


def test_hateful_memes_folders_zero_is_not_hateful(tmp_path):
    root = tmp_path / "hm"
    _write_image(root / "dev" / "0" / "a.png", (0, 0, 0))
    _write_image(root / "dev" / "1" / "b.png", (9, 9, 9))
    entry = {"path": str(root), "type": "imagefolder", "test": "dev"}
    ds = build_dataset("hateful_memes", entry, "test", None)
    assert sorted((_mean_colour(ds[i][0])[0], ds[i][1]) for i in range(2)) == [(0, 0), (9, 1)]
    assert load_benchmarks()["hateful_memes"].classnames[0] == "meme"
    (root / "dev" / "hateful").mkdir()
    with pytest.raises(ValueError, match="unexpected \\['hateful'\\]"):
        build_dataset("hateful_memes", entry, "test", None)


def test_unreadable_image_is_none_with_a_warning_and_collate_counts_it(tmp_path, caplog):
    _write_image(tmp_path / "test" / "0_red" / "a.png", COLOURS["red"])
    (tmp_path / "test" / "1_green").mkdir(parents=True)
    (tmp_path / "test" / "1_green" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    _write_image(tmp_path / "test" / "2_blue" / "c.png", COLOURS["blue"])
    truncated = _png_bytes(COLOURS["blue"], size=64)
    (tmp_path / "test" / "2_blue" / "d.png").write_bytes(truncated[: len(truncated) // 2])
    ds = build_dataset("toy", {"path": str(tmp_path), "type": "imagefolder", "test": "test"}, "test",
                       TF.to_tensor, benchmark=TOY)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING, logger="slip.eval.datasets"):
        assert ds[1] is None
    assert "broken.jpg" in caplog.text
    batches = list(make_eval_loader(ds, batch_size=3))
    assert [b[3] for b in batches] == [1, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 2]
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 2]


def test_missing_image_folder_names_key_and_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"'food101'.*<class folder>/<images>"):
        build_dataset("food101", {"path": str(tmp_path), "type": "imagefolder", "test": "test"}, "test", None)


def test_split_role_selects_the_entry_field(tmp_path):
    _write_image(tmp_path / "val" / "0_red" / "a.png", COLOURS["red"])
    _write_image(tmp_path / "val" / "1_green" / "a.png", COLOURS["red"])
    _write_image(tmp_path / "val" / "2_blue" / "a.png", COLOURS["red"])
    entry = {"path": str(tmp_path), "type": "imagefolder", "test": "val"}
    assert len(build_dataset("toy", entry, "test", None, benchmark=TOY)) == 3
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_dataset("toy", entry, "train", None, benchmark=TOY)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset("toy", entry, "val", None, benchmark=TOY)


# --- file lists -----------------------------------------------------------------------------


def _file_list(root: Path, split: str, labels: np.ndarray, n: int | None = None) -> None:
    n = len(labels) if n is None else n
    paths = []
    for i in range(n):
        _write_image(root / "imgs" / f"{i}.png", (i * 10, 0, 0))
        paths.append(f"imgs/{i}.png" if i % 2 else str(root / "imgs" / f"{i}.png"))  # relative and absolute
    np.save(root / f"{split}_images.npy", np.array(paths))
    np.save(root / f"{split}_labels.npy", labels)


def test_filelist_clevr_count_labels_map_to_class_names(tmp_path):
    labels = np.array(["count_10", "count_3", "count_5", "count_9"])
    _file_list(tmp_path, "val", labels)
    ds = build_dataset("clevr_counts", {"path": str(tmp_path), "type": "filelist", "test": "val"}, "test", None)
    # classnames are "10", "3", "4", ..., "9": the string sort of the counts.
    assert ds.targets == [0, 1, 3, 7]
    assert [_mean_colour(ds[i][0])[0] for i in range(4)] == [0, 10, 20, 30]


def test_filelist_numeric_labels_and_errors(tmp_path):
    _file_list(tmp_path, "test", np.array([3, 0, 396]))
    entry = {"path": str(tmp_path), "type": "filelist", "test": "test"}
    assert build_dataset("sun397", entry, "test", None).targets == [3, 0, 396]
    np.save(tmp_path / "test_labels.npy", np.array([3, 0, 397]))
    with pytest.raises(ValueError, match=r"outside \[0, 397\)"):
        build_dataset("sun397", entry, "test", None)
    np.save(tmp_path / "test_labels.npy", np.array(["abbey", "alley", "no such place"]))
    with pytest.raises(ValueError, match="no such place"):
        build_dataset("sun397", entry, "test", None)
    np.save(tmp_path / "test_labels.npy", np.array(["abbey", "alley", "airplane cabin"]))
    assert build_dataset("sun397", entry, "test", None).targets == [0, 3, 1]
    np.save(tmp_path / "test_labels.npy", np.array([1, 2, 3], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="re-save it as a string array"):
        build_dataset("sun397", entry, "test", None)
    (tmp_path / "test_images.npy").unlink()
    with pytest.raises(DatasetNotFoundError, match="'sun397'.*test_images.npy"):
        build_dataset("sun397", entry, "test", None)


# --- torchvision layouts, written by hand ----------------------------------------------------


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) with numpy 1.x wrote CIFAR's files: strings are
    8-bit ``str`` (SHORT_BINSTRING/BINSTRING), arrays are rebuilt by
    ``numpy.core.multiarray._reconstruct`` with a ``numpy.dtype`` and their raw bytes as a ``str``.
    Handles what CIFAR holds: dicts, lists, str, non-negative ints and uint8 arrays."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(i: int) -> bytes:
        return b"K" + bytes([i]) if i < 256 else b"M" + struct.pack("<H", i) if i < 65536 else b"J" + struct.pack("<i", i)

    def dump(o) -> bytes:
        if isinstance(o, str):
            return string(o.encode("latin1"))
        if isinstance(o, int):
            return integer(o)
        if isinstance(o, list):
            return b"](" + b"".join(map(dump, o)) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in o.items()) + b"u"
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R("
                 + integer(3) + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb")
        state = b"(" + integer(1) + b"(" + b"".join(map(integer, o.shape)) + b"t" + dtype + b"\x89" + string(o.tobytes()) + b"tb"
        return b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b") + b"\x87R" + state

    return b"\x80\x02" + dump(obj) + b"."


def _write_cifar(root: Path, hundred: bool, fmt: str | int = "py2") -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR-10/100's python layout with the keys the real files hold, pickled as Python 2 did
    (``fmt="py2"``) or by this Python at protocol ``fmt``."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    def write(name: str, obj: dict) -> None:
        (folder / name).write_bytes(_py2_pickle(obj) if fmt == "py2" else pickle.dumps(obj, protocol=fmt))

    written = {}
    for seed, name in enumerate(files):
        data = _cifar_images(2, seed)
        labels = [seed % 10, (seed + 7) % 10]
        entry = {"batch_label": f"{name} of 6", "data": data, "filenames": [f"img_{seed}_{i}.png" for i in range(2)]}
        if hundred:
            entry.update(fine_labels=labels, coarse_labels=[label // 5 for label in labels])
        else:
            entry["labels"] = labels
        write(name, entry)
        written[name] = (data, labels)
    if hundred:
        write("meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        write("batches.meta", {"num_cases_per_batch": 10000, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return written


@pytest.mark.parametrize("fmt", ["py2", 2, 5])
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reads_local_pickles_without_md5_or_download(tmp_path, hundred, fmt):
    written = _write_cifar(tmp_path, hundred, fmt)
    key = "cifar100" if hundred else "cifar10"
    entry = {"path": str(tmp_path), "type": "special"}
    test = build_dataset(key, entry, "test", None)
    data, labels = written["test" if hundred else "test_batch"]
    assert len(test) == 2
    image, label = test[1]
    assert label == labels[1]
    # Rows are channel-major 32x32 planes.
    assert np.array_equal(np.asarray(image), data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    train = build_dataset(key, entry, "train", None)
    assert len(train) == (2 if hundred else 10)
    assert [train[i][1] for i in range(len(train))] == [y for name, (_, ys) in written.items() if "test" not in name for y in ys]
    assert train.classes[:2] == ["c0", "c1"] and len(train.classes) == (100 if hundred else 10)


class _WritesFile:
    """Unpickling this calls ``open(path, "w")``: a pickle that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class _RunsShell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def test_cifar_refuses_pickles_that_would_run_code_naming_the_file(tmp_path):
    entry = {"path": str(tmp_path), "type": "special"}
    marker = tmp_path / "pwned"
    # The payload is live: plain pickle.load, as torchvision uses, creates the file.
    pickle.loads(pickle.dumps(_WritesFile(marker))).close()
    assert marker.exists()
    marker.unlink()
    folder = tmp_path / "cifar-10-batches-py"
    for payload, refused in ((_WritesFile(marker), r"builtins\.open|io\.open"), (_RunsShell(marker), r"posix\.system|os\.system")):
        for name in ("test_batch", "batches.meta"):  # a data batch and the metadata file
            shutil.rmtree(folder, ignore_errors=True)
            _write_cifar(tmp_path, hundred=False, fmt=2)
            clean = pickle.loads((folder / name).read_bytes())  # written just now by the test
            clean["labels" if name == "test_batch" else "label_names"] = payload
            (folder / name).write_bytes(pickle.dumps(clean, protocol=2))
            with pytest.raises(SourceFormatError, match=rf"{re.escape(str(folder / name))}: refusing to unpickle ({refused})"):
                build_dataset("cifar10", entry, "test", None)
            assert not marker.exists()


def test_cifar_refuses_object_arrays(tmp_path):
    # An object array's elements are unpickled as arbitrary objects; CIFAR only has uint8 arrays.
    entry = {"path": str(tmp_path), "type": "special"}
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(tmp_path, hundred=False, fmt=2)
    clean = pickle.loads((folder / "test_batch").read_bytes())
    for objects in (np.array([b"x" * 3072, b"y" * 3072], dtype=object),
                    np.array([{"a": 1}, _WritesFile(tmp_path / "pwned")], dtype=object)):
        for protocol in (2, 5):
            clean["data"] = objects
            (folder / "test_batch").write_bytes(pickle.dumps(clean, protocol=protocol))
            with pytest.raises(SourceFormatError, match=rf"{re.escape(str(folder / 'test_batch'))}: refusing an array of Python objects"):
                build_dataset("cifar10", entry, "test", None)
    assert not (tmp_path / "pwned").exists()


def test_special_dataset_missing_names_key_and_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"'cifar10'.*cifar-10-batches-py/test_batch.*Nothing is downloaded"):
        build_dataset("cifar10", {"path": str(tmp_path), "type": "special"}, "test", None)
    with pytest.raises(DatasetNotFoundError, match=r"'mnist'.*MNIST/raw/t10k-images-idx3-ubyte"):
        build_dataset("mnist", {"path": str(tmp_path), "type": "special"}, "test", None)
    with pytest.raises(ValueError, match="only for"):
        build_dataset("food101", {"path": str(tmp_path), "type": "special"}, "test", None)


def test_mnist_reads_raw_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    # idx format: big-endian magic (0x0803 = uint8, 3 dims), then the dimensions, then the data.
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, 3, 28, 28) + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 3) + labels.tobytes())
    ds = build_dataset("mnist", {"path": str(tmp_path), "type": "special"}, "test", None)
    assert [ds[i][1] for i in range(3)] == [7, 0, 9]
    assert np.array_equal(np.asarray(ds[2][0]), images[2])


def test_stl10_test_split_needs_only_its_own_files(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.random.default_rng(1).integers(0, 256, size=(2, 3, 96, 96), dtype=np.uint8)
    # STL-10 stores each channel column-major (hence the transpose) and labels 1..10.
    images.transpose(0, 1, 3, 2).tofile(folder / "test_X.bin")
    np.array([1, 10], dtype=np.uint8).tofile(folder / "test_y.bin")
    ds = build_dataset("stl10", {"path": str(tmp_path), "type": "special"}, "test", None)
    assert [ds[0][1], ds[1][1]] == [0, 9]
    assert np.array_equal(np.asarray(ds[1][0]), images[1].transpose(1, 2, 0))
    with pytest.raises(DatasetNotFoundError, match="train_X.bin"):
        build_dataset("stl10", {"path": str(tmp_path), "type": "special"}, "train", None)


# --- webdataset shards ------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_wds_shards_labels_from_cls_or_json(tmp_path):
    with tarfile.open(tmp_path / "test-000000.tar", "w") as tar:
        _add(tar, "a.jpg", _png_bytes(COLOURS["red"], fmt="JPEG"))
        _add(tar, "a.cls", b"2\n")
        _add(tar, "dir/b.png", _png_bytes(COLOURS["green"]))
        _add(tar, "dir/b.json", json.dumps({"label": 1, "caption": "x"}).encode())
    with tarfile.open(tmp_path / "test-000001.tar", "w") as tar:
        _add(tar, "c.png", b"garbage")
        _add(tar, "c.json", json.dumps({"cls": 0, "label": 2}).encode())
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        _add(tar, "z.png", _png_bytes(COLOURS["blue"]))
        _add(tar, "z.cls", b"0")
    entry = {"path": str(tmp_path), "type": "wds", "test": "test"}
    ds = build_dataset("toy", entry, "test", None, benchmark=TOY)
    assert ds.targets == [2, 1, 0]  # "cls" wins over "label"
    assert _mean_colour(ds[1][0]) == COLOURS["green"]
    assert ds[2] is None  # undecodable image: skipped, not fatal
    assert len(build_dataset("toy", entry, "train", None, benchmark=TOY)) == 1

    with tarfile.open(tmp_path / "test-000002.tar", "w") as tar:
        _add(tar, "d.png", _png_bytes(COLOURS["blue"]))
    with pytest.raises(ValueError, match="sample 'd': no label"):
        build_dataset("toy", entry, "test", None, benchmark=TOY)
    with pytest.raises(DatasetNotFoundError, match=r"'toy'.*val-\*\.tar"):
        build_dataset("toy", {**entry, "test": "val"}, "test", None, benchmark=TOY)


def test_synthetic_benchmark_directory_is_read(tmp_path):
    from slip.data.synthetic import generate_synthetic

    generate_synthetic(tmp_path, seed=3, train_samples=1, test_per_class=1, image_size=16)
    local = load_benchmark_dir(tmp_path / "benchmark")
    meta = json.loads((tmp_path / "benchmark" / "benchmark.json").read_text())
    assert list(local.benchmark.classnames) == meta["classes"]
    assert local.benchmark.templates == tuple(meta["templates"])
    assert set(local.groups["held_out"]) == set(meta["held_out_indices"])
    assert sorted(local.groups["held_out"] + local.groups["seen"]) == list(range(len(meta["classes"])))
    ds = build_dataset(local.benchmark.key, local.entry, "test", TF.to_tensor, benchmark=local.benchmark)
    assert sorted(ds.targets) == list(range(len(meta["classes"])))  # one image per class
    image, _ = ds[0]
    assert image.shape == (3, 16, 16)
    with pytest.raises(DatasetNotFoundError, match="benchmark.json"):
        load_benchmark_dir(tmp_path / "train")


# --- VOC 2007 --------------------------------------------------------------------------------


def test_voc2007_multi_hot_targets_with_difficult(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for image_id in ("000001", "000002"):
        _write_image(root / "JPEGImages" / f"{image_id}.jpg", (1, 2, 3))
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for name in VOC2007_CLASSES:
        first = {"dog": " 1", "cat": " 0"}.get(name, "-1")
        second = {"dog": "-1", "person": " 1"}.get(name, "-1")
        (main / f"{name}_test.txt").write_text(f"000001 {first}\n000002 {second}\n")
    ds = build_dataset("voc2007", {"path": str(tmp_path / "VOCdevkit"), "type": "voc2007"}, "test", TF.to_tensor)
    assert len(ds) == 2
    first, second = ds.targets
    classes = list(VOC2007_CLASSES)
    assert first[classes.index("dog")] == 1 and first[classes.index("cat")] == -1
    assert int((first != 0).sum()) == 2 and int((second != 0).sum()) == 1
    assert second[classes.index("person")] == 1
    # benchmarks.json's class names follow the same order as the file-name ids.
    names = load_benchmarks()["voc2007"].classnames
    assert [n.replace(" ", "") for n in names] == classes
    _, labels, _, _ = next(iter(make_eval_loader(ds, batch_size=2)))
    assert labels.shape == (2, 20)


# --- loading helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(7, 2), (7, 3), (2, 3), (0, 2)])
def test_sharded_sampler_covers_every_index_once_without_padding(n, world):
    parts = [list(ShardedEvalSampler(n, r, world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert [len(ShardedEvalSampler(n, r, world)) for r in range(world)] == [len(p) for p in parts]


def test_collate_skipping_all_bad_batch():
    images, labels, indices, skipped = collate_skipping([(0, None), (1, None)])
    assert skipped == 2 and len(labels) == 0 and len(indices) == 0
