"""Architectures as data.

A model name maps to an :class:`Architecture`: a vision preset, an optional text tower and
an optional SSL projection head. Every number lives here once; the builders read nothing else.
The released SLIP checkpoints use these exact shapes (SLIP ``models.py``), with one quirk kept:
their ViT-S/16 has 12 attention heads, not timm's 6 (MoCo v3's small ViT). The ``*_openai``
presets have the towers of OpenAI's CLIP (and open_clip's own ViT): the same sizes with a
LayerNorm before the blocks, QuickGELU and LayerNorm eps 1e-5, so OpenAI's ViT-B/16 weights load
into ``clip_vit_b16_openai`` and training can start from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "quick_gelu")  # MLP activations: exact GELU, or QuickGELU x * sigmoid(1.702 x) (OpenAI's CLIP)
TIMM_NORM_EPS = 1e-6  # the eps of timm's ViT LayerNorms
OPENAI_NORM_EPS = 1e-5  # OpenAI CLIP's (PyTorch's default, open_clip's)


def _check_act(where: str, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}.act={act!r} is not one of {list(ACTIVATIONS)}")


RESNET_WIDTHS = {18: 512, 34: 512, 50: 2048, 101: 2048, 152: 2048}  # timm resnetN's pooled feature size


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a timm VisionTransformer with a class token and no classifier
    (``num_classes=0``), or with ``kind="resnet"`` timm's ``resnet{depth}`` (globally
    average-pooled ``width``-d feature, BatchNorm; ``heads`` and ``patch_size`` unused).

    The ViT's last three fields keep timm's defaults except for towers in OpenAI CLIP's layout
    (open_clip's own ViT): ``pre_norm`` (OpenAI's ``ln_pre``), ``act="quick_gelu"``, ``norm_eps=1e-5``.
    """

    width: int  # embed_dim of the ViT, also the feature size fed to the projections
    depth: int
    heads: int
    patch_size: int = 16
    image_size: int = 224
    pre_norm: bool = False  # a LayerNorm after the embeddings (timm's norm_pre); the patch embedding has no bias
    act: str = "gelu"  # the MLPs' activation, one of ACTIVATIONS
    norm_eps: float = TIMM_NORM_EPS  # eps of every LayerNorm of the tower
    kind: str = "vit"  # vit | resnet

    def __post_init__(self) -> None:
        _check_act("vision", self.act)
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision.kind={self.kind!r} is not one of ['vit', 'resnet']")
        if self.kind == "resnet":
            if self.depth not in RESNET_WIDTHS:
                raise ValueError(f"vision.depth={self.depth} names no ResNet; one of {sorted(RESNET_WIDTHS)}")
            if self.width != RESNET_WIDTHS[self.depth]:
                raise ValueError(f"vision.width={self.width}: ResNet-{self.depth}'s pooled feature has "
                                 f"{RESNET_WIDTHS[self.depth]} channels")

    @property
    def has_batchnorm(self) -> bool:
        """Whether the tower normalises over the batch (a ResNet): features of a sample then
        depend on its batch, so views are run one call each and micro-batches differ from the batch."""
        return self.kind == "resnet"


