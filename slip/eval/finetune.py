"""End-to-end classification fine-tuning of a checkpoint's image tower (SLIP's ImageNet protocol).

SLIP fine-tuned its pretrained ViTs with BEiT's recipe (``run_class_finetuning.py`` with the
class token as the image representation). This module reproduces that recipe from timm's
building blocks:

* model: a fresh timm ``VisionTransformer`` with the tower's dimensions, ``global_pool="token"``
  (the final LayerNorm, then the class token: BEiT's ``--use_cls``), ``drop_path_rate`` and a
  ``num_classes`` head. The tower's weights are loaded into it; the head is initialised with
  ``trunc_normal(std=2e-5)`` and a zero bias (BEiT's ``init_scale=0.001`` times 0.02, MAE's 2e-5);
* optimisation: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.05) with layer-wise lr decay
  from ``timm.optim.create_optimizer_v2`` (layer ids from the ViT's ``group_matcher``; no weight
  decay on 1-D parameters, ``pos_embed`` and ``cls_token``); per-step linear warm-up from 0 and
  cosine decay to 1e-6 with ``timm.scheduler.CosineLRScheduler``;
* data: ``timm.data.create_transform`` training transform (random-resized crop, flip,
  RandAugment ``rand-m9-mstd0.5-inc1``, bicubic, random erasing 0.25 in ``pixel`` mode, one
  box), ``timm.data.Mixup`` (mixup 0.8, cutmix 1.0, switch 0.5, label smoothing 0.1) with
  ``timm.loss.SoftTargetCrossEntropy``; evaluation: bicubic resize of the shorter side to
  ``size / 0.875`` (256 for 224) and a centre crop, ImageNet mean/std.

Sizes (by tower width) set the recipe's remaining numbers, see :data:`RECIPES`. The learning rate
is ``base_lr * batch_size / 1024`` with ``base_lr = 4e-3`` (BEiT's 4e-3 at a global batch of
1024), unless an absolute ``lr`` is given.

Runs unchanged in one process and under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). Checkpoints
``OUTPUT/checkpoints/step-XXXXXXXX.pt`` are written atomically every ``save_every`` epochs (and
optionally every ``save_every_steps`` steps) and at the end, the last ``keep_last`` kept; a rerun
with the same output directory resumes exactly (weights, optimizer, scheduler, loss scaler,
step, every rank's RNG). Data augmentation is keyed by (seed, epoch, image index), so the images
of a step do not depend on the number of loader workers or on where a run was interrupted.

A fine-tuned checkpoint (``OUTPUT/finetuned.pt``, and every step checkpoint) is a plain dict that
``torch.load(path, weights_only=True)`` reads::

    ckpt = torch.load("finetuned.pt", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(**ckpt["model"]["timm_kwargs"])
    model.load_state_dict(ckpt["state_dict"])

or simply ``model, transform = load_finetuned("finetuned.pt")``. A tower in OpenAI CLIP's layout
(imported from OpenAI or open_clip) keeps it: ``timm_kwargs`` hold ``pre_norm`` and
``act_layer="quick_gelu"``; its LayerNorm eps (1e-5; ``ckpt["model"]["vision"]["norm_eps"]``) is no
plain value, so plain timm needs ``norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-5)``
added, which ``load_finetuned`` does.

ResNet towers (``*_resnet50``, ``*_resnet_tiny``) are fine-tuned as timm fine-tunes its ResNets:
timm's ``resnet{depth}`` with the tower's weights (BatchNorm running statistics included), its
global average pool and a new ``num_classes`` linear classifier ``fc`` (initialised as the ViT's
head), with the same optimiser, schedule, augmentation and loss. Their recipe (:data:`RECIPES`
``"resnet"``) has no layer-wise lr decay (``layer_decay`` 1.0: none of the SSL papers decays a
ResNet's lr by depth) and timm's ResNet Strikes Back numbers for the rest: drop path 0.05 (timm's
stochastic depth over the residual blocks), 100 epochs of which 5 warm-up. An explicit
``layer_decay`` below 1 applies timm's own grouping of a ResNet (``group_matcher``: the stem, then
every residual block in order, the classifier last). BatchNorm statistics are those of a
micro-batch over all ranks (synchronised as in pretraining, so a run on N ranks normalises the
batch a single process would); with ``accum_steps`` above 1 each micro-batch is normalised on its
own, as with timm's ``--grad-accum-steps``. The fine-tuned checkpoint names the timm model::

    model = timm.create_model(ckpt["model"]["architecture"], **ckpt["model"]["timm_kwargs"])  # "resnet50"
    model.load_state_dict(ckpt["state_dict"])
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .. import distributed as D
from .. import runtime
from ..checkpoint import CheckpointError, LoadedCheckpoint, read_checkpoint
from ..errors import UserError
from ..fileio import atomic_path, atomic_write_text
from ..models import VisionConfig
from ..runtime import NonFiniteGuard, RunStopped
from ..train.checkpoints import CheckpointManager, rng_state, set_rng_state
from ..train.logger import MetricLogger, format_duration
from ..transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "FINETUNE_FORMAT",
    "RECIPES",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "FinetuneStopped",
    "Finetuner",
    "Recipe",
    "SeededAugmentation",
    "build_classifier",
    "build_criterion",
    "build_eval_transform",
    "build_mixup",
    "build_optimizer",
    "build_scheduler",
    "build_train_transform",
    "classifier_from_checkpoint",
    "finetune",
    "load_finetuned",
    "read_finetuned",
    "recipe_for_width",
    "timm_architecture",
    "timm_kwargs",
]

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "slip-finetune/1"
REFERENCE_BATCH = 1024  # the global batch at which base_lr is the peak learning rate
HEAD_INIT_STD = 2e-5
# Metrics a softmax classifier cannot be scored with (multi-label benchmarks).
_MULTILABEL_METRICS = frozenset({"voc_11pt_map"})


class FinetuneError(UserError, ValueError):
    """A setting or input that makes fine-tuning impossible; the message says which."""


# --- recipe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The numbers of BEiT's recipe that depend on the model size."""

    name: str
    layer_decay: float
    drop_path: float
    epochs: int
    warmup_epochs: float


