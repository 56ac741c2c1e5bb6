"""The worker half of making views: crop boxes drawn first, one decode, every crop resized
to a ``uint8`` tensor (see :mod:`slip.data.views` for what the views are)."""
from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slip.data.errors import CORRUPT_IMAGE, SampleSkip
from slip.data.images import DEFAULT_MAX_PIXELS, decode_error, open_image, to_rgb
from slip.data.saliency import (
    SALIENCY_MODES,
    draw_masked,
    estimate_mask,
    mask_crop,
    read_mask,
    remove_background,
)
from slip.data.views import ViewSpec
from slip.runtime import host_to_device

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


@dataclass(frozen=True)
class Jigsaw:
    """One sample's jigsaw (PIRL): the parent crop box, the grid cell each slot holds
    (``cells[k]``: a permutation of ``range(grid * grid)``, cell ``r * grid + c`` in row r,
    column c), every cell's box (row-major) and each slot's tile box; boxes are
    ``(left, top, width, height)`` in image pixels."""

    parent: tuple[int, int, int, int]
    cells: tuple[int, ...]
    cell_boxes: tuple[tuple[int, int, int, int], ...]
    tiles: tuple[tuple[int, int, int, int], ...]


def jigsaw_boxes(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    grid: int = 3,
    tile_fraction: float = 64 / 85,
) -> Jigsaw:
    """Draw a jigsaw transform's tiles for a ``width x height`` image (PIRL, after Noroozi &
    Favaro's jigsaw): ONE RandomResizedCrop box (:func:`sample_crop` with ``scale``/``ratio``),
    divided into a ``grid x grid`` grid of cells (edges at rounded multiples of a third of the
    box); a random permutation of the cells; for slot k a tile inside cell ``cells[k]``, each
    side ``tile_fraction`` of the cell's (rounded, at least 1 px) at a uniformly random offset
    (PIRL: a random 64 px crop of each 85 px cell of the crop resized to 255 px). The tiles are
    cut from the image itself, one resampling each, rather than from a resized parent.

    Draws from ``rng`` in this order: the parent box, the permutation, then per slot the
    horizontal and vertical offsets.
    """
    left, top, w, h = sample_crop(rng, width, height, scale, ratio)
    xs = [left + round(j * w / grid) for j in range(grid + 1)]
    ys = [top + round(i * h / grid) for i in range(grid + 1)]
    cell_boxes = []
    for r in range(grid):
        for c in range(grid):
            # A parent narrower than the grid leaves empty cells: they take one pixel at their edge.
            x0, y0 = min(xs[c], width - 1), min(ys[r], height - 1)
            cell_boxes.append((x0, y0, max(1, xs[c + 1] - x0), max(1, ys[r + 1] - y0)))
    cells = list(range(grid * grid))
    rng.shuffle(cells)
    tiles = []
    for cell in cells:
        x0, y0, cw, ch = cell_boxes[cell]
        tw, th = max(1, round(cw * tile_fraction)), max(1, round(ch * tile_fraction))
        tiles.append((x0 + rng.randint(0, cw - tw), y0 + rng.randint(0, ch - th), tw, th))
    return Jigsaw((left, top, w, h), tuple(cells), tuple(cell_boxes), tuple(tiles))


