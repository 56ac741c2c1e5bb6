"""Loading and saving checkpoints, safely.

Two formats are read:

* the project's own: ``{"format": "slip/1", "arch": {...}, "state_dict": {...}, ...}`` written
  with ``torch.save``, or a ``.safetensors`` file whose metadata holds ``format`` and ``arch``;
* the checkpoints SLIP's authors released: ``{"epoch", "args": argparse.Namespace,
  "state_dict"}`` with DDP's ``module.`` prefix on every key;
* open_clip model folders (``open_clip_config.json`` + ``open_clip_model.safetensors`` or a
  ``.bin``), written by open_clip or ``slip export --format open_clip``, whose image tower is a
  timm ViT that slip has a preset for (``visual.trunk.X -> visual.X``, ``visual.head.proj.weight``
  transposed -> ``image_projection``; text keys as they are).

Nothing in a file is ever executed: pickles are opened with ``torch.load(weights_only=True)``,
which rebuilds only tensors and plain containers, plus ``argparse.Namespace`` for the released
``args``. Anything else is refused with an error naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .fileio import atomic_path
from .models import Architecture, SLIPModel, SSLHeadConfig, TextConfig, VisionConfig, get_architecture
from .transforms import eval_transform

FORMAT = "slip/1"

# Released checkpoints name their architecture in args.model; SLIP's small ViT has 12 heads.
RELEASED_MODELS = {
    f"{kind.upper()}_VIT{size.upper()}16": f"{kind}_vit_{size}16"
    for kind in ("clip", "simclr", "slip") for size in ("s", "b", "l")
}
# When a file names no architecture: attention heads by ViT width, as in SLIP's models.
_VISION_HEADS_BY_WIDTH = {384: 12, 768: 12, 1024: 16}
_TEXT_HEAD_WIDTH = 64  # CLIP's text towers use 64-wide heads (512 -> 8)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be (safely) loaded; the message names the file."""


@dataclass
class LoadedCheckpoint:
    arch: Architecture
    state_dict: dict[str, torch.Tensor]
    meta: dict  # everything else in the file (epoch, args as a dict, training state ...)
    source: str  # "slip", "released" or "open_clip"


def _strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2 or later starts with its PROTO opcode


