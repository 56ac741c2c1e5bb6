"""The batched half of making views: photometric augmentation and normalisation of ``uint8``
view batches on any device, with per-sample random parameters (see :mod:`slip.data.views`).

Colour jitter applies brightness, contrast, saturation and hue in a random order per sample, as
torchvision's ``ColorJitter`` does (``jitter_order="fixed"`` keeps that listed order instead).
The ops follow torchvision's tensor implementations (``adjust_brightness`` etc. on float images
in [0, 1]); tests compare them op by op.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from slip.data.views import MethodViews, ViewSpec
from slip.runtime import host_to_device
from slip.transforms import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


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
    gray = torch.mul(r, _LUMA[0])
    return gray.add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(factor * x)`` per sample, as torchvision's ``adjust_brightness``."""
    return torch.mul(x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its grayscale, as torchvision's ``adjust_contrast``.

    The mean of the luma is the luma of the channel means (it is linear), which reads the image
    once instead of writing a grayscale copy first.
    """
    f = _per_sample(factor, x)
    luma = host_to_device(_LUMA, x.device, x.dtype)
    mean = (x.mean(dim=(-2, -1)) * luma).sum(dim=-1).reshape(-1, 1, 1, 1)
    return torch.mul(x, f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its grayscale, as torchvision's ``adjust_saturation``."""
    f = _per_sample(factor, x)
    return torch.mul(x, f).add_(rgb_to_grayscale(x).mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Rotate hue by ``factor`` turns (in [-0.5, 0.5]), as torchvision's ``adjust_hue``.

    Value (max) and chroma (max - min) are invariant under a hue rotation, so instead of a full
    RGB->HSV->RGB round trip each output channel is ``max - chroma * w(k)`` with the
    piecewise-linear HSV basis ``w(k) = clamp(min(k, 4 - k), 0, 1)`` on ``k = (n + 6h') mod 6``
    (n = 5, 3, 1 for R, G, B): mathematically identical. It is computed without boolean masks
    or ``remainder`` (both are several times slower than arithmetic on CPU): the sextant is
    chosen by multiplying with 0/1 floats, and ``w(k)`` is ``clamp(2 - 6|q - round(q)|, 0, 1)``
    with ``q = (k - 2) / 6``, the distance to the nearest plateau centre of the periodic basis.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(maxc, chroma, out=chroma)
    # Hue in sextants times chroma, with torchvision's tie-breaking (red, then green, then blue);
    # at ties the formulas agree anyway, the hue being continuous across sextant borders.
    is_max = torch.empty_like(maxc)
    hue = torch.sub(r, g).add_(chroma, alpha=4.0)  # blue is the maximum
    other = torch.sub(b, r).add_(chroma, alpha=2.0).sub_(hue)  # green is
    hue.addcmul_(torch.eq(maxc, g, out=is_max), other)
    torch.sub(g, b, out=other).sub_(hue)  # red is
    hue.addcmul_(torch.eq(maxc, r, out=is_max), other)
    # A grey pixel (chroma 0) has a zero numerator: any positive divisor gives hue 0.
    hue.div_(torch.clamp_min(chroma, torch.finfo(x.dtype).tiny).mul_(6.0))  # in turns now
    # q = (k - 2) / 6 for each channel's k = n + 6 * (hue + factor), n = 5, 3, 1 for R, G, B.
    offsets = host_to_device([(n - 2.0) / 6.0 for n in (5.0, 3.0, 1.0)], x.device, x.dtype)
    if isinstance(factor, torch.Tensor):
        offsets = offsets + factor.to(device=x.device, dtype=x.dtype).reshape(-1, 1)
    else:
        offsets = offsets + factor
    q = hue.unsqueeze(-3) + offsets.reshape(-1, 3, 1, 1)
    q.sub_(torch.round(q)).abs_()
    w = q.mul_(-6.0).add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(-3), chroma.unsqueeze(-3), w, value=-1.0, out=w)


_NEGLIGIBLE_WEIGHT = 1e-12


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
    sig = sigma.to(x.device, x.dtype) if isinstance(sigma, torch.Tensor) else torch.full((), float(sigma), device=x.device,
                                                                                           dtype=x.dtype)
    sig = sig.reshape(-1, 1).expand(n, 1)
    weights = torch.exp(-0.5 * (t / sig) ** 2)
    # A narrow kernel's tails underflow to subnormal floats (exp(-88) and below), and products
    # with subnormals run ~15x slower on x86 CPUs: weights under 1e-12 -- invisible next to the
    # centre weight in float32 -- are set to zero.
    weights = weights.masked_fill_(weights < _NEGLIGIBLE_WEIGHT, 0.0)
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
    lo = host_to_device([max(0.0, 1.0 - s) for s in strengths[:3]] + [-strengths[3]], u.device, u.dtype)
    hi = host_to_device([1.0 + s for s in strengths[:3]] + [strengths[3]], u.device, u.dtype)
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
    rows = [_jitter_one(x[i : i + 1], f, o, active) for i, (f, o) in enumerate(zip(factors.tolist(), order.tolist()))]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _jitter_one(x: torch.Tensor, factors: Sequence[float], order: Iterable[int], active: Sequence[bool]) -> torch.Tensor:
    """One sample's colour jitter: its active ops in its ``order`` with its ``factors`` (Python
    numbers, cheaper per op than tensor slices); every op returns a new tensor, so ``x`` is
    never written."""
    for op in order:
        if active[op]:
            x = _JITTER_OPS[op](x, factors[op])
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


# The per-sample ops of BatchAugment, in the order they apply.
_OPS = ("flip", "jitter", "grayscale", "blur", "solarize")


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
        cpu_blur_chunk: blurred samples convolved together on CPU (no effect on results).
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
        cpu_blur_chunk: int = 16,
        blend: bool | None = None,
    ) -> None:
        super().__init__()
        if jitter_order not in ("random", "fixed"):
            raise ValueError("jitter_order must be 'random' or 'fixed'")
        self.views = views
        self.jitter_order = jitter_order
        self.out_dtype = out_dtype
        self.seed = seed
        self.cpu_blur_chunk = cpu_blur_chunk
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

        On an accelerator (or with ``blend=True``) each op runs on the whole batch at once. On
        CPU each sample goes through its own ops alone, with its parameters as Python numbers:
        one 224 px image in float32 is 0.6 MB, so its intermediates stay in a core's L2 cache,
        several times faster than whole-batch ops; the blurred samples are set aside and
        convolved ``cpu_blur_chunk`` at a time (oneDNN's depthwise convolution is several times
        faster per image on many channels at once). No effect on results.
        """
        # Unnormalised views feed visual tokenizers: kept in float32 whatever ``out_dtype`` is.
        out = torch.empty(x.shape, dtype=self.out_dtype if spec.normalize else torch.float32, device=x.device)
        active = tuple(s > 0 for s in spec.jitter) if spec.jitter is not None else (False,) * 4
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        blend = x.device.type != "cpu" if self.blend is None else self.blend
        if x.device.type != "cpu" or blend:
            # Planar float whatever the batch's layout (the workers' batches are channels-last).
            y = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
            y = self._apply_ops(y, spec, params, active, blend)
            return self._normalize(y, spec, mean, std, out)
        return self._apply_per_sample(x, spec, params, active, mean, std, out)

    def _apply_per_sample(self, x: torch.Tensor, spec: ViewSpec, params: Mapping[str, torch.Tensor],
                          active: tuple[bool, ...], mean: torch.Tensor, std: torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor:
        """The CPU path of :meth:`apply`: sample by sample, the blur in groups."""
        n = x.shape[0]
        draws = {k: v.tolist() for k, v in params.items()}
        flip, jitter, gray, blur, solar = (draws.get(k, [False] * n) for k in _OPS)
        blurred = [i for i in range(n) if blur[i]]
        pending = torch.empty((len(blurred), *x.shape[1:]), dtype=torch.float32) if blurred else None

        def finish(y: torch.Tensor, i: int) -> None:
            # The ops after the blur, then normalisation into ``out``.
            self._normalize(solarize(y) if solar[i] else y, spec, mean, std, out[i : i + 1])

        set_aside = 0
        for i in range(n):
            # Into planar memory whatever the batch's layout (the workers' batches are
            # channels-last): the per-channel ops below read whole planes.
            y = torch.div(x[i : i + 1], 255.0, out=torch.empty((1, *x.shape[1:])))
            if flip[i]:
                y = y.flip(-1)
            if jitter[i]:
                order = draws["jitter_order"][i] if "jitter_order" in draws else range(4)
                y = _jitter_one(y, draws["jitter_factors"][i], order, active)
            if gray[i]:
                y = rgb_to_grayscale(y).expand(-1, 3, -1, -1)
            if blur[i]:
                pending[set_aside] = y[0]
                set_aside += 1
            else:
                finish(y, i)
        kernel = blur_kernel_size(spec.blur_sigma[1])
        group = max(1, self.cpu_blur_chunk)
        for start in range(0, len(blurred), group):
            rows = blurred[start : start + group]
            y = gaussian_blur(pending[start : start + len(rows)], params["blur_sigma"][rows], kernel)
            for j, i in enumerate(rows):
                finish(y[j : j + 1], i)
        return out

    @staticmethod
    def _normalize(y: torch.Tensor, spec: ViewSpec, mean: torch.Tensor, std: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """``(y - mean) / std`` (or ``y`` for an unnormalised view) written into ``out``; ``y`` is
        not modified."""
        if not spec.normalize:
            return out.copy_(y)
        if out.dtype == y.dtype:
            return torch.sub(y, mean, out=out).div_(std)
        return out.copy_(torch.sub(y, mean).div_(std))

    @staticmethod
    def _apply_ops(y: torch.Tensor, spec: ViewSpec, params: Mapping[str, torch.Tensor], active: tuple[bool, ...],
                   blend: bool) -> torch.Tensor:
        """Flip, jitter, grayscale, blur and solarise the float batch ``y`` where ``params`` say;
        ``y`` may be modified in place."""

        def on_rows(key: str, op: Callable[[Any], torch.Tensor]) -> None:
            # op(rows) computes the op on y[rows]; rows is every row (blend, or all selected) or
            # the selected ones.
            nonlocal y
            if key not in params:
                return
            mask = params[key]
            if blend:
                y = _where_rows(mask, op(slice(None)), y)
                return
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == len(mask):
                y = op(slice(None))
            elif idx.numel():
                y[idx] = op(idx)

        order = params.get("jitter_order")
        on_rows("flip", lambda r: y[r].flip(-1))
        on_rows("jitter", lambda r: color_jitter(y[r], params["jitter_factors"][r],
                                                 None if order is None else order[r], active, blend))
        on_rows("grayscale", lambda r: rgb_to_grayscale(y[r]).expand(-1, 3, -1, -1).contiguous())
        on_rows("blur", lambda r: gaussian_blur(y[r], params["blur_sigma"][r], blur_kernel_size(spec.blur_sigma[1])))
        on_rows("solarize", lambda r: solarize(y[r]))
        return y

    def augment(
        self, x: torch.Tensor, spec: ViewSpec, *, return_params: bool = False,
        generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
        params: Mapping[str, torch.Tensor] | None = None, flip: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one ``(N, 3, H, W)`` uint8 view batch; float ``out_dtype`` out.

        With ``return_params`` also returns the per-sample draws (``flip``, ``jitter``,
        ``jitter_factors``, ``jitter_order``, ``grayscale``, ``blur``, ``blur_sigma``,
        ``solarize``), which tests use to check application rates; ``params`` applies given
        draws instead of drawing (a view that ``shares`` another's). ``rows=(offset, total)``
        says that ``x`` is rows ``offset..offset+N`` of a global batch of ``total`` (e.g. this
        rank's share): the draws are made for the whole global batch and sliced, so with a
        shared ``generator`` the result does not depend on how the batch is split over ranks.
        ``flip``: the per-sample flips to apply instead of this view's own draw (a view that
        takes another's flip, ``ViewSpec.flip_with``); the view's draws are made all the same.
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise TypeError(f"expected a (N, 3, H, W) uint8 batch, got {tuple(x.shape)} {x.dtype}")
        if params is None:
            n = x.shape[0]
            offset, total = rows if rows is not None else (0, n)
            params = self.sample_params(total, spec, x.device, generator)
            if total != n:
                params = {k: v[offset:offset + n] for k, v in params.items()}
        if flip is not None:
            params = {**params, "flip": flip}
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
                flip = drawn[spec.flip_with].get("flip") if spec.flip_with else None
                y, drawn[spec.name] = self.augment(v, spec, return_params=True, flip=flip,
                                                   params=drawn.get(spec.shares) if spec.shares else None, **kw)
                out["views"].append(y)
        return out
