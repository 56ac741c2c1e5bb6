"""AMDIM (Bachman, Hjelm, Buchwalter 2019, "Learning Representations by Maximizing Mutual
Information Across Views", arXiv 1906.00910): the global feature of one augmented view against
the local features of the other, at two scales, plus one local feature against the other view's
locals, with NCE over the batch.

Sources: the paper's text was not available; every fact below cited as "amdim-public's FILE" was
read in the authors' released code (github.com/Philip-Bachman/amdim-public; costs.py in its latest
stored version), "bolts' FILE" in Lightning-Bolts' port of it (src/pl_bolts/...).

Representation extraction (:data:`slip.ssl.base.MAP`, ``SSLMethod.view_features``): each of the
two views gives, from one tower call, its pooled feature (the global one, AMDIM's 1 x 1 feature)
and the feature grids of two layers (the local ones, AMDIM's 7 x 7 and 5 x 5 maps): a ResNet's
stages 3 and 4 (14 x 14 and 7 x 7 at 224 px), a ViT's block round(2 depth / 3) and its last block
(blocks 8 and 12 of ViT-B/16, both 14 x 14 patch grids; 1 and 2 of the tiny ViT). The layers are
this implementation's choice for these towers (AMDIM's own encoder is a custom ResNet whose 7 x 7
and 5 x 5 maps at 128 px it uses, amdim-public's model.py), so they are fixed by the tower rather
than a setting. Each local feature goes through its own head to the embedding size D
(``model.ssl_head.out_dim``): AMDIM's residual 1 x 1-conv head (:class:`RKHSHead`, amdim-public's
model.py ``FakeRKHSConvNet`` with its default ``--use_bn 0``), here as linear layers applied at
every position. AMDIM's global feature has no head (its encoder's last layer already outputs D
channels, batch-normalised); a tower's pooled feature is not D wide, so here it goes through an
:class:`RKHSHead` as well (a difference of this framework).

Loss (:func:`amdim_nce`, as amdim-public's costs.py ``NCE_MI_MULTI``): for a source feature g_i
of image i and the local feature l_{j,p} at position p of image j (of the other view), the raw
score is s = g_i . l_{j,p} / sqrt(D); the regulariser is ``reg_weight * mean(s^2)`` over all
(i, j, p) of the unclipped scores (``objective.amdim_reg_weight``, 5e-2: costs.py's latest
version; its earlier versions have 4e-2); scores are soft-clipped to c tanh(s / c), c = 20
(``objective.amdim_clip``; train.py's ``--tclip`` default and the README's ImageNet command).
Each positive (i, p) (image i's own local feature at p) is scored against every local feature of
every other image j != i at every position: -log(exp(s_ip) / (exp(s_ip) + sum_{j != i, q}
exp(s_ijq))), averaged over i and p. Three terms, as costs.py's: the global feature against the
other view's locals at each of the two scales (its 1-7 and 1-5) and one local feature of the
deeper scale, at a position drawn uniformly per image, against the other view's locals of that
scale (its 5-5, :func:`sample_positions`). Each term is averaged over its two directions (view 1
as source against view 2's locals, and back); the terms' NCEs and their regularisers are summed
(costs.py; task_self_supervised.py adds the NCE sum and the regulariser).

Distributed: the local features of the whole global batch are gathered WITH gradient (like
SimCLR's keys), so each rank's sources meet every image's locals as negatives, and W ranks of
batch B compute the loss and gradients of one process of batch W x B (DDP averages the ranks'
losses; the heads' BatchNorm is synchronised by the trainer). AMDIM itself scores the whole
batch on one process (``nn.DataParallel``).

Where the references disagree: bolts' AMDIM (amdim_module.py) builds its default task
``FeatureMapContrastiveTask("01, 02, 11")`` with that class's default clip 10, not its own
``tclip`` 20 (bolts' losses/self_supervised_learning.py); slip follows amdim-public's 20.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.views import MethodViews, ViewSpec, _pair
from ..distributed import all_gather_with_grad, get_rank, get_world_size
from ..losses import _fp32, _up
from ..runtime import host_to_device
from .base import POOLED, SSLMethod, feature_channels, register_method


def amdim_views(size: int | tuple[int, int] = 224, prefix: str = "amdim") -> tuple[ViewSpec, ViewSpec]:
    """AMDIM's two views, as amdim-public's datasets.py augments ImageNet (``TransformsImageNet128``,
    the version its latest train.py imports; bolts' amdim/transforms.py has the same):
    RandomResizedCrop scale (0.3, 1) and aspect ratio (0.7, 1.4), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.25, a horizontal flip with p=0.5 drawn
    once per image for both views (AMDIM flips the image before cutting the two crops; here the
    second view takes the first's flip, ``ViewSpec.flip_with``, and since the crop boxes are
    mirror-symmetric in distribution, flipping the crops is the same). No blur. Difference:
    AMDIM's crops are 128 px, here the tower's size. (An earlier datasets.py had hue 0.2 and
    grayscale p=0.2 for ImageNet; its CIFAR-10 and STL-10 transforms use hue 0.2 and grayscale
    0.25.)"""
    common = {"size": _pair(size), "scale": (0.3, 1.0), "ratio": (0.7, 1.4), "hflip_p": 0.5,
              "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "grayscale_p": 0.25}
    return ViewSpec(name=f"{prefix}1", **common), ViewSpec(name=f"{prefix}2", flip_with=f"{prefix}1", **common)


def local_layers(encoder: nn.Module) -> tuple[int, int]:
    """The two layers whose feature grids are AMDIM's local features (timm's
    ``forward_intermediates`` indices): a ViT's blocks round(2 depth / 3) - 1 and depth - 1
    (0-based), a ResNet's stages 3 and 4."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        return (3, 4)
    depth = len(blocks)
    return (max(0, round(2 * depth / 3) - 1), depth - 1)