def _torch_load(path: Path) -> object:
    """torch.load with weights_only (tensors, plain containers, argparse.Namespace). A file
    refused or unreadable gets a CheckpointError saying what it is not; torch's own message is
    not passed on, since its advice (``weights_only=False``) is what must not be done with a
    file slip refused."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle, "
                              "nor safetensors)")
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused: a pickle that builds Python objects{what} other than tensors, plain containers "
                "and argparse.Namespace; unpickling it could run code, so slip does not") from None
        except Exception as e:  # noqa: BLE001 -- whatever the reader trips on, the file is at fault
            first = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: a damaged or truncated PyTorch checkpoint ({first})") from None


def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Open any supported checkpoint and work out its architecture, without building a model."""
    path = Path(path)
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        return read_open_clip_folder(path)
    if path.is_file() and path.name in OPEN_CLIP_WEIGHTS and (path.parent / OPEN_CLIP_CONFIG).is_file():
        return read_open_clip_folder(path.parent)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if _is_safetensors(path):
        return _read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        try:
            arch = Architecture.from_dict(obj["arch"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad 'arch' entry: {e}") from None
        meta = {k: v for k, v in obj.items() if k not in ("arch", "state_dict")}
        return LoadedCheckpoint(arch, _state_dict_of(obj, path), meta, "slip")
    if "state_dict" in obj or "model" in obj:
        state_dict = _strip_prefix(_state_dict_of(obj, path))
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        arch = infer_architecture(state_dict, args.get("model"), path)
        meta = {k: v for k, v in obj.items() if k not in ("args", "state_dict", "model")}
        meta["args"] = args
        return LoadedCheckpoint(arch, _released_names(state_dict), meta, "released")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = _strip_prefix(obj)
        return LoadedCheckpoint(infer_architecture(state_dict, None, path), _released_names(state_dict), {}, "released")
    raise CheckpointError(f"{path}: no 'state_dict' entry; top-level keys: {sorted(map(str, obj))[:20]}")


def _released_names(state_dict: dict) -> dict:
    """SLIP's SimCLR head ``image_mlp`` lives in slip's SSL method module (``ssl.image_mlp``)."""
    return {("ssl." + k if k.startswith("image_mlp.") else k): v for k, v in state_dict.items()}


def _state_dict_of(obj: dict, path: Path) -> dict:
    state_dict = obj.get("state_dict", obj.get("model"))
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map parameter names to tensors")
    return state_dict


def _read_safetensors(path: Path) -> LoadedCheckpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        state_dict = _strip_prefix(state_dict)
        return LoadedCheckpoint(infer_architecture(state_dict, None, path), _released_names(state_dict), meta, "released")
    try:
        arch = Architecture.from_dict(json.loads(meta.pop("arch")))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad 'arch' metadata: {e}") from None
    meta.pop("format")
    meta = {k: json.loads(v) for k, v in meta.items()}
    return LoadedCheckpoint(arch, state_dict, meta, "slip")


def _count_blocks(state_dict: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def infer_architecture(state_dict: dict, released_name: str | None = None, path: object = "<state_dict>") -> Architecture:
    """The architecture of a state dict (without ``module.``), from its tensor shapes.

    Shapes give everything but the number of attention heads. ``released_name`` (SLIP's
    ``args.model``, e.g. ``SLIP_VITB16``) supplies those and is cross-checked against the shapes;
    without it, SLIP's convention for the width is used.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"{path}: cannot infer the architecture: missing key {key!r}")
        return state_dict[key]

    width = need("visual.cls_token").shape[-1]
    patch = need("visual.patch_embed.proj.weight").shape[-1]
    grid = int(round((need("visual.pos_embed").shape[1] - 1) ** 0.5))
    depth = _count_blocks(state_dict, r"visual\.blocks\.(\d+)\.")
    preset = None
    if released_name is not None:
        if released_name not in RELEASED_MODELS:
            raise CheckpointError(
                f"{path}: args.model is {released_name!r}, not one of the released architectures "
                f"{sorted(RELEASED_MODELS)}")
        preset = get_architecture(RELEASED_MODELS[released_name])
        heads = preset.vision.heads
    elif width in _VISION_HEADS_BY_WIDTH:
        heads = _VISION_HEADS_BY_WIDTH[width]
    else:
        raise CheckpointError(f"{path}: ViT width {width} is not a released size and the file names no architecture")
    vision = VisionConfig(width=width, depth=depth, heads=heads, patch_size=patch, image_size=grid * patch)

    text = None
    embed_dim = 512  # unused without a text tower; kept at the presets' value
    if "token_embedding.weight" in state_dict:
        vocab, t_width = state_dict["token_embedding.weight"].shape
        text = TextConfig(
            width=t_width, heads=t_width // _TEXT_HEAD_WIDTH,
            layers=_count_blocks(state_dict, r"transformer\.resblocks\.(\d+)\."),
            context_length=need("positional_embedding").shape[0], vocab_size=vocab,
        )
        embed_dim = need("image_projection").shape[1]
    ssl_head = None
    if "image_mlp.layer1.weight" in state_dict:
        ssl_head = SSLHeadConfig(mlp_dim=state_dict["image_mlp.layer1.weight"].shape[0],
                                 out_dim=need("image_mlp.layer3.weight").shape[0])
    arch = Architecture(vision=vision, text=text, embed_dim=embed_dim, ssl_head=ssl_head)
    if preset is not None:
        _check_against_preset(arch, preset, released_name, path)
    return arch


def _check_against_preset(arch: Architecture, preset: Architecture, name: str, path: object) -> None:
    same = (arch.vision == preset.vision and arch.text == preset.text
            and (arch.text is None or arch.embed_dim == preset.embed_dim)
            and (arch.ssl_head is None) == (preset.ssl_head is None))
    if not same:
        raise CheckpointError(f"{path}: tensor shapes do not match args.model={name!r}: found {arch}, expected {preset}")


def build_from_checkpoint(ckpt: LoadedCheckpoint, path: object, device: str | torch.device = "cpu") -> SLIPModel:
    """Build the model on ``device`` and load the weights, requiring an exact key match."""
    # Built on the meta device, so no time goes into a random initialisation that the weights
    # overwrite; strict loading below guarantees every parameter and buffer is filled.
    with torch.device("meta"):
        model = SLIPModel(ckpt.arch)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt.arch} model: "
                              f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    return model


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SLIPModel, Callable]:
    """Load a checkpoint (released by SLIP's authors or written by slip) for inference.

    Returns the model in eval mode on ``device`` and its evaluation transform
    (resize, centre crop, ImageNet normalisation at the model's image size).
    """
    ckpt = read_checkpoint(path)
    model = build_from_checkpoint(ckpt, path, device).eval()
    return model, eval_transform(ckpt.arch.vision.image_size)


def save_checkpoint(model: SLIPModel, path: str | os.PathLike, **extra) -> None:
    """Write ``model`` atomically; ``.safetensors`` paths get safetensors, others ``torch.save``.

    ``extra`` (step, epoch, optimizer state ...) must be what ``torch.load(weights_only=True)``
    can read; in safetensors files it must be JSON-serialisable and is kept as metadata.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            meta = {"format": FORMAT, "arch": json.dumps(model.arch.to_dict())}
            meta.update({k: json.dumps(v) for k, v in extra.items()})
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=meta)
        else:
            torch.save({"format": FORMAT, "arch": model.arch.to_dict(), "state_dict": state_dict, **extra}, tmp)


# ------------------------------------------------------------------------------ open_clip folders

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
_NULL = object()  # a field that must be absent or null
# Config fields that change nothing at inference, or that must hold the value slip's model has.
_OC_MODEL_FIELDS = {"embed_dim": None, "vision_cfg": None, "text_cfg": None, "quick_gelu": True,
                    "custom_text": False, "init_logit_scale": None, "cast_dtype": None}
_OC_VISION_FIELDS = {"image_size": None, "timm_model_name": None, "timm_model_pretrained": None,
                     "timm_pool": "token", "timm_proj": "linear", "timm_proj_bias": False,
                     "timm_drop": None, "timm_drop_path": None, "patch_dropout": None}
_OC_TEXT_FIELDS = {"context_length": None, "vocab_size": None, "width": None, "heads": None, "layers": None,
                   "mlp_ratio": 4.0, "ls_init_value": _NULL, "pool_type": "argmax", "proj_type": "linear",
                   "proj_bias": False, "no_causal_mask": False, "embed_cls": False}
# open_clip's defaults where a field is absent (its timm tower pools by "avg" unless told).
_OC_DEFAULTS = {"quick_gelu": False, "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}


def _check_fields(cfg: dict, allowed: dict, where: str, path: Path) -> None:
    for key, value in cfg.items():
        if key not in allowed:
            raise CheckpointError(f"{path}: {where}.{key}={value!r} is not something slip's model has "
                                  f"(an open_clip model slip cannot load)")
        want = allowed[key]
        if want is _NULL:
            if value is not None:
                raise CheckpointError(f"{path}: {where}.{key}={value!r}: slip's model has no such option")
        elif want is not None and value != want:
            raise CheckpointError(f"{path}: {where}.{key}={value!r}, slip's model needs {want!r}")
    for key, default in _OC_DEFAULTS.items():
        if key in allowed and key not in cfg and allowed[key] is not None and default != allowed[key]:
            raise CheckpointError(f"{path}: {where}.{key} is absent (open_clip's default {default!r}), "
                                  f"slip's model needs {allowed[key]!r}")


def _open_clip_weights(path: Path) -> dict:
    for name in OPEN_CLIP_WEIGHTS:
        f = path / name
        if f.is_file():
            if _is_safetensors(f):
                from safetensors.torch import load_file

                return load_file(str(f))
            obj = _torch_load(f)
            if isinstance(obj, dict) and "state_dict" in obj:
                obj = obj["state_dict"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"{f}: expected a state dict mapping names to tensors")
            return _strip_prefix(obj)
    raise CheckpointError(f"{path}: an open_clip folder without weights (none of {list(OPEN_CLIP_WEIGHTS)})")


def _open_clip_trunk(path: Path, name: str):
    """The timm trunk open_clip builds for ``timm_model_name`` (on the meta device), as open_clip
    does it: timm's defaults for the name, class-token pooling, no classifier."""
    import timm

    if name.startswith(("local-dir:", "hf-hub:")):
        where = [path / "config.json"]  # the folder's own timm config (what slip export writes)
        if name.startswith("local-dir:"):
            where.append(Path(name[len("local-dir:"):]) / "config.json")
        found = next((f for f in where if f.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: vision_cfg.timm_model_name={name!r} names a timm config.json "
                                  "that is not in the folder nor at that path")
        try:
            tcfg = json.loads(found.read_text(encoding="utf-8"))
            arch_name, model_args = tcfg["architecture"], dict(tcfg.get("model_args") or {})
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{found}: not a timm config.json ({e})") from None
    else:
        arch_name, model_args = name, {}
    model_args.update(num_classes=0, global_pool="token")
    try:
        with torch.device("meta"):
            return timm.create_model(arch_name, pretrained=False, **model_args)
    except Exception as e:  # noqa: BLE001 -- an unknown name or arguments that do not fit
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={name!r}: timm cannot build it ({e})") from None


def read_open_clip_folder(path: str | os.PathLike) -> LoadedCheckpoint:
    """An open_clip folder with a timm ViT image tower slip has a preset for, in slip's names."""
    from timm.models.vision_transformer import VisionTransformer

    from .export import _tower_signature
    from .models.presets import VISION_PRESETS

    path = Path(path)
    try:
        cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path / OPEN_CLIP_CONFIG}: not JSON ({e})") from None
    model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise CheckpointError(f"{path / OPEN_CLIP_CONFIG}: no model_cfg.vision_cfg")
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg.get("text_cfg") or {}
    sd = _open_clip_weights(path)
    if "timm_model_name" not in vision_cfg or any(k.startswith("visual.conv1.") for k in sd):
        bad = next((k for k in ("visual.ln_pre.weight", "visual.conv1.weight") if k in sd), "vision_cfg.timm_model_name")
        raise CheckpointError(f"{path}: open_clip's own VisionTransformer image tower ({bad!r}) is not slip's "
                              "timm ViT (its ln_pre has no place there); only timm-tower folders "
                              "(vision_cfg.timm_model_name) load")
    _check_fields(model_cfg, _OC_MODEL_FIELDS, "model_cfg", path)
    _check_fields(vision_cfg, _OC_VISION_FIELDS, "model_cfg.vision_cfg", path)
    _check_fields(text_cfg, _OC_TEXT_FIELDS, "model_cfg.text_cfg", path)
    if "visual.head.proj.weight" not in sd:
        raise CheckpointError(f"{path}: missing tensor 'visual.head.proj.weight' (the image projection)")

    trunk = _open_clip_trunk(path, vision_cfg["timm_model_name"])
    if not isinstance(trunk, VisionTransformer):
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={vision_cfg['timm_model_name']!r} is a "
                              f"{type(trunk).__name__}, not a ViT slip has a preset for")
    vision = VisionConfig(width=trunk.embed_dim, depth=len(trunk.blocks), heads=trunk.blocks[0].attn.num_heads,
                          patch_size=trunk.patch_embed.patch_size[0], image_size=trunk.patch_embed.img_size[0])
    with torch.device("meta"):
        ours = VisionTransformer(img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.width,
                                 depth=vision.depth, num_heads=vision.heads, num_classes=0)
    if vision not in VISION_PRESETS.values() or _tower_signature(trunk) != _tower_signature(ours) \
            or repr(trunk) != repr(ours):
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={vision_cfg['timm_model_name']!r} builds a "
                              f"tower ({vision}) that is none of slip's ViT presets")

    state_dict, oc_names = {}, {}  # slip's names -> tensors, and -> open_clip's names (for messages)
    for k, v in sd.items():
        if k.startswith("visual.trunk."):
            ours = "visual." + k[len("visual.trunk."):]
        elif k == "visual.head.proj.weight":
            ours, v = "image_projection", v.t().contiguous()
        elif k.startswith("visual."):
            ours = "open_clip:" + k  # a head part slip has no place for (refused below)
        else:
            ours = k
        state_dict[ours], oc_names[ours] = v, k
    t_width = tuple(state_dict["token_embedding.weight"].shape)[1] if "token_embedding.weight" in state_dict else 0
    text = TextConfig(
        width=text_cfg.get("width", t_width), heads=text_cfg.get("heads", t_width // _TEXT_HEAD_WIDTH),
        layers=text_cfg.get("layers", _count_blocks(state_dict, r"transformer\.resblocks\.(\d+)\.")),
        context_length=text_cfg.get("context_length", 77), vocab_size=text_cfg.get("vocab_size", 49408))
    arch = Architecture(vision=vision, text=text, embed_dim=model_cfg.get("embed_dim", 512))
    with torch.device("meta"):
        want = SLIPModel(arch).state_dict()
    for k, v in state_dict.items():
        oc_name = oc_names[k]
        if k not in want:
            raise CheckpointError(f"{path}: tensor {oc_name!r} has no place in slip's {vision} CLIP model")
        if tuple(v.shape) != tuple(want[k].shape):
            shape = tuple(want[k].shape)
            if k == "image_projection":
                shape = shape[::-1]
            raise CheckpointError(f"{path}: tensor {oc_name!r} has shape {tuple(v.shape)}, the config says {shape}")
    missing = [k for k in want if k not in state_dict]
    if missing:
        missing = ["visual.head.proj.weight" if k == "image_projection" else
                   "visual.trunk." + k[len("visual."):] if k.startswith("visual.") else k for k in missing]
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}")
    return LoadedCheckpoint(arch, state_dict, {"open_clip_config": cfg}, "open_clip")
