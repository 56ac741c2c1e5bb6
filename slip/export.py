"""``slip export``: a checkpoint as a folder that open_clip or timm loads by itself.

    slip export CHECKPOINT OUT --format open_clip   # open_clip.create_model_and_transforms("local-dir:OUT")
    slip export CHECKPOINT OUT --format timm        # timm.create_model("local-dir:OUT", pretrained=True)

open_clip: ``open_clip_config.json`` + ``open_clip_model.safetensors`` + ``README.md`` (the
layout the Hugging Face hub expects). The image tower is open_clip's timm tower with class-token
pooling (``timm_pool: "token"``; open_clip's default ``"avg"`` would change every embedding) and
a bias-free linear head holding ``image_projection`` transposed; the text tower keeps its CLIP
names, with QuickGELU (``quick_gelu: true``) or GELU as the model has. A tower in OpenAI CLIP's
layout (``pre_norm``: imported from OpenAI or open_clip, or trained from such weights) becomes
open_clip's own ViT instead, in OpenAI's names (``visual.conv1``, ``visual.ln_pre`` ...,
``visual.proj``), which needs no timm config; open_clip's ``quick_gelu`` then sets both towers'
activation, so they must have the same one. Image and text embeddings equal slip's to float32
rounding. ``preprocess_cfg`` is the model's evaluation transform: slip's (ImageNet statistics,
bilinear) or, exported from an imported checkpoint, the one it came with (OpenAI's: OpenAI's
statistics, bicubic).

open_clip builds the timm trunk from ``timm_model_name`` alone (it passes no architecture
arguments to timm), so a tower that matches a registered timm model exactly (ViT-B/16 ->
``vit_base_patch16_224``, ViT-L/16 -> ``vit_large_patch16_224``) is named by it and the folder
can be moved or uploaded. SLIP's ViT-S/16 has 12 heads (timm's ``vit_small`` has 6, with the
same weight shapes: it would load and compute wrong embeddings without an error), and the tiny
test preset is no timm model: for those the folder also holds timm's ``config.json`` and the
config names ``local-dir:<absolute path of OUT>``. Such a folder loads where it was written; moved,
timm fails with "Config file not found" instead of loading anything wrong. ``--hub-id ORG/NAME``
names ``hf-hub:ORG/NAME`` instead, for a folder that will be uploaded there (timm then reads the
same ``config.json`` from the hub).

timm: ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with the model's evaluation
preprocessing) + ``model.safetensors`` (the image tower alone, no classifier) + ``README.md``.
A tower with LayerNorm eps 1e-5 (OpenAI CLIP's layout) names timm's ``vit_base_patch16_clip_224``,
whose norm layer has that eps, with ``model_args`` ``pre_norm`` and ``act_layer: quick_gelu`` as the
tower has them; timm has no plain argument for other eps values, which are refused.

slip: SLIP's released layout, one ``.pt`` file ``{"epoch", "args": argparse.Namespace(model=
"SLIP_VITB16", ssl_mlp_dim, ssl_emb_dim, ...), "state_dict": {"module." + key: tensor}}`` with SLIP's
key names (its SimCLR head at ``image_mlp.*``), which SLIP's own ``eval_zeroshot.py`` and
``main_linear.py`` read. Only SLIP's architectures (CLIP/SimCLR/SLIP with ViT-S/16, B/16, L/16 and a
SimCLR head) exist there; other SSL methods, the tiny preset and towers in OpenAI CLIP's layout
(or with GELU in the text tower) are refused.

ResNet towers (``*_resnet50``, ``*_resnet_tiny``: timm's ``resnet50`` / ``resnet18``) export to timm
and open_clip under timm's registered name, so their folders can be moved or uploaded as they are.
timm: ``config.json`` names ``resnetN`` with no ``model_args`` and the weights are the tower's
(BatchNorm running statistics included, no ``fc``): ``timm.create_model("local-dir:OUT",
pretrained=True)`` or ``timm.create_model("resnetN", pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file="OUT/model.safetensors"))`` gives slip's pooled feature (timm's
global average pool; ``num_classes=0`` because the file holds no classifier, ``num_classes=N`` for
a new one). open_clip: its timm tower with ``timm_pool: "avg"`` (timm's global average pool, as
slip's tower) and the same bias-free linear head holding ``image_projection``; image and text
embeddings equal slip's to float32 rounding. SLIP's layout (``--format slip``) is refused: SLIP's
code has ViT models only.

Image-only models (SimCLR) have no text tower and cannot be open_clip CLIP models; their tower
exports to timm. Folders are written atomically (a temporary sibling folder, then a rename) and
a non-empty OUT is only replaced with ``--overwrite``; the slip format's file likewise (a
temporary sibling file, then a rename), and an existing file is only replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import UserError, command
from .fileio import _fsync_dir, atomic_path, temporary_dir_beside
from .models.presets import OPENAI_NORM_EPS, TIMM_NORM_EPS
from .transforms import IMAGENET_MEAN, OPENAI_MEAN, SLIP_PREPROCESS

FORMATS = ("open_clip", "timm", "slip")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"

# Registered timm ViTs whose default arguments build exactly slip's tower (checked at export).
_TIMM_NAMES = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
# The registered ViT whose norm layer has OpenAI CLIP's LayerNorm eps (timm's CLIP image towers).
_TIMM_CLIP_BASE = "vit_base_patch16_clip_224"
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "logit_scale")


class _Source:
    """What an export needs: architecture, weights, run metadata, a name for messages."""

    def __init__(self, arch, state_dict: dict, meta: dict, label: str, preprocess: dict | None = None):
        self.arch, self.state_dict, self.meta, self.label = arch, state_dict, meta, label
        # eval_transform's mean, std and interpolation, where not slip's (an imported model's own)
        self.preprocess = {**SLIP_PREPROCESS, **(preprocess or {})}

    @property
    def name(self) -> str:
        from .models import MODELS

        for name, arch in MODELS.items():
            if (arch.vision, arch.text, arch.ssl_head is None) == (self.arch.vision, self.arch.text, self.arch.ssl_head is None) \
                    and (arch.text is None or arch.embed_dim == self.arch.embed_dim):
                return name
        return f"custom model ({self.arch.vision})"


def _source(model_or_checkpoint) -> _Source:
    from .models import SLIPModel

    model = getattr(model_or_checkpoint, "module", model_or_checkpoint)  # unwrap DDP
    if isinstance(model, SLIPModel):
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return _Source(model.arch, sd, {}, "a SLIPModel")
    if not isinstance(model_or_checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected a SLIPModel or a checkpoint path, got {type(model_or_checkpoint).__name__}")
    from .checkpoint import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(model_or_checkpoint)
    marks = ("visual.conv1.weight",) if is_resnet(ckpt.arch.vision) else ("visual.cls_token", "visual.pos_embed")
    needed = [k for k in marks if k not in ckpt.state_dict]
    if needed:
        raise CheckpointError(f"{model_or_checkpoint}: no image tower (missing {needed})")
    return _Source(ckpt.arch, ckpt.state_dict, ckpt.meta, str(model_or_checkpoint), ckpt.preprocess)


def is_resnet(vision) -> bool:
    return vision.kind == "resnet"


def resnet_timm_name(vision) -> str:
    """The registered timm model of a ResNet tower (``resnet{depth}``), checked to build exactly
    slip's tower (:func:`slip.models.model.build_tower`: timm's defaults, no classifier)."""
    import timm

    from .models.model import build_tower

    name = f"resnet{vision.depth}"
    with torch.device("meta"):
        ours, theirs = build_tower(vision), timm.create_model(name, pretrained=False, num_classes=0)
    if _tower_signature(ours) != _tower_signature(theirs):
        raise UserError(f"the image tower ({vision}) is not timm's registered {name} with its default "
                        "arguments; no timm or open_clip config can name it")
    return name


# ---------------------------------------------------------------------------------------- timm


def _base_architecture(vision) -> str:
    """A registered ViT entrypoint to name in config.json; ``model_args`` fix every size and
    option, the entrypoint the LayerNorm eps (which no plain argument sets)."""
    if vision.norm_eps == OPENAI_NORM_EPS:
        return _TIMM_CLIP_BASE
    if vision.norm_eps != TIMM_NORM_EPS:
        raise UserError(f"the image tower's LayerNorm eps {vision.norm_eps} is neither timm's {TIMM_NORM_EPS} nor "
                        f"OpenAI CLIP's {OPENAI_NORM_EPS}; no timm config.json can name it")
    return {384: "vit_small_patch16_224", 1024: "vit_large_patch16_224"}.get(vision.width, "vit_base_patch16_224")


def timm_model_args(vision) -> dict:
    """``timm.create_model`` arguments that build slip's tower on top of :func:`_base_architecture`'s
    entrypoint (whose own ``pre_norm`` is overridden where it is a CLIP tower's)."""
    from .models.model import vit_args

    args = vit_args(vision)
    if _base_architecture(vision) == _TIMM_CLIP_BASE:
        args["pre_norm"] = vision.pre_norm
    return {**args, "global_pool": "token"}


def _tower_signature(model) -> tuple:
    # repr shows the layer types and settings (activation, LayerNorm eps, pre-norm) shapes do not
    if not hasattr(model, "blocks"):  # a ResNet
        return ({k: tuple(v.shape) for k, v in model.state_dict().items()}, repr(model))
    return (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads,
            tuple(model.patch_embed.patch_size), tuple(model.patch_embed.img_size), model.global_pool,
            {k: tuple(v.shape) for k, v in model.state_dict().items()}, repr(model))


def registered_timm_name(vision) -> str | None:
    """The registered timm model that builds exactly this tower (heads included), or None; a
    ResNet tower's is :func:`resnet_timm_name`."""
    import timm

    from .models.model import build_vit

    if is_resnet(vision):
        return resnet_timm_name(vision)

    with torch.device("meta"):
        want = _tower_signature(build_vit(vision))
        for name in _TIMM_NAMES:
            if _tower_signature(timm.create_model(name, pretrained=False, num_classes=0)) == want:
                return name
    return None


def timm_config(vision, preprocess: dict | None = None) -> dict:
    """timm's ``config.json`` for slip's tower: what ``timm.create_model("local-dir:...")`` reads.
    ``preprocess``: the model's evaluation transform (:attr:`_Source.preprocess`; slip's if None)."""
    size = vision.image_size
    pp = preprocess or SLIP_PREPROCESS
    resnet = is_resnet(vision)
    pretrained_cfg = {
        "tag": "slip",
        "input_size": [3, size, size],
        "fixed_input_size": not resnet,  # a ResNet pools any size; the ViT's position embedding is fixed
        # the evaluation transform: shorter side to S, centre crop S x S.
        "interpolation": pp["interpolation"],
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(pp["mean"]),
        "std": list(pp["std"]),
        "num_classes": 0,
        "pool_size": [max(1, size // 32)] * 2 if resnet else None,
        "first_conv": "conv1" if resnet else "patch_embed.proj",
        "classifier": "fc" if resnet else "head",
    }
    return {
        "architecture": resnet_timm_name(vision) if resnet else _base_architecture(vision),
        "num_classes": 0,
        "num_features": vision.width,
        "global_pool": "avg" if resnet else "token",
        "model_args": {} if resnet else timm_model_args(vision),
        "pretrained_cfg": pretrained_cfg,
    }


def _tower_state_dict(src: _Source) -> dict:
    return {k[len("visual."):]: v.contiguous() for k, v in src.state_dict.items() if k.startswith("visual.")}


# ----------------------------------------------------------------------------------- open_clip


def native_open_clip(arch) -> bool:
    """Whether the model becomes open_clip's own ViT (OpenAI CLIP's layout) rather than a timm
    tower: its image tower has ``pre_norm`` and the text tower's activation (open_clip's one
    ``quick_gelu`` flag sets both)."""
    return arch.text is not None and arch.vision.pre_norm and arch.vision.act == arch.text.act


def open_clip_config(arch, timm_model_name: str | None, preprocess: dict | None = None) -> dict:
    """``open_clip_config.json``: ``model_cfg`` (the image tower as open_clip's timm tower named
    ``timm_model_name``, or for None as open_clip's own ViT, see :func:`native_open_clip`; CLIP
    text tower) and the ``preprocess_cfg`` that reproduces the model's evaluation transform
    (``preprocess``: :attr:`_Source.preprocess`; :func:`slip.transforms.eval_transform` if None)."""
    if arch.text is None:
        raise UserError("an image-only model has no text tower for open_clip")
    v, t = arch.vision, arch.text
    pp = preprocess or SLIP_PREPROCESS
    if timm_model_name is None:
        if not native_open_clip(arch):
            raise UserError(f"open_clip's own ViT has a LayerNorm before the blocks and the text tower's activation; "
                            f"this image tower ({v}) does not (text: {t.act})")
        vision_cfg = {"image_size": v.image_size, "layers": v.depth, "width": v.width,
                      "head_width": v.width // v.heads, "patch_size": v.patch_size}
        if v.norm_eps != OPENAI_NORM_EPS:  # open_clip's LayerNorm: torch's eps 1e-5
            vision_cfg["norm_kwargs"] = {"eps": v.norm_eps}
    else:
        vision_cfg = {
            "image_size": v.image_size,
            "timm_model_name": timm_model_name,
            "timm_model_pretrained": False,
            # ViT: the class token, as slip (open_clip's default "avg" is not); ResNet: timm's
            # global average pool, as slip's tower
            "timm_pool": "avg" if is_resnet(v) else "token",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        }
    return {
        "model_cfg": {
            "embed_dim": arch.embed_dim,
            "quick_gelu": t.act == "quick_gelu",
            "vision_cfg": vision_cfg,
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size,
                         "width": t.width, "heads": t.heads, "layers": t.layers},
        },
        "preprocess_cfg": {
            "size": v.image_size,
            "mode": "RGB",
            "mean": list(pp["mean"]),
            "std": list(pp["std"]),
            "interpolation": pp["interpolation"],
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    }


def open_clip_state_dict(src: _Source, native: bool = False) -> dict:
    """slip's names -> open_clip's: for a timm tower ``visual.X -> visual.trunk.X``,
    ``image_projection`` (in, out) -> ``visual.head.proj.weight`` (out, in); for open_clip's own
    ViT (``native``) OpenAI CLIP's names (:func:`slip.checkpoint.openai_layout`). The text tower's
    names are open_clip's already."""
    from .checkpoint import openai_layout, timm_tower_layout

    layout = openai_layout if native else timm_tower_layout
    sd = {}
    for k, v in src.state_dict.items():
        if k.startswith(("visual.", "image_projection")) or k.startswith(_TEXT_KEYS):
            name, tensor = layout(k, v, False)
            if name is None:
                raise UserError(f"{src.name}: tensor {k!r} has no place in open_clip's {'ViT' if native else 'timm tower'}")
            sd[name] = tensor.contiguous()
    return sd


# ------------------------------------------------------------------------------- folder writing


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")


class _Folder:
    """A temporary sibling of ``out`` that becomes ``out`` on success (see :func:`_atomic_folder`)."""

    def __init__(self, path: Path):
        self.path = path

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text, encoding="utf-8")

    def write_json(self, name: str, obj: dict) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def write_safetensors(self, name: str, state_dict: dict, metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        save_file(state_dict, str(self.path / name), metadata=metadata)


class _atomic_folder:
    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite

    def __enter__(self) -> _Folder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_dir_beside(self.out)
        return _Folder(self.tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _check_out(self.out, self.overwrite)  # again: something may have appeared meanwhile
            old = None
            if self.out.is_dir() and any(self.out.iterdir()):
                old = temporary_dir_beside(self.out, ".old")
                os.replace(self.out, old)  # onto the empty folder mkdtemp made
            os.replace(self.tmp, self.out)  # a rename; onto an empty folder where one exists
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.out.parent)


# ------------------------------------------------------------------------------------ model card


def _model_card(src: _Source, fmt: str, out: Path, results: dict | None, load: str, portable_note: str) -> str:
    a = src.arch
    kind = "SLIP (CLIP + self-supervised learning)" if a.text and a.ssl_head else \
        "CLIP" if a.text else "image-only self-supervised (SimCLR-style)"
    v = a.vision
    traits = [t for t, on in (("a LayerNorm before the blocks", v.pre_norm), ("QuickGELU", v.act == "quick_gelu"),
                              (f"LayerNorm eps {v.norm_eps:g}", v.norm_eps != TIMM_NORM_EPS)) if on]
    lines = ["---", f"library_name: {fmt}", "tags:", "  - slip", "  - clip" if a.text else "  - self-supervised",
             "  - image-feature-extraction" if fmt == "timm" else "  - zero-shot-image-classification", "---", "",
             f"# {src.name} ({fmt} export)", "",
             f"A {kind} model trained with slip, exported with `slip export --format {fmt}`.", "",
             "## Model", "",
             (f"- Image tower: timm's ResNet-{v.depth} (`resnet{v.depth}`, BatchNorm), {v.image_size} px images, "
              f"globally average-pooled {v.width}-d features." if is_resnet(v) else
              f"- Image tower: ViT, width {v.width}, depth {v.depth}, {v.heads} heads, patch {v.patch_size}, "
              f"{v.image_size} px images, class-token features{' (' + ', '.join(traits) + ')' if traits else ''}.")]
    if a.text is not None and fmt == "open_clip":
        t = a.text
        lines.append(f"- Text tower: CLIP transformer, width {t.width}, {t.layers} layers, {t.heads} heads, "
                     f"context {t.context_length}, vocabulary {t.vocab_size} (CLIP BPE), "
                     f"{'QuickGELU' if t.act == 'quick_gelu' else 'GELU'}.")
        lines.append(f"- Joint embedding: {a.embed_dim}.")
    if a.ssl_head is not None:
        lines.append(f"- Trained with the self-supervised objective `{a.ssl_head.method}` "
                     "(its head is not part of this export).")
    pp = src.preprocess
    stats = {IMAGENET_MEAN: "ImageNet", OPENAI_MEAN: "OpenAI CLIP's"}.get(tuple(pp["mean"]))
    stats = f"{stats} mean/std" if stats else f"mean {list(pp['mean'])}, std {list(pp['std'])}"
    lines.append(f"- Preprocessing: shorter side resized to {v.image_size} ({pp['interpolation']}), centre crop, "
                 f"{stats}.")
    if fmt == "timm":
        lines.append("- Only the image tower is exported (no projection, no text tower, no classifier).")
    lines += ["", "## Usage", "", "```python", load, "```", ""]
    if portable_note:
        lines += [portable_note, ""]
    lines += ["## Training", "", f"Exported from {src.label}."]
    meta = src.meta
    if "step" in meta:
        lines.append(f"Training step: {meta['step']}.")
    if "epoch" in meta:
        lines.append(f"Epoch: {meta['epoch']}.")
    for key, title in (("config", "The run's configuration"), ("args", "The run's arguments (SLIP's released checkpoint)")):
        if meta.get(key):
            lines += ["", f"{title}:", "", "```json", json.dumps(meta[key], indent=2, default=str), "```"]
    if not any(k in meta for k in ("step", "epoch", "config", "args")):
        lines.append("The checkpoint records no training configuration.")
    lines += ["", "## Evaluation", ""]
    if results:
        lines += ["```json", json.dumps(results, indent=2, default=str), "```"]
    else:
        lines.append("No evaluation results were given at export (`slip export --results FILE.json`).")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- exports


def export_open_clip(model_or_checkpoint, out: str | os.PathLike, *, overwrite: bool = False,
                     results: dict | None = None, hub_id: str | None = None) -> Path:
    """Write an open_clip folder (see the module doc); returns its path.

    ``model_or_checkpoint``: a :class:`slip.SLIPModel` or a checkpoint path. ``results``: evaluation
    results for the model card. ``hub_id``: the hub repository the folder will be uploaded to, for
    towers no registered timm model builds (ViT-S/16 with 12 heads, the tiny preset)."""
    out = Path(out)
    _check_out(out, overwrite)
    src = _source(model_or_checkpoint)
    if src.arch.text is None:
        raise UserError(f"{src.name}: an image-only model (no text tower) cannot become an open_clip CLIP model; "
                        "export its image tower with --format timm")
    native = native_open_clip(src.arch)  # OpenAI CLIP's layout: open_clip's own ViT, no timm config
    registered = None if native else registered_timm_name(src.arch.vision)  # a ResNet's: resnetN
    if native or registered:
        timm_name, note = registered, ""
    elif hub_id:
        timm_name = f"hf-hub:{hub_id}"
        note = (f"The image tower is built by timm from `{TIMM_CONFIG}` of the hub repository `{hub_id}` "
                f"(no registered timm model has its {src.arch.vision.heads} heads); upload this folder there.")
    else:
        timm_name = f"local-dir:{out.resolve()}"
        note = (f"Note: no registered timm model builds this image tower ({src.arch.vision.heads} heads), so "
                f"`{OPEN_CLIP_CONFIG}` names timm's `{TIMM_CONFIG}` in this folder by its absolute path "
                f"(`{out.resolve()}`): the folder loads there and, moved, fails with timm's 'Config file not found'. "
                "Export again with `--hub-id ORG/NAME` for a folder to upload to the Hugging Face hub.")
    load = ("import open_clip\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{out}\")\n"
            f"tokenizer = open_clip.get_tokenizer(\"local-dir:{out}\")")
    with _atomic_folder(out, overwrite) as folder:
        folder.write_json(OPEN_CLIP_CONFIG, open_clip_config(src.arch, timm_name, src.preprocess))
        if not native and not registered:
            folder.write_json(TIMM_CONFIG, timm_config(src.arch.vision, src.preprocess))
        folder.write_safetensors(OPEN_CLIP_WEIGHTS, open_clip_state_dict(src, native))
        folder.write_text("README.md", _model_card(src, "open_clip", out, results, load, note))
    return out


def export_timm(model_or_checkpoint, out: str | os.PathLike, *, overwrite: bool = False,
                results: dict | None = None) -> Path:
    """Write a timm folder with the image tower (see the module doc); returns its path."""
    out = Path(out)
    _check_out(out, overwrite)
    src = _source(model_or_checkpoint)
    cfg = timm_config(src.arch.vision, src.preprocess)
    args = "".join(f", {k}={v!r}" for k, v in cfg["model_args"].items())
    load = ("import timm\n"
            f"model = timm.create_model(\"local-dir:{out}\", pretrained=True)\n"
            "# or, from the weights file alone (num_classes=0: the file holds no classifier):\n"
            f"model = timm.create_model(\"{cfg['architecture']}\", pretrained=True, num_classes=0{args},\n"
            f"                          pretrained_cfg_overlay=dict(file=\"{out / TIMM_WEIGHTS}\"))\n"
            "# fine-tuning: num_classes=N instead, for a new classifier")
    with _atomic_folder(out, overwrite) as folder:
        folder.write_json(TIMM_CONFIG, cfg)
        folder.write_safetensors(TIMM_WEIGHTS, _tower_state_dict(src))
        folder.write_text("README.md", _model_card(src, "timm", out, results, load, ""))
    return out


def released_model_name(arch) -> str | None:
    """SLIP's ``args.model`` for an architecture SLIP's own code builds (the table
    :data:`slip.checkpoint.RELEASED_MODELS` reads), or None. SSL head sizes are free: SLIP's
    models take them from ``args.ssl_mlp_dim`` / ``args.ssl_emb_dim``."""
    from .checkpoint import RELEASED_MODELS
    from .models import get_architecture

    if arch.ssl_head is not None and arch.ssl_head.method != "simclr":
        return None
    for released, preset_name in RELEASED_MODELS.items():
        preset = get_architecture(preset_name)
        if (preset.vision == arch.vision and preset.text == arch.text
                and (arch.text is None or arch.embed_dim == preset.embed_dim)
                and (preset.ssl_head is None) == (arch.ssl_head is None)):
            return released
    return None


def _slip_lacks(arch) -> list[str]:
    """What the model's towers have that SLIP's cannot build (timm's plain ViT, CLIP's QuickGELU text tower)."""
    v, lacks = arch.vision, []
    if v.pre_norm:
        lacks.append("a LayerNorm before the image blocks (pre_norm)")
    if v.act != "gelu":
        lacks.append(f"{v.act} in the image tower")
    if v.norm_eps != TIMM_NORM_EPS:
        lacks.append(f"image LayerNorm eps {v.norm_eps:g}")
    if arch.text is not None and arch.text.act != "quick_gelu":
        lacks.append(f"{arch.text.act} in the text tower")
    return lacks


def slip_state_dict(src: _Source) -> dict:
    """slip's names -> SLIP's (``ssl.image_mlp.* -> image_mlp.*``), with DDP's ``module.`` prefix."""
    out = {}
    for k, v in src.state_dict.items():
        # SimCLR's head is ssl.image_mlp in slip, image_mlp in SLIP (other methods are refused before)
        out["module." + k.removeprefix("ssl.")] = v.contiguous()
    return out


def export_slip(model_or_checkpoint, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write SLIP's released checkpoint layout (see the module doc) to the file ``out``; returns it."""

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --format slip writes one .pt file")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: file exists; pass --overwrite to replace it")
    src = _source(model_or_checkpoint)
    if is_resnet(src.arch.vision):
        raise UserError(f"{src.name}: cannot be exported in SLIP's layout: its image tower is a ResNet (timm "
                        f"resnet{src.arch.vision.depth}) and SLIP's code has ViT models only (SLIP_VITS16, B16, "
                        "L16); use --format timm or open_clip")
    released = released_model_name(src.arch)
    if released is None:
        head = src.arch.ssl_head
        lacks = _slip_lacks(src.arch)
        if head is not None and head.method != "simclr":
            why = f"its SSL method {head.method!r} has no counterpart in SLIP's code (SimCLR only)"
        elif lacks:
            why = f"its towers have what SLIP's code lacks: {', '.join(lacks)}"
        else:
            why = f"its architecture ({src.arch.vision}) is none of SLIP's ViT-S/16, B/16, L/16 models"
        raise UserError(f"{src.name}: cannot be exported in SLIP's layout: {why}; use --format open_clip or timm")
    sd = slip_state_dict(src)
    stray = [k for k in sd if k.startswith("module.") and k.split(".")[1] not in
             ("visual", "transformer", "token_embedding", "positional_embedding", "ln_final",
              "image_projection", "text_projection", "logit_scale", "image_mlp")]
    if stray:
        raise UserError(f"{src.name}: tensors SLIP's {released} has no place for: {stray[:5]}")
    meta = src.meta
    args = dict(meta.get("args") or {})  # a released checkpoint's own args travel on
    args.update(model=released)
    if src.arch.ssl_head is not None:
        args.update(ssl_mlp_dim=src.arch.ssl_head.mlp_dim, ssl_emb_dim=src.arch.ssl_head.out_dim)
    else:  # SLIP's model builders take these keywords whatever the model
        args.setdefault("ssl_mlp_dim", 4096)
        args.setdefault("ssl_emb_dim", 256)
    epoch = meta.get("epoch")
    obj = {"epoch": epoch if isinstance(epoch, int) else 0, "args": argparse.Namespace(**args), "state_dict": sd}
    if isinstance(meta.get("step"), int):
        obj["step"] = meta["step"]
    if out.exists() and not overwrite:  # again: something may have appeared meanwhile
        raise UserError(f"{out}: file exists; pass --overwrite to replace it")
    with atomic_path(out) as tmp:
        torch.save(obj, tmp)
    return out


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file (slip's or SLIP's released ones)")
    p.add_argument("out", help="folder to write (must be absent or empty unless --overwrite); "
                               "for --format slip a .pt file (must be absent unless --overwrite)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="open_clip (image + text), timm (image tower) or slip (SLIP's released .pt layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty (or exists, for slip)")
    p.add_argument("--results", help="evaluation results (a JSON file, e.g. from slip zero-shot --out) for the model card")
    p.add_argument("--hub-id", help="open_clip: the hub repository OUT will be uploaded to, for image towers "
                                    "no registered timm model builds (ViT-S/16's 12 heads)")
    return p


@command("export")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    results = None
    if args.results:
        try:
            results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{args.results}: not JSON ({e})") from None
    if args.format == "slip":
        if args.hub_id or results is not None:
            raise UserError(f"{'--hub-id' if args.hub_id else '--results'} is not used by --format slip")
        out = export_slip(args.checkpoint, args.out, overwrite=args.overwrite)
    elif args.format == "open_clip":
        out = export_open_clip(args.checkpoint, args.out, overwrite=args.overwrite, results=results, hub_id=args.hub_id)
    else:
        if args.hub_id:
            raise UserError("--hub-id is for --format open_clip")
        out = export_timm(args.checkpoint, args.out, overwrite=args.overwrite, results=results)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
