"""Architectures as data.

A model name maps to an :class:`Architecture`: a vision preset, an optional text tower and
an optional SSL projection head. Every number lives here once; the builders read nothing else.
The released SLIP checkpoints use these exact shapes (SLIP ``models.py``), with one quirk kept:
their ViT-S/16 has 12 attention heads, not timm's 6 (MoCo v3's small ViT).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionConfig:
    """A timm VisionTransformer with a class token and no classifier (``num_classes=0``)."""

    width: int  # embed_dim of the ViT, also the feature size fed to the projections
    depth: int
    heads: int
    patch_size: int = 16
    image_size: int = 224


@dataclass(frozen=True)
class TextConfig:
    """CLIP's causal text transformer (pre-LN, QuickGELU, features at the EOT token)."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408  # CLIP BPE vocabulary, SOT=49406, EOT=49407


@dataclass(frozen=True)
class SSLHeadConfig:
    """The self-supervised branch: a method from :mod:`slip.ssl` and its head sizes."""

    mlp_dim: int = 4096  # hidden width of the projector (and predictor) MLPs
    out_dim: int = 256  # SSL embedding size
    method: str = "simclr"  # simclr | mocov3 | byol | beit (see slip.ssl.method_names())
    vocab_size: int = 8192  # BEiT: codes of the visual tokenizer (DALL-E/FLAVA: 8192)


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a model; stored in every checkpoint the project writes."""

    vision: VisionConfig
    text: TextConfig | None = None  # None: an image-only model (SimCLR)
    embed_dim: int = 512  # joint image-text embedding size
    ssl_head: SSLHeadConfig | None = None  # None: no SSL branch (CLIP); its method is trainable state

    def with_ssl_method(self, method: str, vocab_size: int | None = None) -> "Architecture":
        """This architecture with its SSL head running ``method`` (head sizes kept), and for
        BEiT a vocabulary of ``vocab_size`` visual-token codes."""
        if self.ssl_head is None:
            raise ValueError(f"this architecture has no SSL head to run {method!r} ({self.vision})")
        extra = {} if vocab_size is None else {"vocab_size": vocab_size}
        return dataclasses.replace(self, ssl_head=dataclasses.replace(self.ssl_head, method=method, **extra))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}; known: {sorted(known)}")
        if "vision" not in d:
            raise ValueError("architecture is missing the 'vision' section")

        def sub(kind, value):
            return None if value is None else kind(**value)

        return cls(
            vision=VisionConfig(**d["vision"]),
            text=sub(TextConfig, d.get("text")),
            embed_dim=d.get("embed_dim", 512),
            ssl_head=sub(SSLHeadConfig, d.get("ssl_head")),
        )


VISION_PRESETS: dict[str, VisionConfig] = {
    "vit_s16": VisionConfig(width=384, depth=12, heads=12),
    "vit_b16": VisionConfig(width=768, depth=12, heads=12),
    "vit_l16": VisionConfig(width=1024, depth=24, heads=16),
    # For tests and the CPU demo: 32 px images in 8 px patches, two blocks.
    "vit_tiny": VisionConfig(width=64, depth=2, heads=2, patch_size=8, image_size=32),
}

TEXT_PRESETS: dict[str, TextConfig] = {
    "base": TextConfig(),
    "tiny": TextConfig(width=64, heads=2, layers=2),
}

# Which tower sizes go with each vision preset, and the joint embedding size.
_SIZES = {
    "vit_s16": ("base", 512),
    "vit_b16": ("base", 512),
    "vit_l16": ("base", 512),
    "vit_tiny": ("tiny", 32),
}
_SSL_HEADS = {"base": SSLHeadConfig(), "tiny": SSLHeadConfig(mlp_dim=128, out_dim=32)}


def _build_registry() -> dict[str, Architecture]:
    registry = {}
    for vision_name, (text_name, embed_dim) in _SIZES.items():
        vision, text = VISION_PRESETS[vision_name], TEXT_PRESETS[text_name]
        head = _SSL_HEADS[text_name]
        registry[f"clip_{vision_name}"] = Architecture(vision, text, embed_dim, None)
        registry[f"simclr_{vision_name}"] = Architecture(vision, None, embed_dim, head)
        registry[f"slip_{vision_name}"] = Architecture(vision, text, embed_dim, head)
    return registry


MODELS: dict[str, Architecture] = _build_registry()


def list_models() -> list[str]:
    """Names accepted by :func:`slip.create_model`, sorted."""
    return sorted(MODELS)


def get_architecture(name: str) -> Architecture:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
