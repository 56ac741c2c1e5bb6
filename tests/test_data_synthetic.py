"""Tests of the synthetic captioned-shapes corpus and its zero-shot benchmark."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slip.data import synthetic
from slip.data.shards import load_index

SMALL = {"train_samples": 150, "test_per_class": 3, "samples_per_shard": 64}


def read_split(split_dir: Path) -> list[dict]:
    samples = []
    for shard in load_index(split_dir)["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            current: dict = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if current.get("key") != key:
                    current = {"key": key}
                    samples.append(current)
                current[ext] = tar.extractfile(member).read()
    for sample in samples:
        sample["txt"] = sample["txt"].decode("utf-8")
        sample["json"] = json.loads(sample["json"])
    return samples


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "seed0"
    result = synthetic.generate_synthetic(out, seed=0, **SMALL)
    return out, result


def test_same_seed_gives_identical_bytes(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = corpus
    again = synthetic.generate_synthetic(tmp_path / "again", seed=0, **SMALL)
    first, second = all_files(out), all_files(tmp_path / "again")
    assert list(first) == list(second)
    assert "train/train-000000.tar" in first and "benchmark/benchmark.json" in first
    assert first == second
    assert again["train"]["total_samples"] == 150


def test_different_seed_gives_different_corpus(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, result = corpus
    other = synthetic.generate_synthetic(tmp_path / "seed1", seed=1, **SMALL)
    assert (out / "train" / "train-000000.tar").read_bytes() != (tmp_path / "seed1" / "train" / "train-000000.tar").read_bytes()
    captions0 = [s["txt"] for s in read_split(out / "train")]
    captions1 = [s["txt"] for s in read_split(tmp_path / "seed1" / "train")]
    assert captions0 != captions1
    assert result["benchmark"]["held_out"] != other["benchmark"]["held_out"]


def test_held_out_pairs_absent_from_training(corpus: tuple[Path, dict]) -> None:
    out, result = corpus
    bench = result["benchmark"]
    held = {tuple(name.split(" ")) for name in bench["held_out"]}
    assert len(held) == len(synthetic.SHAPES)
    # Every shape and every held-out colour still occurs in training with other partners.
    assert {s for _, s in held} == set(synthetic.SHAPES)
    assert len({c for c, _ in held}) == len(held)

    train = read_split(out / "train")
    assert len(train) == 150
    seen_pairs = set()
    for sample in train:
        meta, caption = sample["json"], sample["txt"]
        pair = (meta["colour"], meta["shape"])
        seen_pairs.add(pair)
        assert pair not in held
        # Captions always name the colour and the shape (canonically or by a synonym).
        assert re.search(rf"\b{meta['colour']}\b", caption)
        assert any(word in caption for word in synthetic._SHAPE_WORDS[meta["shape"]])
        for colour, shape in held:
            assert f"{colour} {shape}" not in caption
    assert {c for c, _ in seen_pairs} == set(synthetic.COLOURS)
    assert {s for _, s in seen_pairs} == set(synthetic.SHAPES)


def test_benchmark_layout_and_labels(corpus: tuple[Path, dict]) -> None:
    out, result = corpus
    bench = json.loads((out / "benchmark" / "benchmark.json").read_text())
    assert bench == result["benchmark"]
    assert bench["format"] == "slip-synthetic-benchmark/1"
    assert bench["classes"] == synthetic.class_names() and len(bench["classes"]) == 30
    assert all("{}" in t for t in bench["templates"])
    assert bench["held_out_indices"] == [bench["classes"].index(n) for n in bench["held_out"]]
    assert load_index(out / "benchmark")["corpus"] == "synthetic-benchmark"
    assert load_index(out / "train")["corpus"] == "synthetic"

    test = read_split(out / "benchmark")
    assert len(test) == bench["num_test"] == 30 * 3
    counts = Counter(s["json"]["cls"] for s in test)
    assert counts == {i: 3 for i in range(30)}
    for sample in test:
        meta = sample["json"]
        assert bench["classes"][meta["cls"]] == meta["class_name"] == f"{meta['colour']} {meta['shape']}"
        assert meta["held_out"] == (meta["class_name"] in bench["held_out"])
        assert meta["class_name"] in sample["txt"]
    # Labels are shuffled, not in class order.
    assert [s["json"]["cls"] for s in test[:30]] != sorted(s["json"]["cls"] for s in test[:30])


def colour_fraction(jpg: bytes, colour: str) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
    distance = np.abs(pixels - np.array(synthetic.COLOURS[colour])).sum(axis=-1)
    return float((distance < 70).mean())


def test_images_show_the_described_attributes(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    train = read_split(out / "train")
    fractions: dict[tuple[str, str], list[float]] = {}
    for sample in train:
        meta = sample["json"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (64, 64) and image.mode == "RGB"
        fraction = colour_fraction(sample["jpg"], meta["colour"])
        assert fraction > 0.01, (sample["key"], meta)  # at least ~40 pixels of the colour
        fractions.setdefault((meta["shape"], meta["size"]), []).append(fraction)
        # The shape sits in the described part of the image.
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
        mask = np.abs(pixels - np.array(synthetic.COLOURS[meta["colour"]])).sum(axis=-1) < 70
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if "left" in meta["position"]:
            assert cx < 0.5
        if "right" in meta["position"]:
            assert cx > 0.5
        if "top" in meta["position"]:
            assert cy < 0.5
        if "bottom" in meta["position"]:
            assert cy > 0.5
    for shape in synthetic.SHAPES:
        assert np.mean(fractions[shape, "big"]) > 2 * np.mean(fractions[shape, "small"])


def test_captions_are_varied(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    captions = [s["txt"] for s in read_split(out / "train")]
    assert len(set(captions)) > 0.8 * len(captions)
    assert any(c.startswith("a photo of") or c.startswith("photo of") for c in captions)
    assert any(" is " in c for c in captions)  # "the red square is in the middle"
    assert any("background" in c for c in captions) and any("background" not in c for c in captions)


def test_make_synthetic_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / "out"), "--seed", "3", "--train-samples", "40", "--test-per-class", "1", "--image-size", "32", "--no-progress"]
    assert synthetic.main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 40 training samples" in printed and "held-out classes" in printed
    test = read_split(tmp_path / "out" / "benchmark")
    assert Image.open(io.BytesIO(test[0]["jpg"])).size == (32, 32)
    assert synthetic.main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert synthetic.main([*args, "--overwrite"]) == 0


def test_explicit_held_out_and_validation(tmp_path: Path) -> None:
    result = synthetic.generate_synthetic(
        tmp_path / "o", seed=0, train_samples=60, test_per_class=1, held_out=[("red", "circle")]
    )
    assert result["benchmark"]["held_out"] == ["red circle"]
    assert all((s["json"]["colour"], s["json"]["shape"]) != ("red", "circle") for s in read_split(tmp_path / "o" / "train"))
    with pytest.raises(ValueError, match="unknown held-out class"):
        synthetic.generate_synthetic(tmp_path / "p", held_out=[("pink", "circle")])
    with pytest.raises(ValueError):
        synthetic.generate_synthetic(tmp_path / "q", image_size=8)
