"""Training views for SLIP: declarations, one-decode geometric cropping, batched photometrics.

The work is split in two halves on purpose:

* **Worker half (per sample, CPU)**: :func:`decode_views` reads the image size from the header,
  draws every view's crop box first, then decodes the image **once** -- at a reduced size via
  libjpeg's DCT scaling (``Image.draft``) when every crop keeps at least the output resolution --
  and resizes each crop straight to a ``uint8`` tensor (antialiased bilinear, like torchvision's
  ``RandomResizedCrop``). Nothing photometric happens here, so workers ship ``uint8`` (4x less
  inter-process traffic than float32).
* **Batched half (per batch, accelerator or CPU)**: :class:`BatchAugment` applies horizontal
  flip, colour jitter, grayscale, Gaussian blur and normalisation to a whole ``uint8`` batch with
  per-sample random parameters, in plain tensor ops. The same code runs on CPU and GPU, so the
  distribution does not depend on the device.

The views of a method are declared with :class:`ViewSpec` (a method's set: :meth:`slip.ssl.SSLMethod.declare_views`; by name: :func:`slip.ssl.method_views`):

* CLIP view (SLIP's ``train_transform``): ``RandomResizedCrop(size, scale=(0.5, 1))`` then
  ImageNet normalisation; no flip, no colour augmentation.
* SimCLR views (two): ``RandomResizedCrop(size, scale=(0.08, 1))``, colour jitter
  ``(0.4, 0.4, 0.4, 0.1)`` with p=0.8, grayscale p=0.2, Gaussian blur sigma in [0.1, 2] with
  p=0.5, horizontal flip p=0.5, ImageNet normalisation.
* BYOL / MoCo v3 views (two, asymmetric, :func:`byol_views`): as SimCLR's but colour jitter
  ``(0.4, 0.4, 0.2, 0.1)``; the first view is always blurred and never solarised, the second
  blurred with p=0.1 and solarised with p=0.2.
* BEiT views (:func:`beit_views`): one ``RandomResizedCrop(scale=(0.08, 1))`` cut at two sizes
  from the same box with the same flip and colour jitter (``(0.4, 0.4, 0.4)``, always): the
  tower's view (ImageNet-normalised) and the visual tokenizer's (``normalize=False``: float
  pixels in [0, 1]). A view declares the sharing with ``shares="<name of the earlier view>"``.
  :attr:`MethodViews.mask` adds a blockwise patch mask per sample, drawn in the workers.

Colour jitter applies brightness, contrast, saturation and hue in a random order per sample, as
torchvision's ``ColorJitter`` does (``jitter_order="fixed"`` keeps that listed order instead).
The ops follow torchvision's tensor implementations (``adjust_brightness`` etc. on float images
in [0, 1]); tests compare them op by op.
"""
from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slip.data.images import DEFAULT_MAX_PIXELS, decode_error, open_image, to_rgb
from slip.transforms import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)

