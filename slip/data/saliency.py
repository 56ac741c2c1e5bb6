"""Background removal for views that ask for it (RELICv2's saliency masking).

A view with ``saliency_p > 0`` (:class:`~slip.data.views.ViewSpec`) is, with that probability
per sample, cut from the image with its background removed (set to black): RELICv2's
``x_m = remove_background(x)`` chosen with probability ``p_m`` for each large crop (Tomasev et
al. 2022, arXiv 2201.05119, its pseudocode). The foreground comes from a mask:

* the shard's own mask when the sample has one (``{key}.mask.png``, any size, grey levels read
  as foreground weights; e.g. masks made offline by a saliency model, as the paper's), unless
  ``data.saliency`` is ``estimate``;
* otherwise an unsupervised estimate, the spectral residual of Hou & Zhang (CVPR 2007,
  "Saliency Detection: A Spectral Residual Approach"): the image's grey levels at 64 px on the
  long side, log amplitude spectrum minus its 3 x 3 local mean, back with the original phase,
  squared magnitude, Gaussian smoothing (sigma 4 grid pixels); the object map is where the
  saliency exceeds its mean. Hou & Zhang's object map takes 3 x the mean, which on this grid
  keeps 1-10% of scikit-image's sample photos or no pixel at all; at 1 x the mean they keep
  26-51%, the subject included (our choice). A map with
  no pixel above the threshold leaves the image whole (an all-black view would teach nothing).

Every mask lives on the image's *mask grid* (:func:`mask_grid`, 64 px on the long side) as
float weights in [0, 1]; a view's part of it is cut with the view's own crop box and resized to
the view's size by ``roi_align`` (bilinear), so the same code serves the worker path and the
training-device path (:class:`~slip.data.decode.DeviceDecoder`), whose crops then agree to
within resampling tolerance.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from slip.data.augment import gaussian_blur
from slip.runtime import host_to_device

SALIENCY_MODES = ("auto", "estimate")  # data.saliency
MASK_MEMBER = "mask.png"  # {key}.mask.png in a shard
GRID = 64  # long side of the mask grid and of the spectral residual's input (Hou & Zhang)
RESIDUAL_BOX = 3  # the local mean subtracted from the log amplitude spectrum (Hou & Zhang: 3 x 3)
SMOOTH_SIGMA = 4.0  # Gaussian smoothing of the saliency map, in grid pixels (our choice)
THRESHOLD = 1.0  # object map: saliency above THRESHOLD x its mean (Hou & Zhang: 3; see above)


def mask_grid(width: int, height: int) -> tuple[int, int]:
    """``(grid_height, grid_width)``: the image's aspect with the long side ``GRID``."""
    scale = GRID / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def spectral_residual(gray: torch.Tensor) -> torch.Tensor:
    """The spectral-residual saliency map (float32, same shape) of a grey-level ``(H, W)`` image
    (any scale; call it on the mask grid)."""
    spectrum = torch.fft.fft2(gray.float())
    log_amplitude = torch.log(spectrum.abs().clamp_min(1e-8))
    pad = RESIDUAL_BOX // 2
    local_mean = F.avg_pool2d(F.pad(log_amplitude[None, None], (pad,) * 4, mode="replicate"), RESIDUAL_BOX, stride=1)[0, 0]
    residual = torch.polar(torch.exp(log_amplitude - local_mean), torch.angle(spectrum))
    saliency = torch.fft.ifft2(residual).abs().square()
    kernel = 2 * math.ceil(3 * SMOOTH_SIGMA) + 1
    return gaussian_blur(saliency[None, None], SMOOTH_SIGMA, kernel)[0, 0]


def estimate_mask(pixels: torch.Tensor) -> torch.Tensor:
    """The foreground of a ``(C, H, W)`` uint8 image (C = 1 or 3) on its mask grid: 1 where the
    spectral residual exceeds ``THRESHOLD`` x its mean, else 0 (float32, on ``pixels``' device);
    all ones when nothing does or the image is flat (grey levels' standard deviation under 1)."""
    h, w = mask_grid(pixels.shape[2], pixels.shape[1])
    x = pixels.float()
    if x.shape[0] == 3:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    gray = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    saliency = spectral_residual(gray)
    mask = saliency > THRESHOLD * saliency.mean()
    # (Almost) flat, where the residual would be rounding noise, or nothing above the threshold:
    # all foreground. Decided on the device: reading the two conditions would sync per image.
    everything = (gray.std() < 1.0) | ~mask.any()
    return (mask | everything).float()


def read_mask(data: bytes, width: int, height: int) -> torch.Tensor:
    """A shard's mask (PNG or any PIL-readable bytes) as foreground weights in [0, 1] on the
    mask grid of a ``width x height`` image (float32).

    Raises:
        ValueError: the bytes are not an image PIL can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L")
            h, w = mask_grid(width, height)
            grey = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width)
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types on broken data
        raise ValueError(f"unreadable mask: {type(exc).__name__}: {exc}") from None
    return F.interpolate(grey[None, None].float() / 255.0, size=(h, w), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0].clamp_(0.0, 1.0)


def draw_masked(views: Sequence, rng) -> tuple[bool, ...]:
    """Per view, whether this sample's crop is cut from the background-removed image: a draw from
    ``rng`` for each view with ``saliency_p > 0`` (none for the others, so methods without
    masking draw exactly what they did); a view that ``shares`` another takes its draw."""
    drawn: list[bool] = []
    by_name: dict[str, int] = {}
    for v in views:
        by_name[v.name] = len(drawn)
        if v.shares is not None:
            drawn.append(drawn[by_name[v.shares]])
        else:
            drawn.append(v.saliency_p > 0 and rng.random() < v.saliency_p)
    return tuple(drawn)


def mask_crop(mask: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int],
              image_size: tuple[int, int]) -> torch.Tensor:
    """The part of a grid ``mask`` under crop ``box = (left, top, width, height)`` of an image of
    ``image_size = (width, height)`` pixels, resized to ``size = (height, width)`` (bilinear,
    ``roi_align``): ``(h, w)`` float32 weights."""
    gh, gw = mask.shape
    sx, sy = gw / image_size[0], gh / image_size[1]
    left, top, w, h = box
    rois = host_to_device([[0.0, left * sx, top * sy, (left + w) * sx, (top + h) * sy]], mask.device, torch.float32)
    return roi_align(mask[None, None].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=2,
                     aligned=True)[0, 0]


def remove_background(crop: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A ``(3, h, w)`` uint8 crop with each pixel scaled by its foreground weight (background
    black), rounded back to uint8."""
    return (crop.float() * weights.clamp(0.0, 1.0)).round_().to(torch.uint8)
