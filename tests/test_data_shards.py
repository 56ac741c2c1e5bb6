"""Tests of slip.data.shards: shard layout, index, image validation/conversion, crash safety."""
from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slip.data import shards
from slip.data.shards import (
    Sample,
    SampleSkip,
    clean_key,
    load_index,
    prepare_image,
    write_shards,
)

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def solid_jpeg(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=95)


def read_shard(path: Path) -> list[dict[str, bytes]]:
    """Samples of one shard in order, as {"__key__": key, ext: bytes}."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


def read_all(out_dir: Path) -> list[dict[str, bytes]]:
    index = load_index(out_dir)
    samples: list[dict] = []
    for shard in index["shards"]:
        samples.extend(read_shard(out_dir / shard["name"]))
    return samples


def decode(jpg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpg))
    img.load()
    return img


# ------------------------------------------------------------------------------------------
# layout and index
# ------------------------------------------------------------------------------------------


def test_shards_layout_index_and_members(tmp_path: Path) -> None:
    images = [encode(noise_image(i), "JPEG", quality=90) for i in range(7)]
    samples = [
        Sample(key=f"img{i}", image=images[i], caption=f"  caption\nnumber {i} ", extra={"source": "test", "n": i})
        for i in range(7)
    ]
    index = write_shards(samples, tmp_path / "out", samples_per_shard=3, corpus="unit", progress=False)

    on_disk = json.loads((tmp_path / "out" / "index.json").read_text())
    assert on_disk == index
    assert index["format"] == "slip-shards/1"
    assert index["corpus"] == "unit"
    assert index["shards"] == [
        {"name": "shard-000000.tar", "samples": 3},
        {"name": "shard-000001.tar", "samples": 3},
        {"name": "shard-000002.tar", "samples": 1},
    ]
    assert index["total_samples"] == 7
    assert index["skipped"] == {}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"
    ]

    read = read_all(tmp_path / "out")
    assert [s["__key__"] for s in read] == [f"img{i}" for i in range(7)]
    for i, sample in enumerate(read):
        assert set(sample) == {"__key__", "jpg", "txt", "json"}
        # RGB JPEGs needing no change are stored byte for byte.
        assert sample["jpg"] == images[i]
        assert sample["txt"].decode("utf-8") == f"caption number {i}"
        meta = json.loads(sample["json"])
        assert meta == {"source": "test", "n": i, "width": 48, "height": 40}

    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {shards.SHARD_MTIME}


def test_shards_readable_by_webdataset(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    samples = [Sample(key=f"k{i}", image=solid_jpeg(), caption=f"c{i}", extra={"captions": [f"c{i}", "x"]}) for i in range(5)]
    write_shards(samples, tmp_path, samples_per_shard=2, progress=False)
    urls = [str(tmp_path / s["name"]) for s in load_index(tmp_path)["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    rows = list(dataset)
    assert [r[0] for r in rows] == [f"k{i}" for i in range(5)]
    assert all(r[1].mode == "RGB" and r[1].size == (40, 30) for r in rows)
    assert [r[2] for r in rows] == [f"c{i}" for i in range(5)]
    assert rows[3][3]["captions"] == ["c3", "x"]


def test_shards_identical_with_worker_processes(tmp_path: Path) -> None:
    images = [encode(noise_image(i, (90, 70)).convert("L"), "PNG") if i % 2 else encode(noise_image(i), "JPEG") for i in range(40)]
    samples = [Sample(key=f"s{i:03d}", image=images[i], caption=f"c {i}") for i in range(40)]
    one = write_shards(samples, tmp_path / "one", samples_per_shard=16, max_side=50, workers=1, progress=False)
    two = write_shards(samples, tmp_path / "two", samples_per_shard=16, max_side=50, workers=2, progress=False)
    assert one == two
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["name"]).read_bytes() == (tmp_path / "two" / shard["name"]).read_bytes()


def test_image_paths_are_read_in_workers(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(solid_jpeg((10 * i, 0, 0)))
        paths.append(path)
    samples = [Sample(key=p.stem, image=p, caption="x") for p in paths]
    samples.append(Sample(key="gone", image=tmp_path / "gone.jpg", caption="x"))
    samples.append(Sample(key="dir", image=tmp_path, caption="x"))
    index = write_shards(samples, tmp_path / "out", workers=2, progress=False)
    assert index["total_samples"] == 5
    assert index["skipped"] == {"missing_image": 1, "unreadable_image": 1}
    assert [s["jpg"] for s in read_all(tmp_path / "out")] == [p.read_bytes() for p in paths]


# ------------------------------------------------------------------------------------------
# bad inputs and conversions
# ------------------------------------------------------------------------------------------


def corrupted_png() -> bytes:
    data = bytearray(encode(noise_image(3), "PNG"))
    start = data.index(b"IDAT") + 20
    for i in range(start, start + 40):
        data[i] ^= 0xFF
    return bytes(data)


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    good = solid_jpeg()
    jpeg = encode(noise_image(5, (64, 64)), "JPEG")
    empty_file = tmp_path / "empty.jpg"
    empty_file.write_bytes(b"")

    def unreadable() -> bytes:
        raise PermissionError("denied")

    def vanished() -> bytes:
        raise FileNotFoundError("no such archive member")

    samples = [
        Sample("ok1", good, "fine"),
        Sample("undecodable", corrupted_png(), "x"),
        Sample("garbled_jpeg", jpeg[:300] + bytes(range(256)) * 4, "x"),
        Sample("truncated", jpeg[: len(jpeg) // 2], "x"),
        Sample("text", b"this is not an image at all", "x"),
        Sample("zero", empty_file, "x"),
        Sample("zero_bytes", b"", "x"),
        Sample("missing", tmp_path / "does-not-exist.jpg", "x"),
        Sample("none", None, "x"),
        Sample("callable_missing", vanished, "x"),
        Sample("callable_unreadable", unreadable, "x"),
        Sample("no_caption", good, None),
        Sample("blank_caption", good, " \n\t "),
        Sample("latin1_caption", good, "café".encode("latin-1")),
        Sample("surrogate_caption", good, "bad \udcff"),
        Sample("dup", good, "first"),
        Sample("dup", good, "second"),
        Sample("nan", good, "x", extra={"value": float("nan")}),
        Sample("ok2", good, "fine".encode("utf-8")),
    ]
    index = write_shards(samples, tmp_path / "out", progress=False)
    assert index["skipped"] == {
        "bad_metadata": 1,
        "caption_not_utf8": 2,
        "corrupt_image": 2,
        "truncated_image": 1,  # the name the training loader gives it too
        "duplicate_key": 1,
        "empty_caption": 1,
        "empty_file": 2,
        "missing_caption": 1,
        "missing_image": 3,
        "not_an_image": 1,
        "unreadable_image": 1,
    }
    assert index["total_samples"] == 3
    written = read_all(tmp_path / "out")
    assert [(s["__key__"], s["txt"]) for s in written] == [("ok1", b"fine"), ("dup", b"first"), ("ok2", b"fine")]


def la_tiff(grey: int = 90, alpha: int = 200) -> bytes:
    """A grey TIFF with *associated* (premultiplied) alpha, ExtraSamples = 1: PIL opens it in
    mode "La", which it cannot convert to RGB. PIL only writes unassociated alpha (LA), so the
    tag of an LA TIFF is patched."""
    data = bytearray(encode(Image.new("LA", (20, 12), (grey, alpha)), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 338:  # ExtraSamples
            struct.pack_into("<H", data, entry + 8, 1)
    assert Image.open(io.BytesIO(bytes(data))).mode == "La"
    return bytes(data)


def test_make_shards_counts_every_skip_reason_exactly(tmp_path: Path, capsys: pytest.CaptureFixture, one_torch_thread) -> None:
    # A folder corpus through `slip make-shards` with 2 worker processes, then the training
    # loader over its output: each bad file is counted once under its own reason.
    from slip.data import make_shards
    from slip.data.pipeline import PipelineConfig, build_loader

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    jpeg = encode(noise_image(5, (64, 64)), "JPEG")

    def put(name: str, data: bytes, caption: str | None = "a caption") -> None:
        (src / name).write_bytes(data)
        if caption is not None:
            (src / name).with_suffix(".txt").write_text(caption)

    good = [f"good{i}" for i in range(6)]
    for i, key in enumerate(good[:4]):
        put(f"{key}.jpg", encode(noise_image(i), "JPEG"))
    put("good4.png", encode(noise_image(4).convert("L"), "PNG"))  # converted, not skipped
    put("good5.tif", encode(noise_image(6).convert("CMYK"), "TIFF"))
    put("corrupt1.png", corrupted_png())
    put("corrupt2.jpg", jpeg[:300] + bytes(range(256)) * 4)
    put("corrupt3.jpg", jpeg[: len(jpeg) // 2])  # truncated
    put("lamode1.tif", la_tiff(90, 200))
    put("lamode2.tif", la_tiff(30, 100))
    put("text.jpg", b"<html>not found</html>")
    put("empty.jpg", b"")
    put("nocaption.jpg", encode(noise_image(7), "JPEG"), caption=None)
    put("blank.jpg", encode(noise_image(8), "JPEG"), caption=" \n ")
    assert make_shards.main([str(src), str(out), "--workers", "2", "--samples-per-shard", "4", "--no-progress"]) == 0
    expected = {"corrupt_image": 2, "truncated_image": 1, "unsupported_mode": 2, "not_an_image": 1, "empty_file": 1,
                "missing_caption": 1, "empty_caption": 1}
    index = load_index(out)
    assert index["skipped"] == expected
    assert index["total_samples"] == 6 and [s["samples"] for s in index["shards"]] == [4, 2]
    assert sorted(s["__key__"] for s in read_all(out)) == good
    printed = capsys.readouterr().out
    assert "wrote 6 samples in 2 shards" in printed and "skipped 9 samples: " in printed
    assert "corrupt_image=2" in printed and "truncated_image=1" in printed and "unsupported_mode=2" in printed
    # What was written loads without a single skip.
    config = PipelineConfig(method="clip", size=16, batch_size=4, workers=0, shuffle_buffer=0)
    tokens = lambda texts: torch.zeros(len(texts), 8, dtype=torch.long)  # noqa: E731
    loader = build_loader(out, config, tokenizer=tokens)
    assert sorted(k for batch in loader for k in batch["key"]) == good
    assert loader.skipped() == {}
    # The same files packed as they are and read by the training loader: the same skips, by reason.
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "raw-000000.tar", "w") as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=path.name)
    loader = build_loader(raw, config, tokenizer=tokens)
    assert sorted(k for batch in loader for k in batch["key"]) == good
    assert loader.skipped() == expected


def test_decompression_bomb_rejected_by_pixel_cap(tmp_path: Path) -> None:
    big = encode(Image.new("RGB", (100, 100), (0, 255, 0)), "PNG")
    small = encode(Image.new("RGB", (40, 25), (0, 255, 0)), "PNG")
    index = write_shards(
        [Sample("big", big, "x"), Sample("small", small, "x")], tmp_path, max_pixels=1000, progress=False
    )
    assert index["skipped"] == {"too_many_pixels": 1}
    assert [s["__key__"] for s in read_all(tmp_path)] == ["small"]
    with pytest.raises(SampleSkip) as info:
        prepare_image(big, max_pixels=9_999)
    assert info.value.reason == "too_many_pixels"
    assert prepare_image(big, max_pixels=10_000).width == 100


def test_mode_conversions_to_rgb(tmp_path: Path) -> None:
    cmyk = encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (10, 0, 20, 10))  # right half fully transparent
    sixteen = Image.fromarray(np.full((10, 20), 32896, dtype=np.uint16))  # mid grey in 16 bit
    assert sixteen.mode.startswith("I;16")
    grey = encode(Image.new("L", (20, 10), 77), "JPEG", quality=95)
    samples = [
        Sample("cmyk", cmyk, "x"),
        Sample("palette", encode(palette, "PNG"), "x"),
        Sample("rgba", encode(rgba, "PNG"), "x"),
        Sample("sixteen", encode(sixteen, "PNG"), "x"),
        Sample("grey", grey, "x"),
        Sample("gif", encode(palette, "GIF"), "x"),
    ]
    index = write_shards(samples, tmp_path, progress=False)
    assert index["skipped"] == {}
    out = {s["__key__"]: decode(s["jpg"]) for s in read_all(tmp_path)}
    assert all(img.format == "JPEG" and img.mode == "RGB" and img.size == (20, 10) for img in out.values())
    pixel = {k: np.asarray(img)[5, 5].astype(int) for k, img in out.items()}
    assert np.abs(pixel["cmyk"] - [255, 0, 0]).max() < 20
    assert np.abs(pixel["palette"] - [0, 0, 255]).max() < 20
    assert np.abs(pixel["gif"] - [0, 0, 255]).max() < 20
    assert np.abs(pixel["rgba"] - [255, 0, 0]).max() < 20
    assert np.abs(np.asarray(out["rgba"])[5, 15].astype(int) - [255, 255, 255]).max() < 20  # white
    assert np.abs(pixel["sixteen"] - [128, 128, 128]).max() < 6  # scaled, not clipped to 255
    assert np.abs(pixel["grey"] - [77, 77, 77]).max() < 6


def test_prepare_image_keeps_or_reencodes() -> None:
    jpeg = encode(noise_image(1, (120, 80)), "JPEG", quality=90)
    kept = prepare_image(jpeg)
    assert kept.data == jpeg and not kept.reencoded and (kept.width, kept.height) == (120, 80)
    # Shorter side above max_side: downscaled so the shorter side is exactly max_side.
    small = prepare_image(jpeg, max_side=40)
    assert small.reencoded and (small.width, small.height) == (60, 40)
    assert decode(small.data).size == (60, 40)
    tall = prepare_image(encode(noise_image(2, (30, 90)), "PNG"), max_side=20)
    assert (tall.width, tall.height) == (20, 60)
    # Shorter side not above max_side: untouched.
    assert prepare_image(jpeg, max_side=80).data == jpeg


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rotated = prepare_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert rotated.reencoded and (rotated.width, rotated.height) == (20, 40)


def test_clean_key() -> None:
    assert clean_key("a/b.c d") == "a_b_c_d"
    assert clean_key("ok-key_1") == "ok-key_1"
    long_a, long_b = clean_key("x" * 100 + "a"), clean_key("x" * 100 + "b")
    assert len(long_a) <= shards.MAX_KEY_LENGTH and long_a != long_b
    with pytest.raises(ValueError):
        clean_key("")


# ------------------------------------------------------------------------------------------
# crash safety and overwrite protection
# ------------------------------------------------------------------------------------------


def test_interrupted_run_leaves_no_partial_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def failing_source():
        for i in range(5):
            yield Sample(f"k{i}", solid_jpeg(), f"c{i}")
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(failing_source(), out, samples_per_shard=2, progress=False)
    # The two completed shards are in place; the third (one sample) was never renamed.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert len(read_shard(out / name)) == 2

    with pytest.raises(FileExistsError):
        write_shards([Sample("a", solid_jpeg(), "c")], out, progress=False)
    index = write_shards([Sample("a", solid_jpeg(), "c")], out, overwrite=True, progress=False)
    assert index["shards"] == [{"name": "shard-000000.tar", "samples": 1}]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]


def test_failure_while_writing_removes_temporary_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = shards.TarWriter.write

    def write_then_fail(self, obj):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, obj)

    monkeypatch.setattr(shards.TarWriter, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_shards([Sample(f"k{i}", solid_jpeg(), "c") for i in range(5)], tmp_path, samples_per_shard=10, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path: Path) -> None:
    for kwargs in ({"samples_per_shard": 0}, {"workers": 0}, {"max_side": 0}, {"prefix": "a/b"}, {"max_pixels": 0}):
        with pytest.raises(ValueError):
            write_shards([], tmp_path, progress=False, **kwargs)


def test_empty_input_writes_empty_index(tmp_path: Path) -> None:
    index = write_shards([Sample("a", b"", "c")], tmp_path, progress=False, corpus=None)
    assert index["shards"] == [] and index["total_samples"] == 0 and index["corpus"] is None
    assert index["skipped"] == {"empty_file": 1}
    assert load_index(tmp_path) == index


def _in_mode(mode: str) -> tuple[bytes, np.ndarray]:
    """A smooth 48 x 40 image stored in ``mode`` (encoded bytes) and the RGB pixels it means."""
    y, x = np.mgrid[0:40, 0:48]
    level = (x * 4 + y * 2).astype(np.float64)  # 0..266 -> clipped 0..255 below
    level = np.clip(level, 0, 255)
    gray8 = level.astype(np.uint8)
    if mode == "I;16":  # 16-bit PNG: full range
        return encode(Image.fromarray((level * 257).astype(np.uint16)), "PNG"), np.repeat(gray8[..., None], 3, -1)
    if mode == "I":  # 32-bit integers holding 8-bit data
        return encode(Image.fromarray(level.astype(np.int32), mode="I"), "TIFF"), np.repeat(gray8[..., None], 3, -1)
    if mode == "F":  # floats in [0, 1]
        return encode(Image.fromarray((level / 255).astype(np.float32), mode="F"), "TIFF"), np.repeat(gray8[..., None], 3, -1)
    rgb = np.stack([gray8, 255 - gray8, np.full_like(gray8, 90)], -1)
    if mode == "RGBA":  # left half transparent: white there
        alpha = np.where(x < 24, 0, 255).astype(np.uint8)
        want = np.where((x < 24)[..., None], 255, rgb).astype(np.uint8)
        return encode(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), "PNG"), want
    if mode == "CMYK":
        img = Image.fromarray(rgb).convert("CMYK")
        return encode(img, "TIFF"), np.asarray(img.convert("RGB"))
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "CMYK"])
def test_make_shards_and_the_loader_see_the_same_pixels_in_every_mode(mode: str) -> None:
    from slip.data.decode import _decode_pixels
    from slip.data.images import open_image

    data, want = _in_mode(mode)
    stored = prepare_image(data)  # what make-shards writes (JPEG, quality 95)
    written = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB")).astype(np.int16)
    loaded = _decode_pixels(data, open_image(data), 1)  # what the loader decodes from the file itself
    loaded = loaded.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(loaded - want).max() <= 1, mode
    assert np.abs(written - want).mean() < 2.0, mode  # JPEG's own error, nothing more
