"""Tests for slip.data.views: crop boxes, one-decode views, draft decoding, batched augmentation."""
from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from slip import transforms as T
from slip.data import augment as A
from slip.data import decode as D
from slip.data import errors as E
from slip.data import views as V
from slip.ssl import method_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ helpers
def _smooth_rgb(width: int, height: int, seed: int = 0, cell: int = 16) -> np.ndarray:
    """A smooth colourful image (random colours every ``cell`` pixels, bicubic in between)."""
    rs = np.random.RandomState(seed)
    small = (rs.rand(height // cell + 2, width // cell + 2, 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> bytes:
    return _encode(Image.fromarray(_smooth_rgb(width, height, seed)), "JPEG", quality=quality)


def _skip_reason(data: bytes, views, **kw) -> str:
    with pytest.raises(E.SampleSkip) as info:
        D.decode_views(data, views, random.Random(0), **kw)
    return info.value.reason


SLIP32 = method_views("slip-simclr", 32)


# ------------------------------------------------------------------------------ declarations
def test_method_views_declare_slip_three_views():
    mv = method_views("slip-simclr", 224)
    assert mv.clip is not None and mv.clip.scale == (0.5, 1.0) and mv.clip.jitter is None
    assert mv.clip.hflip_p == 0.0 and mv.needs_text
    assert len(mv.ssl) == 2
    for s in mv.ssl:
        assert s.scale == (0.08, 1.0) and s.jitter == (0.4, 0.4, 0.4, 0.1)
        assert (s.jitter_p, s.grayscale_p, s.blur_p, s.hflip_p) == (0.8, 0.2, 0.5, 0.5)
        assert s.blur_sigma == (0.1, 2.0) and s.size == (224, 224)
    assert method_views("clip", 64).ssl == () and method_views("clip", 64).clip.size == (64, 64)
    assert method_views("simclr", 48).clip is None and not method_views("simclr", 48).needs_text
    with pytest.raises(ValueError):
        method_views("dino")
    with pytest.raises(ValueError):
        V.ViewSpec(name="bad", size=(32, 32), scale=(0.0, 1.0))


# --------------------------------------------------------------------------------- crop boxes
def test_sample_crop_stays_inside_and_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 900), rng.randint(20, 900)
        left, top, cw, ch = D.sample_crop(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h and cw > 0 and ch > 0


def test_sample_crop_area_distribution_matches_torchvision():
    # Same algorithm as torchvision's RandomResizedCrop.get_params: compare area-fraction means.
    rng = random.Random(1)
    torch.manual_seed(1)
    img = torch.zeros(3, 300, 400)
    ours, theirs = [], []
    for _ in range(3000):
        _, _, cw, ch = D.sample_crop(rng, 400, 300, (0.08, 1.0), (3 / 4, 4 / 3))
        ours.append(cw * ch / 120000)
        _, _, th, tw = torch_rrc_params(img)
        theirs.append(tw * th / 120000)
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.03
    assert abs(np.std(ours) - np.std(theirs)) < 0.03


def torch_rrc_params(img):
    from torchvision.transforms import RandomResizedCrop

    return RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])


def test_sample_crop_falls_back_to_central_crop_for_extreme_aspect():
    left, top, cw, ch = D.sample_crop(random.Random(0), 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3))
    # No 90%-area crop with aspect <= 4/3 fits a 100:1 image: central crop of height 10.
    assert ch == 10 and cw == round(10 * 4 / 3) and left == (1000 - cw) // 2 and top == 0


def test_draft_factor_keeps_every_crop_at_output_resolution():
    sizes = [(32, 32), (32, 32)]
    assert D.draft_factor([(0, 0, 300, 300), (0, 0, 300, 300)], sizes) == 8
    assert D.draft_factor([(0, 0, 300, 300), (0, 0, 140, 300)], sizes) == 4
    assert D.draft_factor([(0, 0, 300, 300), (0, 0, 70, 70)], sizes) == 2
    assert D.draft_factor([(0, 0, 300, 300), (0, 0, 40, 300)], sizes) == 1
    assert D.draft_factor([(0, 0, 20, 20)], sizes[:1]) == 1


