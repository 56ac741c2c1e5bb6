"""CPC v2 (Henaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord 2020, "Data-Efficient
Image Recognition with Contrastive Predictive Coding", arXiv 1905.09272): an image cut into an
overlapping grid of patches, each patch encoded on its own, a context network over the grid of
patch features that sees only the rows above, and InfoNCE between its predictions of the
features k rows below and every patch of the batch.

Data (:func:`slip.data.views.cpc_views`): the G x G patches of one parent crop (the paper's
7 x 7 patches of 64 px at stride 32 from 256 px; G = ``model.ssl_head.patch_grid``) are G^2
ordinary views in row-major order, each augmented on its own; both decode paths draw their
boxes in the workers (:func:`slip.data.decode.grid_boxes`). The tower encodes each patch alone
(a ViT at the patch's size: a 64 px patch is 4 x 4 tokens of ViT-B/16; or the ResNet tower),
and the patch's representation z is the tower's pooled feature (CPC v2 mean-pools each patch's
final map; a ViT here pools as its tower does, with its class token).

Context network (:class:`ContextNetwork`): PixelCNN-style residual blocks
``x + conv1x1(relu(rowconv(relu(x))))`` over the (N, C, G, G) grid of patch features, where a
row-causal convolution is a 3 x 3 convolution whose bottom kernel row is masked (a 2 x 3 kernel
over rows r - 1 and r, columns c - 1 .. c + 1): output row r depends only on input rows <= r
("rows above"), and G - 1 blocks let row r see every row above it. Then one 1 x 1 convolution
W_k per offset k = 1 .. K predicts z at row r + k: zhat_{r+k,c} = W_k c_{r,c}.

Loss (:func:`cpc_nce`): for every image n, position (r, c) with r + k < G and offset k, the
scores are the dot products of zhat with every patch feature of the global batch (all positions
of all images, the image's own other patches included), divided by the temperature (1 unless
``objective.ssl_temperature`` is set: CPC's plain dot product); the positive is z_{n, r+k, c};
cross-entropy, averaged over the (n, r, c) of each k, then over k. Targets keep their gradient
(CPC trains the encoder through both sides).

Distributed: the patch features of the whole global batch are gathered WITH gradient (as
SimCLR's keys and AMDIM's locals), so W ranks of batch B compute the loss and gradients of one
process of batch W x B. Memory: the scores are (B x G(G-k) , W B G^2) per k.

Not verified against the paper's text (recalled, or this implementation's choice): K = 5 rows
("up to five rows below", CPC v1's wording; capped at G - 1: 2 for the tiny 3 x 3 grid), the
context network's form (G - 1 residual blocks of the tower's width; CPC v2's is a larger masked
ResNet), no temperature, the averaging over k, and the per-patch augmentation (see
:func:`slip.data.views.cpc_views`). CPC v2 also replaces the encoder's BatchNorm by layer
normalisation; a ResNet tower here keeps its BatchNorm (each patch slot is its own tower call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.views import CPC_GRID, MethodViews, cpc_views
from ..distributed import all_gather_with_grad, get_rank
from ..losses import _fp32, _up
from .base import POOLED, SSLMethod, register_method

MAX_STEPS = 5  # predict up to five rows below (not verified against CPC v2's text)


class RowCausalConv(nn.Module):
    """A 3 x 3 convolution with its bottom kernel row masked away: a (2, 3) kernel over rows
    r - 1 and r (zero padding above and at the sides), so output row r sees input rows <= r."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 0)))


class ContextBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.rowconv = RowCausalConv(channels)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.relu(self.rowconv(F.relu(x))))