# SLIP's fine-tuning (BEiT's recipe): ViT-S/B 100 epochs (20 warm-up), layer decay 0.65; ViT-L
# 50 epochs (5 warm-up), layer decay 0.75; drop path 0.1 except for ViT-S. ResNets (any depth):
# no layer decay, and timm's ResNet Strikes Back drop path (0.05) and warm-up (5 epochs).
RECIPES: dict[str, Recipe] = {
    "vit_s": Recipe("vit_s", layer_decay=0.65, drop_path=0.0, epochs=100, warmup_epochs=20),
    "vit_b": Recipe("vit_b", layer_decay=0.65, drop_path=0.1, epochs=100, warmup_epochs=20),
    "vit_l": Recipe("vit_l", layer_decay=0.75, drop_path=0.1, epochs=50, warmup_epochs=5),
    "resnet": Recipe("resnet", layer_decay=1.0, drop_path=0.05, epochs=100, warmup_epochs=5),
}


def recipe_for_width(width: int, kind: str = "vit") -> Recipe:
    """The recipe of the tower: a ResNet's (``kind="resnet"``) whatever its width, else the ViT
    size with this width: <= 384 ViT-S (also the tiny test model), <= 768 ViT-B, wider ViT-L."""
    if kind == "resnet":
        return RECIPES["resnet"]
    if width <= 384:
        return RECIPES["vit_s"]
    if width <= 768:
        return RECIPES["vit_b"]
    return RECIPES["vit_l"]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run. ``None`` fields are filled by :meth:`resolve` from
    the recipe of the tower's size (and ``lr`` from ``base_lr`` and ``batch_size``)."""

    checkpoint: str  # pretrained checkpoint (slip's, SLIP's released ones, or a fine-tuned one)
    catalog: str  # dataset catalog JSON (see zero_shot/catalog.example.json)
    benchmark: str  # catalog / benchmarks.json key, e.g. imagenet
    output_dir: str
    epochs: int | None = None
    warmup_epochs: float | None = None
    batch_size: int = 1024  # global: ranks x accumulation micro-batches
    accum_steps: int = 1
    lr: float | None = None  # peak lr; None: base_lr * batch_size / 1024
    base_lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_lr: float = 0.0  # lr at step 0 (BEiT's warm-up starts at 0)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None
    drop_path: float | None = None
    clip_grad: float | None = None  # max gradient norm; None: no clipping (BEiT's default)
    mixup: float = 0.8  # mixup alpha; 0 with cutmix 0 disables mixing
    cutmix: float = 1.0  # cutmix alpha
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # timm turns it off when RandAugment is on (as in BEiT)
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    crop_pct: float = 224 / 256  # evaluation: resize to size / crop_pct, centre crop
    interpolation: str = "bicubic"
    seed: int = 0
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | fp32
    workers: int = 8  # loader processes per rank
    eval_batch_size: int = 256
    eval_every: int = 5  # epochs between evaluations (0: only at the end)
    save_every: int = 1  # epochs between checkpoints
    save_every_steps: int | None = None  # also save every this many steps
    keep_last: int = 2
    log_every: int = 20  # steps
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans epochs
    max_nonfinite: int = 5  # consecutive non-finite losses (updates skipped) before the run stops

    def resolve(self, tower: int | VisionConfig) -> "FinetuneConfig":
        """A copy with the recipe defaults of the tower (a :class:`VisionConfig`, or the width of
        a ViT) filled in, validated."""
        recipe = (recipe_for_width(tower.width, tower.kind) if isinstance(tower, VisionConfig)
                  else recipe_for_width(tower))
        out = dataclasses.replace(
            self,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            warmup_epochs=recipe.warmup_epochs if self.warmup_epochs is None else self.warmup_epochs,
            layer_decay=recipe.layer_decay if self.layer_decay is None else self.layer_decay,
            drop_path=recipe.drop_path if self.drop_path is None else self.drop_path,
            lr=self.base_lr * self.batch_size / REFERENCE_BATCH if self.lr is None else self.lr,
            betas=tuple(self.betas),
        )
        out.validate()
        return out

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise FinetuneError(message)

        need(self.epochs is not None and self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.warmup_epochs is not None and 0 <= self.warmup_epochs < self.epochs,
             f"warmup_epochs must lie in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        need(self.batch_size >= 1 and self.accum_steps >= 1, "batch_size and accum_steps must be positive")
        need(self.layer_decay is not None and 0 < self.layer_decay <= 1, "layer_decay must lie in (0, 1]")
        need(self.drop_path is not None and 0 <= self.drop_path < 1, "drop_path must lie in [0, 1)")
        need(self.lr is not None and self.lr > 0, "the learning rate must be positive")
        need(0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)")
        need(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be 0 or more")
        need(0 <= self.reprob <= 1, "reprob must lie in [0, 1]")
        need(self.precision in ("auto", "bf16", "fp16", "fp32"),
             f"precision {self.precision!r} is not auto|bf16|fp16|fp32")
        need(self.workers >= 0, "workers must be 0 or more")
        need(self.eval_every >= 0 and self.save_every >= 1 and self.keep_last >= 1 and self.log_every >= 1,
             "eval_every >= 0, save_every >= 1, keep_last >= 1 and log_every >= 1 are required")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1")
        need(self.max_nonfinite >= 1, "max_nonfinite must be at least 1")
        need(self.save_every_steps is None or self.save_every_steps >= 1, "save_every_steps must be at least 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


# Settings that may change when a run resumes: where files are and how often things are logged,
# saved and evaluated, how data is read, and where to stop. Everything else defines the run.
_RESUMABLE = frozenset({"checkpoint", "catalog", "output_dir", "device", "workers", "eval_batch_size",
                        "eval_every", "save_every", "save_every_steps", "keep_last", "log_every", "max_steps",
                        "max_nonfinite"})


def _run_defining_changes(saved: dict, current: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in _RESUMABLE and saved.get(k) != current.get(k)]


# --- model --------------------------------------------------------------------------------


def _is_resnet(vision: VisionConfig) -> bool:
    return vision.kind == "resnet"


def timm_architecture(vision: VisionConfig) -> str | None:
    """The registered timm model a ResNet tower is (``resnet{depth}``); None for a ViT, which
    :func:`timm_kwargs` describes whole for ``VisionTransformer``."""
    return f"resnet{vision.depth}" if _is_resnet(vision) else None


def _default_pool(vision: VisionConfig) -> str:
    return "avg" if _is_resnet(vision) else "token"


def _head_prefix(vision: VisionConfig) -> str:
    """The classifier's parameter prefix in timm: ``fc.`` of a ResNet, ``head.`` of a ViT."""
    return "fc." if _is_resnet(vision) else "head."


def timm_kwargs(vision: VisionConfig, num_classes: int, drop_path_rate: float = 0.0,
                global_pool: str | None = None) -> dict:
    """Keyword arguments of timm's ``VisionTransformer`` for a slip tower with a classifier, all
    plain values (:func:`slip.models.model.vit_args`; a LayerNorm eps other than timm's is not
    among them, see the module doc); for a ResNet tower those of
    ``timm.create_model(timm_architecture(vision), ...)``. ``global_pool``: the ViT's class token
    (``"token"``) or the ResNet's global average pool (``"avg"``) unless given.

    The other arguments keep timm's defaults, which are what slip's towers are built with
    (``SLIPModel``), so the tower's state dict loads without renaming.
    """
    pool = global_pool or _default_pool(vision)
    if _is_resnet(vision):
        return {"num_classes": num_classes, "global_pool": pool, "drop_path_rate": drop_path_rate}
    from ..models.model import vit_args

    return {**vit_args(vision), "num_classes": num_classes, "global_pool": pool,
            "drop_path_rate": drop_path_rate}


def build_classifier(vision: VisionConfig, num_classes: int, drop_path_rate: float = 0.0,
                     global_pool: str | None = None) -> nn.Module:
    """A freshly initialised timm classifier (see :func:`timm_kwargs`): a ViT with the tower's
    LayerNorm eps, or timm's ``resnet{depth}``."""
    if _is_resnet(vision):
        import timm

        return timm.create_model(timm_architecture(vision), pretrained=False,
                                 **timm_kwargs(vision, num_classes, drop_path_rate, global_pool))
    from ..models.model import build_vit

    return build_vit(vision, num_classes=num_classes, global_pool=global_pool or _default_pool(vision),
                     drop_path_rate=drop_path_rate)


def _init_head(model: nn.Module, std: float) -> None:
    # A near-zero head starts every class at the same logit, so early gradients flow into the
    # tower through a well-conditioned softmax instead of a random projection (BEiT, MAE).
    head = model.get_classifier()  # a ViT's head, a ResNet's fc
    nn.init.trunc_normal_(head.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(head.bias)


def _tower_from_file(path: str | os.PathLike) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(tower config, tower state dict with timm's key names) of any supported checkpoint.

    A slip or released SLIP checkpoint gives its ``visual.*`` weights (a ViT's or a ResNet's); a
    fine-tuned checkpoint (:data:`FINETUNE_FORMAT`) gives its classifier's weights without the head.
    """
    try:
        ckpt: LoadedCheckpoint = read_checkpoint(path)
    except CheckpointError as err:
        try:
            tuned = read_finetuned(path)
        except FinetuneError:
            raise err from None  # neither kind: the pretrained reader's message is the useful one
        vision = VisionConfig(**tuned["model"]["vision"])
        head = _head_prefix(vision)
        return vision, {k: v for k, v in tuned["state_dict"].items() if not k.startswith(head)}
    prefix = "visual."
    state = {k[len(prefix):]: v for k, v in ckpt.state_dict.items() if k.startswith(prefix)}
    return ckpt.arch.vision, state


def _classifier_from_tower(vision: VisionConfig, state: dict[str, torch.Tensor], num_classes: int,
                           drop_path_rate: float, head_init_std: float, source: object) -> nn.Module:
    model = build_classifier(vision, num_classes, drop_path_rate)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_head_prefix(vision))]
    if missing or unexpected:
        what = timm_architecture(vision) or "ViT"
        raise CheckpointError(f"{source}: the image tower does not fit a timm {what} of {vision}: "
                              f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    _init_head(model, head_init_std)
    return model


def classifier_from_checkpoint(path: str | os.PathLike, num_classes: int, drop_path_rate: float = 0.0,
                               head_init_std: float = HEAD_INIT_STD) -> tuple[nn.Module, VisionConfig]:
    """The tower of the checkpoint at ``path`` with a new ``num_classes`` head.

    Every tower parameter must load (a mismatch is an error naming the keys); the head is the
    only new part, initialised with ``trunc_normal(std=head_init_std)`` and a zero bias, from
    torch's global RNG (seed it for a reproducible head).
    """
    vision, state = _tower_from_file(path)
    return _classifier_from_tower(vision, state, num_classes, drop_path_rate, head_init_std, path), vision


def read_finetuned(path: str | os.PathLike) -> dict:
    """Open a fine-tuned checkpoint (weights-only unpickling) and check its format."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FinetuneError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # unpickling errors: not a file this module wrote
        raise FinetuneError(f"{path}: not a readable fine-tuned checkpoint ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FINETUNE_FORMAT:
        raise FinetuneError(f"{path}: not a {FINETUNE_FORMAT} checkpoint (nor a pretrained one slip can read)")
    return obj


def load_finetuned(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """A fine-tuned classifier in eval mode on ``device`` and its evaluation transform."""
    ckpt = read_finetuned(path)
    info = ckpt["model"]
    model = build_classifier(VisionConfig(**info["vision"]), info["num_classes"], 0.0, info.get("global_pool"))
    model.load_state_dict(ckpt["state_dict"])
    cfg = ckpt.get("config", {})
    transform = build_eval_transform(ckpt["model"]["vision"]["image_size"], cfg.get("crop_pct", 224 / 256),
                                     cfg.get("interpolation", "bicubic"))
    return model.to(device).eval(), transform


# --- data ---------------------------------------------------------------------------------


def build_train_transform(cfg: FinetuneConfig, image_size: int) -> Callable:
    """timm's ImageNet training transform with the recipe's augmentation (PIL -> tensor)."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=image_size, is_training=True, color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment, interpolation=cfg.interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def _posterize(img, bits_to_keep: int, **_):
    """Posterize, where keeping no bits gives a black image.

    RandAugment's ``PosterizeIncreasing`` at the top magnitude (10, reached by ``mstd0.5`` noise
    around 9 in ~2% of draws) keeps 0 bits. Pillow < 11 returned a black image for that, which is
    what BEiT and SLIP trained with; Pillow >= 11 raises ``ValueError``, which would crash a
    loader worker a few times per ImageNet epoch. This restores the old result.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: Any) -> None:
    """Route the posterize ops of timm's (Rand)Augment policies in ``transform`` through
    :func:`_posterize` (only this transform's op objects are changed, not timm)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        stack.extend(getattr(t, "transforms", []) or [])  # Compose
        for op in getattr(t, "ops", []) or []:  # RandAugment
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize
        for sub in getattr(t, "policy", []) or []:  # AutoAugment: sub-policies of ops
            for op in sub:
                if str(getattr(op, "name", "")).startswith("Posterize"):
                    op.aug_fn = _posterize


def build_eval_transform(image_size: int, crop_pct: float = 224 / 256, interpolation: str = "bicubic") -> Callable:
    """Resize the shorter side to ``floor(image_size / crop_pct)``, centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(input_size=image_size, is_training=False, interpolation=interpolation,
                            crop_pct=crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's CPU RNG for the block, then put their states back.

    timm's transforms draw from all three (crop and RandAugment from ``random``, RandAugment's op
    choice from numpy, flip and erasing from torch). Putting the states back keeps the caller's
    streams (mixup, drop path) independent of how many images were loaded in this process.
    Only the CPU generator is touched: ``torch.manual_seed`` would also reseed CUDA's.
    """
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


class SeededAugmentation(Dataset):
    """Items ``(image, label, replaced)`` whose random augmentation is keyed by
    (seed, epoch, index), so they are the same in any worker, any number of workers and after a
    resume. An unreadable image (``None`` from slip's datasets) is replaced by the next readable
    one, so every batch keeps its size (ranks of a DDP run must agree); ``replaced`` counts the
    unreadable images skipped for this item.
    """

    def __init__(self, dataset: Dataset, seed: int, max_tries: int = 16) -> None:
        self.dataset, self.seed, self.max_tries, self.epoch = dataset, seed, max_tries, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def item_seed(self, index: int, attempt: int = 0) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, index, attempt]).generate_state(1, np.uint64)[0])

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        n = len(self)
        for attempt in range(min(self.max_tries, n)):
            with _seeded_rngs(self.item_seed(index, attempt)):
                item = self.dataset[(index + attempt) % n]
            if item is not None:
                image, label = item
                return image, int(label), attempt
        raise RuntimeError(f"{self.max_tries} unreadable images in a row from index {index}; check the dataset")


class _SkipFirst(Sampler[int]):
    """The indices of ``sampler`` after its first ``skip`` (resuming in the middle of an epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


# --- optimisation -------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (timm): param group ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer_id)`` with layer ids 0 for the patch embedding,
    positional embedding and class token, ``i + 1`` for block ``i`` (the final norm shares the last
    block's), ``depth + 1`` for the head. A ResNet's layer ids (timm's ``group_matcher``): 0 for
    the stem (``conv1``, ``bn1``), ``i + 1`` for the ``i``-th residual block over all stages, the
    last for ``fc``. No weight decay on 1-D parameters (biases, norms, BatchNorm), ``pos_embed``
    and ``cls_token``."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    """Per-step schedule (call ``step_update(step)`` before each update): linear warm-up from
    ``warmup_lr`` over ``warmup_epochs``, then cosine to ``min_lr`` at the last step; timm
    multiplies each group's value by its ``lr_scale``."""
    from timm.scheduler import CosineLRScheduler

    total = steps_per_epoch * cfg.epochs
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False)


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's batch-wise Mixup/CutMix producing label-smoothed soft targets, or None when off."""
    if not cfg.mixup_active:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    """Soft-target cross-entropy with mixup (its targets are already smoothed), else
    label-smoothing cross-entropy, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


# --- checkpoints --------------------------------------------------------------------------


class _FinetuneCheckpoints(CheckpointManager):
    """The training checkpoints' file layout and pruning, holding fine-tuned classifiers."""

    def _write(self, module, path: Path, /, **state) -> None:
        _save_finetuned(module, path, **state)

    def latest(self):  # type: ignore[override]
        for path in reversed(self.paths()):
            try:
                return read_finetuned(path), path
            except FinetuneError as e:
                logger.warning("skipping unreadable checkpoint: %s", e)
        return None


def _save_finetuned(module: nn.Module, path: Path, **extra) -> None:
    module = getattr(module, "module", module)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FINETUNE_FORMAT, "state_dict": state, **extra}, tmp)


# --- the run ------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    benchmark: str
    metric: str
    value: float  # the metric of the final model on the test split, in percent
    best: dict  # {"value", "epoch", "step"} over all evaluations of the run
    step: int
    epochs_done: float
    checkpoint: Path | None  # finetuned.pt (weights and metadata only)
    results_path: Path | None
    n: int = 0
    skipped: int = 0
    history: list = field(default_factory=list)


def _load_datasets(cfg: FinetuneConfig, train_transform: Callable, eval_transform: Callable):
    from zero_shot import benchmarks_with_catalog, load_catalog

    from .datasets import build_dataset

    catalog = load_catalog(cfg.catalog)
    benchmarks = benchmarks_with_catalog(catalog, cfg.catalog)
    if cfg.benchmark not in benchmarks:
        raise FinetuneError(f"unknown benchmark {cfg.benchmark!r}; known: {', '.join(benchmarks)}")
    bench = benchmarks[cfg.benchmark]
    if bench.metric in _MULTILABEL_METRICS:
        raise FinetuneError(f"{cfg.benchmark} is multi-label ({bench.metric}); fine-tuning trains a softmax classifier")
    if cfg.benchmark not in catalog:
        raise FinetuneError(f"benchmark {cfg.benchmark!r} has no entry in {cfg.catalog}")
    entry = catalog[cfg.benchmark]
    train = build_dataset(cfg.benchmark, entry, "train", train_transform, bench)
    test = build_dataset(cfg.benchmark, entry, "test", eval_transform, bench)
    return bench, train, test


class FinetuneStopped(RunStopped):
    """The run stopped on purpose (a non-finite loss); the message says why and what is intact."""


def _first_names(classnames) -> list[str]:
    return [c if isinstance(c, str) else c[0] for c in classnames]


class Finetuner:
    """Builds model, data, optimizer and schedule from a :class:`FinetuneConfig`; see :meth:`run`.

    Under ``torchrun`` every rank builds one (the process group is joined here). An output
    directory that already holds checkpoints of this run is resumed from its newest one.
    """

    def __init__(self, cfg: FinetuneConfig, *, log_stream=None) -> None:
        try:
            self.rt = runtime.start(cfg.device, cfg.precision)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
        self.rank, self.world, self.device = self.rt.rank, self.rt.world, self.rt.device
        self.output_dir = Path(cfg.output_dir)
        self.checkpoints = _FinetuneCheckpoints(self.output_dir, cfg.keep_last)
        if D.is_main_process():
            self.checkpoints.remove_stale_temporaries()
        D.barrier()
        self._found = self.checkpoints.latest()
        tower_state: dict | None = None
        if self._found is not None:
            # Resuming: the architecture and weights come from the run's own checkpoint; the
            # pretrained file is not read again (it may have moved).
            saved, path = self._found
            vision = VisionConfig(**saved["model"]["vision"])
        else:
            vision, tower_state = _tower_from_file(cfg.checkpoint)
        self.vision = vision
        self.cfg = cfg = cfg.resolve(vision)
        if self._found is not None:
            changed = _run_defining_changes(saved.get("config", {}), cfg.to_dict())
            if changed:
                raise FinetuneError(f"{path}: {self.output_dir} holds a run with other settings "
                                    f"({'; '.join(changed)}); resume with the same settings or use another "
                                    "output directory")

        per_rank, rem = divmod(cfg.batch_size, self.world * cfg.accum_steps)
        if rem or per_rank < 1:
            raise FinetuneError(f"batch_size {cfg.batch_size} is not divisible by {self.world} ranks x "
                                f"{cfg.accum_steps} accumulation steps")
        if cfg.mixup_active and per_rank % 2:
            raise FinetuneError(f"mixup/cutmix pair up images within a micro-batch, which must be even; "
                                f"it is {per_rank} (batch_size / ranks / accum_steps)")
        self.micro_batch = per_rank
        self.rank_batch = per_rank * cfg.accum_steps

        self.benchmark, train_set, self.test_set = _load_datasets(
            cfg, build_train_transform(cfg, vision.image_size),
            build_eval_transform(vision.image_size, cfg.crop_pct, cfg.interpolation))
        self.num_classes = self.benchmark.num_classes
        if self._found is not None and saved["model"]["num_classes"] != self.num_classes:
            raise FinetuneError(f"{path}: the checkpoint has {saved['model']['num_classes']} classes, "
                                f"{cfg.benchmark} has {self.num_classes}")
        self.train_set = SeededAugmentation(train_set, cfg.seed)
        # DistributedSampler in one process too: its shuffle is keyed by (seed, epoch), never by
        # the global RNG, and its rank slices make the union of the ranks' batches of a step
        # the single-process batch of that step.
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = len(self.sampler) // self.rank_batch
        if self.steps_per_epoch < 1:
            raise FinetuneError(f"the train split has {len(self.train_set)} images, fewer than one global batch "
                                f"of {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.last_step = min(self.total_steps, cfg.max_steps or self.total_steps)

        runtime.seed_everything(cfg.seed)  # the same head on every rank
        if self._found is not None:
            model = build_classifier(vision, self.num_classes, cfg.drop_path)
        else:
            model = _classifier_from_tower(vision, tower_state, self.num_classes, cfg.drop_path,
                                           HEAD_INIT_STD, cfg.checkpoint)
        del tower_state
        self.model = model.to(self.device)
        if self.world > 1 and vision.has_batchnorm:
            from ..models.batchnorm import sync_batchnorm

            # statistics over the micro-batch of every rank (the weights and their Parameters kept)
            self.model = sync_batchnorm(self.model, self.device).to(self.device)
        # Per-rank streams for mixup and drop path (different draws on every rank, as in BEiT).
        runtime.seed_everything(cfg.seed + self.rank)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = self.rt.grad_scaler()
        self.mixup = build_mixup(cfg, self.num_classes)
        self.criterion = build_criterion(cfg)
        self.forward_model = self.rt.ddp(self.model)
        self.log = MetricLogger(self.output_dir, enabled=D.is_main_process(), stream=log_stream,
                                total_steps=self.last_step)
        self.step = 0
        self.nonfinite = NonFiniteGuard(cfg.max_nonfinite, str(self.checkpoints.dir), FinetuneStopped,
                                        "max_nonfinite")
        self.history: list[dict] = []
        self.skipped_images = 0
        self._saved_step: int | None = None

    # ----------------------------------------------------------------------------------
    def model_info(self) -> dict:
        """What is needed to rebuild the classifier with plain timm (stored in checkpoints)."""
        info = {
            "vision": dataclasses.asdict(self.vision), "num_classes": self.num_classes,
            "global_pool": _default_pool(self.vision), "timm_kwargs": timm_kwargs(self.vision, self.num_classes, 0.0),
            "classnames": _first_names(self.benchmark.classnames),
        }
        if _is_resnet(self.vision):  # timm.create_model(architecture, **timm_kwargs)
            info["architecture"] = timm_architecture(self.vision)
        return info

    def _epoch_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)  # a new loader per epoch: workers get the new epoch
        sampler: Sampler[int] = self.sampler
        if skip_batches:
            sampler = _SkipFirst(self.sampler, skip_batches * self.rank_batch)
        # Worker seeds are drawn from this generator instead of the global RNG, so making a
        # loader leaves the training streams alone (augmentation is seeded per image anyway).
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return DataLoader(self.train_set, batch_size=self.rank_batch, sampler=sampler,
                          num_workers=self.cfg.workers, drop_last=True, generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, replaced: torch.Tensor) -> dict:
        self.scheduler.step_update(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.cfg.accum_steps
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            # Gradients are all-reduced once, on the last micro-batch.
            sync = (self.forward_model.no_sync() if i < accum - 1 and self.forward_model is not self.model
                    else contextlib.nullcontext())
            with sync:
                with self.rt.autocast():
                    logits = self.forward_model(x)
                loss = self.criterion(logits.float(), y)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        # One collective: the global mean loss, whether every rank's loss is finite, skips.
        stats = torch.stack([torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0),
                             torch.isfinite(total).float(), replaced.sum().to(total)])
        D.all_reduce_(stats)
        if not self.nonfinite.record(bool(stats[1].item() >= self.world), self.step):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return {"loss": float(stats[0]) / self.world, "replaced": int(stats[2])}

    # ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The benchmark's metric (and top-1) of the current model on the test split, every rank
        scoring its share of the images; the same dict on every rank."""
        from .datasets import make_eval_loader
        from .metrics import compute_metric
        from .zero_shot import compute_benchmark_metric, run_image_model

        model = self.model

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            with self.rt.autocast():
                return model(x).float()

        # Making a loader draws a seed from the global RNG; evaluating must not move the
        # training streams, or a run evaluated at other steps would train differently.
        with torch.random.fork_rng(devices=[]):
            loader = make_eval_loader(self.test_set, self.cfg.eval_batch_size, self.cfg.workers,
                                      self.rank, self.world)
            logits, labels, skipped = run_image_model(model, loader, logits_of, self.device,
                                                      desc=f"{self.cfg.benchmark} test")
        if len(labels) == 0:
            raise FinetuneError(f"{self.cfg.benchmark}: no readable test images ({skipped} skipped)")
        return {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "metric": self.benchmark.metric,
            "value": compute_benchmark_metric(self.benchmark.metric, logits, labels),
            "top1": compute_metric("top1", logits, labels), "n": int(len(labels)), "skipped": int(skipped),
        }

    def _record(self, result: dict) -> dict:
        self.history.append(result)
        self.log.log({k: v for k, v in result.items() if k != "step"}, self.step, kind="eval")
        return result

    # ----------------------------------------------------------------------------------
    def save(self) -> Path:
        """A step checkpoint (collective: every rank contributes its RNG state)."""
        ranks = D.all_gather_object({"rng": rng_state()})
        path = self.checkpoints.path_for(self.step)
        if D.is_main_process():
            path = self.checkpoints.save(
                self.model, self.step, model=self.model_info(), config=self.cfg.to_dict(),
                benchmark=self.cfg.benchmark, epoch=self.step // self.steps_per_epoch,
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(), world_size=self.world, ranks=ranks,
                history=self.history, skipped_images=self.skipped_images, **self.nonfinite.state_dict())
        D.barrier()
        self._saved_step = self.step
        return path

    def try_resume(self) -> bool:
        if self._found is None:
            return False
        saved, path = self._found
        self._found = None  # the big dicts are not kept around
        self.model.load_state_dict(saved["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step = self._saved_step = int(saved["step"])
        self.history = list(saved.get("history", []))
        self.skipped_images = int(saved.get("skipped_images", 0))
        self.nonfinite.load_state_dict(saved)
        if saved["world_size"] == self.world:
            set_rng_state(saved["ranks"][self.rank]["rng"])
            how = "exact RNG state restored"
        else:
            # Other ranks draw other mixup / drop-path numbers: reseed, keyed by the step.
            runtime.seed_everything(self.cfg.seed + self.rank + 7919 * self.step)
            how = f"world size changed {saved['world_size']} -> {self.world}: RNG reseeded"
        self.log.message(f"resumed from {path} at step {self.step} ({how})")
        return True

    # ----------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        cfg = self.cfg
        if D.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.try_resume()
        n_params = sum(p.numel() for p in self.model.parameters())
        v = self.vision
        tower = f"a ResNet-{v.depth} (timm resnet{v.depth}" if _is_resnet(v) else f"a ViT (width {v.width}, depth {v.depth}"
        self.log.message(
            f"fine-tuning {tower}, {n_params / 1e6:.1f}M parameters) on "
            f"{cfg.benchmark} ({self.num_classes} classes, {len(self.train_set)} train / {len(self.test_set)} test "
            f"images) on {self.world} x {self.device.type}; global batch {cfg.batch_size} ({self.micro_batch} per "
            f"rank x {cfg.accum_steps} accumulation), lr {cfg.lr:.3g}, layer decay {cfg.layer_decay}, drop path "
            f"{cfg.drop_path}, {cfg.epochs} epochs ({cfg.warmup_epochs} warm-up) of {self.steps_per_epoch} steps; "
            f"steps {self.step}->{self.last_step} of {self.total_steps}")
        spe = self.steps_per_epoch
        last_loss = float("nan")
        try:
            window_start, window_steps = time.perf_counter(), 0
            run_start, start_step = time.perf_counter(), self.step
            while self.step < self.last_step:
                epoch, offset = divmod(self.step, spe)
                for images, labels, replaced in self._epoch_loader(epoch, offset):
                    out = self._train_step(images, labels, replaced)
                    last_loss = out["loss"]
                    self.skipped_images += out["replaced"]
                    self.step += 1
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self.step == self.last_step:
                        now = time.perf_counter()
                        rate = window_steps * cfg.batch_size / max(now - window_start, 1e-9)
                        eta = (now - run_start) / max(self.step - start_step, 1) * (self.last_step - self.step)
                        self.log.log({"loss": last_loss, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                                      "epoch": round(self.step / spe, 4), "samples_per_s": round(rate, 2),
                                      "skipped_images": self.skipped_images, "skipped_updates": self.nonfinite.skipped,
                                      "eta": format_duration(eta)}, self.step)
                        window_start, window_steps = now, 0
                    if self.step == self.last_step:
                        break
                    if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                        self.save()
                if self.step % spe == 0 and self.step < self.last_step:
                    done = self.step // spe
                    if cfg.eval_every and done % cfg.eval_every == 0:
                        self._record(self.evaluate())
                    if done % cfg.save_every == 0 and self._saved_step != self.step:
                        self.save()
            if not self.history or self.history[-1]["step"] != self.step:
                self._record(self.evaluate())
            if self._saved_step != self.step or not self.checkpoints.paths():
                self.save()
            final = self.history[-1]
            best = max(self.history, key=lambda r: r["value"])
            finetuned = self.output_dir / "finetuned.pt"
            results_path = self.output_dir / "results.json"
            if D.is_main_process():
                _save_finetuned(self.model, finetuned, model=self.model_info(), config=self.cfg.to_dict(),
                                benchmark=cfg.benchmark, step=self.step, epoch=self.step / spe, result=final,
                                pretrained=str(cfg.checkpoint))
                report = {
                    "benchmark": cfg.benchmark, "name": self.benchmark.name, "metric": final["metric"],
                    "value": final["value"], "top1": final["top1"], "n": final["n"], "skipped": final["skipped"],
                    "best": {k: best[k] for k in ("value", "epoch", "step")}, "step": self.step,
                    "epochs_done": self.step / spe, "total_steps": self.total_steps,
                    "checkpoint": str(finetuned), "pretrained": str(cfg.checkpoint),
                    "skipped_train_images": self.skipped_images, "history": self.history, "config": cfg.to_dict(),
                }
                atomic_write_text(results_path, json.dumps(report, indent=2) + "\n")
            D.barrier()
        finally:
            self.log.close()
        return FinetuneResult(
            benchmark=cfg.benchmark, metric=final["metric"], value=final["value"],
            best={k: best[k] for k in ("value", "epoch", "step")}, step=self.step, epochs_done=self.step / spe,
            checkpoint=finetuned, results_path=results_path, n=final["n"], skipped=final["skipped"],
            history=list(self.history))


def finetune(cfg: FinetuneConfig, *, log_stream=None) -> FinetuneResult:
    """Fine-tune with ``cfg`` (resuming from ``cfg.output_dir`` when it holds checkpoints)."""
    return Finetuner(cfg, log_stream=log_stream).run()
