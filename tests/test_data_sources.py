"""Tests of slip.data.sources readers and the ``slip make-shards`` command (make_shards.main)."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shlex
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slip.data import make_shards, sources
from slip.data.shards import load_index, write_shards
from slip.data.sources import SourceFormatError


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small distinct RGB JPEG per seed."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 20 % 256, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def read_samples(out_dir: Path) -> list[dict]:
    """All samples of a shard directory in order: key, jpg bytes, caption, json."""
    result = []
    for shard in load_index(out_dir)["shards"]:
        with tarfile.open(out_dir / shard["name"]) as tar:
            members: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
        for sample in members.values():
            result.append(
                {"key": sample["key"], "jpg": sample["jpg"], "txt": sample["txt"].decode(), "json": json.loads(sample["json"])}
            )
    return result


class Evil:
    """Unpickling this runs a shell command that creates ``marker``, unless refused."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# ------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, bytes]:
    (root / "b_dir" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.jpg": jpeg(1),
        "b_dir/x.png": png(2),
        "b_dir/deeper/y.JPEG": jpeg(3),
        "c.jpg": jpeg(4),  # no caption file
        "d.jpg": jpeg(5),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "a.txt").write_text("caption of a\n", encoding="utf-8")
    (root / "b_dir" / "x.txt").write_text("caption of x", encoding="utf-8")
    (root / "b_dir" / "deeper" / "y.txt").write_text("caption of y", encoding="utf-8")
    (root / "d.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden" / "h.jpg").write_bytes(jpeg(9))
    (root / ".hidden" / "h.txt").write_text("hidden")
    return files


def test_read_folder_sorted_recursive(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "src")
    samples = list(sources.read_folder(tmp_path / "src"))
    assert [s.key for s in samples] == ["a", "c", "d", "b_dir/x", "b_dir/deeper/y"]
    assert samples[0].caption == b"caption of a\n"
    assert samples[1].caption is None
    assert [s.extra["path"] for s in samples] == ["a.jpg", "c.jpg", "d.jpg", "b_dir/x.png", "b_dir/deeper/y.JPEG"]
    assert list(sources.read_folder(tmp_path / "src")) == samples  # re-iterable, deterministic

    index = write_shards(sources.read_folder(tmp_path / "src"), tmp_path / "out", progress=False)
    assert index["skipped"] == {"caption_not_utf8": 1, "missing_caption": 1}
    written = read_samples(tmp_path / "out")
    assert [(s["key"], s["txt"]) for s in written] == [
        ("a", "caption of a"), ("b_dir_x", "caption of x"), ("b_dir_deeper_y", "caption of y")
    ]
    assert written[0]["jpg"] == files["a.jpg"]
    with pytest.raises(SourceFormatError, match="not a directory"):
        sources.read_folder(tmp_path / "src" / "a.jpg")


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------


def write_table_images(root: Path) -> list[str]:
    (root / "imgs").mkdir(parents=True)
    names = []
    for i in range(4):
        (root / "imgs" / f"{i}.jpg").write_bytes(jpeg(10 + i))
        names.append(f"imgs/{i}.jpg")
    return names


