"""RELICv2 (Tomasev et al. 2022, "Pushing the limits of self-supervised ResNets: Can we outperform
supervised learning without labels on ImageNet?", arXiv 2201.05119): a contrastive loss plus an
explicit invariance (KL) term, between an online network and its EMA target, over multi-crop views.

What the paper's pseudocode fixes (its training loop, as reproduced in
https://zhuanzhi.ai/document/a9cb4fbae70f0ed7c1274f8089dda5de and in the notes of
github.com/dhkim0225/1day_1paper issue 92), and this module follows:

* every large crop goes through the online network (``f_o``: encoder + comparison network) and
  the target network (``g_t``, an EMA of ``f_o``: ``g_t = gamma * g_t + (1 - gamma) * f_o``);
  small crops go through the online network only;
* the loss sums ``loss_relicv2(ol_i, tl_j, n_e)`` over every pair of large crops (i, j),
  **i == j included**, and over every small crop i against every large crop j, and divides by
  ``(num_large_crops + num_small_crops) * num_large_crops`` (the number of pairs);
* ``loss_relicv2`` is a contrastive negative log-likelihood against ``n_e`` negatives plus a KL
  divergence with a stop-gradient on the target side (the notes), weighted by beta.

How ``loss_relicv2`` is computed here (:func:`relicv2_loss`; the body of the paper's function was
not available, so this is our reading of the above): for each anchor b of crop i, the candidates
are the target projections of crop j of image b (the positive) and of ``n_e`` other images of the
global batch (drawn uniformly without replacement, never b). The online distribution is the
softmax over the candidates of cos(prediction_i[b], candidate) / tau, the target distribution the
softmax of cos(target_j[b], candidate) / tau (the target network's own view of the same
candidates, no gradient); the term is ``-log p_online(positive) + beta * KL(p_online || p_target)``,
averaged over the anchors. When the online prediction equals the target projection the KL term
and its gradient are 0.

Negatives: each (i, j) pair draws its own table of ``n_e`` negatives per anchor over the global
batch (:func:`sample_negatives`), from a CPU generator seeded by the count of applied updates (a
buffer, written in checkpoints, as MoCo v2 seeds its BN shuffle): every rank draws the same
tables, a resumed run draws what the uninterrupted one did, and W ranks of B compute the loss and
gradients of one process with the batch W * B (the target projections are gathered without
gradient, as MoCo v3's keys).

Settings and where they come from. From the pseudocode: the pair structure and normalisation
above, the EMA target, small crops online only, ``n_e`` negatives. Reported for the paper but not
checked against its text here: 4 large crops at the tower size and 2 small crops at 96/224 of it
(``LARGE_CROPS``/``SMALL_CROPS``). Our choices, to check against the paper's Sec. 3 and appendix
(all but the crop counts are config keys): temperature 0.2 (``objective.ssl_temperature``), beta
1.0 (``objective.relic_beta``), 10 negatives (``objective.relic_negatives``; the default of a
third-party reimplementation of SemPPL, the same group's successor built on RELICv2), the target
momentum 0.996 rising to 1 on a cosine schedule (BYOL's; RELICv2's released code "relies heavily
on the BYOL code"), BYOL's projector and predictor (2-layer MLPs with BN) as the comparison
network, BYOL's two augmentation distributions alternated over the crops, crop scales (0.08, 1)
for large crops (BYOL's) and (0.05, 0.14) for small ones (SwAV's multi-crop).

Saliency masking (the pseudocode's ``x_m = remove_background(x)``, chosen with probability
``p_m`` for each large crop): ``objective.relic_saliency_p`` (default 0.1, our choice: the value
of p_m is not in the pseudocode), drawn per large crop in the data workers. The paper's masks
come from an unsupervised saliency model trained on part of ImageNet, not shipped here: a
sample's own ``{key}.mask.png`` is used when the shard has one (e.g. masks made offline by such a
model), else the spectral-residual estimate (Hou & Zhang 2007); ``data.saliency: estimate``
ignores shard masks. See :mod:`slip.data.saliency`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import MethodViews, ViewSpec, small_crop_size
from ..distributed import all_gather_no_grad, get_rank
from ..losses import _accuracy, _fp32, _up
from ..runtime import host_to_device
from .base import POOLED, MomentumMethod, mlp, register_method

LARGE_CROPS, SMALL_CROPS = 4, 2
LARGE_SCALE, SMALL_SCALE = (0.08, 1.0), (0.05, 0.14)


def relicv2_views(size: int | tuple[int, int] = 224, *, large: int = LARGE_CROPS, small: int = SMALL_CROPS,
                  patch_size: int = 16, saliency_p: float = 0.0, prefix: str = "relicv2") -> tuple[ViewSpec, ...]:
    """RELICv2's multi-crop: ``large`` crops at ``size`` with scale ``LARGE_SCALE`` and ``small``
    crops at 96/224 of it in whole patches of ``patch_size`` (:func:`~slip.data.views.small_crop_size`)
    with scale ``SMALL_SCALE``, large first. Photometric augmentation is BYOL's (Grill et al. 2020,
    Table 6): flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2, blur sigma in
    [0.1, 2], with BYOL's two distributions alternated within each size (even crops: blur 1.0, no
    solarisation; odd crops: blur 0.1, solarisation 0.2). Each large crop is cut from the
    background-removed image with probability ``saliency_p`` (the pseudocode's ``p_m``, drawn per
    large crop; :mod:`slip.data.saliency`); small crops never are."""
    common = {"hflip_p": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2,
              "blur_sigma": (0.1, 2.0)}
    byol = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
    large_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    small_size = small_crop_size(size, patch_size)
    return (tuple(ViewSpec(name=f"{prefix}_large{i + 1}", size=large_size, scale=LARGE_SCALE, saliency_p=saliency_p,
                           **common, **byol[i % 2])
                  for i in range(large))
            + tuple(ViewSpec(name=f"{prefix}_small{i + 1}", size=small_size, scale=SMALL_SCALE, **common, **byol[i % 2])
                    for i in range(small)))


def sample_negatives(n: int, num: int, generator: torch.Generator, tables: int = 1,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``tables`` independent tables of negatives for a batch of ``n``, ``(tables, n, min(num, n - 1))``
    int64 on ``device``: row g of a table holds distinct indices, a uniformly random subset of the
    batch without g (so never g itself), drawn by Floyd's algorithm over the ``n - 1`` other
    positions, every row at once. The randomness is float64 uniforms from ``generator`` on the CPU;
    the rest is exact integer work, so any device gives the same tables."""
    others = n - 1
    num = min(num, others)
    uniform = host_to_device(torch.rand(num, tables, n, generator=generator, dtype=torch.float64), device)
    picks = torch.empty(tables, n, num, dtype=torch.long, device=device)
    for k, top in enumerate(range(others - num, others)):
        draw = (uniform[k] * (top + 1)).long().clamp_(max=top)  # uniform over 0..top
        seen = (picks[..., :k] == draw[..., None]).any(dim=-1)
        picks[..., k] = torch.where(seen, torch.full_like(draw, top), draw)  # top itself is not taken yet
    rows = torch.arange(n, device=device)[:, None]
    return picks + (picks >= rows).long()  # position among the others -> batch index


