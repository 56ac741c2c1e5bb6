"""The SLIP model: a shared timm ViT, an optional CLIP text tower, an optional SSL method.

CLIP is the model without an SSL head, SimCLR the model without a text tower, SLIP has both.
Attribute names follow the released SLIP checkpoints (``visual``, ``transformer``,
``image_projection`` ...) so their state dicts load after stripping DDP's ``module.`` prefix.
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..ssl.base import MAP, MASKED, POOLED, TARGET
from .presets import TIMM_NORM_EPS, Architecture, VisionConfig, get_architecture
from .text import TextTransformer


def vit_args(vision: VisionConfig) -> dict:
    """timm ``VisionTransformer`` keyword arguments for the tower, all plain values (what timm's
    ``config.json`` and fine-tuned checkpoints store): its sizes, and ``pre_norm`` / ``act_layer``
    where they are not timm's defaults. A LayerNorm eps other than timm's is no plain argument
    to timm; :func:`build_vit` adds it."""
    args = {"img_size": vision.image_size, "patch_size": vision.patch_size, "embed_dim": vision.width,
            "depth": vision.depth, "num_heads": vision.heads}
    if vision.pre_norm:
        args["pre_norm"] = True
    if vision.act != "gelu":
        args["act_layer"] = vision.act  # a name timm's get_act_layer knows ("quick_gelu")
    return args


def build_vit(vision: VisionConfig, **kwargs) -> VisionTransformer:
    """The tower as a timm ``VisionTransformer``: :func:`vit_args`, its LayerNorm eps, no
    classifier; ``kwargs`` add or override timm arguments (``num_classes``, ``drop_path_rate`` ...)."""
    args = {**vit_args(vision), "num_classes": 0}
    if vision.norm_eps != TIMM_NORM_EPS:
        args["norm_layer"] = partial(LayerNorm, eps=vision.norm_eps)
    return VisionTransformer(**{**args, **kwargs})


def build_tower(vision: VisionConfig, several_sizes: bool = False) -> nn.Module:
    """The image tower of ``vision``: :func:`build_vit`, or timm's ``resnet{depth}`` without its
    classifier (its forward gives the globally average-pooled ``width``-d feature).
    ``several_sizes``: the ViT takes inputs of other sizes than ``vision.image_size`` (whole
    patches), its position embedding resampled to their grid (timm's ``dynamic_img_size``;
    multi-crop methods); at its own size it computes exactly what the plain tower does."""
    if vision.kind == "resnet":
        import timm

        return timm.create_model(f"resnet{vision.depth}", num_classes=0, pretrained=False)
    return build_vit(vision, dynamic_img_size=True) if several_sizes else build_vit(vision)


class SLIPModel(nn.Module):
    """Image tower + optional text tower (CLIP branch) + optional SSL projection head.

    ``forward`` returns a dict, like open_clip's models:
    ``image_embed`` (N, E) and ``text_embed`` (N, E) unnormalised, ``logit_scale`` (scalar,
    already exponentiated) when there is a text tower and ``image``/``text`` are given, and
    ``ssl``, the SSL method's outputs (for SimCLR ``{"embeds": [z1, z2]}``), when ``views``
    are given (the method's views, in its order; BEiT also takes ``patch_mask``, PIRL ``index``,
    each sample's global index in the corpus, which reaches its loss as ``out["ssl"]["index"]``).
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        v = arch.vision
        several_sizes = False
        if arch.ssl_head is not None:
            from ..ssl import method_class  # importing slip.ssl registers the methods

            several_sizes = bool(method_class(arch.ssl_head.method).view_sizes(v.image_size) - {(v.image_size,) * 2})
        self.visual = build_tower(v, several_sizes)
        self.vision_width = v.width
        if arch.text is not None:
            t = arch.text
            self.context_length = t.context_length
            self.token_embedding = nn.Embedding(t.vocab_size, t.width)
            self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
            self.transformer = TextTransformer(t.width, t.layers, t.heads, t.act)
            self.ln_final = nn.LayerNorm(t.width)
            # Bias-free projections stored as (in, out) matrices, applied as x @ W (CLIP's layout).
            self.image_projection = nn.Parameter(torch.empty(v.width, arch.embed_dim))
            self.text_projection = nn.Parameter(torch.empty(t.width, arch.embed_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self._init_clip_parameters()
        if arch.ssl_head is not None:
            from ..ssl import build_method  # importing slip.ssl registers the methods

            # Built after the tower: momentum methods start from a copy of it.
            self.ssl = build_method(arch.ssl_head, encoder=self.visual, width=v.width)

    @property
    def has_text(self) -> bool:
        return self.arch.text is not None

    @property
    def has_ssl_head(self) -> bool:
        return self.arch.ssl_head is not None

    def _init_clip_parameters(self) -> None:
        # CLIP's initialisation, which SLIP keeps; the ViT keeps timm's own.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.vision_width**-0.5)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward, in both towers (timm's API name)."""
        self.visual.set_grad_checkpointing(enable)
        if self.has_text:
            self.transformer.grad_checkpointing = enable

    def _require_text(self, what: str) -> None:
        if not self.has_text:
            raise RuntimeError(f"{what} needs a text tower, and this model ({self.arch.vision}) has none")

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim) joint embedding; for image-only models, (N, width) features."""
        x = self.visual(image)
        if self.has_text:
            x = x @ self.image_projection
        return F.normalize(x, dim=-1) if normalize else x

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, EOT being the highest id of each row -> (N, width) features at EOT.

        L may be anything up to the context length: attention is causal, so the EOT feature
        never depends on the padding after it, and callers cut it where the tokens are made
        (:func:`slip.tokenizer.trim_padding`; the training loader and zero-shot do). Nothing
        here reads the tokens on the host, so a GPU step never waits for it.
        """
        self._require_text("encode_text")
        eot = text.argmax(dim=-1)
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), eot]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, L) token ids -> (N, embed_dim) joint embedding."""
        x = self.text_features(text) @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def image_features(self, images: Sequence[torch.Tensor],
                       masks: Sequence[torch.Tensor | None] | None = None,
                       requests: Sequence[tuple] | None = None) -> list:
        """Tower features of several image batches in as few tower calls as possible.

        Batches of the same shape are concatenated into one call (the ViT has no batch
        statistics, so this is exact); a tower with BatchNorm (a ResNet) runs one call per batch
        instead, so that each view is normalised by its own statistics, as the papers train
        them. Results come back in input order. ``masks`` gives, per batch, None or an
        ``(N, L)`` bool patch mask: masked batches come back as ``(N, L, width)`` patch tokens
        with the SSL method's mask token substituted (BEiT), the others as pooled
        ``(N, width)`` features. ``requests`` gives, per batch, the features wanted besides the
        pooled one (representation extraction, see :data:`slip.ssl.base.MAP`): a batch with
        requests comes back as the tuple ``(pooled, *features)``, each feature (N, C, H, W), from
        the same tower call; an empty tuple (the default) gives the pooled feature as always.
        """
        masks = list(masks) if masks is not None else [None] * len(images)
        requests = list(requests) if requests is not None else [()] * len(images)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, x in enumerate(images):
            groups[(i,) if self.arch.vision.has_batchnorm else tuple(x.shape[1:])].append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            x = torch.cat([images[i] for i in idx])
            sizes = [images[i].shape[0] for i in idx]
            if all(masks[i] is None for i in idx):
                wanted = list(dict.fromkeys(r for i in idx for r in requests[i]))
                if not wanted:
                    for i, f in zip(idx, self.visual(x).split(sizes)):
                        out[i] = f
                    continue
                pooled, extra = self._tower_with_features(x, wanted)
                parts = [t.split(sizes) for t in [pooled, *extra]]
                for k, i in enumerate(idx):
                    f = [p[k] for p in parts]
                    out[i] = (f[0], *(f[1 + wanted.index(r)] for r in requests[i])) if requests[i] else f[0]
                continue
            if any(requests[i] for i in idx):
                raise ValueError("a masked view cannot also request features besides its patch tokens")
            num_patches = self.visual.patch_embed.num_patches
            mask = torch.cat([masks[i] if masks[i] is not None else
                              torch.zeros(n, num_patches, dtype=torch.bool, device=x.device) for i, n in zip(idx, sizes)])
            prefix = self.visual.num_prefix_tokens
            for i, t in zip(idx, self._masked_tower(x, mask).split(sizes)):
                out[i] = t[:, prefix:] if masks[i] is not None else self.visual.forward_head(t)
        return out  # type: ignore[return-value]

    def _tower_with_features(self, x: torch.Tensor, wanted: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The pooled feature and the ``wanted`` features (MAP or intermediate indices) of one
        tower call: timm's ``forward_intermediates`` (its blocks/stages and final norm are
        ``forward_features``'s), then ``forward_head`` on its final output, as ``forward`` does."""
        v = self.visual
        vit = self.arch.vision.kind == "vit"
        count = len(v.blocks) if vit else 5  # a ResNet's stem and four stages
        ints = sorted({(r + count if r < 0 else r) for r in wanted if r != MAP})
        if ints:
            final, inter = v.forward_intermediates(x, indices=ints, output_fmt="NCHW")
        else:
            final, inter = v.forward_features(x), []
        pooled = v.forward_head(final)
        extra = []
        for r in wanted:
            if r != MAP:
                extra.append(inter[ints.index(r + count if r < 0 else r)])
            elif vit:
                h, w = v.patch_embed.dynamic_feat_size(x.shape[-2:])
                grid = final[:, v.num_prefix_tokens:]
                extra.append(grid.reshape(grid.shape[0], h, w, -1).permute(0, 3, 1, 2))
            else:
                extra.append(final)
        return pooled, extra

    def _masked_tower(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` with masked patch embeddings replaced by the mask token."""
        v = self.visual
        tokens = self.ssl.mask_patches(v.patch_embed(x), mask)
        tokens = v.norm_pre(v.patch_drop(v._pos_embed(tokens)))
        tokens = checkpoint_seq(v.blocks, tokens) if v.grad_checkpointing else v.blocks(tokens)
        return v.norm(tokens)

    def forward_features(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        views: Sequence[torch.Tensor] | None = None,
        patch_mask: torch.Tensor | None = None,
        targets: bool = True,
        index: torch.Tensor | None = None,
    ) -> dict:
        """The towers: ``image`` (N, width), ``text`` (N, text width), ``views`` (per tower view of
        the SSL method: (N, width), or (N, L, width) patch tokens for a masked view, or the tuple
        (pooled, *features) when the method requests features, ``SSLMethod.view_features``), with
        ``patch_mask`` the mask it was given, and with ``targets`` the SSL method's targets
        ``ssl_targets`` (the momentum tower's features, tokenizer codes; no gradient).
        ``index`` (the batch's global sample indices) is passed on as ``index`` when the SSL
        method needs it (``needs_sample_index``: PIRL's memory bank), so that micro-batches
        keep their rows' indices in order like any other feature.

        With a ViT everything here is per-sample (no batch statistics), so features of
        micro-batches can be computed separately and concatenated; :meth:`forward_heads`
        (projections, heads, the momentum projector) then sees the whole batch. A tower with
        BatchNorm is not per-sample (the trainer refuses to split its batches).
        """
        views = list(views) if views is not None else []
        if views and not self.has_ssl_head:
            raise RuntimeError("SSL views were given but this model has no SSL head")
        if image is not None:
            self._require_text("the CLIP branch (image=...)")
        roles = self.ssl.view_roles if views else ()
        if len(views) != len(roles):
            raise ValueError(f"SSL method {self.ssl.name!r} takes {len(roles)} views, got {len(views)}")
        if MASKED in roles and patch_mask is None:
            raise ValueError(f"SSL method {self.ssl.name!r} needs a patch_mask")
        tower_views = [(v, r) for v, r in zip(views, roles) if r != TARGET]
        inputs = ([image] if image is not None else []) + [v for v, _ in tower_views]
        masks = ([None] if image is not None else []) + [patch_mask if r == MASKED else None for _, r in tower_views]
        wanted = tuple(self.ssl.view_features) if views else ()
        requests = ([()] if image is not None else []) + [wanted if r == POOLED else () for _, r in tower_views]
        tower = self.image_features(inputs, masks, requests) if inputs else []
        feats: dict = {}
        if image is not None:
            feats["image"] = tower.pop(0)
        if views:
            feats["views"] = tower
            if patch_mask is not None:
                feats["patch_mask"] = patch_mask
            if targets and self.ssl.has_targets:
                feats["ssl_targets"] = self.ssl.target_features(views)
            if index is not None and self.ssl.needs_sample_index:
                feats["index"] = index
        if text is not None:
            feats["text"] = self.text_features(text)
        return feats

    def forward_heads(self, feats: dict) -> dict:
        """Projections and the SSL method's heads on tower features (see :meth:`forward`)."""
        out: dict = {}
        if "image" in feats:
            out["image_embed"] = feats["image"] @ self.image_projection
        if "text" in feats:
            out["text_embed"] = feats["text"] @ self.text_projection
        if self.has_text and ("image" in feats or "text" in feats):
            out["logit_scale"] = self.logit_scale.exp()
        if "views" in feats:
            out["ssl"] = self.ssl(feats["views"], feats.get("ssl_targets"), feats.get("patch_mask"))
            if "index" in feats:
                out["ssl"]["index"] = feats["index"]
        return out

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        views: Sequence[torch.Tensor] | None = None,
        patch_mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict:
        return self.forward_heads(self.forward_features(image=image, text=text, views=views, patch_mask=patch_mask,
                                                        index=index))


def create_model(name: str | Architecture) -> SLIPModel:
    """A freshly initialised model from a registered name (see :func:`slip.list_models`)."""
    arch = name if isinstance(name, Architecture) else get_architecture(name)
    return SLIPModel(arch)