class RKHSHead(nn.Module):
    """AMDIM's residual 1 x 1 head applied at every position of (..., d_in) features, as
    amdim-public's model.py ``FakeRKHSConvNet`` with its default ``--use_bn 0`` (no BatchNorm
    inside the branch): ``bn_out(shortcut(x) + layer2(relu(layer1(x))))`` to d_out, BatchNorm over
    all positions, ``layer1`` and ``layer2`` without bias. At initialisation ``layer2`` is zero
    (the head starts as ``bn_out(shortcut(x))``) and, when d_out >= d_in, ``shortcut`` is near the
    identity: weights uniform in [-0.01, 0.01] with ones on the diagonal."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.layer1 = nn.Linear(d_in, d_out, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.layer2 = nn.Linear(d_out, d_out, bias=False)
        self.shortcut = nn.Linear(d_in, d_out)
        self.bn_out = nn.BatchNorm1d(d_out)
        nn.init.zeros_(self.layer2.weight)
        if d_out >= d_in:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01).diagonal().fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        out = self.bn_out(self.shortcut(x) + self.layer2(self.relu1(self.layer1(x))))
        return out.reshape(*shape, -1)


def position_generator(seed: int, updates: int) -> torch.Generator:
    """The CPU generator of a step's position draws (:func:`sample_positions`): seeded by the run's
    seed and the number of applied updates, the same on every rank, so a step draws the same
    positions after a resume, with gradient accumulation and on any number of ranks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + updates)


