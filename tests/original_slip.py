"""An independent re-statement of the original SLIP text tower, CLIP head and CLIP loss, for tests.

Written from the architecture description (LND layout, nn.MultiheadAttention with an explicit
additive causal mask, QuickGELU, pre-LN, features at the argmax token), deliberately unlike
slip's implementation (batch-first, fused causal SDPA, padding trimmed), so that agreement
between the two means something.

:func:`slip_clip_loss` states SLIP's ``CLIPLoss`` from its definition (losses.py and
utils.all_gather_batch of facebookresearch/SLIP): the other ranks' normalised embeddings are
gathered as constants (no autograd, this rank's own rows included) and each rank's local,
differentiable embeddings are scored against them. The gather here is a sum of zero-padded
buffers (all_reduce), not slip's all_gather, so the two share no mechanism.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _Block(nn.Module):
    def __init__(self, width, heads, mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.Identity())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)
        self.mask = mask

    def forward(self, x):  # (L, N, D)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h)
        return x + self.mlp.c_proj(h)


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads, mask):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OriginalCLIP(nn.Module):
    """Keys as in SLIP's released CLIP/SLIP state dicts (without the ``module.`` prefix)."""

    def __init__(self, timm_name: str, vision_heads: int, embed_dim=512, width=512, layers=12, heads=8,
                 context=77, vocab=49408, ssl=None):
        super().__init__()
        import timm  # here, not at the top: spawned test workers import this module without needing it

        self.visual = timm.create_model(timm_name, num_classes=0, num_heads=vision_heads)
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.transformer = _Transformer(width, layers, heads, mask)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        vw = self.visual.embed_dim
        self.image_projection = nn.Parameter(torch.randn(vw, embed_dim) * vw**-0.5)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))
        if ssl is not None:
            mlp_dim, out_dim = ssl
            self.image_mlp = nn.Sequential()
            for name, mod in [("layer1", nn.Linear(vw, mlp_dim)), ("bn1", nn.BatchNorm1d(mlp_dim)),
                              ("relu1", nn.ReLU()), ("layer2", nn.Linear(mlp_dim, mlp_dim)),
                              ("bn2", nn.BatchNorm1d(mlp_dim)), ("relu2", nn.ReLU()),
                              ("layer3", nn.Linear(mlp_dim, out_dim))]:
                self.image_mlp.add_module(name, mod)
        # Non-zero biases and LayerNorm affines so every parameter matters in the comparison.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or ".ln_" in name or name.startswith("ln_final"):
                    p.add_(torch.randn_like(p) * 0.1)

    def encode_image(self, image):
        return self.visual(image) @ self.image_projection

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def _constant_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` stacked in rank order, as a constant; ``x`` itself in one process
    (SLIP's helper returns its input unchanged there, gradient included)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    rows, rank, world = x.shape[0], dist.get_rank(), dist.get_world_size()
    buffer = x.new_zeros((world * rows,) + tuple(x.shape[1:]))
    buffer[rank * rows:(rank + 1) * rows] = x.detach()
    dist.all_reduce(buffer)
    return buffer


def slip_clip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale) -> torch.Tensor:
    """SLIP's CLIP loss on this rank: image rows against all texts, text rows against all
    images, targets at this rank's offset in the global batch; mean of the two cross-entropies."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    image = image_embed / image_embed.norm(dim=1, keepdim=True)
    text = text_embed / text_embed.norm(dim=1, keepdim=True)
    all_images, all_texts = _constant_gather(image), _constant_gather(text)
    rows = torch.arange(image.shape[0])
    targets = rank * image.shape[0] + rows
    image_to_text = -(logit_scale * image @ all_texts.T).log_softmax(dim=1)[rows, targets].mean()
    text_to_image = -(logit_scale * text @ all_images.T).log_softmax(dim=1)[rows, targets].mean()
    return (image_to_text + text_to_image) / 2
