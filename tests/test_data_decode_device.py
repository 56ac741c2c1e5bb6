"""data.decode=device: workers ship JPEG bytes and crop boxes, the training device decodes and
cuts the views. Run here on the CPU (torchvision's decode_jpeg and the same crop code), which is
what a GPU runs too, with nvJPEG as the decoder."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slip.data import decode as D
from slip.data import errors as E
from slip.data import pipeline as P
from slip.data.views import MethodViews, clip_view, simclr_view

from test_data_pipeline import _write_tar


pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEWS = MethodViews(clip=clip_view(32), ssl=(simclr_view(32, "a"), simclr_view(24, "b")))


def _photo(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    """A smooth image with some texture (JPEG-friendly, but not flat)."""
    rs = np.random.RandomState(seed)
    small = (rs.rand(height // 10, width // 10, 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _shards(root: Path, members_by_shard: list[list[tuple[str, bytes]]]) -> Path:
    root.mkdir(parents=True)
    for i, members in enumerate(members_by_shard):
        _write_tar(root / f"s-{i:06d}.tar", members)
    return root


def _sample(key: str, image: bytes, ext: str = "jpg") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", image), (f"{key}.txt", f"a photo {key}".encode())]


def _config(**kw) -> P.PipelineConfig:
    base = dict(views=VIEWS, batch_size=4, workers=0, shuffle_buffer=6, shuffle_initial=2, rank=0, world_size=1,
                seed=0, partial_batches=True)
    base.update(kw)
    return P.PipelineConfig(**base)


def _tokens(texts):
    return torch.zeros(len(texts), 8, dtype=torch.long)


def _device_batches(spec, config) -> list[dict]:
    loader = P.SlipLoader(spec, config, tokenizer=_tokens)
    decoder = loader.device_decoder("cpu")
    return [decoder(batch) for batch in loader], loader, decoder


@pytest.fixture
def photos(tmp_path):
    shards = [[m for i in range(8) for m in _sample(f"p{s}{i:02d}", _encode(_photo(s * 10 + i), quality=90))]
              for s in range(2)]
    return str(_shards(tmp_path / "photos", shards))


def _views_of(batch):
    return [batch["image"], *batch["views"]]


def test_device_decoded_views_equal_worker_decoded_ones_within_a_grey_level(photos):
    worker = list(P.SlipLoader(photos, _config(allow_draft=False), tokenizer=_tokens))
    device, _, _ = _device_batches(photos, _config(decode="device"))
    assert [b["key"] for b in device] == [b["key"] for b in worker]
    for a, b in zip(device, worker):
        assert "encoded" not in a
        for x, y in zip(_views_of(a), _views_of(b)):
            assert x.shape == y.shape and x.dtype == torch.uint8
            # The same decoder and crop boxes; antialiased bilinear in float vs torch's uint8 kernel.
            assert (x.int() - y.int()).abs().max() <= 1


def test_device_decoding_stays_close_to_the_reduced_size_worker_decode(photos):
    # Workers may decode large JPEGs at a reduced size (DCT scaling) and snap the boxes to it;
    # the device decodes at full size: the crops agree to resampling tolerance.
    worker = list(P.SlipLoader(photos, _config(allow_draft=True), tokenizer=_tokens))
    device, _, _ = _device_batches(photos, _config(decode="device"))
    diffs = [(x.float() - y.float()).abs().mean().item() for a, b in zip(device, worker)
             for x, y in zip(_views_of(a), _views_of(b))]
    assert max(diffs) < 4.0


def test_images_the_device_cannot_decode_are_decoded_in_the_workers_and_bad_ones_counted(tmp_path):
    good = [_sample(f"g{i}", _encode(_photo(i), quality=90)) for i in range(5)]
    png = _sample("png", _encode(_photo(20), "PNG"), "png")
    cmyk = _sample("cmyk", _encode(_photo(21).convert("CMYK"), quality=90))
    jpeg = _encode(_photo(22), quality=90)
    truncated = _sample("trunc", jpeg[: len(jpeg) // 2])  # caught in the worker: no end marker
    # Complete-looking (header and end marker intact) but undecodable: found only on the device.
    broken = _sample("broken", jpeg[:400] + bytes(300) + b"\xff\xd9")
    members = [m for sample in [*good[:2], png, broken, cmyk, *good[2:], truncated] for m in sample]
    spec = str(_shards(tmp_path / "mixed", [members]))
    # numbered, so the batch carries each sample's global index (its place in the tar)
    (tmp_path / "mixed" / "index.json").write_text(json.dumps(
        {"format": "slip-shards/1", "shards": [{"name": "s-000000.tar", "samples": 9}]}))
    config = _config(decode="device", shuffle_buffer=0, batch_size=9, allow_draft=False)
    batches, loader, decoder = _device_batches(spec, config)
    (batch,) = batches
    assert batch["key"] == ["g0", "g1", "png", "broken", "cmyk", "g2", "g3", "g4"]  # the truncated one skipped
    assert loader.skipped() == {E.TRUNCATED_IMAGE: 1, E.CORRUPT_IMAGE: 1}
    assert decoder.replaced == 1
    # The broken sample's place holds a copy of the batch's first good sample (same batch size).
    i = batch["key"].index("broken")
    for x in _views_of(batch):
        assert torch.equal(x[i], x[0])
    assert batch["index"].tolist() == [0, 1, 2, 0, 4, 5, 6, 7]  # the copy's index too (a bank must not misfile it)
    # PNG and CMYK were decoded in the worker: their views equal the worker path's.
    worker = list(P.SlipLoader(spec, _config(shuffle_buffer=0, batch_size=9, allow_draft=False), tokenizer=_tokens))
    for key in ("png", "cmyk", "g0"):
        j, k = batch["key"].index(key), worker[0]["key"].index(key)
        for x, y in zip(_views_of(batch), _views_of(worker[0])):
            assert (x[j].int() - y[k].int()).abs().max() <= 1, key


def test_a_resumed_device_decoding_loader_gives_the_uninterrupted_batches(photos):
    config = _config(decode="device", epoch_samples=24)
    full, _, _ = _device_batches(photos, config)
    for k in (1, 3):
        loader = P.SlipLoader(photos, config, tokenizer=_tokens)
        for i, _ in enumerate(loader, start=1):
            if i == k:
                break
        resumed = P.SlipLoader(photos, config, tokenizer=_tokens)
        resumed.load_state_dict(loader.state_dict())
        decoder = resumed.device_decoder("cpu")
        rest = [decoder(b) for b in resumed]
        assert [b["key"] for b in rest] == [b["key"] for b in full[k:]]
        for a, b in zip(rest, full[k:]):
            for x, y in zip(_views_of(a), _views_of(b)):
                assert torch.equal(x, y)


def test_workers_draw_the_same_crop_boxes_in_both_modes():
    data = _encode(_photo(3, 400, 300), quality=90)
    for seed in range(5):
        planned = D.plan_views(data, VIEWS.all, random.Random(seed))
        _, boxes = D.plan_crops(400, 300, VIEWS.all, random.Random(seed), allow_draft=False)
        assert planned.data == data and list(planned.boxes) == boxes and planned.decoded is None
    png = _encode(_photo(3), "PNG")
    planned = D.plan_views(png, VIEWS.all, random.Random(0))
    assert planned.data is None and [tuple(v.shape) for v in planned.decoded] == [(3, 32, 32), (3, 32, 32), (3, 24, 24)]


def test_an_unknown_decode_mode_is_refused(photos):
    with pytest.raises(ValueError, match="decode must be one of workers, device"):
        P.SlipLoader(photos, _config(decode="gpu"))


def test_bench_data_reports_the_loader_side_alone_when_the_device_decodes(photos, capsys, monkeypatch):
    import json

    from slip.data import bench

    decodes = []
    real = D._decode_pixels
    monkeypatch.setattr(D, "_decode_pixels", lambda *a: decodes.append(1) or real(*a))
    runs, decoded = {}, {}
    for mode in ("workers", "device"):
        decodes.clear()
        assert bench.main([photos, "--method", "slip-simclr", "--workers", "0", "--seconds", "1", "--batch-size", "4",
                           "--size", "32", "--device", "cpu", "--warmup-batches", "1", "--decode", mode,
                           "--no-draft"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        decoded[mode] = len(decodes)
    device, workers = runs["device"], runs["workers"]
    assert device["decode"] == "device" and device["device_cpu_fallback"] == 0 and device["device_ms_per_batch"] > 0
    assert device["loader_samples_per_cpu_s"] > 0 and workers["loader_samples_per_cpu_s"] > 0
    # Decoding moved off the loader: no JPEG is decoded on the loader side (the device decoder
    # decodes them), where the workers decode every sample. (CPU-time figures are for the
    # benchmark to print, not for a test to compare.)
    assert decoded["device"] == 0 and decoded["workers"] > 0
