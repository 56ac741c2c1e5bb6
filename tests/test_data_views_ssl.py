"""Tests for the SSL view declarations of slip.data.views and slip.data.pipeline: solarisation,
BYOL's asymmetric views, BEiT's shared-crop views (``ViewSpec.shares`` / ``normalize``), the
validation of :class:`MethodViews` and the patch mask drawn in the pipeline workers."""
from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF2
from PIL import Image, ImageDraw

from slip import transforms as T
from slip.data import augment as A
from slip.data import decode as D
from slip.data import pipeline as P
from slip.data import views as V
from slip.data.synthetic import generate_synthetic
from slip.ssl import method_views
from slip.ssl.masking import BlockMaskGenerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------ helpers
def _scene(width: int = 160, height: int = 120) -> Image.Image:
    """A smooth two-way colour gradient with a few hard-edged shapes: every crop looks different."""
    xs = np.linspace(0.0, 1.0, width)[None, :]
    ys = np.linspace(0.0, 1.0, height)[:, None]
    arr = np.stack([255 * xs * np.ones_like(ys), 255 * ys * np.ones_like(xs), 255 * (1 - xs) * (1 - ys) + 40 * xs],
                   axis=-1)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((20, 15, 70, 60), fill=(250, 240, 20))
    draw.rectangle((95, 30, 140, 95), fill=(20, 30, 200))
    draw.polygon([(30, 110), (75, 70), (90, 115)], fill=(230, 20, 120))
    draw.line((0, 0, width, height), fill=(255, 255, 255), width=3)
    return im


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _down(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float -> antialiased bilinear resize to size x size (as the pipeline resizes)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x.float() * STD + MEAN


def _rate(flags: torch.Tensor) -> float:
    return flags.float().mean().item()


def _tol(p: float, n: int) -> float:
    """Five binomial standard deviations (a fixed seed makes the test deterministic anyway)."""
    return 5 * (p * (1 - p) / n) ** 0.5


# ---------------------------------------------------------------------------------- solarize
def test_solarize_threshold_is_128_of_255():
    assert A.SOLARIZE_THRESHOLD == pytest.approx(128 / 255, abs=1e-12)


def test_solarize_matches_torchvision_on_float_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 10, generator=g)
    # Also values exactly at and just around the threshold.
    t = A.SOLARIZE_THRESHOLD
    edge = torch.tensor([0.0, t - 1e-4, t, t + 1e-4, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    for images in (x, edge.contiguous()):
        ours = A.solarize(images)
        torch.testing.assert_close(ours, TF2.solarize(images, t), atol=0, rtol=0)
    # A custom threshold is honoured too.
    torch.testing.assert_close(A.solarize(x, 0.3), TF2.solarize(x, 0.3), atol=0, rtol=0)
    assert not torch.equal(A.solarize(x), x)


def test_solarize_on_uint8_pixels_agrees_with_torchvision_uint8_solarize():
    # Every grey level, in every channel.
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    ours = (A.solarize(u8.float() / 255.0) * 255.0).round().to(torch.uint8)
    theirs = TF2.solarize(u8, 128)
    assert torch.equal(ours, theirs)
    flat = ours[0, 0].flatten()
    assert flat[127] == 127 and flat[128] == 127 and flat[255] == 0  # 128 is inverted, 127 is not


def test_batch_augment_draws_solarize_per_sample_and_applies_it():
    spec = V.ViewSpec(name="s", size=(8, 8), scale=(0.5, 1.0), solarize_p=0.5)
    aug = A.BatchAugment(V.MethodViews(clip=None, ssl=(spec,)))
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out, params = aug.augment(x, spec, return_params=True, generator=torch.Generator().manual_seed(2))
    assert params["solarize"].shape == (64,) and params["solarize"].dtype == torch.bool
    assert 0 < int(params["solarize"].sum()) < 64
    pixels = _unnormalise(out)
    y = x.float() / 255.0
    expected = torch.where(params["solarize"].view(-1, 1, 1, 1), TF2.solarize(y, A.SOLARIZE_THRESHOLD), y)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
    # A view without solarisation draws no solarize parameter at all.
    plain = dataclasses.replace(spec, solarize_p=0.0)
    assert "solarize" not in aug.sample_params(4, plain, "cpu")


def test_solarize_is_applied_after_blur():
    spec = V.ViewSpec(name="bs", size=(12, 12), scale=(0.5, 1.0), blur_p=1.0, blur_sigma=(1.5, 1.5), solarize_p=1.0)
    aug = A.BatchAugment(V.MethodViews(clip=None, ssl=(spec,)))
    # Hard 0/255 edges: blurring makes mid-grey values, so the two orders give different images.
    x = torch.zeros(2, 3, 12, 12, dtype=torch.uint8)
    x[:, :, :, 6:] = 255
    x[1, :, 3:9, 3:9] = 200
    out, params = aug.augment(x, spec, return_params=True, generator=torch.Generator().manual_seed(0))
    assert params["blur"].all() and params["solarize"].all()
    y = x.float() / 255.0
    k = A.blur_kernel_size(spec.blur_sigma[1])
    blur_then_solarize = A.solarize(A.gaussian_blur(y, params["blur_sigma"], k))
    solarize_then_blur = A.gaussian_blur(A.solarize(y), params["blur_sigma"], k)
    assert (blur_then_solarize - solarize_then_blur).abs().max() > 0.1  # the order is observable
    torch.testing.assert_close(_unnormalise(out), blur_then_solarize, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- BYOL views
def test_byol_views_declare_the_asymmetric_recipe():
    first, second = V.byol_views(48, prefix="tgt")
    assert (first.name, second.name) == ("tgt1", "tgt2")
    for v in (first, second):
        assert v.size == (48, 48) and v.scale == (0.08, 1.0) and v.ratio == (3 / 4, 4 / 3)
        assert v.jitter == (0.4, 0.4, 0.2, 0.1) and v.jitter_p == 0.8
        assert v.grayscale_p == 0.2 and v.hflip_p == 0.5 and v.blur_sigma == (0.1, 2.0)
        assert v.shares is None and v.normalize
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert V.byol_views((24, 40))[0].size == (24, 40)
    assert [v.name for v in V.byol_views(8)] == ["byol1", "byol2"]
    V.MethodViews(clip=V.clip_view(8), ssl=V.byol_views(8))  # a valid declaration


# BYOL's (blur_p, solarize_p) for its first and second view (Grill et al. 2020, Table 6).
BYOL_BLUR_SOLARIZE = ((1.0, 0.0), (0.1, 0.2))


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (4000, 3, 8, 8), dtype=torch.uint8, generator=g)


def test_byol_views_draw_each_op_at_its_declared_rate(tiny_images):
    views = V.MethodViews(clip=None, ssl=V.byol_views(8))
    aug = A.BatchAugment(views)
    n = tiny_images.shape[0]
    g = torch.Generator().manual_seed(3)
    for spec, (blur_p, solarize_p) in zip(views.ssl, BYOL_BLUR_SOLARIZE):
        out, params = aug.augment(tiny_images, spec, return_params=True, generator=g)
        assert out.shape == tiny_images.shape and out.dtype == torch.float32
        expected = {"flip": 0.5, "jitter": 0.8, "grayscale": 0.2, "blur": blur_p, "solarize": solarize_p}
        for name, p in expected.items():
            if p == 0.0:
                assert name not in params, (spec.name, name)
                continue
            rate = _rate(params[name])
            assert abs(rate - p) <= _tol(p, n), (spec.name, name, rate)
        f = params["jitter_factors"]
        assert f[:, :2].min() >= 0.6 and f[:, :2].max() <= 1.4  # brightness, contrast 0.4
        assert f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2  # saturation 0.2
        assert f[:, 3].abs().max() <= 0.1  # hue 0.1
        assert f[:, 2].max() > 1.19 and f[:, 2].min() < 0.81  # the whole saturation range is used
        # Greyscale really happened exactly where it was drawn (random colour inputs are never grey).
        is_gray = (_unnormalise(out)[:, 0] - _unnormalise(out)[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
        assert torch.equal(is_gray, params["grayscale"])


@pytest.mark.parametrize("op", ["hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"])
def test_byol_views_apply_each_op_at_its_declared_rate_in_the_output(op, tiny_images):
    """Each op isolated (the others' probabilities zeroed) and detected from the pixels alone."""
    n = tiny_images.shape[0]
    x = tiny_images
    if op == "hflip_p":  # asymmetric rows: a flip is always visible
        x = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 1, 1, 8).expand(n, 3, 8, 8).contiguous()
    if op == "solarize_p":  # every pixel at or above the threshold: solarising changes each one
        x = (128 + x // 2).to(torch.uint8)
    off = {k: 0.0 for k in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p") if k != op}
    if op == "blur_p":  # a blur with sigma near 0.1 changes no pixel (neighbour weight e^-50): keep visible sigmas
        off["blur_sigma"] = (1.0, 2.0)
    declared = {"hflip_p": (0.5, 0.5), "jitter_p": (0.8, 0.8), "grayscale_p": (0.2, 0.2),
                "blur_p": tuple(b for b, _ in BYOL_BLUR_SOLARIZE), "solarize_p": tuple(s for _, s in BYOL_BLUR_SOLARIZE)}
    for spec, p in zip(V.byol_views(8), declared[op]):
        isolated = dataclasses.replace(spec, **off)
        aug = A.BatchAugment(V.MethodViews(clip=None, ssl=(isolated,)), seed=17)
        pixels = _unnormalise(aug.augment(x, isolated))
        changed = (pixels - x.float() / 255.0).abs().amax(dim=(1, 2, 3)) > 1e-4
        rate = _rate(changed)
        if p in (0.0, 1.0):
            assert rate == p, (spec.name, op, rate)
        else:
            assert abs(rate - p) <= _tol(p, n), (spec.name, op, rate)


# ------------------------------------------------------------------------------- BEiT views
def test_beit_views_declare_one_crop_at_two_sizes():
    big, small = V.beit_views(64, 32)
    assert (big.name, small.name) == ("beit", "beit_tokens")
    assert big.size == (64, 64) and small.size == (32, 32)
    assert big.shares is None and small.shares == "beit"
    assert big.normalize and not small.normalize
    for v in (big, small):
        assert v.scale == (0.08, 1.0) and v.hflip_p == 0.5 and v.jitter_p == 1.0
        assert v.jitter == (0.4, 0.4, 0.4, 0.0) and v.grayscale_p == 0.0 and v.blur_p == 0.0
        assert v.solarize_p == 0.0
    assert len(V.beit_views()) == 2 and V.beit_views()[1].size == (112, 112)
    V.MethodViews(clip=V.clip_view(64), ssl=V.beit_views(64, 32))  # valid, also next to a CLIP view


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_plan_crops_gives_the_sharing_view_the_same_box(fmt):
    im = _scene()
    views = V.beit_views(32, 16)
    independent = (views[0], dataclasses.replace(views[1], shares=None))
    factors = set()
    for seed in range(40):
        factor, boxes = D.plan_crops(im.width, im.height, views, random.Random(seed),
                                     allow_draft=fmt == "JPEG")
        factors.add(factor)
        assert boxes[0] == boxes[1]
        # The sharing view draws nothing: the RNG is left where the first view's draw left it.
        rng_both, rng_first = random.Random(seed), random.Random(seed)
        D.plan_crops(im.width, im.height, views, rng_both, allow_draft=False)
        D.plan_crops(im.width, im.height, views[:1], rng_first, allow_draft=False)
        assert rng_both.random() == rng_first.random()
    if fmt == "JPEG":
        assert max(factors) > 1  # the snapped (reduced-decode) path is covered too
    # Declared without sharing, the second view draws a box of its own.
    different = sum(
        D.plan_crops(im.width, im.height, independent, random.Random(seed))[1][0]
        != D.plan_crops(im.width, im.height, independent, random.Random(seed))[1][1]
        for seed in range(40)
    )
    assert different >= 35


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_views_small_beit_view_is_the_big_view_resized(fmt):
    data = _encode(_scene(), fmt)
    views = V.beit_views(32, 16)
    independent = (views[0], dataclasses.replace(views[1], shares=None))
    shared_err, indep_err = [], []
    for seed in range(20):
        big, small = D.decode_views(data, views, random.Random(seed))
        assert big.shape == (3, 32, 32) and small.shape == (3, 16, 16)
        assert big.dtype == small.dtype == torch.uint8
        ref = _down(big[None].float(), 16)[0]
        shared_err.append((small.float() - ref).abs().mean().item())
        big_i, small_i = D.decode_views(data, independent, random.Random(seed))
        indep_err.append((small_i.float() - _down(big_i[None].float(), 16)[0]).abs().mean().item())
    assert max(shared_err) < 4.0, shared_err
    assert np.mean(shared_err) < 2.5
    assert np.mean(indep_err) > 5 * np.mean(shared_err), (np.mean(indep_err), np.mean(shared_err))


def _beit_batch(n: int, seed: int = 0) -> dict:
    data = _encode(_scene(), "PNG")
    rng = random.Random(seed)
    crops = [D.decode_views(data, V.beit_views(32, 16), rng) for _ in range(n)]
    return {"views": [torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])],
            "key": [str(i) for i in range(n)]}


def test_batch_augment_beit_tokenizer_view_is_unnormalised_float32_with_the_same_draws():
    batch = _beit_batch(24)
    views = V.MethodViews(clip=None, ssl=V.beit_views(32, 16))
    out = A.BatchAugment(views, out_dtype=torch.bfloat16)(batch, generator=torch.Generator().manual_seed(0))
    big, tokens = out["views"]
    assert big.dtype == torch.bfloat16 and big.shape == (24, 3, 32, 32)
    assert tokens.dtype == torch.float32 and tokens.shape == (24, 3, 16, 16)
    assert tokens.min() >= 0.0 and tokens.max() <= 1.0
    assert big.float().min() < -0.5  # normalised: dark pixels go well below zero
    pixels = _unnormalise(big)
    assert pixels.min() > -0.02 and pixels.max() < 1.02
    err = (_down(pixels, 16) - tokens).abs().mean(dim=(1, 2, 3))
    # Same flip and jitter: only resampling (a 32 -> 16 px second resize of a hard-edged scene,
    # amplified by up to 1.4x contrast/brightness/saturation) and bfloat16 rounding separate them.
    assert err.max() < 0.045 and err.mean() < 0.02, err
    # Control: the same batch with independent draws for the tokenizer view is far off.
    unshared = V.MethodViews(clip=None, ssl=(views.ssl[0], dataclasses.replace(views.ssl[1], shares=None)))
    out_i = A.BatchAugment(unshared, out_dtype=torch.bfloat16)(batch, generator=torch.Generator().manual_seed(0))
    err_i = (_down(_unnormalise(out_i["views"][0]), 16) - out_i["views"][1]).abs().mean(dim=(1, 2, 3))
    assert err_i.mean() > 10 * err.mean(), (err_i.mean(), err.mean())
    assert batch["views"][0].dtype == torch.uint8  # the input batch is left alone


def test_batch_augment_flips_both_beit_views_together():
    n = 64
    # A grey left-to-right ramp: jitter keeps it monotone (hue cannot act on grey), so the
    # direction of the ramp tells whether a sample was flipped.
    def ramp(w: int) -> torch.Tensor:
        return torch.linspace(20, 235, w).round().to(torch.uint8).view(1, 1, 1, w).expand(n, 3, w, w).contiguous()

    batch = {"views": [ramp(32), ramp(16)]}

    def flipped(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x[..., :4].mean(dim=(1, 2, 3)) > x[..., -4:].mean(dim=(1, 2, 3))

    beit = V.MethodViews(clip=None, ssl=V.beit_views(32, 16))
    out = A.BatchAugment(beit, seed=5)(batch)
    f_big, f_small = flipped(_unnormalise(out["views"][0])), flipped(out["views"][1])
    assert 10 < int(f_big.sum()) < n - 10  # both outcomes occur
    assert torch.equal(f_big, f_small)
    # The params handed to the sharing view are the first view's own draws.
    aug = A.BatchAugment(beit)
    _, p1 = aug.augment(batch["views"][0], beit.ssl[0], return_params=True, generator=torch.Generator().manual_seed(9))
    _, p2 = aug.augment(batch["views"][1], beit.ssl[1], return_params=True, params=p1)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
    # Control: without sharing, the flips disagree on many samples.
    unshared = V.MethodViews(clip=None, ssl=(beit.ssl[0], dataclasses.replace(beit.ssl[1], shares=None)))
    out_u = A.BatchAugment(unshared, seed=5)(batch)
    disagree = flipped(_unnormalise(out_u["views"][0])) != flipped(out_u["views"][1])
    assert int(disagree.sum()) > 10


# ------------------------------------------------------------------------------ validation
def _view(name: str, **kw) -> V.ViewSpec:
    return V.ViewSpec(name=name, size=kw.pop("size", (16, 16)), scale=kw.pop("scale", (0.2, 1.0)), **kw)


def test_method_views_rejects_duplicate_names():
    with pytest.raises(ValueError, match=r"two views are named 'a'"):
        V.MethodViews(clip=None, ssl=(_view("a"), _view("a", size=(8, 8))))
    with pytest.raises(ValueError, match=r"two views are named 'clip'"):
        V.MethodViews(clip=V.clip_view(16), ssl=(_view("clip"),))


def test_method_views_rejects_sharing_an_unknown_or_later_view():
    with pytest.raises(ValueError, match=r"view 'b' shares 'nope', which is not an earlier view"):
        V.MethodViews(clip=None, ssl=(_view("a"), _view("b", shares="nope")))
    with pytest.raises(ValueError, match=r"view 'a' shares 'b', which is not an earlier view"):
        V.MethodViews(clip=None, ssl=(_view("a", shares="b"), _view("b")))
    with pytest.raises(ValueError, match=r"not an earlier view"):
        V.MethodViews(clip=None, ssl=(_view("a", shares="a"),))  # nor itself


def test_method_views_rejects_sharing_a_view_that_shares():
    with pytest.raises(ValueError, match=r"view 'c' shares 'b', which itself shares a view"):
        V.MethodViews(clip=None, ssl=(_view("a"), _view("b", shares="a"), _view("c", shares="b")))
    # Two views sharing the same source are fine.
    V.MethodViews(clip=None, ssl=(_view("a"), _view("b", shares="a"), _view("c", shares="a", size=(8, 8))))


def test_a_view_that_takes_anothers_flip_is_flipped_with_it_and_keeps_its_other_draws():
    # AMDIM flips the image once for both views: view b takes a's flip; its jitter is its own.
    views = V.MethodViews(clip=None, ssl=(_view("a", hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0),
                                          _view("b", hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0,
                                                flip_with="a")))
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = A.BatchAugment(views, seed=4, blend=True)
    _, pa = aug.augment(x, views.ssl[0], return_params=True)
    _, pb = aug.augment(x, views.ssl[1], return_params=True, flip=pa["flip"])
    assert torch.equal(pb["flip"], pa["flip"]) and 0 < int(pa["flip"].sum()) < 64
    assert not torch.equal(pb["jitter_factors"], pa["jitter_factors"])
    # Through forward, without jitter: b is a exactly (independent flips would differ in half).
    plain = V.MethodViews(clip=None, ssl=(_view("a", hflip_p=0.5), _view("b", hflip_p=0.5, flip_with="a")))
    for blend in (True, False):
        y = A.BatchAugment(plain, seed=4, blend=blend).forward({"views": [x, x]})["views"]
        assert torch.equal(y[0], y[1])


def test_method_views_checks_the_view_whose_flip_is_taken():
    with pytest.raises(ValueError, match=r"view 'b' takes the flip of 'nope', which is not an earlier view"):
        V.MethodViews(clip=None, ssl=(_view("a", hflip_p=0.5), _view("b", hflip_p=0.5, flip_with="nope")))
    with pytest.raises(ValueError, match=r"view 'b' takes the flip of 'a' but declares hflip_p 0.5 against its 0.2"):
        V.MethodViews(clip=None, ssl=(_view("a", hflip_p=0.2), _view("b", hflip_p=0.5, flip_with="a")))
    with pytest.raises(ValueError, match=r"view 'b': a view that shares another's draws takes its flip already"):
        _view("b", shares="a", flip_with="a")


@pytest.mark.parametrize("changed", [{"scale": (0.3, 1.0)}, {"ratio": (0.5, 2.0)}, {"hflip_p": 1.0},
                                     {"solarize_p": 1.0}, {"jitter": (0.4, 0.4, 0.4, 0.1)}, {"blur_sigma": (0.1, 3.0)}])
def test_method_views_rejects_a_sharing_view_with_other_crop_or_photometric_settings(changed):
    # The sharing view takes its source's box and draws: settings of its own would be ignored.
    (field,) = changed
    with pytest.raises(ValueError, match=rf"view 'b' shares the crop and draws of 'a' but declares other {field}"):
        V.MethodViews(clip=None, ssl=(_view("a"), _view("b", shares="a", **changed)))
    # The same view at another size, unnormalised, is allowed.
    V.MethodViews(clip=None, ssl=(_view("a"), _view("b", shares="a", size=(8, 8), normalize=False)))


def test_a_view_sharing_the_clip_view_gets_its_draws():
    clip = V.ViewSpec(name="clip", size=(16, 16), scale=(0.5, 1.0), hflip_p=0.5)
    tok = V.ViewSpec(name="tok", size=(8, 8), scale=(0.5, 1.0), hflip_p=0.5, shares="clip", normalize=False)
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).expand(64, 3, 16, 16).contiguous()
    small = ramp[:, :, ::2, ::2].contiguous()
    out = A.BatchAugment(V.MethodViews(clip=clip, ssl=(tok,)), seed=0)({"image": ramp, "views": [small]})
    big_flipped = out["image"][:, 0, 0, 0] > out["image"][:, 0, 0, -1]
    small_flipped = out["views"][0][:, 0, 0, 0] > out["views"][0][:, 0, 0, -1]
    assert 0 < int(big_flipped.sum()) < 64 and torch.equal(big_flipped, small_flipped)


# ------------------------------------------------------------------------- pipeline + mask
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ssl_corpus")
    generate_synthetic(out, seed=0, train_samples=64, test_per_class=1, image_size=32, samples_per_shard=16)
    return out / "train"


def _mask_gen() -> BlockMaskGenerator:
    return BlockMaskGenerator((4, 4), mask_ratio=0.4, min_block=1)


def _loader(corpus: Path, seed: int = 0, mask: bool = True, **kw) -> P.SlipLoader:
    views = V.MethodViews(clip=None, ssl=V.beit_views(32, 16), mask=_mask_gen() if mask else None)
    config = P.PipelineConfig(views=views, batch_size=8, workers=kw.pop("workers", 0), shuffle_buffer=16,
                              shuffle_initial=4, rank=0, world_size=1, seed=seed, **kw)
    return P.SlipLoader(corpus, config)


def _masks_by_key(loader: P.SlipLoader) -> dict[str, torch.Tensor]:
    return {k: m for batch in loader for k, m in zip(batch["key"], batch["patch_mask"])}


def test_pipeline_batches_carry_a_block_patch_mask_and_two_beit_views(corpus):
    batches = list(_loader(corpus))
    assert len(batches) == 8 and sum(len(b["key"]) for b in batches) == 64
    target = int(0.4 * 16)
    counts = []
    for batch in batches:
        assert set(batch) == {"key", "index", "views", "patch_mask"}  # no text: BEiT alone needs none
        mask = batch["patch_mask"]
        assert mask.shape == (8, 16) and mask.dtype == torch.bool
        counts += mask.sum(dim=1).tolist()
        big, small = batch["views"]
        assert big.shape == (8, 3, 32, 32) and small.shape == (8, 3, 16, 16)
        assert big.dtype == small.dtype == torch.uint8
        # One crop at two sizes, also through the pipeline.
        assert (_down(big.float(), 16) - small.float()).abs().mean() < 3.0
    # BlockMaskGenerator masks at most the target and almost always exactly it.
    assert max(counts) == target and min(counts) >= target - 1
    assert sum(c == target for c in counts) >= 0.95 * len(counts)
    # Masks are not all the same block pattern.
    patterns = {tuple(m.tolist()) for b in batches for m in b["patch_mask"]}
    assert len(patterns) > 20


def test_pipeline_masks_are_reproducible_from_the_seed(corpus):
    a, b, other = _masks_by_key(_loader(corpus)), _masks_by_key(_loader(corpus)), _masks_by_key(_loader(corpus, seed=1))
    assert len(a) == 64 and a.keys() == b.keys() == other.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], other[k]) for k in a) > 48