def test_read_tsv_and_csv(tmp_path: Path) -> None:
    names = write_table_images(tmp_path)
    with open(tmp_path / "data.tsv", "w", encoding="utf-8", newline="") as f:
        f.write("filepath\ttitle\tlicense\n")
        for i, name in enumerate(names):
            f.write(f"{name}\tcaption {i}\tcc-by\n")
        f.write("imgs/missing.jpg\tlost\tcc-by\n")
    index = write_shards(sources.read_table(tmp_path / "data.tsv", extra_columns=["license"]), tmp_path / "tsv", progress=False)
    assert index["total_samples"] == 4 and index["skipped"] == {"missing_image": 1}
    written = read_samples(tmp_path / "tsv")
    assert [s["txt"] for s in written] == [f"caption {i}" for i in range(4)]
    assert [s["key"] for s in written] == [f"{i:09d}" for i in range(4)]
    assert written[2]["jpg"] == (tmp_path / names[2]).read_bytes()
    assert written[0]["json"]["license"] == "cc-by"

    # CSV with quoting, custom column names, paths relative to another root, a bad caption.
    table_dir = tmp_path / "tables"
    table_dir.mkdir()
    with open(table_dir / "data.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img", "text_en"])
        writer.writerow([names[0], 'a "quoted", comma caption'])
        writer.writerow([names[1], ""])
        writer.writerow([str(tmp_path / names[3]), "absolute path"])
    with open(table_dir / "data.csv", "ab") as f:
        f.write(names[2].encode() + b",caf\xe9\n")
    table = sources.read_table(table_dir / "data.csv", image_column="img", caption_column="text_en", image_root=tmp_path)
    index = write_shards(table, tmp_path / "csv", progress=False)
    assert index["skipped"] == {"caption_not_utf8": 1, "empty_caption": 1}
    assert [s["txt"] for s in read_samples(tmp_path / "csv")] == ['a "quoted", comma caption', "absolute path"]


