"""Zero-shot benchmark metadata (zero_shot/benchmarks.json) and catalog validation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

import zero_shot
from slip.eval.metrics import METRICS
from zero_shot import Benchmark, CatalogError, load_benchmarks, load_catalog
from zero_shot.build_metadata import main as build_main

PACKAGE_DIR = Path(zero_shot.__file__).resolve().parent
# The reference files live in the development workspace beside the checkout (../shared), or
# in shared/ inside a copied working tree; a clean CI checkout has neither, and the
# regeneration test then recovers them from the committed files (see REFERENCE_SHA256).
_REFERENCE_CANDIDATES = [root / "shared" / "reference" / "zero_shot" for root in (PACKAGE_DIR.parent.parent, PACKAGE_DIR.parent)]
REFERENCE_DIR = next((d for d in _REFERENCE_CANDIDATES if d.is_dir()), _REFERENCE_CANDIDATES[0])

# Class counts of the standard releases (CLIP paper, Table 9; Caltech-101 counts its
# background class, as CLIP's class list does).
KNOWN_CLASS_COUNTS = {
    "imagenet": 1000,
    "cifar10": 10,
    "cifar100": 100,
    "flowers": 102,
    "food101": 101,
    "pets": 37,
    "aircraft": 100,
    "cars": 196,
    "cub200": 200,
    "sun397": 397,
    "dtd": 47,
    "caltech101": 102,
    "mnist": 10,
    "fer2013": 7,
    "stl10": 10,
    "eurosat": 10,
    "resisc45": 45,
    "gtsrb": 43,
    "kitti_distance": 4,
    "country211": 211,
    "patch_camelyon": 2,
    "ucf101_frames": 101,
    "kinetics700_frames": 700,
    "clevr_counts": 8,
    "hateful_memes": 2,
    "rendered_sst2": 2,
    "birdsnap": 500,
    "voc2007": 20,
}

EXPECTED_METRICS = {
    "aircraft": "mean_per_class_recall",
    "pets": "mean_per_class_recall",
    "caltech101": "mean_per_class_recall",
    "flowers": "mean_per_class_recall",
    "kinetics700_frames": "mean_top1_top5",
    "hateful_memes": "roc_auc",
    "voc2007": "voc_11pt_map",
}


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, Benchmark]:
    return load_benchmarks()


def test_every_benchmark_has_classes_templates_and_a_known_metric(benchmarks: dict[str, Benchmark]) -> None:
    assert benchmarks, "benchmarks.json is empty"
    for key, b in benchmarks.items():
        assert b.key == key
        assert b.name
        assert b.num_classes > 0, key
        assert all(syn and all(isinstance(s, str) and s for s in syn) for syn in b.class_synonyms), key
        assert b.templates, key
        for t in b.templates:
            assert t.count("{}") == 1 and t.replace("{}", "").count("{") == 0, (key, t)
            assert "X" in t.format("X")
        assert b.metric in METRICS, (key, b.metric)
        assert b.metric == EXPECTED_METRICS.get(key, "top1"), key


def test_class_counts(benchmarks: dict[str, Benchmark]) -> None:
    present = set(benchmarks) & set(KNOWN_CLASS_COUNTS)
    assert {"imagenet", "cifar10", "cifar100", "flowers", "food101", "pets", "aircraft"} <= present
    for key in present:
        assert benchmarks[key].num_classes == KNOWN_CLASS_COUNTS[key], key
    assert set(benchmarks) <= set(KNOWN_CLASS_COUNTS), "a benchmark without a known class count"


def test_class_names_unique_except_clip_imagenet_duplicates(benchmarks: dict[str, Benchmark]) -> None:
    for key, b in benchmarks.items():
        firsts = [syn[0] for syn in b.class_synonyms]
        duplicates = sorted({c for c in firsts if firsts.count(c) > 1})
        # CLIP's curated ImageNet names map two synsets each to these strings; kept
        # verbatim because SLIP's reported numbers were computed with them.
        assert duplicates == (["missile", "sunglasses"] if key == "imagenet" else []), key


def test_synonyms_are_kept_as_tuples(benchmarks: dict[str, Benchmark]) -> None:
    fer = benchmarks["fer2013"]
    assert fer.classnames[3] == ("happy", "smiling")
    assert fer.class_synonyms[0] == ("angry",)
    assert benchmarks["cifar10"].class_synonyms[0] == ("airplane",)


def test_flowers_folders_map_by_name_not_string_sort(benchmarks: dict[str, Benchmark]) -> None:
    flowers = benchmarks["flowers"]
    assert flowers.folder_names == tuple(str(i) for i in range(1, 103))
    on_disk = sorted(flowers.folder_names)  # ImageFolder's order: "1", "10", "100", ...
    assert on_disk[:4] == ["1", "10", "100", "101"]
    mapping = flowers.folder_to_index(on_disk)
    assert mapping["1"] == 0 and mapping["2"] == 1 and mapping["10"] == 9 and mapping["102"] == 101
    # Folder i holds class i-1 of CLIP's list: 1 = pink primrose, 102 = blackberry lily.
    assert flowers.classnames[mapping["1"]] == "pink primrose"
    assert flowers.classnames[mapping["102"]] == "blackberry lily"
    assert sorted(mapping.values()) == list(range(102))
    # The naive string-sort mapping would mislabel most classes.
    naive = {name: i for i, name in enumerate(on_disk)}
    assert sum(naive[f] != mapping[f] for f in on_disk) > 90


def test_folder_to_index_rejects_wrong_folders(benchmarks: dict[str, Benchmark]) -> None:
    flowers = benchmarks["flowers"]
    with pytest.raises(ValueError, match=r"unexpected \['103'\], missing \['1'\]"):
        flowers.folder_to_index([str(i) for i in range(2, 104)])
    cifar = benchmarks["cifar10"]
    assert cifar.folder_names is None
    assert cifar.folder_to_index(["b", "a"] + [f"c{i}" for i in range(8)])["a"] == 0
    with pytest.raises(ValueError, match="expected 10 class folders, found 9"):
        cifar.folder_to_index([f"c{i}" for i in range(9)])
    with pytest.raises(ValueError, match="repeated"):
        cifar.folder_to_index(["a"] * 10)


def test_hateful_memes_not_hateful_first(benchmarks: dict[str, Benchmark]) -> None:
    hm = benchmarks["hateful_memes"]
    assert hm.classnames == ("meme", "hatespeech meme")
    assert hm.folder_to_index(["1", "0"]) == {"0": 0, "1": 1}
    with pytest.raises(ValueError, match="class folders must be exactly"):
        hm.folder_to_index(["hateful", "not_hateful"])


def test_order_sensitive_reference_lists(benchmarks: dict[str, Benchmark]) -> None:
    # These lists are in the string-sorted order of their folder / label names, which a
    # "tidy up" (numeric or alphabetical re-sorting) would silently break.
    assert benchmarks["clevr_counts"].classnames == ("10", "3", "4", "5", "6", "7", "8", "9")
    pets = benchmarks["pets"].classnames
    assert pets[:2] == ("Abyssinian", "Bengal") and pets[12] == "american bulldog"
    assert benchmarks["caltech101"].classnames[:3] == ("background", "off-center face", "centered face")


def test_load_benchmarks_returns_fresh_dicts() -> None:
    first = load_benchmarks()
    first.pop("cifar10")
    assert "cifar10" in load_benchmarks()


# SLIP's reference files, pinned by content: sha256 of each file's JSON in canonical form
# (sorted keys, no whitespace, UTF-8), measured on shared/reference/zero_shot.
REFERENCE_SHA256 = {
    "labels.json": "9833a0a0aaad78760885db6f95b570f0970af26cd8ff868fbb7bec628df38c02",
    "templates.json": "07cd8eae3d529bff2d5b5f0fb2544fef892836a65414795f8bf8577c18f601fc",
    "dataset_catalog.example.json": "271e45e8a0b3d627c26d684850e8a2dbffd4a5c079ba0ad65ba6c8aba1396c4b",
}


def _canonical_sha256(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reference_from_committed_files(out: Path) -> Path:
    """The three reference inputs recovered from the committed outputs, which keep them
    verbatim: each benchmark's class names and templates in benchmarks.json, the catalog in
    catalog.example.json. This makes the regeneration check runnable from the repository alone."""
    committed = json.loads((PACKAGE_DIR / "benchmarks.json").read_text())["benchmarks"]
    out.mkdir()
    (out / "labels.json").write_text(json.dumps({k: b["classnames"] for k, b in committed.items()}))
    (out / "templates.json").write_text(json.dumps({k: b["templates"] for k, b in committed.items()}))
    (out / "dataset_catalog.example.json").write_text((PACKAGE_DIR / "catalog.example.json").read_text())
    return out


def test_build_metadata_regenerates_committed_files(tmp_path: Path) -> None:
    # From the inputs recovered out of the repository (always), and from SLIP's reference files
    # when the development workspace has them: the inputs are SLIP's (by content hash), and
    # build_metadata.py turns them into exactly the committed files (names, metrics, folder
    # names and order come from the script, so any hand edit of the outputs shows up here).
    inputs = [_reference_from_committed_files(tmp_path / "recovered")]
    if REFERENCE_DIR.is_dir():
        inputs.append(REFERENCE_DIR)
    for i, reference in enumerate(inputs):
        for name, digest in REFERENCE_SHA256.items():
            assert _canonical_sha256(json.loads((reference / name).read_text(encoding="utf-8"))) == digest, (reference, name)
        out = tmp_path / f"out{i}"
        assert build_main([str(reference), "--out-dir", str(out)]) == 0
        for name in ("benchmarks.json", "catalog.example.json"):
            assert (out / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), (reference, name)
        labels = json.loads((reference / "labels.json").read_text(encoding="utf-8"))
        assert set(load_benchmarks()) == set(labels)


def test_example_catalog_is_valid(benchmarks: dict[str, Benchmark]) -> None:
    catalog = load_catalog(PACKAGE_DIR / "catalog.example.json")
    assert set(catalog) <= set(benchmarks)
    assert catalog["kinetics700_frames"] == {
        "path": "/path/to/dataset", "type": "imagefolder", "train": "train_images", "test": "val_images"
    }
    assert catalog["cifar10"]["type"] == "special"


def _write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "my_catalog.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("entry_key", "entry", "message"),
    [
        ("food101", {"type": "imagefolder", "test": "test"}, "missing required field 'path'"),
        ("food101", {"path": "/d", "test": "test"}, "missing required field 'type'"),
        ("food101", {"path": "/d", "type": "zipfile", "test": "t"}, "unknown type 'zipfile'; known types: filelist, imagefolder, special"),
        ("food-101", {"path": "/d", "type": "imagefolder", "test": "t"}, "unknown benchmark; known benchmarks: .*food101"),
        ("food101", {"path": "/d", "type": "imagefolder", "tset": "t"}, r"unknown field\(s\) \['tset'\]"),
        ("food101", {"path": "/d", "type": "imagefolder"}, "needs the 'test' split name"),
        ("food101", {"path": 3, "type": "imagefolder", "test": "t"}, "'path' must be a non-empty string"),
        ("food101", ["/d", "imagefolder"], "must be an object"),
    ],
)
def test_catalog_errors_name_file_and_key(tmp_path: Path, entry_key: str, entry: object, message: str) -> None:
    path = _write(tmp_path, {"cifar10": {"path": "./data/cifar10", "type": "special"}, entry_key: entry})
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: entry {entry_key!r}: ")
    assert isinstance(info.value, ValueError)


def test_catalog_file_level_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, [1, 2])
    with pytest.raises(CatalogError, match=f"^{re.escape(str(path))}: must be a JSON object"):
        load_catalog(path)
    path.write_text("{not json")
    with pytest.raises(CatalogError, match=f"^{re.escape(str(path))}: not valid JSON"):
        load_catalog(path)
