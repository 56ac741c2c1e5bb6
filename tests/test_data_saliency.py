"""Saliency masking (RELICv2's background removal): the spectral-residual estimate, shard masks,
the per-view draws, and the same masked crops from the worker and the device decode paths."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_decode_device import (
    _config,
    _device_batches,
    _encode,
    _photo,
    _shards,
    _tokens,
)

from slip.data import decode as D
from slip.data import errors as E
from slip.data import pipeline as P
from slip.data import saliency as S
from slip.data.errors import SampleSkip
from slip.data.views import MethodViews, ViewSpec, simclr_view

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _square_scene(width: int = 192, height: int = 128, seed: int = 0) -> np.ndarray:
    """A textured red square on a flat, faintly noisy grey background (right of centre)."""
    rs = np.random.RandomState(seed)
    img = np.full((height, width, 3), 120, dtype=np.float64) + rs.randn(height, width, 3) * 2
    top, left, side = height // 3, width // 2, height // 3
    img[top:top + side, left:left + side] = rs.rand(side, side, 3) * 255 * [1.0, 0.3, 0.3]
    return img.clip(0, 255).astype(np.uint8)


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_the_spectral_residual_finds_the_object_and_drops_the_far_background():
    img = _square_scene()
    mask = S.estimate_mask(_chw(img))
    assert mask.shape == S.mask_grid(192, 128) == (43, 64)
    gh, gw = mask.shape
    # the square spans rows 1/3..2/3 and columns 1/2..5/6 of the image
    inside = mask[round(gh * 0.40):round(gh * 0.60), round(gw * 0.55):round(gw * 0.78)]
    assert inside.mean() > 0.9
    assert mask[:, : gw // 5].mean() < 0.1 and mask[: gh // 6].mean() < 0.1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_an_image_without_salient_structure_keeps_everything():
    flat = torch.full((3, 40, 60), 90, dtype=torch.uint8)
    assert torch.equal(S.estimate_mask(flat), torch.ones(S.mask_grid(60, 40)))


def test_a_shard_mask_of_any_size_is_read_onto_the_image_grid():
    mask = np.zeros((50, 80), dtype=np.uint8)
    mask[:, :40] = 255  # left half foreground, at another resolution than the image's
    grid = S.read_mask(_png(mask), width=320, height=200)
    assert grid.shape == S.mask_grid(320, 200)
    gw = grid.shape[1]
    assert grid[:, : gw // 2 - 2].min() > 0.999 and grid[:, gw // 2 + 2:].max() < 0.001
    with pytest.raises(ValueError, match="unreadable mask"):
        S.read_mask(b"not a png", 320, 200)


def test_only_views_with_a_saliency_probability_draw_and_a_sharing_view_takes_its_sources_draw():
    plain = [simclr_view(32, "a"), simclr_view(32, "b")]
    rng = random.Random(3)
    before = rng.getstate()
    assert S.draw_masked(plain, rng) == (False, False)
    assert rng.getstate() == before  # methods without masking draw exactly what they did
    half = ViewSpec(name="m", size=(32, 32), scale=(0.2, 1.0), saliency_p=0.5)
    twin = ViewSpec(name="t", size=(16, 16), scale=(0.2, 1.0), saliency_p=0.5, shares="m")
    draws = [S.draw_masked([half, twin, plain[0]], random.Random(seed)) for seed in range(400)]
    assert all(d[0] == d[1] and not d[2] for d in draws)
    assert 0.4 < np.mean([d[0] for d in draws]) < 0.6


def _masked_views(p: float) -> list[ViewSpec]:
    return [ViewSpec(name="large", size=(48, 48), scale=(0.5, 1.0), saliency_p=p),
            ViewSpec(name="small", size=(24, 24), scale=(0.2, 0.5))]


def test_a_masked_crop_is_the_plain_crop_with_the_background_blacked_out():
    img = _square_scene()
    data = _encode(Image.fromarray(img), quality=95)
    mask = np.zeros((128, 192), dtype=np.uint8)
    mask[:, 96:] = 255  # the right half is foreground
    plain = D.decode_views(data, _masked_views(0.0), random.Random(7), allow_draft=False)
    masked = D.decode_views(data, _masked_views(1.0), random.Random(7), allow_draft=False, mask_data=_png(mask))
    # the draws come after the boxes: the same crops, the large one masked, the small one not
    assert torch.equal(masked[1], plain[1])
    box = D.plan_crops(192, 128, _masked_views(1.0), random.Random(7), allow_draft=False)[1][0]
    weights = S.mask_crop(S.read_mask(_png(mask), 192, 128), box, (48, 48), (192, 128))
    assert torch.equal(masked[0], S.remove_background(plain[0], weights))
    assert masked[0].sum() < plain[0].sum()
    # with data.saliency=estimate the shard's mask is ignored
    estimated = D.decode_views(data, _masked_views(1.0), random.Random(7), allow_draft=False, mask_data=_png(mask),
                               saliency="estimate")
    weights = S.mask_crop(S.estimate_mask(_chw(np.asarray(Image.open(io.BytesIO(data))))), box, (48, 48), (192, 128))
    assert torch.equal(estimated[0], S.remove_background(plain[0], weights))


def test_an_unreadable_mask_skips_the_sample_only_when_a_view_needs_it():
    data = _encode(_photo(1), quality=90)
    D.decode_views(data, _masked_views(0.0), random.Random(0), mask_data=b"junk")  # not needed: ignored
    with pytest.raises(SampleSkip) as err:
        D.decode_views(data, _masked_views(1.0), random.Random(0), mask_data=b"junk")
    assert err.value.reason == E.CORRUPT_IMAGE and "mask.png" in err.value.detail
    with pytest.raises(ValueError, match="saliency"):
        D.decode_views(data, _masked_views(1.0), random.Random(0), saliency="sometimes")


@pytest.fixture
def masked_shards(tmp_path):
    members = []
    for i in range(6):
        img = _square_scene(seed=i)
        members += [(f"s{i}.jpg", _encode(Image.fromarray(img), quality=92)), (f"s{i}.txt", b"a square")]
        if i % 2 == 0:  # half the samples carry their own mask
            mask = np.zeros((128, 192), dtype=np.uint8)
            mask[20:100, 30:170] = 255
            members.append((f"s{i}.mask.png", _png(mask)))
    return str(_shards(tmp_path / "masked", [members]))


@pytest.mark.parametrize("saliency", ["auto", "estimate"])
def test_device_and_worker_decoding_mask_the_same_crops(masked_shards, saliency):
    views = MethodViews(clip=None, ssl=tuple(_masked_views(0.7)))
    config = {"views": views, "shuffle_buffer": 0, "batch_size": 6, "allow_draft": False, "saliency": saliency}
    (worker,) = list(P.SlipLoader(masked_shards, _config(**config), tokenizer=_tokens))
    (device,), _, _ = _device_batches(masked_shards, _config(decode="device", **config))
    (unmasked,) = list(P.SlipLoader(masked_shards, _config(**{**config, "views": MethodViews(
        clip=None, ssl=tuple(_masked_views(0.0)))}), tokenizer=_tokens))
    assert device["key"] == worker["key"]
    for x, y in zip(device["views"], worker["views"]):
        assert (x.float() - y.float()).abs().mean() < 1.0  # resampling, and rare mask-edge pixels
    darker = [(worker["views"][0][i].float().mean() < unmasked["views"][0][i].float().mean() - 1).item()
              for i in range(6)]
    assert any(darker) and not all(darker)  # p = 0.7 per sample: some masked, some not
    assert torch.equal(worker["views"][1], unmasked["views"][1])  # the small view is never masked


def test_the_loader_takes_a_samples_own_mask_unless_told_to_estimate(masked_shards):
    views = MethodViews(clip=None, ssl=(_masked_views(1.0)[0],))
    config = {"views": views, "shuffle_buffer": 0, "batch_size": 6, "allow_draft": False}
    (auto,) = list(P.SlipLoader(masked_shards, _config(**config), tokenizer=_tokens))
    (estimated,) = list(P.SlipLoader(masked_shards, _config(saliency="estimate", **config), tokenizer=_tokens))
    same = [torch.equal(a, b) for a, b in zip(auto["views"][0], estimated["views"][0])]
    # s0, s2, s4 carry mask.png (a wide rectangle), the others are estimated in both modes
    assert auto["key"] == [f"s{i}" for i in range(6)] and same == [False, True] * 3


def test_the_saliency_mode_and_probability_are_checked(masked_shards):
    with pytest.raises(ValueError, match="probabilities"):
        ViewSpec(name="x", size=(8, 8), scale=(0.5, 1.0), saliency_p=1.5)
    with pytest.raises(ValueError, match="saliency must be one of auto, estimate"):
        list(P.SlipLoader(masked_shards, _config(saliency="sometimes"), tokenizer=_tokens))
    from slip.train.config import Config, ConfigError, validate

    cfg = Config()
    cfg.data.train, cfg.data.saliency = masked_shards, "sometimes"
    with pytest.raises(ConfigError, match="data.saliency"):
        validate(cfg)
    cfg.data.saliency, cfg.objective.relic_saliency_p = "estimate", -0.1
    with pytest.raises(ConfigError, match="relic_saliency_p"):
        validate(cfg)