def relicv2_loss(online: list[torch.Tensor], targets: list[torch.Tensor], *, temperature: float = 0.2,
                 beta: float = 1.0, negatives: int = 10, generator: torch.Generator | None = None,
                 negative_index: torch.Tensor | None = None) -> dict:
    """RELICv2's loss over multi-crop views (see the module docstring for the terms).

    Args:
        online: per crop, (B, D) online predictions of this rank's images, the large crops first
            then the small ones (not necessarily normalised).
        targets: per large crop, (B, D) target projections (no gradient flows into them).
        temperature: tau of both softmaxes.
        beta: weight of the KL invariance term.
        negatives: n_e, negatives per anchor (at most the global batch minus one).
        generator: draws the negatives (:func:`sample_negatives`), one table per pair in pair
            order; it must be seeded alike on every rank. None: a generator seeded with 0.
        negative_index: instead of drawing, the tables: (pairs, N, n_e) indices into the global
            batch of N, pair p = i * len(targets) + j.
    The pairs are (i, j) for every crop i (large and small) and every large crop j, i == j
    included; the loss is their sum divided by their number (num_large + num_small) x num_large.
    Each pair's term is averaged over this rank's anchors (with DDP's averaging, over the global
    batch). Returns ``loss``, ``ssl_loss``, ``ssl_kl`` (the KL part, before beta) and ``ssl_acc``
    (percent of crop 0's anchors whose best candidate among crop 1's targets, or crop 0's with one
    large crop, is their own). float32 whatever the inputs' dtype or autocast.
    """
    large = len(targets)
    if large < 1 or len(online) < large:
        raise ValueError(f"relicv2_loss needs at least one large crop and its online prediction, got "
                         f"{len(online)} online and {large} target tensors")
    pairs = [(i, j) for i in range(len(online)) for j in range(large)]
    local = online[0].shape[0]
    device = online[0].device
    if generator is None and negative_index is None:
        generator = torch.Generator().manual_seed(0)
    with _fp32(online[0]):
        queries = [F.normalize(_up(q), dim=-1) for q in online]
        mine = [F.normalize(_up(t.detach()), dim=-1) for t in targets]
        keys = [all_gather_no_grad(t).detach() for t in mine]  # (N, D): the global batch's targets
        n = keys[0].shape[0]
        rows = get_rank() * local + torch.arange(local, device=device)
        total = kl_total = 0.0
        acc_pair = (0, 1) if large > 1 else (0, 0)
        acc = None
        if negative_index is None:
            negative_index = sample_negatives(n, negatives, generator, tables=len(pairs), device=device)
        else:
            negative_index = host_to_device(negative_index, device)
            own = negative_index == torch.arange(n, device=device)[:, None]
            if negative_index.shape[:2] != (len(pairs), n) or own.any():
                raise ValueError(f"negative_index: expected ({len(pairs)}, {n}, n_e) indices into the global batch, "
                                 f"no row holding its own index; got {tuple(negative_index.shape)}")
        for p, (i, j) in enumerate(pairs):
            table = negative_index[p]
            candidates = keys[j][torch.cat([rows[:, None], table[rows]], dim=1)]  # (B, 1 + n_e, D), positive first
            log_online = F.log_softmax(torch.einsum("bd,bkd->bk", queries[i], candidates) / temperature, dim=1)
            log_target = F.log_softmax(torch.einsum("bd,bkd->bk", mine[j], candidates) / temperature, dim=1)
            contrastive = -log_online[:, 0].mean()
            kl = (log_online.exp() * (log_online - log_target)).sum(dim=1).mean()
            total = total + contrastive + beta * kl
            kl_total = kl_total + kl.detach()
            if (i, j) == acc_pair:
                acc = _accuracy(log_online, torch.zeros(local, dtype=torch.long, device=device))
        loss = total / len(pairs)
    return {"loss": loss, "ssl_loss": loss, "ssl_kl": kl_total / len(pairs), "ssl_acc": acc}


