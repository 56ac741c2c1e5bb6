"""YADIM (Falcon & Cho 2020, "A Framework For Contrastive Self-Supervised Learning And Designing A
New Approach", arXiv 2009.00104): AMDIM's and CPC's augmentation pipelines merged, any encoder,
two versions of each image encoded and their last feature maps contrasted directly with a dot
product and NCE, no projection head.

Views (:func:`yadim_views`): two views, each the **union** of AMDIM's view and CPC v2's
per-patch augmentation (:func:`union_view`): a transform is applied if either pipeline applies
it, with the wider range / higher probability / stronger jitter of the two (crop scale and aspect
ranges widened to cover both, probabilities the larger, jitter strengths the larger per
component). In slip CPC's per-patch photometric set is AMDIM's (:func:`slip.data.views.cpc_views`),
so the union is AMDIM's views with the crop ranges widened; CPC's patch cutting itself is not
part of YADIM's pipeline here (YADIM encodes whole views).

Representation extraction (``view_features = (MAP,)``): the tower's last feature map (a
ResNet's last stage, a ViT's last block's patch-token grid after its final norm), averaged over
its positions (this implementation's reading of "the last feature maps ... compared directly";
not verified against the paper's text), no projection head.

Loss (:func:`yadim_nce`): scores s_ij = f1_i . f2_j / sqrt(C) / tau (the dot product, scaled by
sqrt(C) as AMDIM scales its scores, tau = ``objective.ssl_temperature``, 1 by default) against
every image of the global batch (gathered with gradient); cross-entropy with the image's own
other view as the positive, both directions averaged.

Not verified against the paper's text: the mean over positions, the sqrt(C) scaling, the
symmetric average, and the recipes' optimisation.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import MethodViews, ViewSpec, cpc_views
from ..distributed import all_gather_with_grad, get_rank
from ..losses import _fp32, _up
from .amdim import amdim_views
from .base import MAP, POOLED, SSLMethod, register_method


def union_view(a: ViewSpec, b: ViewSpec, name: str) -> ViewSpec:
    """The union of two views' augmentations at ``a``'s size: crop ranges covering both,
    every probability the larger, jitter strengths the larger per component (None if neither
    jitters)."""
    jitter = None
    if a.jitter is not None or b.jitter is not None:
        ja, jb = a.jitter or (0.0,) * 4, b.jitter or (0.0,) * 4
        jitter = tuple(max(x, y) for x, y in zip(ja, jb))
    return ViewSpec(
        name=name, size=a.size,
        scale=(min(a.scale[0], b.scale[0]), max(a.scale[1], b.scale[1])),
        ratio=(min(a.ratio[0], b.ratio[0]), max(a.ratio[1], b.ratio[1])),
        hflip_p=max(a.hflip_p, b.hflip_p), jitter=jitter, jitter_p=max(a.jitter_p, b.jitter_p),
        grayscale_p=max(a.grayscale_p, b.grayscale_p), blur_p=max(a.blur_p, b.blur_p),
        blur_sigma=(min(a.blur_sigma[0], b.blur_sigma[0]), max(a.blur_sigma[1], b.blur_sigma[1])),
        solarize_p=max(a.solarize_p, b.solarize_p))


def yadim_views(size: int | tuple[int, int] = 224, prefix: str = "yadim") -> tuple[ViewSpec, ViewSpec]:
    """YADIM's two views: each the union of AMDIM's view and CPC's per-patch augmentation."""
    cpc_patch = dataclasses.replace(cpc_views(size)[0], tile_of=None, tile_layout="jigsaw", tile_stride=0.0)
    return tuple(union_view(a, cpc_patch, f"{prefix}{i}") for i, a in enumerate(amdim_views(size), start=1))  # type: ignore[return-value]


def yadim_nce(f1: torch.Tensor, f2: torch.Tensor, temperature: float = 1.0) -> dict:
    """NCE between this rank's (B, C) features of view 1 and view 2, each against the other view
    of every image of the global batch; both directions averaged. Returns ``loss`` and ``acc``."""
    with _fp32(f1):
        f1, f2 = _up(f1), _up(f2)
        b, c = f1.shape
        k1, k2 = all_gather_with_grad(f1), all_gather_with_grad(f2)
        target = get_rank() * b + torch.arange(b, device=f1.device)
        scale = 1.0 / (math.sqrt(c) * temperature)
        l12, l21 = f1 @ k2.T * scale, f2 @ k1.T * scale
        loss = (F.cross_entropy(l12, target) + F.cross_entropy(l21, target)) / 2
        acc = ((l12.argmax(1) == target).float().mean() + (l21.argmax(1) == target).float().mean()) * 50
    return {"loss": loss, "acc": acc.detach()}


@register_method("yadim")
class YADIM(SSLMethod):
    """No head: the tower's last map, averaged over positions, is the representation."""

    view_roles = (POOLED, POOLED)
    view_features = (MAP,)
    default_temperature = 1.0

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=yadim_views(image_size))

    def forward(self, feats: list, targets=None, patch_mask=None) -> dict:
        return {"maps": [m.mean(dim=(2, 3)) for _, m in feats]}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        t = self.default_temperature if temperature is None else temperature
        res = yadim_nce(*out["maps"], temperature=t)
        return {"loss": res["loss"], "ssl_loss": res["loss"], "ssl_acc": res["acc"]}
