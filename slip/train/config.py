"""Typed training configuration: dataclass defaults <- YAML recipe(s) <- ``key=value`` overrides.

A recipe may start with ``base: other.yaml`` (or a list), merged first, so recipes hold only
their differences. Unknown keys, wrong types and impossible combinations fail here, before
any heavy work, with a message naming the key (and the file it came from).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message names the key."""


@dataclass
class SSLHeadSettings:
    """Changes to the preset's SSL head (slip.models.SSLHeadConfig); None keeps the preset's
    value, or the method's own default (MoCo v2's queue, SwAV's prototypes)."""

    mlp_dim: int | None = None  # hidden width of the projector / predictor
    out_dim: int | None = None  # SSL embedding size
    prototypes: int | None = None  # SwAV: number of prototypes
    queue_size: int | None = None  # MoCo v2: keys in the queue; SwAV: past embeddings per large crop (0: none)
    patch_grid: int | None = None  # CPC v2: patches per side of the patch grid (7 in the paper)

    def given(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ModelConfig:
    name: str = "slip_vit_b16"  # a name from slip.list_models(): tower sizes and SSL head shape
    ssl_head: SSLHeadSettings = field(default_factory=SSLHeadSettings)
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    compile: bool = False  # torch.compile the model
    freeze_patch_embed: bool = False  # keep the ViT's patch projection fixed (MoCo v3's stability trick)
    text_truncation: str = "keep_eot"  # captions over 77 tokens: keep_eot (EOT kept last) | slip (SLIP's: EOT dropped)


@dataclass
class ObjectiveConfig:
    clip: bool = True  # the image-text contrastive branch
    ssl: str = "simclr"  # self-supervised branch: simclr | mocov2 | mocov3 | byol | swav | pirl | amdim | cpc | yadim | beit | none (slip.ssl registry)
    ssl_scale: float = 1.0  # loss = clip_loss + ssl_scale * ssl_loss
    ssl_temperature: float | None = None  # None: the method's (SimCLR 0.1, MoCo v3 0.2, PIRL 0.07)
    momentum: float | None = None  # EMA momentum at step 0 for momentum methods; None: the method's
    tokenizer: str | None = None  # BEiT's visual tokenizer: a FLAVA codebook directory or a k-means file
    mask_ratio: float = 0.4  # BEiT: fraction of patches masked (in blocks); 75/196 reproduces BEiT's code
    gather: str = "with_grad"  # CLIP loss over ranks: with_grad (= one big batch) | slip (SLIP's no-grad gather)
    # SwAV (Caron et al. 2020 and its main_swav.py): Sinkhorn-Knopp's entropy weight and
    # iterations, epochs with the prototypes frozen, and the epoch its queue (ssl_head.queue_size) starts filling
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0
    queue_start_epoch: float = 0.0
    # RELICv2 (Tomasev et al. 2022, arXiv 2201.05119, its pseudocode's loss_relicv2(online, target,
    # n_e)): the weight beta of the KL invariance term and n_e, the negatives drawn per anchor from
    # the global batch (see slip/ssl/relicv2.py for where the defaults come from)
    relic_beta: float = 1.0
    relic_negatives: int = 10
    # p_m: the probability that a large crop is cut from the background-removed image (the
    # pseudocode's saliency masking; the mask from data.saliency)
    relic_saliency_p: float = 0.1
    # PIRL (Misra & van der Maaten 2020, Sec. 3.2-4.1, slip/ssl/pirl.py): negatives drawn from the
    # memory bank per step (32,000), the weight lambda of the jigsaw term (0.5), and the weight
    # of a bank row's old value in its update m <- normalize(w m + (1 - w) f) (0.5)
    nce_negatives: int = 32000
    pirl_lambda: float = 0.5
    bank_momentum: float = 0.5
    # AMDIM (Bachman et al. 2019, slip/ssl/amdim.py; recalled from its released code, not verified
    # against the paper's text): c of the scores' soft clipping c * tanh(s / c) (its --tclip 20),
    # and the weight of the squared-score penalty on the unclipped scores s = g . l / sqrt(D) (5e-2)
    amdim_clip: float = 20.0
    amdim_reg_weight: float = 5e-2


@dataclass
class DataConfig:
    train: str = ""  # shard spec: brace pattern, directory, index.json, or weighted mix
    samples_per_epoch: int | None = None  # None: the shards' index total
    resampled: bool = False  # sample shards with replacement (infinite stream; for many nodes)
    workers: int = 4  # dataloader worker processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling, per worker
    image_size: int | None = None  # None: the model's input size
    decode: str = "auto"  # workers | device (JPEGs decoded on the training device) | auto: device on GPUs
    # saliency-masked views (RELICv2): auto (a sample's own {key}.mask.png, else the spectral-residual
    # estimate) | estimate (always the estimate); see slip/data/saliency.py
    saliency: str = "auto"
    # Studies (slip.data.degrade): keep only the samples whose key hashes below this fraction of
    # (0, 1] (nested subsets, the same in every run); an epoch counted from the index shrinks with it
    subset: float | None = None
    degrade: str | None = None  # corrupt pre-training images: downsample:K | jpeg:Q | saltpepper:P (+ chains) | none


@dataclass
class OptimConfig:
    # adamw (SLIP's) | adam (L2 weight decay: AMDIM's, and Lightning-Bolts' for CPC v2 and YADIM) |
    # sgd | lars (the ResNet SSL papers': MoCo v2 SGD, SwAV LARS)
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate (after warm-up)
    momentum: float = 0.9  # sgd and lars: heavy-ball momentum (adamw uses betas)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to biases, norms and other 1-D parameters unless decay_1d
    # Weight decay (and, with lars, its adaptation) on 1-D parameters too (biases, norms), as MoCo v2's
    # main_moco.py and SwAV's main_swav.py do (their optimizers take model.parameters()); never on
    # 0-D ones (CLIP's logit scale)
    decay_1d: bool = False
    lars_trust_coeff: float = 1e-3  # lars: the trust coefficient (SwAV's LARC, SimCLR's and timm's 0.001)
    warmup_epochs: float = 1.0
    start_lr: float = 1e-6  # learning rate at step 0, rising linearly to lr
    min_lr: float = 1e-5  # end of the cosine decay
    # After the warm-up: cosine (to min_lr at the end, SLIP's) | multistep (lr times decay_rate once
    # each of decay_epochs has been trained, as torch's MultiStepLR stepped per epoch: AMDIM's)
    schedule: str = "cosine"
    decay_epochs: tuple[float, ...] = ()  # multistep: epochs of training after which the rate drops
    decay_rate: float = 0.1  # multistep: factor applied at each of decay_epochs
    clip_grad_norm: float | None = None


@dataclass
class TrainConfig:
    batch_size: int = 4096  # global: over all ranks and accumulation micro-batches
    epochs: float = 25.0
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans epochs
    accum_steps: int = 1  # micro-batches per step; the contrastive loss still sees the whole batch
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32
    seed: int = 0
    output_dir: str = "runs/slip"
    log_every: int = 10  # steps
    save_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_last: int = 3  # checkpoints kept on disk
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    # Start from these weights (a slip or released SLIP checkpoint, an open_clip folder): every
    # tower tensor must be there with its shape; heads the file lacks (an SSL branch added to a
    # CLIP model) start fresh. A resumed run ignores it (its own checkpoint wins).
    init_from: str | None = None
    # Resuming mid-epoch with another number of ranks (elastic restarts): refuse (the data
    # position of each rank and worker cannot be carried over) | restart_epoch (re-read the epoch)
    world_change: str = "refuse"
    logit_scale_max: float = 100.0


@dataclass
class EvalConfig:
    benchmark: str | None = None  # zero-shot validation: a synthetic benchmark dir, or a catalog key
    catalog: str | None = None  # dataset catalog for catalog keys (e.g. imagenet)
    knn: str | None = None  # k-NN validation of the image tower (any objective): a benchmark dir or catalog key
    knn_k: int = 20  # neighbours that vote
    knn_temperature: float = 0.07  # vote weight exp(cosine / temperature)
    every: int = 0  # steps between validations; 0: only at the end
    batch_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {tp}, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return origin(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix[:-1]}" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys in {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A recipe as a nested dict, with its ``base`` files merged underneath it."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = data.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / base, _seen + (path,)))
    return _merge(merged, data)


