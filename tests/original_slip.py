"""An independent re-statement of the original SLIP text tower and CLIP head, for tests.

Written from the architecture description (LND layout, nn.MultiheadAttention with an explicit
additive causal mask, QuickGELU, pre-LN, features at the argmax token), deliberately unlike
slip's implementation (batch-first, fused causal SDPA, padding trimmed), so that agreement
between the two means something.
"""
from __future__ import annotations

import timm
import torch
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