# ------------------------------------------------------------------------- decode and crops
def test_decode_views_gives_channels_last_uint8_crops_of_each_view_size():
    crops = D.decode_views(_jpeg(80, 60), SLIP32.all, random.Random(0))
    assert len(crops) == 3
    for c in crops:  # (3, h, w) in shape, height-width-channel in memory, as the resize writes it
        assert c.shape == (3, 32, 32) and c.dtype == torch.uint8 and c.permute(1, 2, 0).is_contiguous()
    gray_jpeg = _encode(Image.fromarray(_smooth_rgb(80, 60, 0)).convert("L"), "JPEG", quality=90)
    (gray,) = D.decode_views(gray_jpeg, [SLIP32.clip], random.Random(0))
    assert gray.permute(1, 2, 0).is_contiguous() and torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    rect = V.ViewSpec(name="r", size=(24, 40), scale=(0.5, 1.0))
    (out,) = D.decode_views(_jpeg(80, 60), [rect], random.Random(0))
    assert out.shape == (3, 24, 40)


def test_every_view_comes_from_one_decode(monkeypatch):
    calls = []
    original = D._decode_pixels

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(D, "_decode_pixels", counting)
    rng = random.Random(0)
    for seed in range(10):
        D.decode_views(_jpeg(96, 72, seed), SLIP32.all, rng)
    assert len(calls) == 10


def test_resize_crop_matches_pil_resize_with_box():
    arr = _smooth_rgb(200, 150, 3)
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    for box in [(10, 20, 120, 100), (0, 0, 200, 150), (50, 40, 20, 30)]:
        ours = D.resize_crop(pixels, box, (32, 48)).permute(1, 2, 0).numpy().astype(float)
        left, top, w, h = box
        ref = Image.fromarray(arr).resize((48, 32), Image.BILINEAR, box=(left, top, left + w, top + h))
        assert np.abs(ours - np.asarray(ref, dtype=float)).mean() < 1.0


def test_draft_decode_is_close_to_full_decode(monkeypatch):
    # A photo-like image: smooth content with some texture, saved as a high-quality JPEG.
    rs = np.random.RandomState(5)
    arr = _smooth_rgb(640, 480, seed=5, cell=40).astype(float) + rs.normal(0, 4, (480, 640, 3))
    data = _encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=95)
    factors = []
    original = D._decode_pixels
    monkeypatch.setattr(D, "_decode_pixels", lambda d, im, f: (factors.append(f), original(d, im, f))[1])
    full = original(data, Image.open(io.BytesIO(data)), 1)
    views = [V.clip_view(32), V.ViewSpec(name="small", size=(24, 24), scale=(0.3, 0.6))]
    errors = []
    for seed in range(20):
        factor, boxes = D.plan_crops(640, 480, views, random.Random(seed))
        drafted = D.decode_views(data, views, random.Random(seed), allow_draft=True)
        assert factors[-1] == factor
        for crop, box, view in zip(drafted, boxes, views):
            reference = D.resize_crop(full, box, view.size)
            errors.append((crop.float() - reference.float()).abs().mean().item())
    assert max(factors) == 8 and min(factors) >= 2  # the reduced-size path really ran
    assert np.mean(errors) < 1.5 and max(errors) < 3.0


def test_plan_crops_snaps_boxes_to_the_draft_grid():
    views = method_views("slip-simclr", 128).all
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        factor, boxes = D.plan_crops(800, 600, views, rng)
        seen.add(factor)
        for left, top, w, h in boxes:
            assert left % factor == 0 and top % factor == 0 and w % factor == 0 and h % factor == 0
            assert left + w <= 800 and top + h <= 600
            if factor > 1:  # every crop keeps at least its output size on the reduced grid
                assert w // factor >= 128 and h // factor >= 128
    assert {1, 2, 4} <= seen
    factor, _ = D.plan_crops(800, 600, views, rng, allow_draft=False)
    assert factor == 1


