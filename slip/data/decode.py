"""The worker half of making views: crop boxes drawn first, one decode, every crop resized
to a ``uint8`` tensor (see :mod:`slip.data.views` for what the views are)."""
from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slip.data.images import DEFAULT_MAX_PIXELS, decode_error, open_image, to_rgb
from slip.data.views import ViewSpec

# JPEG DCT scaling factors PIL's draft() can apply (libjpeg supports 1/1, 1/2, 1/4, 1/8).
_DRAFT_FACTORS = (8, 4, 2)


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