def test_pipeline_masks_do_not_depend_on_the_number_of_workers(corpus):
    inline = _masks_by_key(_loader(corpus))
    two = _masks_by_key(_loader(corpus, workers=2))
    assert inline.keys() == two.keys() and all(torch.equal(inline[k], two[k]) for k in inline)


def test_pipeline_without_a_mask_has_no_patch_mask(corpus):
    batch = next(iter(_loader(corpus, mask=False)))
    assert "patch_mask" not in batch and len(batch["views"]) == 2


def test_batch_augment_passes_the_patch_mask_through(corpus):
    loader = _loader(corpus)
    batch = next(iter(loader))
    out = A.BatchAugment(loader.views, out_dtype=torch.bfloat16, seed=0)(batch)
    assert out["patch_mask"] is batch["patch_mask"]
    assert out["views"][0].dtype == torch.bfloat16 and out["views"][1].dtype == torch.float32


@pytest.mark.parametrize("method,clip,ssl_sizes,mask", [
    ("clip", True, [], None), ("simclr", False, [224, 224], None), ("slip-simclr", True, [224, 224], None),
    ("byol", False, [224, 224], None), ("slip-byol", True, [224, 224], None),
    ("beit", False, [224, 112], (14, 14)), ("slip-beit", True, [224, 112], (14, 14)),
])
def test_method_views_by_name_for_the_data_tools(method, clip, ssl_sizes, mask):
    views = method_views(method, 224)
    assert (views.clip is not None) == clip and [v.size[0] for v in views.ssl] == ssl_sizes
    assert (views.mask.grid if views.mask is not None else None) == mask
    if method.endswith("byol"):
        assert views.ssl == V.byol_views(224)
    if method.endswith("beit"):
        assert views.ssl == V.beit_views(224, 112)


def test_method_views_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown method 'dino'"):
        method_views("dino")