def test_image_modes_are_converted():
    views = [V.clip_view(16)]
    rgb = Image.fromarray(_smooth_rgb(40, 30))
    # CMYK JPEG, grayscale JPEG, palette PNG, 1-bit PNG all yield 3-channel uint8.
    for data in (
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb.convert("P"), "PNG"),
        _encode(rgb.convert("1"), "PNG"),
        _encode(rgb, "WEBP"),
    ):
        (out,) = D.decode_views(data, views, random.Random(0))
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    (gray,) = D.decode_views(_encode(rgb.convert("L"), "JPEG"), views, random.Random(0))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # Fully transparent pixels are composited over white, whatever colour they store.
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    (out,) = D.decode_views(_encode(clear, "PNG"), views, random.Random(0))
    assert out.min().item() == 255
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 0] * 256)
    (out,) = D.decode_views(_encode(pal, "PNG", transparency=0), views, random.Random(0))
    assert out.min().item() == 255
    # 16-bit grayscale is rescaled from 0..65535, not clipped at 255.
    deep = Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16))
    assert deep.mode.startswith("I")
    (out,) = D.decode_views(_encode(deep, "PNG"), views, random.Random(0))
    assert abs(out.float().mean().item() - 127.5) < 1.5


def test_bad_images_are_rejected_with_reasons(monkeypatch):
    views = SLIP32.all
    good = _jpeg(64, 48)
    assert _skip_reason(b"", views) == E.EMPTY_FILE
    assert _skip_reason(b"this is certainly not an image" * 10, views) == E.NOT_AN_IMAGE
    assert _skip_reason(good[: len(good) // 2], views) == E.TRUNCATED_IMAGE
    # Valid header, garbage Huffman table: the decoder gives up.
    dht = good.index(b"\xff\xc4")
    garbage = good[: dht + 5] + b"\xff" * 20 + good[dht + 25 :]
    assert _skip_reason(garbage, views) == E.CORRUPT_IMAGE
    # Decompression bomb: a tiny PNG of many pixels is refused from its header, never decoded.
    bomb = _encode(Image.new("L", (3000, 3000)), "PNG", optimize=True)
    assert len(bomb) < 50_000
    decoded = []
    monkeypatch.setattr(D, "_decode_pixels", lambda *a: decoded.append(1))
    assert _skip_reason(bomb, views, max_pixels=1_000_000) == E.TOO_MANY_PIXELS
    assert decoded == []


# ------------------------------------------------------------------- batched photometric ops
@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.from_numpy(np.stack([_smooth_rgb(40, 32, s) for s in range(4)])).permute(0, 3, 1, 2)
    return x.float() / 255.0


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_brightness_contrast_saturation_match_torchvision(images, factor):
    f = torch.full((4,), factor)
    torch.testing.assert_close(A.adjust_brightness(images, f), TF.adjust_brightness(images, factor))
    torch.testing.assert_close(A.adjust_contrast(images, f), TF.adjust_contrast(images, factor))
    torch.testing.assert_close(A.adjust_saturation(images, f), TF.adjust_saturation(images, factor))


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_hue_matches_torchvision(images, factor):
    # Include exact ties between channels (greys, saturated primaries) via quantised pixels.
    x = torch.cat([images, (images * 4).round() / 4])
    ours = A.adjust_hue(x, torch.full((8,), factor))
    torch.testing.assert_close(ours, TF.adjust_hue(x, factor), atol=1e-5, rtol=0)


def test_per_sample_factors_apply_per_sample(images):
    f = torch.tensor([0.7, 1.0, 1.2, 1.4])
    out = A.adjust_saturation(images, f)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.adjust_saturation(images[i], float(f[i])))
    h = torch.tensor([-0.1, 0.0, 0.05, 0.1])
    out = A.adjust_hue(images, h)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.adjust_hue(images[i], float(h[i])), atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision(images):
    torch.testing.assert_close(A.rgb_to_grayscale(images), TF.rgb_to_grayscale(images))


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_torchvision(images, sigma):
    ours = A.gaussian_blur(images, torch.full((4,), sigma), 13)
    theirs = TF.gaussian_blur(images, [13, 13], [sigma, sigma])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # Per-sample sigmas.
    sigmas = torch.tensor([0.3, 1.0, 1.5, 2.0])
    out = A.gaussian_blur(images, sigmas, 13)
    for i in range(4):
        ref = TF.gaussian_blur(images[i], [13, 13], [float(sigmas[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_color_jitter_order_matches_sequential_torchvision(images):
    factors = torch.tensor([[0.7, 1.3, 0.8, 0.05], [1.2, 0.6, 1.4, -0.08], [1.0, 1.1, 0.9, 0.1], [0.65, 0.9, 1.3, -0.02]])
    order = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0], [1, 3, 0, 2]])
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(4):
        y = images[i]
        for op in order[i].tolist():
            y = tv_ops[op](y, float(factors[i, op]))
        expected.append(y)
    expected = torch.stack(expected)
    torch.testing.assert_close(A.color_jitter(images, factors, order), expected, atol=1e-5, rtol=0)
    # The slot-grouped implementation used on accelerators gives the same result.
    torch.testing.assert_close(A._jitter_by_slots(images, factors, order, (True,) * 4), expected, atol=1e-5, rtol=0)
    # Fixed order = brightness, contrast, saturation, hue.
    fixed = A.color_jitter(images, factors, None)
    y = images
    for op in range(4):
        y = torch.stack([tv_ops[op](y[i], float(factors[i, op])) for i in range(4)])
    torch.testing.assert_close(fixed, y, atol=1e-5, rtol=0)


def test_application_rates_and_factor_ranges():
    spec = V.simclr_view(8)
    aug = A.BatchAugment(V.MethodViews(clip=None, ssl=(spec,)), seed=123)
    n = 20000
    params = aug.sample_params(n, spec, "cpu")
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        rate = params[name].float().mean().item()
        tol = 5 * (p * (1 - p) / n) ** 0.5
        assert abs(rate - p) < tol, (name, rate)
    f = params["jitter_factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert abs(f[:, :3].mean().item() - 1.0) < 0.01 and abs(f[:, 3].mean().item()) < 0.005
    s = params["blur_sigma"]
    assert s.min() >= 0.1 and s.max() <= 2.0 and abs(s.mean().item() - 1.05) < 0.02
    # Every permutation of the four jitter ops occurs, roughly uniformly (1/24 each).
    perms = Counter(tuple(p) for p in params["jitter_order"].tolist())
    assert len(perms) == 24 and min(perms.values()) > n / 24 * 0.8
    # augment() draws the same way and returns what it applied.
    x = torch.randint(0, 256, (500, 3, 8, 8), dtype=torch.uint8)
    out, drawn = A.BatchAugment(aug.views, seed=5).augment(x, spec, return_params=True)
    assert out.shape == x.shape and out.dtype == torch.float32
    again = A.BatchAugment(aug.views, seed=5).sample_params(500, spec, "cpu")
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)


def test_batch_augment_applies_what_it_draws():
    mean = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8)
    flip_only = V.ViewSpec(name="f", size=(10, 12), scale=(0.5, 1.0), hflip_p=0.5)
    aug = A.BatchAugment(V.MethodViews(clip=None, ssl=(flip_only,)), seed=0)
    out, params = aug.augment(x, flip_only, return_params=True)
    pixels = out * std + mean
    for i in range(64):
        ref = x[i].flip(-1) if params["flip"][i] else x[i]
        torch.testing.assert_close(pixels[i], ref.float() / 255, atol=1e-5, rtol=0)
    gray_only = V.ViewSpec(name="g", size=(10, 12), scale=(0.5, 1.0), grayscale_p=0.5)
    out, params = aug.augment(x, gray_only, return_params=True)
    pixels = out * std + mean
    is_gray = (pixels[:, 0] - pixels[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert torch.equal(is_gray, params["grayscale"])


def test_clip_view_is_only_normalised():
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    aug = A.BatchAugment(method_views("clip", 16))
    expected = TF.normalize(x.float() / 255, T.IMAGENET_MEAN, T.IMAGENET_STD)
    torch.testing.assert_close(aug.augment(x, aug.views.clip), expected)


def test_cpu_path_blur_grouping_and_seed():
    # The CPU path (sample by sample, the blurred ones convolved apart in groups of any size)
    # gives the views of the whole-batch path; another seed gives other views.
    spec = V.simclr_view(16)
    views = V.MethodViews(clip=None, ssl=(spec,))
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    whole = A.BatchAugment(views, seed=7, blend=True).augment(x, spec, return_params=True)
    assert 0 < int(whole[1]["blur"].sum()) < 20
    for blur_chunk in (1, 3, 64):
        a = A.BatchAugment(views, seed=7, cpu_blur_chunk=blur_chunk).augment(x, spec)
        torch.testing.assert_close(a, whole[0], atol=1e-5, rtol=0)
    c = A.BatchAugment(views, seed=8).augment(x, spec)
    assert not torch.allclose(whole[0], c)


@pytest.mark.parametrize("blend", [False, True])
def test_channels_last_batches_give_the_views_of_planar_ones(blend):
    # The workers' batches are channels-last in memory (slip.data.stages.stack_views); both the
    # per-sample CPU path and the whole-batch path give the planar batch's views, planar.
    spec = V.simclr_view(16)
    views = V.MethodViews(clip=None, ssl=(spec,))
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    planar = A.BatchAugment(views, seed=5, blend=blend).augment(x, spec)
    cl = A.BatchAugment(views, seed=5, blend=blend).augment(x.contiguous(memory_format=torch.channels_last), spec)
    torch.testing.assert_close(cl, planar, atol=1e-6, rtol=0)
    assert cl.is_contiguous()


def test_narrow_blur_kernels_hold_no_subnormal_weights(monkeypatch):
    # exp(-0.5 (6 / 0.45)^2) is a subnormal float32; products with subnormals run ~15x slower on
    # x86 CPUs, so such negligible weights must be zero.
    seen = []
    conv2d = A.F.conv2d
    monkeypatch.setattr(A.F, "conv2d", lambda x, w, **kw: seen.append(w) or conv2d(x, w, **kw))
    sigmas = torch.tensor([0.1, 0.45, 0.6, 2.0])
    x = torch.rand(4, 3, 20, 20)
    out = A.gaussian_blur(x, sigmas, 13)
    tiny = torch.finfo(torch.float32).tiny
    assert seen and all(not ((w != 0) & (w.abs() < tiny)).any() for w in seen)
    assert (torch.exp(-0.5 * (6 / sigmas[1]) ** 2) < tiny) and (torch.exp(-0.5 * (6 / sigmas[1]) ** 2) > 0)
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [13, 13], [float(sigmas[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["slip-simclr", "slip-byol", "slip-beit"])
def test_masked_blends_give_the_same_views_as_per_sample_subsets(method):
    # The accelerator path (whole-batch ops kept with torch.where: no host sync) and the CPU
    # path (ops on the selected samples only) must produce the same views for the same draws.
    views = method_views(method, 32)
    checked = 0
    for spec in views.all:
        x = torch.randint(0, 256, (24, 3, *spec.size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
        subset = A.BatchAugment(views, seed=3, blend=False).augment(x, spec, return_params=True)
        blended = A.BatchAugment(views, seed=3, blend=True).augment(x, spec, return_params=True)
        torch.testing.assert_close(blended[0], subset[0], atol=1e-5, rtol=0)
        applied = [k for k in ("flip", "jitter", "grayscale", "blur", "solarize") if k in subset[1]]
        # Ops that hit some rows and miss others are where the two paths could differ.
        checked += sum(0 < int(subset[1][k].sum()) < len(x) for k in applied)
    assert checked >= 2


def test_forward_on_a_batch_dict():
    mv = method_views("slip-simclr", 16)
    batch = {
        "image": torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8),
        "views": [torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8) for _ in range(2)],
        "text": torch.zeros(3, 77, dtype=torch.long),
        "key": ["a", "b", "c"],
    }
    out = A.BatchAugment(mv, seed=0, out_dtype=torch.bfloat16)(batch)
    assert out["image"].dtype == torch.bfloat16 and out["image"].shape == (3, 3, 16, 16)
    assert len(out["views"]) == 2 and all(v.dtype == torch.bfloat16 for v in out["views"])
    assert out["text"] is batch["text"] and out["key"] == ["a", "b", "c"]
    assert batch["image"].dtype == torch.uint8  # the input batch is not modified
    with pytest.raises(TypeError):
        A.BatchAugment(mv).augment(batch["image"].float(), mv.clip)
