"""YADIM (Falcon & Cho 2020, "A Framework For Contrastive Self-Supervised Learning And Designing A
New Approach", arXiv 2009.00104): AMDIM's and CPC's augmentation pipelines merged, any encoder,
two versions of each image encoded and their last feature maps contrasted directly with a dot
product and AMDIM's NCE, no projection head.

Sources: the paper's text was not available. Its experiments were run with Lightning-Bolts, whose
code was read instead ("bolts' FILE": github.com/Lightning-Universe/lightning-bolts,
src/pl_bolts/...); bolts has no YADIM module, so the facts below are those of the parts YADIM
names: AMDIM's and CPC's ImageNet transforms and the feature-map contrastive task.

Views (:func:`yadim_views`): two views, each the **union** of AMDIM's view and CPC v2's
per-patch augmentation (:func:`union_view`): a transform is applied if either pipeline applies
it, with the wider range / higher probability / stronger jitter of the two (crop scale and aspect
ranges widened to cover both, probabilities the larger, jitter strengths the larger per
component). Bolts' ImageNet transforms for AMDIM (amdim/transforms.py
``AMDIMTrainTransformsImageNet128``) and for CPC (cpc/transforms.py
``CPCTrainTransformsImageNet128``, before the patches are cut) are the same pipeline (crop scale
(0.3, 1), ratio (0.7, 1.4), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.25, flip p=0.5),
and slip's :func:`slip.ssl.amdim.amdim_views` and :func:`slip.data.views.cpc_views` follow them,
so the union is AMDIM's views. CPC's patch cutting itself is not part of YADIM's pipeline here
(YADIM encodes whole views).

Representation extraction (``view_features = (MAP,)``): the tower's last feature map (a
ResNet's last stage, a ViT's last block's patch-token grid after its final norm), every position
kept, no projection head (bolts' AMDIM module takes a torchvision encoder's feature maps as they
are).

Loss (:func:`yadim_nce`): bolts' ``FeatureMapContrastiveTask`` comparing the two views' last maps
(its ``"00"``; bolts' losses/self_supervised_learning.py): from view a's map one position per
image, drawn uniformly (:func:`slip.ssl.amdim.sample_positions`), is the source, and every
position of view b's map is a target: AMDIM's NCE (:func:`slip.ssl.amdim.amdim_nce`, bolts'
``AmdimNCELoss``) with scores s = f_a . f_b / sqrt(C) / tau, the image's own positions the
positives and every other image's positions of the global batch (gathered with gradient) the
negatives, the penalty 5e-2 mean(s^2) on the unclipped scores, scores soft-clipped to
10 tanh(s / 10) (the task's default clip). Both directions are averaged, NCE and penalty summed.
tau = ``objective.ssl_temperature`` (1 by default: bolts has no temperature).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..data.views import MethodViews, ViewSpec, cpc_views
from .amdim import amdim_nce, amdim_views, position_generator, sample_positions
from .base import MAP, POOLED, SSLMethod, register_method

YADIM_CLIP = 10.0  # bolts' FeatureMapContrastiveTask default tclip
YADIM_REG_WEIGHT = 5e-2  # bolts' AmdimNCELoss penalty on the squared scores


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


def yadim_nce(m1: torch.Tensor, m2: torch.Tensor, temperature: float = 1.0, clip: float = YADIM_CLIP,
              reg_weight: float = YADIM_REG_WEIGHT, generator: torch.Generator | None = None) -> dict:
    """AMDIM's NCE between this rank's last maps of view 1 and view 2, (B, L, C) each: one
    position of each image of one view, drawn with ``generator``, against every position of the
    other view of every image of the global batch, both directions averaged. Returns ``loss``
    (NCE + penalty), ``nce``, ``reg`` and ``acc``."""
    # Divided in float32: a bfloat16 anchor over tau would round before amdim_nce's upcast.
    a = amdim_nce(sample_positions(m1, generator).float() / temperature, m2, clip, reg_weight)
    b = amdim_nce(sample_positions(m2, generator).float() / temperature, m1, clip, reg_weight)
    nce, reg = (a["nce"] + b["nce"]) / 2, (a["reg"] + b["reg"]) / 2
    return {"loss": nce + reg, "nce": nce, "reg": reg, "acc": (a["acc"] + b["acc"]) / 2}


@register_method("yadim")
class YADIM(SSLMethod):
    """No head: the tower's last map, every position, is the representation."""

    view_roles = (POOLED, POOLED)
    view_features = (MAP,)
    default_temperature = 1.0

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        self.seed = 0
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # seeds the position draws

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=yadim_views(image_size))

    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        self.seed = seed

    def forward(self, feats: list, targets=None, patch_mask=None) -> dict:
        return {"maps": [m.flatten(2).transpose(1, 2) for _, m in feats]}  # (N, C, H, W) -> (N, H W, C)

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        t = self.default_temperature if temperature is None else temperature
        res = yadim_nce(*out["maps"], temperature=t, generator=position_generator(self.seed, self.host_count("num_updates")))
        return {"loss": res["loss"], "ssl_loss": res["loss"], "ssl_nce": res["nce"].detach(),
                "ssl_reg": res["reg"].detach(), "ssl_acc": res["acc"]}

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        out = super().on_step_end(step, total_steps, encoder, base_momentum)
        self.advance_count("num_updates")
        return out
