"""CPC v2 (Henaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord 2020, "Data-Efficient
Image Recognition with Contrastive Predictive Coding", arXiv 1905.09272): an image cut into an
overlapping grid of patches, each patch encoded on its own, a context network over the grid of
patch features that sees only the rows above, and InfoNCE between its predictions of the
features k rows below and every patch of the batch.

Sources: the paper's text was not available (only third-party summaries of it: paperswithcode's
"CPC v2" method page and S.-H. Tsang's review); no code of the authors was found. Where the
formulation below is the paper's (a context vector c_{i,j} that sees only rows above, a linear
prediction zhat_{i+k,j} = W_k c_{i,j} per offset k, negatives from the other locations of the
image and the other images of the batch) it is as those summaries state it. Where they are
silent, slip follows Lightning-Bolts' CPC v2 ("bolts' FILE": github.com/Lightning-Universe/
lightning-bolts, src/pl_bolts/...), whose first author is YADIM's.

Data (:func:`slip.data.views.cpc_views`): the G x G patches of one parent crop (7 x 7 patches
of a quarter of the crop's side at stride an eighth, bolts' cpc/transforms.py: 32 px patches
overlapping by 16 of a 128 px crop; G = ``model.ssl_head.patch_grid``) are G^2 ordinary views in
row-major order, each augmented on its own; both decode paths draw their boxes in the workers
(:func:`slip.data.decode.grid_boxes`). The tower encodes each patch alone (a ViT at the patch's
size: a 64 px patch is 4 x 4 tokens of ViT-B/16; or the ResNet tower), and the patch's
representation z is the tower's pooled feature (a ViT pools as its tower does, with its class
token).

Context network (:class:`ContextNetwork`, bolts' models/vision/pixel_cnn.py ``PixelCNN`` as
its CPCTask builds it): 5 residual blocks over the (N, C, G, G) grid of patch features, each
``x + expand(relu(rows(cols(relu(reduce(x))))))``: 1 x 1 convolutions to and from a 256-wide
hidden layer around a row-causal 2 x 3 kernel factored as a 1 x 3 convolution along the row and
a 2 x 1 convolution over rows r - 1 and r (the grid padded with one row above), then a ReLU
after the last block. Output row r depends only on input rows r - 5 .. r ("rows above", five
blocks of two-row kernels). Then one 1 x 1 convolution W_k per offset k = 1 .. K predicts z at
row r + k: zhat_{r+k,c} = W_k c_{r,c}. Differences from bolts' PixelCNN: its row padding is
filled with ones and its 1 x 3 convolution is unpadded (the grid's edge columns get only the
2 x 1 convolution's zero padding); here both paddings are zeros, before each convolution.

Loss (:func:`cpc_nce`): for every image n, position (r, c) with r + k < G and offset k, the
scores are the dot products of zhat with every patch feature of the global batch (all positions
of all images, the image's own other patches included), divided by the temperature (1 unless
``objective.ssl_temperature`` is set: CPC's plain dot product); the positive is z_{n, r+k, c};
cross-entropy, averaged over the (n, r, c) of each k, then over k. Targets keep their gradient
(CPC trains the encoder through both sides).

Distributed: the patch features of the whole global batch are gathered WITH gradient (as
SimCLR's keys and AMDIM's locals), so W ranks of batch B compute the loss and gradients of one
process of batch W x B. Memory: the scores are (B x G(G-k) , W B G^2) per k.

Not verified (no primary source found; checked: the summaries above, bolts' cpc/cpc_module.py,
cpc/networks.py, cpc/transforms.py and losses/self_supervised_learning.py ``CPCTask``): K = 5
rows ("up to five rows below", CPC v1's wording as we recall it; capped at G - 1: 2 for the tiny
3 x 3 grid), no temperature, the averaging over k, and top-to-bottom prediction only (the
summaries say CPC v2 predicts from both directions; not implemented). Bolts' ``CPCTask`` differs
from the formulation above and is not followed there: it projects the targets to 64 channels
and the predictions likewise with one predictor for every k (scaled by 0.1), predicts offsets
k = 2 .. G - 1 only, each counted k - 1 times, and sums the terms. CPC v2 also replaces the
encoder's BatchNorm by layer normalisation (bolts' cpc/networks.py: LayerNorm throughout); a
ResNet tower here keeps its BatchNorm (each patch slot is its own tower call).
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

MAX_STEPS = 5  # predict up to five rows below (not verified: no primary source found)
CONTEXT_BLOCKS = 5  # bolts' PixelCNN(num_blocks=5)
CONTEXT_HIDDEN = 256  # its hidden_channels


class ContextBlock(nn.Module):
    """``x + expand(relu(rows(cols(relu(reduce(x))))))`` over a (N, C, G, G) grid: ``cols`` a
    1 x 3 convolution along each row, ``rows`` a 2 x 1 convolution over rows r - 1 and r (one row
    of zeros padded above), so output row r sees input rows r - 1 and r only."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.cols = nn.Conv2d(hidden, hidden, kernel_size=(1, 3), padding=(0, 1))
        self.rows = nn.Conv2d(hidden, hidden, kernel_size=(2, 1))
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cols(F.relu(self.reduce(x)))
        return x + self.expand(F.relu(self.rows(F.pad(h, (0, 0, 1, 0)))))


class ContextNetwork(nn.Module):
    """``blocks`` residual row-causal blocks over a (N, C, G, G) grid, then a ReLU: output row r
    depends only on input rows r - blocks .. r."""

    def __init__(self, channels: int, blocks: int = CONTEXT_BLOCKS, hidden: int = CONTEXT_HIDDEN):
        super().__init__()
        self.blocks = nn.Sequential(*(ContextBlock(channels, hidden) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(z))


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
        self.context = ContextNetwork(width)
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