# JPEG DCT scaling factors PIL's draft() can apply (libjpeg supports 1/1, 1/2, 1/4, 1/8).
_DRAFT_FACTORS = (8, 4, 2)


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    """One augmented view of an image.

    The geometric part (``scale``, ``ratio``, ``size``) runs in the data workers; the rest runs
    batched in :class:`BatchAugment`. Probabilities are per sample.

    Attributes:
        name: label used in logs and benchmarks.
        size: output (height, width) in pixels.
        scale: range of the crop area as a fraction of the image area (RandomResizedCrop).
        ratio: range of the crop aspect ratio w/h, sampled log-uniformly.
        hflip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths as in torchvision's
            ``ColorJitter``, or None for no colour jitter.
        jitter_p: probability that colour jitter is applied.
        grayscale_p: probability of converting to (3-channel) grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's standard deviation in output pixels (uniform).
        solarize_p: probability of solarising (pixels at or above 128/255 inverted, as
            torchvision's ``RandomSolarize(threshold=128)`` on uint8 images).
        shares: name of an earlier view of the same declaration whose crop box and random
            photometric draws this view reuses (the same crop at another size: BEiT's two
            views). Its crop and photometric settings must equal that view's; only ``size``
            and ``normalize`` may differ.
        normalize: apply the mean/std normalisation (False: float pixels in [0, 1], e.g. for
            a visual tokenizer with its own normalisation).
    """

    name: str
    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = 0.0
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    shares: str | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"view {self.name!r}: size must be two positive ints, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view {self.name!r}: scale must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"view {self.name!r}: ratio must satisfy 0 < lo <= hi")
        for p in (self.hflip_p, self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"view {self.name!r}: probabilities must lie in [0, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"view {self.name!r}: blur_sigma must satisfy 0 < lo <= hi")


# What a view that ``shares`` another takes from it, and so must declare identically.
_SHARED_FIELDS = ("scale", "ratio", "hflip_p", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma", "solarize_p")


@dataclass(frozen=True)
class MethodViews:
    """The views a training method needs from each image.

    Attributes:
        clip: the view fed to the image tower for the image-text loss, or None (SimCLR alone).
        ssl: the self-supervised views (two for SimCLR), or empty (CLIP alone).
        mask: a patch-mask generator (e.g. :class:`slip.ssl.masking.BlockMaskGenerator`), called
            with each sample's RNG in the workers; batches then carry ``patch_mask``
            ``(B, H * W)`` bool. None: no mask.
    """

    clip: ViewSpec | None
    ssl: tuple[ViewSpec, ...] = field(default_factory=tuple)
    mask: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, ViewSpec] = {}
        for view in self.all:
            if view.name in seen:
                raise ValueError(f"two views are named {view.name!r}")
            if view.shares is not None:
                source = seen.get(view.shares)
                if source is None:
                    raise ValueError(f"view {view.name!r} shares {view.shares!r}, which is not an earlier view")
                if source.shares is not None:
                    raise ValueError(f"view {view.name!r} shares {view.shares!r}, which itself shares a view")
                differ = [f for f in _SHARED_FIELDS if getattr(view, f) != getattr(source, f)]
                if differ:
                    raise ValueError(f"view {view.name!r} shares the crop and draws of {view.shares!r} but declares "
                                     f"other {', '.join(differ)}")
            seen[view.name] = view

    @property
    def all(self) -> tuple[ViewSpec, ...]:
        """Every view in the order :func:`decode_views` returns them: CLIP first, then SSL."""
        return ((self.clip,) if self.clip is not None else ()) + self.ssl

    @property
    def needs_text(self) -> bool:
        """Captions are only needed when there is an image-text loss."""
        return self.clip is not None


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def clip_view(size: int | tuple[int, int] = 224) -> ViewSpec:
    """SLIP's CLIP training view: RandomResizedCrop(size, scale=(0.5, 1)) + normalisation."""
    return ViewSpec(name="clip", size=_pair(size), scale=(0.5, 1.0))


def simclr_view(size: int | tuple[int, int] = 224, name: str = "simclr") -> ViewSpec:
    """One SimCLR view as SLIP augments it (see the module docstring for the parameters)."""
    return ViewSpec(
        name=name,
        size=_pair(size),
        scale=(0.08, 1.0),
        hflip_p=0.5,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
    )


def byol_views(size: int | tuple[int, int] = 224, prefix: str = "byol") -> tuple[ViewSpec, ViewSpec]:
    """BYOL's two asymmetric views (Grill et al. 2020, Table 6), also MoCo v3's for ViTs:
    crop scale (0.08, 1), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2,
    Gaussian blur sigma in [0.1, 2] with p=1.0 / 0.1, solarisation with p=0.0 / 0.2."""
    common = dict(size=_pair(size), scale=(0.08, 1.0), hflip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                  grayscale_p=0.2, blur_sigma=(0.1, 2.0))
    return (ViewSpec(name=f"{prefix}1", blur_p=1.0, solarize_p=0.0, **common),
            ViewSpec(name=f"{prefix}2", blur_p=0.1, solarize_p=0.2, **common))


def beit_views(size: int | tuple[int, int] = 224, tokenizer_size: int | tuple[int, int] = 112) -> tuple[ViewSpec, ViewSpec]:
    """BEiT's two views of one crop (Bao et al. 2021): RandomResizedCrop scale (0.08, 1), flip
    0.5 and colour jitter (0.4, 0.4, 0.4) always, then the tower's view at ``size`` and the
    visual tokenizer's at ``tokenizer_size``, unnormalised. (BEiT resizes them bicubic and
    Lanczos; both are antialiased bilinear here.)"""
    common = dict(scale=(0.08, 1.0), hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.0), jitter_p=1.0)
    return (ViewSpec(name="beit", size=_pair(size), **common),
            ViewSpec(name="beit_tokens", size=_pair(tokenizer_size), shares="beit", normalize=False, **common))