def sample_positions(local: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One position of each image's (N, L, D) local features, drawn uniformly and independently
    per image (amdim-public's costs.py ``_sample_src_ftr``): (N, D). The draws are made for the
    whole global batch (N x ranks images, in rank order) and each rank takes its own images', so
    W ranks draw what one process of the global batch does."""
    n, positions, _ = local.shape
    rank, world = get_rank(), get_world_size()
    idx = host_to_device(torch.randint(positions, (n * world,), generator=generator)[rank * n:(rank + 1) * n], local.device)
    return local[torch.arange(n, device=local.device), idx]


def amdim_nce(g: torch.Tensor, local: torch.Tensor, clip: float = 20.0, reg_weight: float = 5e-2) -> dict:
    """AMDIM's NCE of this rank's global features ``g`` (B, D) against the local features
    ``local`` (B, L, D) of the other view of the same images (gathered over ranks with gradient,
    so the negatives are the global batch's). Returns ``nce`` (mean over anchors i and positions p),
    ``reg`` (``reg_weight`` times the mean squared raw score) and ``acc`` (percent of (i, p) whose
    positive outscores every negative). Float32 whatever the inputs' dtype."""
    with _fp32(g):
        g, local = _up(g), _up(local)
        b, d = g.shape
        keys = all_gather_with_grad(local)  # (W B, L, D) in rank order
        raw = torch.einsum("bd,nld->bnl", g, keys) / math.sqrt(d)  # (B, W B, L)
        reg = reg_weight * raw.pow(2).mean()
        scores = clip * torch.tanh(raw / clip)
        own = get_rank() * b + torch.arange(b, device=g.device)
        pos = scores[torch.arange(b, device=g.device), own]  # (B, L): image i's own positions
        is_pos = (own[:, None] == torch.arange(keys.shape[0], device=g.device))[:, :, None].expand_as(scores)
        neg = scores.masked_fill(is_pos, float("-inf")).reshape(b, -1)  # every other image, every position
        neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (B, 1)
        nce = -(pos - torch.logaddexp(pos, neg_lse)).mean()
        acc = (pos > neg.max(dim=1, keepdim=True).values).float().mean() * 100
    return {"nce": nce, "reg": reg, "acc": acc.detach()}


@register_method("amdim")
class AMDIM(SSLMethod):
    """Heads: ``global_head`` (width -> D) on the pooled feature, ``local_heads[k]`` (the layer's
    channels -> D) at every position of local layer k; D = ``model.ssl_head.out_dim``."""

    view_roles = (POOLED, POOLED)

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        self.view_features = local_layers(encoder)  # per instance: the tower decides the layers
        d = head.out_dim
        self.global_head = RKHSHead(width, d)
        self.local_heads = nn.ModuleList(RKHSHead(feature_channels(encoder, k), d) for k in self.view_features)
        self.clip, self.reg_weight = 20.0, 5e-2
        self.seed = 0
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # seeds the 5-5 term's draws

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=amdim_views(image_size))

    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        self.clip, self.reg_weight = objective.amdim_clip, objective.amdim_reg_weight
        self.seed = seed

    def forward(self, feats: list, targets=None, patch_mask=None) -> dict:
        # One head call per view (BatchNorm sees each view's statistics, as SimCLR's head does).
        # Local grids (N, C, H, W) -> (N, H W, C) -> (N, H W, D).
        out: dict = {"global": [], "local": []}
        for pooled, *grids in feats:
            out["global"].append(self.global_head(pooled))
            out["local"].append([h(m.flatten(2).transpose(1, 2)) for h, m in zip(self.local_heads, grids)])
        return out

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        (g1, g2), (l1, l2) = out["global"], out["local"]
        # (source of view 1, source of view 2, scale): global to local at each scale, then one
        # drawn position of the deeper scale's locals to that scale's locals (AMDIM's 5-5)
        terms = [(g1, g2, k) for k in range(len(self.local_heads))]
        draws = position_generator(self.seed, self.host_count("num_updates"))
        terms.append((sample_positions(l1[-1], draws), sample_positions(l2[-1], draws), len(self.local_heads) - 1))
        nce = reg = acc = 0.0
        for s1, s2, k in terms:
            a = amdim_nce(s1, l2[k], self.clip, self.reg_weight)
            b = amdim_nce(s2, l1[k], self.clip, self.reg_weight)
            nce = nce + (a["nce"] + b["nce"]) / 2
            reg = reg + (a["reg"] + b["reg"]) / 2
            acc = acc + (a["acc"] + b["acc"]) / 2 / len(terms)
        loss = nce + reg
        # ssl_acc: percent of (image, position) positives beating every negative, over terms and directions
        return {"loss": loss, "ssl_loss": loss, "ssl_nce": nce.detach(), "ssl_reg": reg.detach(), "ssl_acc": acc}

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        out = super().on_step_end(step, total_steps, encoder, base_momentum)
        self.advance_count("num_updates")
        return out