def parse_override(text: str) -> dict:
    """``"optim.lr=1e-3"`` -> ``{"optim": {"lr": 0.001}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipe at ``path`` <- overrides, type-checked and validated."""
    values = read_yaml(path) if path is not None else {}
    _fix_yaml_floats(values)
    for text in overrides:
        values = _merge(values, parse_override(text))
    try:
        cfg = _build(Config, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def _fix_yaml_floats(values: dict) -> None:
    # PyYAML follows YAML 1.1, where "1e-3" without a dot is a string; users mean a number.
    for k, v in values.items():
        if isinstance(v, dict):
            _fix_yaml_floats(v)
        elif isinstance(v, str) and _looks_numeric(v) and not v.strip().isdigit():
            values[k] = float(v)


def validate(cfg: Config) -> None:
    """Combinations that cannot work; checked before any model or data is built."""
    from ..models import get_architecture

    try:
        arch = get_architecture(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    from ..losses import GATHER_MODES
    from ..ssl import method_names
    from ..tokenizer import TRUNCATIONS

    if cfg.model.text_truncation not in TRUNCATIONS:
        raise ConfigError(f"model.text_truncation: {cfg.model.text_truncation!r} is not one of "
                          f"{', '.join(TRUNCATIONS)}")
    o = cfg.objective
    if o.gather not in GATHER_MODES:
        raise ConfigError(f"objective.gather: {o.gather!r} is not one of {', '.join(GATHER_MODES)}")
    if o.ssl != "none" and o.ssl not in method_names():
        raise ConfigError(f"objective.ssl: {o.ssl!r} is not one of {', '.join(method_names() + ['none'])}")
    if not o.clip and o.ssl == "none":
        raise ConfigError("objective.clip is false and objective.ssl is none: nothing to train")
    if o.clip and arch.text is None:
        raise ConfigError(f"objective.clip: model {cfg.model.name!r} has no text tower")
    if o.ssl != "none" and arch.ssl_head is None:
        raise ConfigError(f"objective.ssl: model {cfg.model.name!r} has no SSL head for {o.ssl}")
    # Parts of the model no objective trains would sit idle (and DDP refuses unused parameters).
    if not o.clip and arch.text is not None:
        raise ConfigError(f"objective.clip is false but model {cfg.model.name!r} has a text tower; "
                          "pick an image-only model (simclr_*)")
    if o.ssl == "none" and arch.ssl_head is not None:
        raise ConfigError(f"objective.ssl is none but model {cfg.model.name!r} has an SSL head; pick a clip_* model")
    if arch.vision.kind != "vit":
        # A ResNet tower: no patch tokens, and BatchNorm makes features depend on the batch.
        if o.ssl == "beit":
            raise ConfigError(f"objective.ssl: beit masks patch tokens; model {cfg.model.name!r} has a "
                              f"{arch.vision.kind} tower without any (use a ViT model)")
        if cfg.model.freeze_patch_embed:
            raise ConfigError(f"model.freeze_patch_embed: model {cfg.model.name!r} has no patch embedding")
        if cfg.train.accum_steps > 1:
            raise ConfigError(f"train.accum_steps={cfg.train.accum_steps}: model {cfg.model.name!r} has BatchNorm "
                              "in its image tower, so micro-batches would be normalised apart and the step would "
                              "differ from one over the whole batch; use 1 (and model.grad_checkpointing=true "
                              "to save memory)")
    if o.ssl_temperature is not None and o.ssl_temperature <= 0:
        raise ConfigError("objective.ssl_temperature: must be positive")
    if o.momentum is not None and not 0 <= o.momentum < 1:
        raise ConfigError("objective.momentum: must be in [0, 1)")
    if not 0 < o.mask_ratio < 1:
        raise ConfigError("objective.mask_ratio: must be in (0, 1)")
    if o.sinkhorn_epsilon <= 0 or o.sinkhorn_iterations < 1:
        raise ConfigError("objective.sinkhorn_epsilon must be positive and objective.sinkhorn_iterations >= 1")
    if o.freeze_prototypes_epochs < 0 or o.queue_start_epoch < 0:
        raise ConfigError("objective.freeze_prototypes_epochs and objective.queue_start_epoch must be >= 0")
    if o.relic_beta < 0 or o.relic_negatives < 1:
        raise ConfigError("objective.relic_beta must be >= 0 and objective.relic_negatives >= 1")
    if not 0 <= o.relic_saliency_p <= 1:
        raise ConfigError(f"objective.relic_saliency_p: {o.relic_saliency_p} is not a probability in [0, 1]")
    if o.nce_negatives < 1:
        raise ConfigError(f"objective.nce_negatives: must be at least 1, got {o.nce_negatives}")
    if not 0 <= o.pirl_lambda <= 1:
        raise ConfigError(f"objective.pirl_lambda: must be in [0, 1], got {o.pirl_lambda}")
    if not 0 <= o.bank_momentum < 1:
        raise ConfigError(f"objective.bank_momentum: must be in [0, 1), got {o.bank_momentum}")
    if o.amdim_clip <= 0:
        raise ConfigError(f"objective.amdim_clip: must be positive, got {o.amdim_clip}")
    if o.amdim_reg_weight < 0:
        raise ConfigError(f"objective.amdim_reg_weight: must be >= 0, got {o.amdim_reg_weight}")
    head = cfg.model.ssl_head.given()
    if head:
        if arch.ssl_head is None or o.ssl == "none":
            raise ConfigError(f"model.ssl_head: model {cfg.model.name!r} trains no SSL head here")
        try:
            arch.with_ssl_method(o.ssl, **head)
        except ValueError as e:
            raise ConfigError(f"model.ssl_head: {e}") from None
    if o.ssl != "none":
        from ..ssl import method_class

        if method_class(o.ssl).needs_visual_tokenizer and not o.tokenizer:
            raise ConfigError(f"objective.tokenizer: {o.ssl} needs a visual tokenizer (a FLAVA codebook directory, "
                              "or a k-means codebook file from `slip fit-tokenizer`)")
    from .optim import check_optim_config

    check_optim_config(cfg.optim)
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.eval.knn_k < 1 or cfg.eval.knn_temperature <= 0:
        raise ConfigError(f"eval.knn_k must be >= 1 and eval.knn_temperature > 0, got {cfg.eval.knn_k} and "
                          f"{cfg.eval.knn_temperature}")
    if t.world_change not in ("refuse", "restart_epoch"):
        raise ConfigError(f"train.world_change: {t.world_change!r} is not one of refuse, restart_epoch")
    for key in ("batch_size", "accum_steps", "log_every", "save_every", "keep_last", "max_nonfinite"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1")
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by train.accum_steps {t.accum_steps}")
    if t.epochs <= 0:
        raise ConfigError("train.epochs: must be positive")
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr: must be positive")
    if cfg.data.workers < 0:
        raise ConfigError("data.workers: must be 0 or more")
    if cfg.data.decode not in ("auto", "workers", "device"):
        raise ConfigError(f"data.decode: {cfg.data.decode!r} is not one of auto, workers, device")
    if cfg.data.saliency not in ("auto", "estimate"):
        raise ConfigError(f"data.saliency: {cfg.data.saliency!r} is not one of auto, estimate")
    from ..data.degrade import DegradeError, check_subset, parse_degradations

    try:
        if cfg.data.subset is not None:
            check_subset(cfg.data.subset)
        parse_degradations(cfg.data.degrade)
    except DegradeError as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.benchmark is None and cfg.eval.knn is None and cfg.eval.every:
        raise ConfigError("eval.every is set but neither eval.benchmark nor eval.knn is")


def save_config(cfg: Config, path: str | Path) -> None:
    from ..fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