# --------------------------------------------------------------------------------------------
# Worker half: crop boxes, one decode, crop-resize to uint8
# --------------------------------------------------------------------------------------------
def sample_crop(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box ``(left, top, width, height)`` for a ``width x height`` image.

    Same algorithm as torchvision's ``RandomResizedCrop.get_params`` (10 tries of a uniform area
    fraction and log-uniform aspect ratio, then a central crop clamped to ``ratio``), drawn from a
    Python RNG because that is ~20x cheaper per call than torch's RNG on CPU.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w = width
        h = int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        h = height
        w = int(round(h * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draft_factor(
    boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[tuple[int, int]]
) -> int:
    """Largest JPEG DCT scale-down factor (1, 2, 4 or 8) that keeps every crop box at least
    as large as its output size in both dimensions after scaling.

    One extra output pixel of margin per dimension leaves room for snapping the boxes to the
    reduced grid (:func:`plan_crops`), so no crop is upsampled because of the reduced decode.
    """
    for factor in _DRAFT_FACTORS:
        if all(
            bw >= factor * (oh_ow[1] + 1) and bh >= factor * (oh_ow[0] + 1)
            for (_, _, bw, bh), oh_ow in zip(boxes, sizes)
        ):
            return factor
    return 1


def _ends_with_eoi(data: bytes) -> bool:
    """True when a JPEG stream ends with its End-Of-Image marker (ignoring trailing padding):
    a cheap truncation check that lets complete files take the fast decoder."""
    tail = data[-64:].rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


try:  # libjpeg-turbo straight into a tensor; optional (removed in some future torchvision)
    from torchvision.io import ImageReadMode as _TVReadMode
    from torchvision.io import decode_jpeg as _TV_DECODE_JPEG

    _TV_RGB = _TVReadMode.RGB
except ImportError:  # pragma: no cover - depends on the installed torchvision
    _TV_DECODE_JPEG = None
    _TV_RGB = None


def _decode_pixels(data: bytes, im: Image.Image, factor: int) -> torch.Tensor:
    """Decode the image once into a ``(C, H, W)`` uint8 tensor with channels-last memory
    (C is 3, or 1 for grayscale), ``factor`` times smaller than the full size (JPEG only).

    Full-size JPEGs that look complete go to torchvision's libjpeg-turbo decoder, which writes
    straight into a tensor (PIL decodes into its own 4-byte-per-pixel buffer and needs a copy
    out); reduced decodes need PIL's ``draft`` (DCT scaling); everything else goes through PIL.
    """
    if (
        _TV_DECODE_JPEG is not None
        and im.format == "JPEG"
        and factor == 1
        and im.mode in ("RGB", "L")
        and _ends_with_eoi(data)
    ):
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            with warnings.catch_warnings():
                # Deprecated in torchvision 0.29 in favour of torchcodec; PIL is the fallback.
                warnings.simplefilter("ignore", DeprecationWarning)
                return _TV_DECODE_JPEG(raw, mode=_TV_RGB)
        except RuntimeError as exc:
            raise decode_error(exc) from None
    try:
        if factor > 1:
            im.draft("RGB", (im.width // factor, im.height // factor))
        im.load()
    except Exception as exc:  # noqa: BLE001 -- PIL's plugins raise many types on broken data
        raise decode_error(exc) from None
    im, _ = to_rgb(im, keep_gray=True)
    arr = np.asarray(im)
    with warnings.catch_warnings():
        # The array is read-only and never written through this tensor.
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(arr)
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(-1)
    return pixels.permute(2, 0, 1)


def resize_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box = (left, top, width, height)`` out of ``pixels`` (C, H, W uint8) and resize it
    to ``size = (height, width)`` with antialiased bilinear filtering, uint8 in and out.

    torch's uint8 antialiased kernel (SIMD, channels-last input) does this ~3x faster than
    PIL's ``resize(box=...)`` and matches it to within a fraction of a grey level.
    """
    left, top, w, h = box
    crop = pixels[:, top : top + h, left : left + w].unsqueeze(0)
    if w * h >= 4 * size[0] * size[1]:
        # Large downscales run ~25% faster from a dense channels-last copy than from the
        # strided window into the full image; for small crops the copy costs more than it saves.
        crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1)
    return out.contiguous()


def plan_crops(
    width: int,
    height: int,
    views: Sequence[ViewSpec],
    rng: random.Random,
    *,
    allow_draft: bool = True,
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Draw every view's crop box for a ``width x height`` image and pick the decode factor.

    Returns ``(factor, boxes)`` with boxes ``(left, top, width, height)`` in full-size pixels.
    When ``factor > 1`` (see :func:`draft_factor`) the boxes are snapped to multiples of
    ``factor`` so that they map exactly onto the reduced decode's pixel grid (JPEG DCT scaling
    maps each ``factor x factor`` block to one pixel). Snapping moves an edge by at most
    ``factor / 2`` full-size pixels, under half an output pixel since every snapped crop still
    spans at least its output size on the reduced grid (checked; else a smaller factor is
    used); without it the crops would be shifted by a fraction of a reduced pixel relative to a
    full-size decode of the same box.
    """
    boxes: list[tuple[int, int, int, int]] = []
    by_name: dict[str, int] = {}
    for i, v in enumerate(views):
        # A sharing view takes its source's box (validated by MethodViews) and draws nothing.
        boxes.append(boxes[by_name[v.shares]] if v.shares is not None else sample_crop(rng, width, height, v.scale, v.ratio))
        by_name[v.name] = i
    factor = draft_factor(boxes, [v.size for v in views]) if allow_draft else 1
    while factor > 1:
        snapped = _snap(boxes, factor, width, height)
        # Snapping and clipping to the grid can shave a pixel off a crop: re-check the promise.
        if all(w // factor >= v.size[1] and h // factor >= v.size[0] for (_, _, w, h), v in zip(snapped, views)):
            return factor, snapped
        factor //= 2
    return 1, boxes


def _snap(
    boxes: Sequence[tuple[int, int, int, int]], factor: int, width: int, height: int
) -> list[tuple[int, int, int, int]]:
    """Move box edges to the nearest multiple of ``factor`` inside the reduced grid."""
    cols, rows = width // factor, height // factor
    snapped = []
    for left, top, w, h in boxes:
        x0, y0 = min(round(left / factor), cols - 1), min(round(top / factor), rows - 1)
        x1, y1 = min(round((left + w) / factor), cols), min(round((top + h) / factor), rows)
        snapped.append((x0 * factor, y0 * factor, max(1, x1 - x0) * factor, max(1, y1 - y0) * factor))
    return snapped


def decode_views(
    data: bytes,
    views: Sequence[ViewSpec],
    rng: random.Random,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_draft: bool = True,
) -> list[torch.Tensor]:
    """Decode an encoded image once and cut every view's crop out of it.

    Args:
        data: encoded image bytes (JPEG, PNG, WebP, ... anything PIL reads).
        views: the views to produce, in order.
        rng: source of the crop boxes.
        max_pixels: images with more pixels (read from the header) are rejected undecoded.
        allow_draft: permit reduced-size JPEG decoding when every crop stays larger than its
            output size (see :func:`plan_crops`).

    Returns:
        One ``(3, h, w)`` uint8 tensor per view (contiguous).

    Raises:
        SampleSkip: the bytes are empty, not an image, corrupt, truncated or too large.
    """
    im = open_image(data, max_pixels)
    width, height = im.size
    factor, boxes = plan_crops(width, height, views, rng, allow_draft=allow_draft and im.format == "JPEG")
    pixels = _decode_pixels(data, im, factor)
    dec_h, dec_w = pixels.shape[1], pixels.shape[2]
    if (dec_w, dec_h) == (-(-width // factor), -(-height // factor)) and factor > 1:
        # Snapped boxes map exactly onto the reduced grid; libjpeg rounds the reduced size up,
        # so the grid always covers width // factor columns.
        boxes = [(x // factor, y // factor, w // factor, h // factor) for x, y, w, h in boxes]
    elif (dec_w, dec_h) != (width, height):
        # Some other scale (not expected from libjpeg): map the boxes proportionally.
        sx, sy = dec_w / width, dec_h / height
        boxes = [
            (min(round(x * sx), dec_w - 1), min(round(y * sy), dec_h - 1), max(1, round(w * sx)), max(1, round(h * sy)))
            for x, y, w, h in boxes
        ]
        boxes = [(x, y, min(w, dec_w - x), min(h, dec_h - y)) for x, y, w, h in boxes]
    return [resize_crop(pixels, box, v.size) for box, v in zip(boxes, views)]


# --------------------------------------------------------------------------------------------
# Batched half: photometric ops on float (N, 3, H, W) images in [0, 1]
# --------------------------------------------------------------------------------------------
def _per_sample(factor: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(factor, torch.Tensor):
        return factor.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return factor


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``(N, 3, H, W)`` images as ``(N, 1, H, W)`` (torchvision's weights)."""
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(factor * x)`` per sample, as torchvision's ``adjust_brightness``."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its grayscale, as torchvision's ``adjust_contrast``."""
    f = _per_sample(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its grayscale, as torchvision's ``adjust_saturation``."""
    f = _per_sample(factor, x)
    return (x * f + (1.0 - f) * rgb_to_grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Rotate hue by ``factor`` turns (in [-0.5, 0.5]), as torchvision's ``adjust_hue``.

    Value (max) and chroma (max - min) are invariant under a hue rotation, so instead of a full
    RGB->HSV->RGB round trip each output channel is ``max - chroma * w((n + 6h') mod 6)`` with the
    piecewise-linear HSV basis ``w(k) = clamp(min(k, 4 - k), 0, 1)`` (n = 5, 3, 1 for R, G, B):
    mathematically identical, and written with in-place ops into reused buffers because this is
    the most expensive photometric op on CPU.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = x.amax(dim=-3)
    chroma = maxc - x.amin(dim=-3)
    inv = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    is_r = maxc == r
    is_g = maxc == g
    # Hue in sextants, with torchvision's tie-breaking (red, then green, then blue); at ties
    # the formulas agree anyway, the hue being continuous across sextant borders.
    h6 = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).mul_(inv)
    h6 += torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    if isinstance(factor, torch.Tensor):
        h6 += (6.0 * factor.to(device=x.device, dtype=x.dtype)).reshape(-1, 1, 1)
    else:
        h6 += 6.0 * factor
    out = torch.empty_like(x)
    k = torch.empty_like(h6)
    w = torch.empty_like(h6)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        torch.add(h6, n, out=k)
        torch.remainder(k, 6.0, out=k)
        torch.neg(k, out=w)
        w += 4.0
        torch.minimum(k, w, out=w)
        w.clamp_(0.0, 1.0)
        torch.addcmul(maxc, w, chroma, value=-1.0, out=out.select(-3, channel))
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, kernel_size: int) -> torch.Tensor:
    """Gaussian blur with a per-sample ``sigma`` and a fixed odd ``kernel_size``.

    The kernel is torchvision's (``linspace(-(k-1)/2, (k-1)/2)``, normalised), borders are
    reflected like torchvision's ``gaussian_blur``; the 2-D kernel is applied as two 1-D
    depthwise convolutions (separable, same result) with one kernel per sample and channel.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError("kernel_size must be a positive odd integer")
    n, c, h, w = x.shape
    # Reflection padding needs pad < size; shrink the kernel for tiny images.
    kernel_size = min(kernel_size, 2 * (min(h, w) - 1) + 1)
    if kernel_size <= 1:
        return x.clone()
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    sig = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, 1).expand(n, 1)
    weights = torch.exp(-0.5 * (t / sig) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)
    weights = weights.repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.reshape(n, c, h, w)


SOLARIZE_THRESHOLD = 128 / 255  # ImageOps.solarize's default on uint8, as BYOL and MoCo v3 use it


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (torchvision's ``solarize`` on [0, 1] floats)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def blur_kernel_size(sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma of the widest blur (13 for sigma 2): the truncated tail
    holds < 0.3% of the mass, and the kernel does not grow with the image size."""
    return 2 * math.ceil(3.0 * sigma_max) + 1


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_jitter_factors(
    n: int,
    strengths: tuple[float, float, float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, 4)`` factors: brightness/contrast/saturation uniform in ``[max(0, 1-s), 1+s]``,
    hue uniform in ``[-s, s]`` (torchvision's ``ColorJitter`` ranges)."""
    u = torch.rand(n, 4, generator=generator, device=device)
    lo = torch.tensor([max(0.0, 1.0 - s) for s in strengths[:3]] + [-strengths[3]], device=device)
    hi = torch.tensor([1.0 + s for s in strengths[:3]] + [strengths[3]], device=device)
    return lo + (hi - lo) * u


def color_jitter(
    x: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor | None = None,
    active: Sequence[bool] = (True, True, True, True),
    blend: bool | None = None,
) -> torch.Tensor:
    """Apply brightness, contrast, saturation, hue with per-sample ``factors`` (N, 4).

    ``order`` (N, 4) gives each sample's op order (a permutation of 0..3, 0 = brightness ...
    3 = hue); None means the listed order. With ``blend`` (the default on accelerators) random
    order is done slot by slot: in slot ``s`` each op runs on the whole batch and is kept
    (``torch.where``) for the samples that put it there -- 16 kernel groups and no host
    synchronisation; otherwise (the default on CPU) each sample runs its own order. Both give
    the same result. ``active`` skips ops whose strength is zero (torchvision skips them too).
    """
    if order is None:
        for op, fn in enumerate(_JITTER_OPS):
            if active[op]:
                x = fn(x, factors[:, op])
        return x
    if not (x.device.type != "cpu" if blend is None else blend):
        return _jitter_per_sample(x, factors, order, active)
    return _jitter_by_slots(x, factors, order, active)


def _jitter_per_sample(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, active: Sequence[bool]
) -> torch.Tensor:
    # On CPU a loop over cache-resident per-sample slices beats gathering sample subsets.
    x = x.clone()
    for i, sample_order in enumerate(order.tolist()):
        xi = x[i : i + 1]
        for op in sample_order:
            if active[op]:
                xi = _JITTER_OPS[op](xi, factors[i : i + 1, op])
        x[i : i + 1] = xi
    return x


def _jitter_by_slots(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, active: Sequence[bool]
) -> torch.Tensor:
    # On accelerators: few large kernels, and masks rather than index lists (no host sync).
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            if active[op]:
                x = _where_rows(order[:, slot] == op, fn(x, factors[:, op]), x)
    return x


def _where_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Row i of ``new`` where ``mask[i]``, else of ``old`` (batch-first tensors)."""
    return torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old)


class BatchAugment(torch.nn.Module):
    """Photometric augmentation and normalisation of ``uint8`` view batches, on any device.

    Call it on a batch from the loader after moving it to the device::

        augment = BatchAugment(slip.ssl.method_views("slip-simclr", 224))
        batch = augment(move_to_device(batch))   # 'image' and 'views' become float

    Per view and per sample: horizontal flip (``hflip_p``), colour jitter (``jitter_p``, random
    op order unless ``jitter_order="fixed"``), grayscale (``grayscale_p``), Gaussian blur
    (``blur_p``, sigma uniform in ``blur_sigma``, fixed kernel :func:`blur_kernel_size`), then
    ``(x - mean) / std``. All random draws come from ``torch`` on the input's device (seeded by
    ``seed`` when given), one draw per sample whether or not the op then applies, so CPU and
    GPU follow the same distribution.

    Args:
        views: the method's views (the same declaration given to the pipeline).
        mean, std: normalisation constants (ImageNet by default, as SLIP).
        jitter_order: ``"random"`` (torchvision's ColorJitter behaviour) or ``"fixed"``.
        out_dtype: dtype of the returned views (e.g. ``torch.bfloat16`` on GPU).
        seed: seed for a private generator; None uses torch's global RNG.
        cpu_chunk: samples processed together on CPU (cache blocking; no effect on results).
        blend: how an op reaches the samples it applies to: computed for the whole batch and
            kept with ``torch.where`` (True; no host synchronisation, the accelerator default),
            or computed on the selected samples only (False; less work, the CPU default). None
            chooses by device. No effect on results.
    """

    def __init__(
        self,
        views: MethodViews,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        jitter_order: str = "random",
        out_dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        cpu_chunk: int = 4,
        blend: bool | None = None,
    ) -> None:
        super().__init__()
        if jitter_order not in ("random", "fixed"):
            raise ValueError("jitter_order must be 'random' or 'fixed'")
        self.views = views
        self.jitter_order = jitter_order
        self.out_dtype = out_dtype
        self.seed = seed
        self.cpu_chunk = cpu_chunk
        self.blend = blend
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def sample_params(self, n: int, spec: ViewSpec, device: torch.device | str,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the per-sample random parameters of one view for a batch of ``n``.

        Every sample gets every draw whether or not the op then applies, in a fixed order, so a
        seeded run is reproducible and independent of how the batch is later chunked.
        ``generator`` overrides the module's own (or torch's global) RNG.
        """
        gen = generator if generator is not None else self._generator(torch.device(device))
        params: dict[str, torch.Tensor] = {}
        if spec.hflip_p > 0:
            params["flip"] = torch.rand(n, generator=gen, device=device) < spec.hflip_p
        if spec.jitter is not None and spec.jitter_p > 0:
            params["jitter"] = torch.rand(n, generator=gen, device=device) < spec.jitter_p
            params["jitter_factors"] = sample_jitter_factors(n, spec.jitter, gen, device)
            if self.jitter_order == "random":
                params["jitter_order"] = torch.rand(n, 4, generator=gen, device=device).argsort(dim=1)
        if spec.grayscale_p > 0:
            params["grayscale"] = torch.rand(n, generator=gen, device=device) < spec.grayscale_p
        if spec.blur_p > 0:
            params["blur"] = torch.rand(n, generator=gen, device=device) < spec.blur_p
            lo, hi = spec.blur_sigma
            params["blur_sigma"] = lo + (hi - lo) * torch.rand(n, generator=gen, device=device)
        if spec.solarize_p > 0:
            params["solarize"] = torch.rand(n, generator=gen, device=device) < spec.solarize_p
        return params

    def apply(self, x: torch.Tensor, spec: ViewSpec, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Apply drawn ``params`` (see :meth:`sample_params`) to a uint8 batch ``x``.

        On CPU the batch is processed a few samples at a time (``cpu_chunk``) so the float
        intermediates stay in cache -- 2-6x faster than whole-batch ops there; on an
        accelerator the whole batch goes at once.
        """
        n = x.shape[0]
        # Unnormalised views feed visual tokenizers: kept in float32 whatever ``out_dtype`` is.
        out = torch.empty(x.shape, dtype=self.out_dtype if spec.normalize else torch.float32, device=x.device)
        step = n if x.device.type != "cpu" else max(1, self.cpu_chunk)
        active = tuple(s > 0 for s in spec.jitter) if spec.jitter is not None else (False,) * 4
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        blend = x.device.type != "cpu" if self.blend is None else self.blend
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            y = x[part].to(torch.float32).div_(255.0)
            y = self._apply_ops(y, spec, {k: v[part] for k, v in params.items()}, active, blend)
            out[part] = y.sub_(mean).div_(std) if spec.normalize else y
        return out

    @staticmethod
    def _apply_ops(y: torch.Tensor, spec: ViewSpec, params: Mapping[str, torch.Tensor], active: tuple[bool, ...],
                   blend: bool) -> torch.Tensor:
        """Flip, jitter, grayscale, blur and solarise the float batch ``y`` where ``params`` say."""

        def on_rows(key: str, op: Callable[[Any], torch.Tensor]) -> None:
            # op(rows) computes the op on y[rows]; rows is every row (blend) or the selected ones.
            nonlocal y
            mask = params[key]
            if blend:
                y = _where_rows(mask, op(slice(None)), y)
                return
            idx = mask.nonzero().squeeze(1)
            if idx.numel():
                y[idx] = op(idx)

        if "flip" in params:
            on_rows("flip", lambda r: y[r].flip(-1))
        if "jitter" in params:
            order = params.get("jitter_order")
            on_rows("jitter", lambda r: color_jitter(y[r], params["jitter_factors"][r],
                                                     None if order is None else order[r], active, blend))
        if "grayscale" in params:
            on_rows("grayscale", lambda r: rgb_to_grayscale(y[r]).expand(-1, 3, -1, -1))
        if "blur" in params:
            on_rows("blur", lambda r: gaussian_blur(y[r], params["blur_sigma"][r], blur_kernel_size(spec.blur_sigma[1])))
        if "solarize" in params:
            on_rows("solarize", lambda r: solarize(y[r]))
        return y

    def augment(
        self, x: torch.Tensor, spec: ViewSpec, *, return_params: bool = False,
        generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one ``(N, 3, H, W)`` uint8 view batch; float ``out_dtype`` out.

        With ``return_params`` also returns the per-sample draws (``flip``, ``jitter``,
        ``jitter_factors``, ``jitter_order``, ``grayscale``, ``blur``, ``blur_sigma``,
        ``solarize``), which tests use to check application rates; ``params`` applies given
        draws instead of drawing (a view that ``shares`` another's). ``rows=(offset, total)``
        says that ``x`` is rows ``offset..offset+N`` of a global batch of ``total`` (e.g. this
        rank's share): the draws are made for the whole global batch and sliced, so with a
        shared ``generator`` the result does not depend on how the batch is split over ranks.
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise TypeError(f"expected a (N, 3, H, W) uint8 batch, got {tuple(x.shape)} {x.dtype}")
        if params is None:
            n = x.shape[0]
            offset, total = rows if rows is not None else (0, n)
            params = self.sample_params(total, spec, x.device, generator)
            if total != n:
                params = {k: v[offset:offset + n] for k, v in params.items()}
        out = self.apply(x, spec, params)
        return (out, dict(params)) if return_params else out

    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None,
                rows: tuple[int, int] | None = None) -> dict[str, Any]:
        """Return a copy of ``batch`` with ``image`` (CLIP view) and each of ``views`` augmented;
        other entries (``text``, ``key``, ``patch_mask``) pass through. A view that ``shares``
        another gets that view's draws. ``generator``/``rows``: see :meth:`augment`."""
        out = dict(batch)
        kw = {"generator": generator, "rows": rows}
        drawn: dict[str, Mapping[str, torch.Tensor]] = {}
        if self.views.clip is not None and "image" in batch:
            out["image"], drawn[self.views.clip.name] = self.augment(batch["image"], self.views.clip,
                                                                     return_params=True, **kw)
        if self.views.ssl and "views" in batch:
            if len(batch["views"]) != len(self.views.ssl):
                raise ValueError(f"batch has {len(batch['views'])} SSL views, expected {len(self.views.ssl)}")
            out["views"] = []
            for v, spec in zip(batch["views"], self.views.ssl):
                y, drawn[spec.name] = self.augment(v, spec, return_params=True,
                                                   params=drawn.get(spec.shares) if spec.shares else None, **kw)
                out["views"].append(y)
        return out