class ContextNetwork(nn.Module):
    """``blocks`` residual row-causal blocks over a (N, C, G, G) grid: output row r depends only on
    input rows <= r."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ContextBlock(channels) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


SCORE_CHUNK_ELEMENTS = 1 << 28  # scores held at once by the InfoNCE (1 GiB of float32)


def _scores_cross_entropy(q: torch.Tensor, keys: torch.Tensor, target: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = q @ keys.T / temperature
    return F.cross_entropy(logits, target, reduction="sum"), (logits.argmax(dim=1) == target).sum().float()


def _chunked_cross_entropy(q: torch.Tensor, keys: torch.Tensor, target: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the scores ``q @ keys.T / temperature`` against ``target``, and the
    count of rows whose target scores highest, over chunks of rows holding at most
    ``SCORE_CHUNK_ELEMENTS`` scores each; each chunk's scores are recomputed in the backward pass
    (activation checkpointing) rather than kept, so the memory is one chunk's whatever the batch
    (the full scores of the YFCC15M recipe would be 512 x 42 x 200,704 floats per rank, 17 GB)."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, keys.shape[0]))
    if q.shape[0] <= rows:
        return _scores_cross_entropy(q, keys, target, temperature)
    total = right = 0.0
    for start in range(0, q.shape[0], rows):
        part = checkpoint(_scores_cross_entropy, q[start:start + rows], keys, target[start:start + rows],
                          temperature, use_reentrant=False)
        total, right = total + part[0], right + part[1]
    return total, right


def cpc_nce(preds: list[torch.Tensor], z: torch.Tensor, temperature: float = 1.0) -> dict:
    """CPC's InfoNCE: ``preds[k - 1]`` (N, C, G, G) predicts, at (r, c), the feature at
    (r + k, c) of ``z`` (N, C, G, G), this rank's patch features; rows r + k >= G are ignored.
    Negatives: every other patch of the global batch (gathered with gradient). Returns ``loss``
    (cross-entropy averaged over positions per k, then over k) and ``acc`` (percent of
    predictions whose positive scores highest)."""
    with _fp32(z):
        z = _up(z)
        n, c, g, _ = z.shape
        keys = all_gather_with_grad(z.flatten(2).transpose(1, 2).reshape(n * g * g, c))  # (W N G G, C)
        losses, hits, count = [], 0.0, 0
        for k, p in enumerate(preds, start=1):
            p = _up(p)[:, :, : g - k]  # rows that have a target k rows below
            q = p.permute(0, 2, 3, 1).reshape(-1, c)  # (N (G - k) G, C), image-major, row-major
            img = get_rank() * n + torch.arange(n, device=z.device)
            rows = torch.arange(g - k, device=z.device) + k
            cols = torch.arange(g, device=z.device)
            target = (img[:, None, None] * g * g + rows[None, :, None] * g + cols[None, None, :]).reshape(-1)
            total, right = _chunked_cross_entropy(q, keys, target, temperature)
            losses.append(total / target.numel())
            hits = hits + right
            count += target.numel()
        loss = torch.stack(losses).mean()
    return {"loss": loss, "acc": (hits / count * 100).detach()}


@register_method("cpc")
class CPC(SSLMethod):
    """The context network (``context``) and the K predictors (``predictors``, 1 x 1 convs) over
    the tower's width; the grid size G is ``model.ssl_head.patch_grid`` (7), which also sets the
    views (G^2 patches)."""

    view_roles = (POOLED,) * (CPC_GRID * CPC_GRID)
    default_temperature = 1.0  # CPC scores are plain dot products

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        self.grid = int(getattr(head, "patch_grid", CPC_GRID))
        self.view_roles = (POOLED,) * (self.grid * self.grid)  # per instance: the grid sets the views
        patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)  # a ViT's; None for a ResNet
        self._patch_size = int(patch[0]) if patch is not None else 16
        self.steps = min(MAX_STEPS, self.grid - 1)
        self.context = ContextNetwork(width, self.grid - 1)
        self.predictors = nn.ModuleList(nn.Conv2d(width, width, kernel_size=1) for _ in range(self.steps))

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None, grid: int = CPC_GRID) -> MethodViews:
        return MethodViews(clip=None, ssl=cpc_views(image_size, grid=grid, patch_size=patch_size))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        """The patches of this head's grid, in whole patches of this tower's ViT."""
        return self.declare_views(image_size, patch_size=self._patch_size, grid=self.grid)

    def grid_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The G^2 patch features (N, C) in row-major order as the (N, C, G, G) grid."""
        z = torch.stack(feats, dim=2)
        return z.reshape(z.shape[0], z.shape[1], self.grid, self.grid)

    def predict(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Predictions for k = 1 .. K rows below, each (N, C, G, G) (row r predicts row r + k)."""
        ctx = self.context(z)
        return [w(ctx) for w in self.predictors]

    def forward(self, feats: list, targets=None, patch_mask=None) -> dict:
        z = self.grid_features(feats)
        return {"z": z, "preds": self.predict(z)}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        t = self.default_temperature if temperature is None else temperature
        res = cpc_nce(out["preds"], out["z"], t)
        return {"loss": res["loss"], "ssl_loss": res["loss"], "ssl_acc": res["acc"]}