def grid_boxes(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    grid: int,
    tile_fraction: float,
    tile_stride: float,
) -> tuple[tuple[int, int, int, int], tuple[tuple[int, int, int, int], ...]]:
    """Draw CPC's overlapping patch grid for a ``width x height`` image: ONE RandomResizedCrop
    box (:func:`sample_crop`, the only draw from ``rng``) and its ``grid x grid`` patches in
    row-major order, no permutation: patch (r, c) at ``(left + round(c * tile_stride * w),
    top + round(r * tile_stride * h))`` with sides ``round(tile_fraction * w)`` x
    ``round(tile_fraction * h)`` (at least 1 px, clipped to the parent). Returns
    ``(parent, patches)``, boxes ``(left, top, width, height)`` in image pixels."""
    left, top, w, h = sample_crop(rng, width, height, scale, ratio)
    pw, ph = max(1, round(tile_fraction * w)), max(1, round(tile_fraction * h))
    patches = []
    for r in range(grid):
        for c in range(grid):
            x0 = min(left + round(c * tile_stride * w), left + w - 1)
            y0 = min(top + round(r * tile_stride * h), top + h - 1)
            patches.append((x0, y0, min(pw, left + w - x0), min(ph, top + h - y0)))
    return (left, top, w, h), tuple(patches)


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

    The result is ``(3, h, w)`` with channels-last memory (height, width, channel), as the
    kernel writes it: a planar copy would cost about half as much again as the resize, and
    :class:`~slip.data.stages.Collate` stacks such crops into channels-last batches with plain
    copies.
    """
    left, top, w, h = box
    # The kernel runs 1.1x (large downscales) to 2x (small crops) faster from a dense
    # channels-last copy of the crop than from the strided window into the full image.
    crop = pixels[:, top : top + h, left : left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if out.shape[0] == 1:  # grayscale: three equal channels, interleaved
        return out[0].unsqueeze(-1).expand(-1, -1, 3).contiguous().permute(2, 0, 1)
    return out


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
    jigsaws: dict[str, Iterator[tuple[int, int, int, int]]] = {}  # a group's tile boxes, slot by slot
    for i, v in enumerate(views):
        if v.shares is not None:
            # A sharing view takes its source's box (validated by MethodViews) and draws nothing.
            boxes.append(boxes[by_name[v.shares]])
        elif v.tile_of is not None:
            # The first tile of a group draws the whole jigsaw; the others take their slots in turn.
            if v.tile_of not in jigsaws:
                if v.tile_layout == "grid":  # CPC's patch grid, row-major
                    _, tiles = grid_boxes(rng, width, height, v.scale, v.ratio, v.grid, v.tile_fraction,
                                          v.tile_stride)
                else:
                    tiles = jigsaw_boxes(rng, width, height, v.scale, v.ratio, v.grid, v.tile_fraction).tiles
                jigsaws[v.tile_of] = iter(tiles)
            boxes.append(next(jigsaws[v.tile_of]))
        else:
            boxes.append(sample_crop(rng, width, height, v.scale, v.ratio))
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
    mask_data: bytes | None = None,
    saliency: str = "auto",
) -> list[torch.Tensor]:
    """Decode an encoded image once and cut every view's crop out of it.

    Args:
        data: encoded image bytes (JPEG, PNG, WebP, ... anything PIL reads).
        views: the views to produce, in order.
        rng: source of the crop boxes.
        max_pixels: images with more pixels (read from the header) are rejected undecoded.
        allow_draft: permit reduced-size JPEG decoding when every crop stays larger than its
            output size (see :func:`plan_crops`).
        mask_data: the sample's foreground mask (``{key}.mask.png``), if it has one, for views
            with ``saliency_p`` (:mod:`slip.data.saliency`).
        saliency: ``auto`` (the sample's mask when it has one, else an estimate) or
            ``estimate`` (always the estimate).

    Returns:
        One ``(3, h, w)`` uint8 tensor per view, channels-last in memory (see :func:`resize_crop`).

    Raises:
        SampleSkip: the bytes are empty, not an image, corrupt, truncated or too large, or the
            sample's mask, needed for a view, is unreadable.
    """
    return _decode_opened(data, open_image(data, max_pixels), views, rng, allow_draft, mask_data, saliency)


def _draw_masking(views: Sequence[ViewSpec], rng: random.Random, mask_data: bytes | None, saliency: str,
                  width: int, height: int) -> tuple[tuple[bool, ...], torch.Tensor | None]:
    """Per view, whether its crop is saliency-masked (:func:`~slip.data.saliency.draw_masked`), and
    the sample's own mask when a view is and ``saliency`` takes it (else None: estimated later)."""
    masked = draw_masked(views, rng)
    return masked, _shard_mask(mask_data, saliency, width, height) if any(masked) else None


def _shard_mask(mask_data: bytes | None, saliency: str, width: int, height: int) -> torch.Tensor | None:
    """The sample's own mask on the image's mask grid, when it has one and ``saliency`` takes it."""
    if saliency not in SALIENCY_MODES:
        raise ValueError(f"saliency must be one of {', '.join(SALIENCY_MODES)}, got {saliency!r}")
    if mask_data is None or saliency != "auto":
        return None
    try:
        return read_mask(mask_data, width, height)
    except ValueError as exc:
        raise SampleSkip(CORRUPT_IMAGE, f"mask.png: {exc}") from None


def _decode_opened(data: bytes, im: Image.Image, views: Sequence[ViewSpec], rng: random.Random,
                   allow_draft: bool, mask_data: bytes | None = None, saliency: str = "auto") -> list[torch.Tensor]:
    """:func:`decode_views` of an image whose header :func:`open_image` has read."""
    width, height = im.size
    factor, boxes = plan_crops(width, height, views, rng, allow_draft=allow_draft and im.format == "JPEG")
    masked, mask = _draw_masking(views, rng, mask_data, saliency, width, height)
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
    crops = [resize_crop(pixels, box, v.size) for box, v in zip(boxes, views)]
    if any(masked):
        apply_masks(crops, boxes, views, masked, estimate_mask(pixels) if mask is None else mask, (dec_w, dec_h))
    return crops


def apply_masks(crops: list[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], views: Sequence[ViewSpec],
                masked: Sequence[bool], mask: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Remove the background of the crops whose view drew ``masked`` (in place in ``crops``), with
    ``mask`` on the mask grid of an image of ``image_size = (width, height)``, in which ``boxes`` lie."""
    for i, (box, view) in enumerate(zip(boxes, views)):
        if masked[i]:
            crops[i] = remove_background(crops[i], mask_crop(mask, box, view.size, image_size))


# --------------------------------------------------------------------------------------------
# Decoding on the training device (data.decode=device)
# --------------------------------------------------------------------------------------------
def device_decodable(data: bytes, im: Image.Image) -> bool:
    """Whether the training device's JPEG decoder takes the image: a JPEG (baseline or
    progressive) of 1 or 3 channels that looks complete. Anything else (PNG, WebP, CMYK JPEGs,
    truncated files) is decoded in the worker."""
    return im.format == "JPEG" and im.mode in ("RGB", "L") and _ends_with_eoi(data)


@dataclass(frozen=True)
class PlannedViews:
    """One sample's views as a worker prepares them for decoding on the training device: the
    JPEG's bytes and every view's crop box ``(left, top, width, height)`` in full-size pixels;
    or, for an image the device decoder does not take, the views decoded here (``decoded``)."""

    data: bytes | None
    boxes: tuple[tuple[int, int, int, int], ...]
    decoded: list[torch.Tensor] | None = None
    masked: tuple[bool, ...] = ()  # per view: background removed (saliency masking)
    mask: torch.Tensor | None = None  # the sample's own mask on its grid; None: estimated on the device


def plan_views(
    data: bytes,
    views: Sequence[ViewSpec],
    rng: random.Random,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_draft: bool = True,
    mask_data: bytes | None = None,
    saliency: str = "auto",
) -> PlannedViews:
    """The worker's part of ``data.decode=device``: read the header, draw every view's crop box
    from ``rng`` exactly as :func:`decode_views` draws them (without the reduced-size decode,
    which the device decoder cannot do), and leave the decode to :class:`DeviceDecoder`. Images
    the device decoder does not take (:func:`device_decodable`) are decoded here with
    :func:`decode_views` (``allow_draft`` applies to them). Saliency masking draws here too; a
    sample's own mask is read here, an estimated one is made on the device.

    Raises:
        SampleSkip: the bytes are empty, not an image, too large, (decoded here) corrupt, or
            with an unreadable mask that a view needs.
    """
    im = open_image(data, max_pixels)
    if device_decodable(data, im):
        _, boxes = plan_crops(im.width, im.height, views, rng, allow_draft=False)
        masked, mask = _draw_masking(views, rng, mask_data, saliency, im.width, im.height)
        return PlannedViews(bytes(data), tuple(boxes), masked=masked if any(masked) else (), mask=mask)
    return PlannedViews(None, (), _decode_opened(data, im, views, rng, allow_draft, mask_data, saliency))


@dataclass
class EncodedBatch:
    """A batch's images as workers ship them for ``data.decode=device`` (the ``encoded`` entry
    of a batch): per sample, the JPEG bytes as a 1-D uint8 tensor and its views' boxes, or the
    views decoded in the worker. Not a tensor, so moving the batch to the device leaves it on
    the CPU, where the decoder takes its input."""

    data: list[torch.Tensor | None]
    boxes: list[tuple[tuple[int, int, int, int], ...]]
    decoded: dict[int, list[torch.Tensor]]
    # samples with saliency-masked views: sample -> (per view masked, its own mask or None)
    masked: dict[int, tuple[tuple[bool, ...], torch.Tensor | None]] = field(default_factory=dict)

    @classmethod
    def collate(cls, planned: Sequence[PlannedViews]) -> EncodedBatch:
        data = [None if p.data is None else torch.frombuffer(bytearray(p.data), dtype=torch.uint8) for p in planned]
        decoded = {i: p.decoded for i, p in enumerate(planned) if p.decoded is not None}
        masked = {i: (p.masked, p.mask) for i, p in enumerate(planned) if p.masked}
        return cls(data, [p.boxes for p in planned], decoded, masked)

    def __len__(self) -> int:
        return len(self.data)


def resize_crop_float(pixels: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_crop` through float32 (antialiased bilinear, rounded back to uint8), for
    devices whose antialiased kernel takes no uint8; within one grey level of it."""
    left, top, w, h = box
    crop = pixels[:, top : top + h, left : left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.expand(3, -1, -1) if out.shape[0] == 1 else out


class DeviceDecoder:
    """The training device's part of ``data.decode=device``: decodes a batch's JPEGs on the
    device in one call (nvJPEG on CUDA, libjpeg-turbo on the CPU, through torchvision's
    ``decode_jpeg``), cuts every view's crop from each and resizes it (antialiased bilinear, as
    the worker path), and puts the views decoded in the workers in their places. The batch comes
    out as the workers would have made it (``image`` and ``views``, uint8, on the device), ready
    for :class:`~slip.data.augment.BatchAugment`.

    A JPEG the device cannot decode is decoded on the CPU instead (counted in ``cpu_fallback``);
    one no decoder can read is counted in ``skips`` as ``corrupt_image`` and its place taken by
    a copy of the batch's first good sample (image, text and mask), so that every rank keeps
    the same batch size.
    """

    def __init__(self, views: Sequence[ViewSpec], device: torch.device | str, *, has_clip: bool,
                 skips: Any = None) -> None:
        self.views, self.device, self.has_clip, self.skips = list(views), torch.device(device), has_clip, skips
        self.cpu_fallback = 0
        self.replaced = 0

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: moving to torchcodec
            try:
                return list(_TV_DECODE_JPEG(data, mode=_TV_RGB, device=self.device))
            except RuntimeError:  # one bad image fails the whole call: decode them one by one
                out: list[torch.Tensor | None] = []
                for one in data:
                    try:
                        out.append(_TV_DECODE_JPEG(one, mode=_TV_RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def _cpu_decode(self, data: torch.Tensor) -> torch.Tensor | None:
        raw = data.numpy().tobytes()
        try:
            im = open_image(raw)
            return _decode_pixels(raw, im, 1).to(self.device)
        except SampleSkip:
            return None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded: EncodedBatch = batch.pop("encoded")
        n = len(encoded)
        out = [torch.empty(n, 3, *v.size, dtype=torch.uint8, device=self.device) for v in self.views]
        rows = [i for i, d in enumerate(encoded.data) if d is not None]
        images = self._decode_all([encoded.data[i] for i in rows]) if rows else []
        bad = []
        for i, image in zip(rows, images):
            if image is None:
                image = self._cpu_decode(encoded.data[i])
                if image is None:
                    bad.append(i)
                    continue
                self.cpu_fallback += 1
            crops = [resize_crop_float(image, box, view.size) for view, box in zip(self.views, encoded.boxes[i])]
            if i in encoded.masked:
                masked, mask = encoded.masked[i]
                mask = estimate_mask(image) if mask is None else host_to_device(mask, self.device)
                apply_masks(crops, encoded.boxes[i], self.views, masked, mask, (image.shape[2], image.shape[1]))
            for crop, target in zip(crops, out):
                target[i] = crop
        for i, crops in encoded.decoded.items():
            for crop, target in zip(crops, out):
                target[i] = crop.to(self.device, non_blocking=True)
        if bad:
            self._replace(batch, out, bad, n)
        if self.has_clip:
            batch["image"] = out[0]
            out = out[1:]
        if out:
            batch["views"] = out
        return batch

    def _replace(self, batch: dict[str, Any], out: list[torch.Tensor], bad: list[int], n: int) -> None:
        good = next((i for i in range(n) if i not in set(bad)), None)
        if good is None:
            raise RuntimeError(f"no image of this batch could be decoded (samples {batch.get('key')})")
        for i in bad:
            if self.skips is not None:
                key = batch["key"][i] if "key" in batch else ""
                self.skips.add(CORRUPT_IMAGE, "decoding on the training device and on the CPU failed; "
                               "replaced by a copy of another sample of its batch", key)
            for target in out:
                target[i] = target[good]
            for name in ("text", "patch_mask", "index"):
                if name in batch:
                    batch[name][i] = batch[name][good]
            self.replaced += 1