@register_method("relicv2")
class RELICv2(MomentumMethod):
    """Online network: the image tower, a projector and a predictor (BYOL's 2-layer MLPs with BN,
    width -> ``mlp_dim`` -> ``out_dim`` and ``out_dim`` -> ``mlp_dim`` -> ``out_dim``), each run
    per crop; target network: an EMA copy of the tower and projector, momentum rising from 0.996 to
    1 (cosine), run on the large crops only. Loss: :func:`relicv2_loss` over 4 large + 2 small
    crops, temperature 0.2, beta ``objective.relic_beta``, ``objective.relic_negatives`` negatives
    drawn afresh every step (seeded by ``num_updates``)."""

    view_roles = (POOLED,) * (LARGE_CROPS + SMALL_CROPS)
    default_temperature = 0.2
    default_momentum = 0.996
    default_beta = 1.0
    default_negatives = 10
    default_saliency_p = 0.1

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)  # a ViT's; None for a ResNet
        self._patch_size = int(patch[0]) if patch is not None else 16
        self.projector = mlp([width, head.mlp_dim, head.out_dim])
        self.predictor = mlp([head.out_dim, head.mlp_dim, head.out_dim])
        self._init_momentum_branch(encoder)  # the target network
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # seeds the negatives
        self.beta, self.negatives = self.default_beta, self.default_negatives

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=relicv2_views(image_size, patch_size=patch_size, saliency_p=cls.default_saliency_p))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        """The small crops in whole patches of this tower's ViT (e.g. 98 px for ViT-L/14 at 224);
        the large ones saliency-masked with probability ``objective.relic_saliency_p``."""
        p = self.default_saliency_p if objective is None else objective.relic_saliency_p
        return MethodViews(clip=None, ssl=relicv2_views(image_size, patch_size=self._patch_size, saliency_p=p))

    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        self.beta, self.negatives = objective.relic_beta, objective.relic_negatives

    @torch.no_grad()
    def target_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The target tower's features of the large crops (the small ones have no target)."""
        return super().target_features(list(views[:LARGE_CROPS]))

    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None, patch_mask=None) -> dict:
        if targets is None:
            raise RuntimeError("RELICv2 needs the target projections (forward_features(..., targets=True))")
        return {"predictions": [self.predictor(self.projector(f)) for f in feats],
                "targets": self.momentum_projections(targets)}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        generator = torch.Generator().manual_seed(self.host_count("num_updates"))  # the same on every rank
        return relicv2_loss(out["predictions"], out["targets"], temperature=temperature or self.default_temperature,
                            beta=self.beta, negatives=self.negatives, generator=generator)

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        out = super().on_step_end(step, total_steps, encoder, base_momentum)
        self.advance_count("num_updates")
        return out