def test_table_errors_name_file_and_column(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text("filepath\ttitle\nx.jpg\thello\n")
    with pytest.raises(SourceFormatError) as info:
        sources.read_table(tmp_path / "t.tsv", caption_column="caption")
    assert "'caption'" in str(info.value) and "t.tsv" in str(info.value)
    (tmp_path / "u.tsv").write_text("image\tcaption\ttitle\nx.jpg\ta\tb\n")
    with pytest.raises(SourceFormatError, match="several possible caption columns"):
        sources.read_table(tmp_path / "u.tsv")
    (tmp_path / "v.csv").write_text("url,caption\nhttp://example.com/a.jpg,a\n")
    with pytest.raises(SourceFormatError, match="no image column"):
        sources.read_table(tmp_path / "v.csv")
    with pytest.raises(SourceFormatError, match="holds a URL"):
        list(sources.read_table(tmp_path / "v.csv", image_column="url"))
    (tmp_path / "w.txt").write_text("a|b\n")
    with pytest.raises(SourceFormatError, match="unknown table type"):
        sources.read_table(tmp_path / "w.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceFormatError, match="empty table"):
        sources.read_table(tmp_path / "empty.csv")


def test_read_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    names = write_table_images(tmp_path)
    table = pa.table(
        {
            "image_path": [names[0], names[1], None],
            "caption": ["first", None, "third"],
            "bytes_col": [b"", b"", b""],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    source = sources.read_table(tmp_path / "t.parquet")
    assert source.num_samples == 3
    index = write_shards(source, tmp_path / "out", progress=False)
    assert index["skipped"] == {"missing_caption": 1, "missing_image": 1}
    written = read_samples(tmp_path / "out")
    assert [(s["key"], s["txt"]) for s in written] == [("000000000", "first")]
    assert written[0]["jpg"] == (tmp_path / names[0]).read_bytes()

    # Image bytes stored in the table itself (e.g. Hugging Face image structs).
    struct = pa.table({"image": [{"bytes": jpeg(40), "path": "a.jpg"}], "text": ["inline"]})
    pq.write_table(struct, tmp_path / "inline.parquet")
    index = write_shards(sources.read_table(tmp_path / "inline.parquet"), tmp_path / "inline", progress=False)
    assert index["total_samples"] == 1 and read_samples(tmp_path / "inline")[0]["jpg"] == jpeg(40)


# ------------------------------------------------------------------------------------------
# YFCC15M
# ------------------------------------------------------------------------------------------


def make_yfcc(root: Path, entries: list[tuple[int, str, str]], present: set[int]) -> None:
    archives: dict[str, dict[str, bytes]] = {}
    for index in present:
        zip_name, member = sources.yfcc_image_location(index)
        archives.setdefault(zip_name, {})[member] = jpeg(index % 1000)
    for zip_name, members in archives.items():
        path = root / zip_name
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as archive:
            for member, data in sorted(members.items()):
                archive.writestr(member, data)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "yfcc15m.pkl", "wb") as f:
        pickle.dump(entries, f)


def test_yfcc_image_location() -> None:
    assert sources.yfcc_image_location(12345678) == ("images/12/345.zip", "678.jpg")
    assert sources.yfcc_image_location(7) == ("images/00/000.zip", "007.jpg")
    with pytest.raises(ValueError):
        sources.yfcc_image_location(10**8)


def test_read_yfcc(tmp_path: Path) -> None:
    root = tmp_path / "yfcc"
    entries = [
        (12345678, "A+quoted+title%21", "some+description"),
        (12345001, "", "description+only"),
        (7, "already decoded C++ title", "desc"),
        (12345999, "member missing", ""),
        (98000001, "zip missing", ""),
        (12345002, "", ""),
    ]
    make_yfcc(root, entries, present={12345678, 12345001, 7, 12345002})
    source = sources.read_yfcc(root)
    assert source.num_samples == 6
    index = write_shards(source, tmp_path / "out", progress=False)
    assert index["skipped"] == {"empty_caption": 1, "missing_image": 2}
    written = read_samples(tmp_path / "out")
    assert [s["key"] for s in written] == ["12345678", "12345001", "00000007"]
    assert [s["txt"] for s in written] == ["A quoted title!", "description only", "already decoded C++ title"]
    assert written[0]["json"]["title"] == "A quoted title!"
    assert written[0]["json"]["description"] == "some description"
    assert written[1]["json"]["title"] == ""
    assert written[2]["jpg"] == jpeg(7)

    never = [s.extra["title"] for s in sources.read_yfcc(root, unquote=False)]
    assert never[0] == "A+quoted+title%21"
    always = [s.extra["title"] for s in sources.read_yfcc(root, unquote=True)]
    assert always[2] == "already decoded C   title"  # why auto is the default


def test_yfcc_malicious_pickle_refused_without_running_code(tmp_path: Path) -> None:
    root = tmp_path / "yfcc"
    (root / "images").mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(root / "yfcc15m.pkl", "wb") as f:
        pickle.dump([(1, "title", "desc"), Evil(marker)], f)
    with pytest.raises(SourceFormatError) as info:
        sources.read_yfcc(root)
    message = str(info.value)
    assert "yfcc15m.pkl" in message and "system" in message
    assert not marker.exists()

    # Builtins that are not plain data (eval, getattr...) are refused too.
    evil_eval = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR."
    (root / "yfcc15m.pkl").write_bytes(evil_eval)
    with pytest.raises(SourceFormatError, match="builtins.eval"):
        sources.read_yfcc(root)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_pickle_loads_plain_data(tmp_path: Path, protocol: int) -> None:
    data = [(12345678, "título", "desc"), {"a": {1, 2}, "b": frozenset({"x"}), "c": (1.5, b"raw", None, True)}]
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert sources.load_restricted_pickle(path) == data


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numeric_array_globals_rebuild_numbers_and_refuse_object_arrays(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "arrays.pkl"
    data = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "f": np.linspace(0, 1, 5), "n": np.int64(7), "labels": [1, 2]}
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = sources.load_restricted_pickle(path, allowed=sources.numeric_array_globals())
    assert set(loaded) == set(data) and loaded["labels"] == [1, 2] and loaded["n"] == 7
    for key in ("data", "f"):
        assert loaded[key].dtype == data[key].dtype and np.array_equal(loaded[key], data[key])
    # Object arrays: refused by the numeric globals, still read by the CC metadata globals.
    path.write_bytes(pickle.dumps({"data": np.array([{"a": 1}, "x"], dtype=object)}, protocol=protocol))
    with pytest.raises(SourceFormatError, match=r"arrays\.pkl: refusing an array of Python objects"):
        sources.load_restricted_pickle(path, allowed=sources.numeric_array_globals())
    assert list(sources.load_restricted_pickle(path, allowed=sources.numpy_array_globals())["data"]) == [{"a": 1}, "x"]
    # Object arrays asked for without a dtype object: numpy.ndarray((2,), "O") called directly,
    # and _reconstruct(ndarray, (2,), "O") with no state (both plain pickle.loads accept).
    for crafted in (b"\x80\x02cnumpy\nndarray\nK\x02\x85X\x01\x00\x00\x00O\x86R.",
                    b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x02\x85X\x01\x00\x00\x00O\x87R."):
        assert pickle.loads(crafted).dtype == object
        path.write_bytes(crafted)
        with pytest.raises(SourceFormatError, match=r"arrays\.pkl: "):
            sources.load_restricted_pickle(path, allowed=sources.numeric_array_globals())
    # ... and neither lets a reduce to a function through.
    path.write_bytes(pickle.dumps({"data": Evil(tmp_path / "pwned")}, protocol=protocol))
    for allowed in (sources.numeric_array_globals(), sources.numpy_array_globals()):
        with pytest.raises(SourceFormatError, match=r"arrays\.pkl: refusing to unpickle (posix|os)\.system"):
            sources.load_restricted_pickle(path, allowed=allowed)
    assert not (tmp_path / "pwned").exists()


def test_yfcc_malformed_metadata(tmp_path: Path) -> None:
    root = tmp_path / "yfcc"
    (root / "images").mkdir(parents=True)
    for bad, pattern in (
        ({"a": 1}, "expected a list"),
        ([(1, "t")], "entry 0 is not"),
        ([(1, "t", "d"), (-5, "t", "d")], "entry 1 has an invalid image index"),
        ([(1, "t", 3)], "non-string description"),
    ):
        with open(root / "yfcc15m.pkl", "wb") as f:
            pickle.dump(bad, f)
        with pytest.raises(SourceFormatError, match=pattern):
            sources.read_yfcc(root)
    (root / "yfcc15m.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SourceFormatError, match="yfcc15m.pkl"):
        sources.read_yfcc(root)


# ------------------------------------------------------------------------------------------
# CC3M / CC12M
# ------------------------------------------------------------------------------------------


def save_npy(path: Path, records: list) -> None:
    array = np.empty(len(records), dtype=object)
    array[:] = records
    np.save(path, array, allow_pickle=True)


def test_read_cc3m_and_cc12m(tmp_path: Path) -> None:
    root = tmp_path / "cc"
    root.mkdir()
    for name, seed in (("1510438788", 1), ("42", 2), ("0.jpg", 3), ("1.jpg", 4)):
        (root / name).write_bytes(jpeg(seed))
    save_npy(
        tmp_path / "cc3m.npy",
        [
            {"image_id": 1510438788, "captions": ["large field with pink tulips"]},
            {"image_id": np.int64(42), "captions": ["  second  ", "alternative"]},
            {"image_id": 77, "captions": ["image file missing"]},
        ],
    )
    source = sources.read_cc(tmp_path / "cc3m.npy", root)
    assert source.num_samples == 3
    index = write_shards(source, tmp_path / "out3", progress=False)
    assert index["skipped"] == {"missing_image": 1}
    written = read_samples(tmp_path / "out3")
    assert [s["txt"] for s in written] == ["large field with pink tulips", "second"]
    assert written[1]["json"]["captions"] == ["second", "alternative"]
    assert written[1]["jpg"] == jpeg(2)

    save_npy(
        tmp_path / "cc12m.npy",
        [
            {"image_name": "0.jpg", "image_id": 0, "captions": ["Metal chairs - a pair"]},
            {"image_name": "1.jpg", "image_id": 1, "captions": []},
        ],
    )
    index = write_shards(sources.read_cc(tmp_path / "cc12m.npy", root), tmp_path / "out12", progress=False)
    assert index["skipped"] == {"empty_caption": 1}
    written = read_samples(tmp_path / "out12")
    assert written[0]["jpg"] == jpeg(3) and written[0]["json"]["image"] == "0.jpg"

    # Overridable path convention.
    (root / "sub").mkdir()
    (root / "sub" / "5.jpg").write_bytes(jpeg(5))
    save_npy(tmp_path / "t.npy", [{"image_id": 5, "captions": ["templated"]}])
    templated = list(sources.read_cc(tmp_path / "t.npy", root, path_template="{root}/sub/{image_id}.jpg"))
    assert templated[0].image == root / "sub" / "5.jpg"
    with pytest.raises(SourceFormatError, match="does not fit path template"):
        list(sources.read_cc(tmp_path / "t.npy", root, path_template="{root}/{missing_field}"))


def test_cc_metadata_validation_and_safety(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    save_npy(tmp_path / "evil.npy", [{"image_id": 1, "captions": ["x"], "payload": Evil(marker)}])
    with pytest.raises(SourceFormatError) as info:
        sources.read_cc(tmp_path / "evil.npy", tmp_path)
    assert "evil.npy" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()

    save_npy(tmp_path / "notdict.npy", [{"image_id": 1, "captions": ["x"]}, ["a", "list"]])
    with pytest.raises(SourceFormatError, match=r"notdict.npy: entry 1 is a list"):
        sources.read_cc(tmp_path / "notdict.npy", tmp_path)
    save_npy(tmp_path / "noimage.npy", [{"captions": ["x"]}])
    with pytest.raises(SourceFormatError, match="entry 0 has no 'image_name' or 'image_id'"):
        sources.read_cc(tmp_path / "noimage.npy", tmp_path)
    save_npy(tmp_path / "nocaps.npy", [{"image_id": 3}])
    with pytest.raises(SourceFormatError, match="no 'captions' list"):
        sources.read_cc(tmp_path / "nocaps.npy", tmp_path)
    save_npy(tmp_path / "badvalue.npy", [{"image_id": 3, "captions": ["x"], "extra": {"nested": 1}}])
    with pytest.raises(SourceFormatError, match="field 'extra' has unsupported type dict"):
        sources.read_cc(tmp_path / "badvalue.npy", tmp_path)
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(SourceFormatError, match="expected an object array"):
        sources.read_cc(tmp_path / "floats.npy", tmp_path)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(SourceFormatError, match="not a .npy file"):
        sources.read_cc(tmp_path / "junk.npy", tmp_path)


# ------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------


def make_coco(root: Path) -> Path:
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for image_id in (9, 25):
        (root / "train2017" / f"{image_id:012d}.jpg").write_bytes(jpeg(image_id))
    annotations = {
        "images": [{"id": 25}, {"id": 9}, {"id": 30}],
        "annotations": [
            {"id": 1, "image_id": 25, "caption": "A giraffe eating leaves. "},
            {"id": 2, "image_id": 9, "caption": "Food in a bento box."},
            {"id": 3, "image_id": 25, "caption": "A tall animal\nnear a tree."},
            {"id": 4, "image_id": 30, "caption": "Image file is missing."},
        ],
    }
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(annotations))
    return path


def test_read_coco(tmp_path: Path) -> None:
    annotations = make_coco(tmp_path / "coco")
    assert sources.default_coco_root(annotations) == (tmp_path / "coco").resolve()
    source = sources.read_coco(annotations, tmp_path / "coco")
    assert source.num_samples == 3
    index = write_shards(source, tmp_path / "out", progress=False)
    assert index["skipped"] == {"missing_image": 1}
    written = read_samples(tmp_path / "out")
    assert [s["key"] for s in written] == ["000000000009", "000000000025"]
    assert written[1]["txt"] == "A giraffe eating leaves."
    assert written[1]["json"]["captions"] == ["A giraffe eating leaves.", "A tall animal near a tree."]
    assert written[1]["json"]["image_id"] == 25
    assert written[0]["jpg"] == jpeg(9)


def test_coco_malformed(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(SourceFormatError, match="'annotations' list"):
        sources.read_coco(path, tmp_path)
    path.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2}]}))
    with pytest.raises(SourceFormatError, match=r"c.json: annotations\[1\] has no string 'caption'"):
        sources.read_coco(path, tmp_path)
    path.write_text("{not json")
    with pytest.raises(SourceFormatError, match="not valid JSON"):
        sources.read_coco(path, tmp_path)


# ------------------------------------------------------------------------------------------
# detection and the make-shards command
# ------------------------------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    make_yfcc(tmp_path / "yfcc", [(1, "t", "d")], present={1})
    (tmp_path / "folder").mkdir()
    files = {"a.npy": "cc", "b.json": "coco", "c.tsv": "table", "d.csv": "table", "e.parquet": "table", "f.pkl": "yfcc"}
    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert sources.detect_format(tmp_path / "yfcc") == "yfcc"
    assert sources.detect_format(tmp_path / "folder") == "folder"
    for name, kind in files.items():
        assert sources.detect_format(tmp_path / name) == kind
    (tmp_path / "g.bin").write_bytes(b"")
    with pytest.raises(SourceFormatError, match="pass --format"):
        sources.detect_format(tmp_path / "g.bin")
    with pytest.raises(SourceFormatError, match="no such file"):
        sources.detect_format(tmp_path / "absent")


def test_make_shards_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(tmp_path / "src")
    out = tmp_path / "out"
    code = make_shards.main(
        [str(tmp_path / "src"), str(out), "--samples-per-shard", "2", "--workers", "1", "--corpus", "demo", "--max-side", "20", "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples in 2 shards" in printed
    assert "caption_not_utf8=1" in printed and "missing_caption=1" in printed
    index = load_index(out)
    assert index["corpus"] == "demo" and [s["samples"] for s in index["shards"]] == [2, 1]
    sizes = [Image.open(io.BytesIO(sample["jpg"])).size for sample in read_samples(out)]
    assert sizes == [(27, 20), (16, 16), (27, 20)]  # 32x24 JPEGs downscaled, the 16 px PNG kept

    # Existing output is protected unless --overwrite.
    assert make_shards.main([str(tmp_path / "src"), str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert make_shards.main([str(tmp_path / "src"), str(out), "--overwrite", "--workers", "2", "--no-progress"]) == 0

    # COCO autodetected; root defaults to the parent of annotations/.
    annotations = make_coco(tmp_path / "coco")
    assert make_shards.main([str(annotations), str(tmp_path / "coco_out"), "--prefix", "coco", "--no-progress"]) == 0
    assert [s["name"] for s in load_index(tmp_path / "coco_out")["shards"]] == ["coco-000000.tar"]

    # YFCC root directory autodetected.
    make_yfcc(tmp_path / "yfcc", [(12345678, "t", "d")], present={12345678})
    assert make_shards.main([str(tmp_path / "yfcc"), str(tmp_path / "yfcc_out"), "--no-progress"]) == 0
    assert load_index(tmp_path / "yfcc_out")["total_samples"] == 1


def test_make_shards_main_reports_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.tsv").write_text("filepath\ttitle\nx.jpg\thello\n")
    code = make_shards.main([str(tmp_path / "t.tsv"), str(tmp_path / "out"), "--caption-column", "cap", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'cap'" in err and "t.tsv" in err
    with pytest.raises(SystemExit):
        make_shards.main([str(tmp_path / "t.tsv"), str(tmp_path / "out"), "--samples-per-shard", "0"])