@dataclass(frozen=True)
class TextConfig:
    """CLIP's causal text transformer (pre-LN, QuickGELU unless ``act`` says, features at the EOT token)."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408  # CLIP BPE vocabulary, SOT=49406, EOT=49407
    act: str = "quick_gelu"  # the MLPs' activation, one of ACTIVATIONS (open_clip's models without quick_gelu: gelu)

    def __post_init__(self) -> None:
        _check_act("text", self.act)


@dataclass(frozen=True)
class SSLHeadConfig:
    """The self-supervised branch: a method from :mod:`slip.ssl` and its head sizes."""

    mlp_dim: int = 4096  # hidden width of the projector (and predictor) MLPs
    out_dim: int = 256  # SSL embedding size
    method: str = "simclr"  # simclr | mocov2 | mocov3 | byol | swav | beit (see slip.ssl.method_names())
    vocab_size: int = 8192  # BEiT: codes of the visual tokenizer (DALL-E/FLAVA: 8192)
    prototypes: int = 3000  # SwAV: number of prototypes (cluster centres)
    queue_size: int = 0  # MoCo v2: keys in the queue; SwAV: past features per large crop (0: no queue)
    patch_grid: int = 7  # CPC v2: patches per side of its overlapping patch grid (the paper's 7 x 7; sets the views)

    def __post_init__(self) -> None:
        for name in ("mlp_dim", "out_dim", "vocab_size", "prototypes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ssl_head.{name} must be positive, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise ValueError(f"ssl_head.queue_size must be >= 0, got {self.queue_size}")
        if self.patch_grid < 2:
            raise ValueError(f"ssl_head.patch_grid must be at least 2, got {self.patch_grid}")


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a model; stored in every checkpoint the project writes."""

    vision: VisionConfig
    text: TextConfig | None = None  # None: an image-only model (SimCLR)
    embed_dim: int = 512  # joint image-text embedding size
    ssl_head: SSLHeadConfig | None = None  # None: no SSL branch (CLIP); its method is trainable state

    def with_ssl_method(self, method: str, vocab_size: int | None = None, **head) -> "Architecture":
        """This architecture with its SSL head running ``method``: the preset's head sizes, the
        method's own structural defaults (``SSLMethod.head_defaults``, e.g. MoCo v2's queue of
        65,536 keys), then ``head`` (any :class:`SSLHeadConfig` field); for BEiT a vocabulary of
        ``vocab_size`` visual-token codes."""
        if self.ssl_head is None:
            raise ValueError(f"this architecture has no SSL head to run {method!r} ({self.vision})")
        # the registry (importing slip.ssl registers the methods)
        from ..ssl import method_class

        known = {f.name for f in dataclasses.fields(SSLHeadConfig)} - {"method"}
        unknown = sorted(set(head) - known)
        if unknown:
            raise ValueError(f"unknown SSL head setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        extra = {**method_class(method).head_defaults, **head}
        if vocab_size is not None:
            extra["vocab_size"] = vocab_size
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


_OPENAI_LAYOUT = {"pre_norm": True, "act": "quick_gelu", "norm_eps": OPENAI_NORM_EPS}
VISION_PRESETS: dict[str, VisionConfig] = {
    "vit_s16": VisionConfig(width=384, depth=12, heads=12),
    "vit_b16": VisionConfig(width=768, depth=12, heads=12),
    "vit_l16": VisionConfig(width=1024, depth=24, heads=16),
    # For tests and the CPU demo: 32 px images in 8 px patches, two blocks.
    "vit_tiny": VisionConfig(width=64, depth=2, heads=2, patch_size=8, image_size=32),
    # OpenAI CLIP's layout (see the module doc), at ViT-B/16 and at the tiny test size.
    "vit_b16_openai": VisionConfig(width=768, depth=12, heads=12, **_OPENAI_LAYOUT),
    "vit_tiny_openai": VisionConfig(width=64, depth=2, heads=2, patch_size=8, image_size=32, **_OPENAI_LAYOUT),
    # timm's ResNet-50 (the field's SSL reference tower; OpenAI's RN50 has a different stem and
    # attention pooling), and ResNet-18 at 32 px for tests and the CPU.
    "resnet50": VisionConfig(width=2048, depth=50, heads=0, patch_size=32, image_size=224, kind="resnet"),
    "resnet_tiny": VisionConfig(width=512, depth=18, heads=0, patch_size=32, image_size=32, kind="resnet"),
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
    "vit_b16_openai": ("base", 512),
    "vit_tiny_openai": ("tiny", 32),
    "resnet50": ("base", 1024),  # CLIP's RN50 joint embedding size
    "resnet_tiny": ("tiny", 32),
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
