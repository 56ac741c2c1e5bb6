"""The SSL method interface, its registry, and helpers shared by methods (MLPs, EMA)."""
from __future__ import annotations

import abc
import copy
import dataclasses
import math
from collections import OrderedDict
from typing import Callable, ClassVar

import torch
from torch import nn

from ..data.views import MethodViews, byol_views, clip_view, simclr_view

_METHODS: dict[str, type["SSLMethod"]] = {}


def register_method(name: str) -> Callable[[type["SSLMethod"]], type["SSLMethod"]]:
    def add(cls: type[SSLMethod]) -> type[SSLMethod]:
        if name in _METHODS:
            raise ValueError(f"SSL method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(head, encoder: nn.Module, width: int) -> "SSLMethod":
    """The method named by ``head.method`` (an :class:`~slip.models.SSLHeadConfig`), built for
    an image tower of feature size ``width``; ``encoder`` is copied by momentum methods."""
    return method_class(head.method)(encoder=encoder, width=width, head=head)


def method_class(name: str) -> type["SSLMethod"]:
    """The registered class of method ``name`` (class attributes describe its needs)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown SSL method {name!r}; known methods: {', '.join(method_names())}") from None


def view_method_names() -> list[str]:
    """The names :func:`method_views` knows: ``clip``, every SSL method alone, and each beside
    CLIP as ``slip-<method>`` (``slip`` alone means ``slip-simclr``, the paper's SLIP)."""
    names = method_names()
    return ["clip", *names, *(f"slip-{n}" for n in names)]


def method_views(method: str, size: int | tuple[int, int] = 224, patch_size: int = 16) -> MethodViews:
    """The views a method needs from the data pipeline, by name, for the data tools
    (``slip bench-data``, :class:`slip.data.pipeline.PipelineConfig`'s ``method``), from the
    registry: ``clip`` is the CLIP view alone, a method's name its own views
    (:meth:`SSLMethod.declare_views`), ``slip-<method>`` both. Training builds the same from the
    model (:meth:`SSLMethod.data_views`)."""
    name = "slip-simclr" if method == "slip" else method
    if name not in view_method_names():
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(view_method_names())}")
    if name == "clip":
        return MethodViews(clip=clip_view(size))
    ssl = name.removeprefix("slip-")
    views = method_class(ssl).declare_views(size, patch_size=patch_size)
    return dataclasses.replace(views, clip=clip_view(size)) if ssl != name else views


# What the model does with each of a method's views (``SSLMethod.view_roles``):
POOLED = "pooled"  # through the online tower; the method gets the pooled (N, width) feature
MASKED = "masked"  # through the online tower with ``patch_mask``; the method gets (N, L, width) patch tokens
TARGET = "target"  # not through the online tower; only ``target_features`` sees it (e.g. a tokenizer's view)

# Representation extraction (Falcon & Cho 2020's third design choice): what the tower returns
# for a ``pooled`` view besides the pooled feature (``SSLMethod.view_features``). A request is
# MAP, the last block's patch-token grid of a ViT (after its final norm, prefix tokens dropped) or
# the last stage's feature map of a ResNet, or an int, an intermediate feature as timm's
# ``forward_intermediates`` indexes them: a ViT's block (0-based, negative from the end; its
# output before the final norm), a ResNet's stage (0 the stem, 1-4 layer1-layer4).
MAP = "map"


def feature_channels(encoder: nn.Module, request: str | int) -> int:
    """The channels of the feature ``request`` (see :data:`MAP`) of the timm tower ``encoder``."""
    if request == MAP:
        return int(encoder.num_features)
    return int(encoder.feature_info[request]["num_chs"])


class SSLMethod(nn.Module, metaclass=abc.ABCMeta):
    """One self-supervised objective on two (or more) views of each image.

    A method declares the views it needs from the data pipeline (:meth:`data_views`) and what
    the model does with each (``view_roles``). The model runs the online image tower on every
    ``pooled``/``masked`` view (in one call, with the CLIP view) and hands the features to
    :meth:`forward`; targets that need no gradient (a momentum encoder's keys, a visual
    tokenizer's codes) come from :meth:`target_features`. Splitting the work this way lets the
    trainer's gradient accumulation cache features across micro-batches.
    """

    name: ClassVar[str] = ""
    view_roles: ClassVar[tuple[str, ...]] = (POOLED, POOLED)
    needs_visual_tokenizer: ClassVar[bool] = False  # True: the trainer calls attach_visual_tokenizer(...)
    # True: the method's loss needs each sample's global index in the corpus (a memory bank of
    # one row per image): the model puts the batch's ``index`` into :meth:`forward`'s output
    # (``out["index"]``), and the trainer refuses data without indices and passes the corpus
    # size to :meth:`configure_training`.
    needs_sample_index: ClassVar[bool] = False
    # Representation extraction: the features the tower returns for each ``pooled`` view besides
    # the pooled one (requests: MAP or intermediate indices, see there). Empty (every method but
    # AMDIM): each view's feature is the pooled (N, width) tensor, computed as always. Otherwise
    # each ``pooled`` view's feature is the tuple (pooled (N, width), *one (N, C, H, W) tensor per
    # request, in order), from the same tower call; the CLIP view stays pooled. A method may set it
    # per instance (from its tower) in ``__init__``. Gradient accumulation caches the tuples.
    view_features: tuple[str | int, ...] = ()
    default_temperature: ClassVar[float | None] = None
    default_momentum: ClassVar[float | None] = None
    # SSLHeadConfig fields the method sets when chosen (Architecture.with_ssl_method), e.g. MoCo
    # v2's queue length; the preset's head sizes and the recipe's model.ssl_head settings win.
    head_defaults: ClassVar[dict] = {}

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__()
        self._host_copies: dict[str, int] = {}

    # Host copies of integer buffers (update counts, fill levels) that a step's seeds and decisions
    # depend on: reading a device value mid-step (int(), bool(), .item()) makes the host wait for
    # the accelerator (a sync); the buffer, saved in checkpoints, stays the truth.
    def host_count(self, name: str, read: Callable[[], int] | None = None) -> int:
        """The integer buffer ``name`` as a Python int: read from the device once (after
        construction or a state-dict load), then kept by :meth:`advance_count`. ``read``: how to
        compute the value from the device state instead, for a value that is not a buffer of that
        name (e.g. a flag derived from one); :meth:`keep_host_count` then keeps it."""
        if name not in self._host_copies:
            self._host_copies[name] = int(read() if read is not None else getattr(self, name))
        return self._host_copies[name]

    def keep_host_count(self, name: str, value: int) -> None:
        """Set the host copy ``name`` after the step wrote the device state it is read from."""
        self._host_copies[name] = int(value)

    def advance_count(self, name: str, by: int = 1, limit: int | None = None) -> None:
        """``buffer += by`` (at most ``limit``), on the device and in the host copy alike."""
        value = self.host_count(name) + by
        value = value if limit is None else min(value, limit)
        getattr(self, name).fill_(value)
        self._host_copies[name] = value

    def forget_host_copies(self) -> None:
        """Drop the host copies (the buffers were overwritten); the next read takes the buffers'."""
        self._host_copies.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.forget_host_copies()

    @classmethod
    def view_sizes(cls, image_size: int = 224) -> set[tuple[int, int]]:
        """The sizes of the method's views at tower size ``image_size``; more than one (multi-crop)
        means a ViT tower must take several input sizes (timm's ``dynamic_img_size``)."""
        return {v.size for v in cls.declare_views(image_size).ssl if v.normalize}

    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        """Called once by the trainer before the first step (and before a resume loads the
        checkpoint), on the training device, with the ``objective`` config section and the
        schedule: methods with training-time settings (SwAV's Sinkhorn, when its queue starts)
        read them here. ``corpus_size``: the number of samples of the training corpus (the
        shards' index; given to methods that set ``needs_sample_index``, else None); ``seed``:
        the run's ``train.seed``. Default: nothing."""

    def gathered_state(self) -> dict[str, torch.Tensor]:
        """State kept outside the module's buffers (because it is sharded over ranks), for the
        checkpoint: a collective that every rank calls; rank 0 gets the whole state (e.g. PIRL's
        memory bank in global row order, on the CPU), the other ranks an empty dict. Default:
        none."""
        return {}

    def load_gathered_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`gathered_state`'s result (read from a checkpoint by every rank), each
        rank keeping its own share, whatever the number of ranks that wrote it. Default:
        nothing to restore."""

    @property
    def num_views(self) -> int:
        return len(self.view_roles)

    @property
    def has_targets(self) -> bool:
        return False

    @classmethod
    def declare_views(cls, image_size: int | tuple[int, int], *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        """The method's part of the data declaration, without building the method: its SSL
        views (and patch mask, if any) and no CLIP view. Default: SimCLR's two views.
        ``patch_size``, ``mask_ratio`` and ``tokenizer_size`` are for methods that mask patches
        or feed a visual tokenizer."""
        return MethodViews(clip=None, ssl=(simclr_view(image_size, "simclr1"), simclr_view(image_size, "simclr2")))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        """:meth:`declare_views` for this instance (e.g. BEiT's patch grid and tokenizer);
        ``objective`` is the training config's section, for methods whose views it sets
        (RELICv2's saliency masking), None outside training."""
        return self.declare_views(image_size, mask_ratio=mask_ratio)

    def target_features(self, views: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per view targets computed without gradient (all of ``views``, whatever their role);
        None if the method uses none."""
        return None

    def mask_patches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``(N, L, width)`` with the positions where ``mask`` ``(N, L)`` is True
        replaced (by a learned mask token); methods with a ``masked`` view implement it."""
        raise RuntimeError(f"SSL method {self.name!r} has no masked view")

    @abc.abstractmethod
    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None,
                patch_mask: torch.Tensor | None = None) -> dict:
        """Heads on the online tower features of the ``pooled``/``masked`` views (in order; a
        ``pooled`` view's is a tuple when the method sets ``view_features``); ``patch_mask`` is
        the batch's mask when the method has a ``masked`` view. Returns what :meth:`loss` needs."""

    @abc.abstractmethod
    def loss(self, out: dict, temperature: float | None = None) -> dict:
        """``loss``, ``ssl_loss`` and metrics (e.g. ``ssl_acc``) from :meth:`forward`'s output."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and before the optimizer step ``step`` (0-based), e.g. to keep
        parameters frozen for a while by dropping their gradients (SwAV's prototypes)."""

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        """Called after each optimizer step that was applied (momentum updates, queues); ``step``
        counts the steps done. Returns values to log."""
        return {}


class MomentumMethod(SSLMethod):
    """A method whose targets come from a momentum (EMA) copy of the image tower and projector
    (MoCo v3's keys, BYOL's targets). Subclasses build ``self.projector`` and call
    :meth:`_init_momentum_branch`; the copies start equal to the online weights."""

    @classmethod
    def declare_views(cls, image_size: int | tuple[int, int], *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        """BYOL's asymmetric views (blur 1.0 / 0.1, solarisation 0.0 / 0.2), which MoCo v3 uses too."""
        return MethodViews(clip=None, ssl=byol_views(image_size))

    def _init_momentum_branch(self, encoder: nn.Module) -> None:
        self.momentum_encoder = frozen_copy(encoder)
        # A tower with BatchNorm (a ResNet) normalises each view alone (see target_features).
        self._views_apart = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
        self.momentum_projector = frozen_copy(self.projector)

    @property
    def has_targets(self) -> bool:
        return True

    @torch.no_grad()
    def target_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum tower's features of each view (per-sample with a ViT, so micro-batches
        can be computed apart; a tower with BatchNorm runs one call per view, each view with its
        own statistics); the momentum projector runs in :meth:`momentum_projections`."""
        if self._views_apart:
            return [self.momentum_encoder(v) for v in views]
        return list(self.momentum_encoder(torch.cat(views)).split([v.shape[0] for v in views]))

    @torch.no_grad()
    def momentum_projections(self, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum projector on the whole batch's target features, once per view (its
        BatchNorm sees each view's statistics, like the online projector's)."""
        return [self.momentum_projector(t) for t in targets]

    # "cosine": from the base momentum to 1 over training (BYOL, MoCo v3); "constant" (MoCo v2)
    momentum_schedule: ClassVar[str] = "cosine"

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        base = self.default_momentum if base_momentum is None else base_momentum
        m = momentum_at(step, total_steps, base) if self.momentum_schedule == "cosine" else base
        ema_update(self.momentum_encoder, encoder, m)
        ema_update(self.momentum_projector, self.projector, m)
        return {"momentum": m}


def mlp(dims: list[int], *, last_bn: bool = False, last_bn_affine: bool = True, bn: bool = True) -> nn.Sequential:
    """Linear layers of widths ``dims``, with BatchNorm (unless ``bn`` is False, as MoCo v2's
    head) + ReLU between them, and optionally a BatchNorm after the last (MoCo v3's projector).
    Names: layer1, bn1, relu1, layer2, ..."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        last = i == len(dims) - 1
        layers.append((f"layer{i}", nn.Linear(d_in, d_out)))
        if not last:
            layers += ([(f"bn{i}", nn.BatchNorm1d(d_out))] if bn else []) + [(f"relu{i}", nn.ReLU(inplace=True))]
        elif last_bn:
            layers.append((f"bn{i}", nn.BatchNorm1d(d_out, affine=last_bn_affine)))
    return nn.Sequential(OrderedDict(layers))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that receives no gradient (the momentum branch)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Cosine schedule from ``base`` at step 0 to 1 at the last step (BYOL, MoCo v3)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, over parameters. Buffers (BatchNorm
    statistics) are left to the momentum branch's own forward passes, as in BYOL and MoCo v3."""
    t_params, o_params = list(target.parameters()), [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
