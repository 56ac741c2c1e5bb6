"""Loading and saving checkpoints, safely.

These formats are read:

* the project's own: ``{"format": "slip/1", "arch": {...}, "state_dict": {...}, ...}`` written
  with ``torch.save``, or a ``.safetensors`` file whose metadata holds ``format`` and ``arch``;
* the checkpoints SLIP's authors released: ``{"epoch", "args": argparse.Namespace,
  "state_dict"}`` with DDP's ``module.`` prefix on every key;
* open_clip model folders (``open_clip_config.json`` + ``open_clip_model.safetensors`` or a
  ``.bin``), written by open_clip or ``slip export --format open_clip``, whose image tower is
  either a timm ViT that slip has a preset for (``visual.trunk.X -> visual.X``,
  ``visual.head.proj.weight`` transposed -> ``image_projection``) or open_clip's own ViT, which
  is OpenAI CLIP's (see below); text keys as they are, QuickGELU or GELU as ``quick_gelu`` says;
* OpenAI CLIP's state dicts (``visual.conv1.weight``, ``visual.class_embedding``,
  ``visual.ln_pre.*``, ``visual.transformer.resblocks.N.*``, ``visual.proj`` ...; open_clip's
  own ViT has the same names) in a ``.pt``/``.bin``/``.safetensors`` file, bare or under
  ``state_dict``. The tower becomes slip's timm ViT with ``pre_norm`` (``ln_pre``), QuickGELU
  and LayerNorm eps 1e-5; sizes come from the shapes and, as in OpenAI's code, heads are
  64 wide. Such a file holds no config, so it is read as OpenAI's CLIP (QuickGELU in both
  towers, OpenAI's image statistics and bicubic resizing); open_clip models trained with GELU
  load from their folder, whose config says so.

Nothing in a file is ever executed: pickles are opened with ``torch.load(weights_only=True)``,
which rebuilds only tensors and plain containers, plus ``argparse.Namespace`` for the released
``args``. Anything else is refused with an error naming the file, as are OpenAI's TorchScript
archives (load those with open_clip, which can save their state dict).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .fileio import atomic_path
from .models import Architecture, SLIPModel, SSLHeadConfig, TextConfig, VisionConfig, get_architecture
from .models.presets import OPENAI_NORM_EPS
from .transforms import INTERPOLATIONS, OPENAI_PREPROCESS, eval_transform

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
    source: str  # "slip", "released", "open_clip" or "openai"
    # eval_transform's mean, std and interpolation where the model was trained with others than slip's
    preprocess: dict = field(default_factory=dict)


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
    if head.startswith(_ZIP_MAGIC) and _is_torchscript(path):
        raise CheckpointError(
            f"{path}: a TorchScript archive (as OpenAI's released CLIP files are), which holds code; slip loads no "
            "code. Save its weights with open_clip: torch.save(open_clip.load_openai_model(PATH, device='cpu')"
            ".state_dict(), 'weights.pt'), then load that file")
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
        try:
            if head.startswith(_ZIP_MAGIC):
                return _load_mapped(path)
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


def _load_mapped(path: Path) -> object:
    """torch.load of a torch.save archive, memory-mapped: tensors are read from the file when
    first touched, and processes loading the same file (the ranks of a resumed run) share its
    pages in the page cache instead of each holding a copy (a PIRL memory bank for YFCC15M is
    7 GiB). Writing into a loaded tensor copies the page (a private mapping); the file never
    changes. A file system that cannot map files is read the ordinary way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise
    except Exception:  # noqa: BLE001 -- no mmap here, or a damaged file: the plain read says which
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_torchscript(path: Path) -> bool:
    """A zip written by ``torch.jit.save`` (its ``constants.pkl`` is what torch.load looks for)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load then reports the damage


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
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        meta = {k: v for k, v in obj.items() if k not in ("args", "state_dict", "model")}
        meta["args"] = args
        return _from_state_dict(_state_dict_of(obj, path), path, meta, args.get("model"))
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_state_dict(obj, path, {})
    raise CheckpointError(f"{path}: no 'state_dict' entry; top-level keys: {sorted(map(str, obj))[:20]}")


def _from_state_dict(state_dict: dict, path: Path, meta: dict, released_name: str | None = None) -> LoadedCheckpoint:
    """A state dict without slip's architecture record: OpenAI CLIP's layout, or SLIP's (whose
    ``args.model``, when the file has one, names the architecture)."""
    state_dict = _strip_prefix(state_dict)
    if any(k in state_dict for k in _OPENAI_MARKS):
        return read_openai_state_dict(state_dict, path, meta)
    arch = infer_architecture(state_dict, released_name, path)
    return LoadedCheckpoint(arch, _released_names(state_dict), meta, "released")


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
        return _from_state_dict(state_dict, path, meta)
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
    """Load a checkpoint (any format :func:`read_checkpoint` reads) for inference.

    Returns the model in eval mode on ``device`` and its evaluation transform (resize, centre
    crop at the model's image size, normalisation): ImageNet's statistics and bilinear resizing
    for slip's and SLIP's models, what an open_clip folder's ``preprocess_cfg`` says for those,
    OpenAI's statistics and bicubic resizing for OpenAI CLIP's state dicts.
    """
    ckpt = read_checkpoint(path)
    model = build_from_checkpoint(ckpt, path, device).eval()
    return model, eval_transform(ckpt.arch.vision.image_size, **ckpt.preprocess)


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
# Config fields slip reads: None, anything (it changes nothing at inference, or is read below);
# _NULL, absent or null; a tuple, one of these values; any other value, the one slip's model has.
_OC_BLOCK_FIELDS = {"block_type": (None, "default"), "qk_norm": False, "scaled_cosine_attn": False,
                    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                    "act_kwargs": _NULL}
_OC_MODEL_FIELDS = {"embed_dim": None, "vision_cfg": None, "text_cfg": None, "quick_gelu": None,
                    "custom_text": False, "init_logit_scale": None, "cast_dtype": None}
_OC_VISION_FIELDS = {"image_size": None, "timm_model_name": None, "timm_model_pretrained": None,
                     "timm_pool": "token", "timm_proj": "linear", "timm_proj_bias": False,
                     "timm_drop": None, "timm_drop_path": None, "patch_dropout": None}
# open_clip's own ViT (OpenAI CLIP's layout); its timm_* fields are unused without a timm_model_name.
_OC_NATIVE_VISION_FIELDS = {
    "layers": None, "width": None, "head_width": None, "patch_size": None, "image_size": None, "mlp_ratio": 4.0,
    "ls_init_value": _NULL, "patch_dropout": None, "attentional_pool": False, "attn_pooler_queries": None,
    "attn_pooler_heads": None, "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "pool_type": "tok", "output_tokens": None, "norm_kwargs": None, "timm_model_name": _NULL,
    "timm_model_pretrained": None, "timm_pool": None, "timm_proj": None, "timm_proj_bias": None, "timm_drop": None,
    "timm_drop_path": None, **_OC_BLOCK_FIELDS}
_OC_TEXT_FIELDS = {"context_length": None, "vocab_size": None, "width": None, "heads": None, "layers": None,
                   "mlp_ratio": 4.0, "ls_init_value": _NULL, "pool_type": "argmax", "proj_type": "linear",
                   "proj_bias": False, "no_causal_mask": False, "embed_cls": False, "final_ln_after_pool": False,
                   "norm_kwargs": _NULL, "hf_tokenizer_name": _NULL, "tokenizer_mode": _NULL,
                   "tokenizer_kwargs": _NULL, "pad_id": None, "eos_id": None, "output_tokens": None, **_OC_BLOCK_FIELDS}
# A ResNet trunk: timm's global average pool (slip's ResNet feature), open_clip's default.
_OC_RESNET_VISION_FIELDS = {**_OC_VISION_FIELDS, "timm_pool": "avg"}
_OC_PREPROCESS_FIELDS = {"size": None, "mode": "RGB", "mean": None, "std": None, "interpolation": tuple(INTERPOLATIONS),
                         "resize_mode": "shortest", "fill_color": None}
# open_clip's defaults where a field is absent (its timm tower pools by "avg" unless told).
_OC_DEFAULTS = {"timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}
_OC_NATIVE_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "patch_size": 16, "image_size": 224}
_OC_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def _accepts(want: object, value: object) -> bool:
    if want is None:
        return True
    if want is _NULL:
        return value is None
    if isinstance(want, tuple):
        return value in want
    return value == want


def _check_fields(cfg: dict, allowed: dict, where: str, path: Path) -> None:
    for key, value in cfg.items():
        if key not in allowed:
            raise CheckpointError(f"{path}: {where}.{key}={value!r} is not something slip's model has "
                                  f"(an open_clip model slip cannot load)")
        want = allowed[key]
        if _accepts(want, value):
            continue
        if want is _NULL:
            raise CheckpointError(f"{path}: {where}.{key}={value!r}: slip's model has no such option")
        need = f"one of {list(want)}" if isinstance(want, tuple) else repr(want)
        raise CheckpointError(f"{path}: {where}.{key}={value!r}, slip's model needs {need}")
    for key, default in _OC_DEFAULTS.items():
        if key in allowed and key not in cfg and not _accepts(allowed[key], default):
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
    does it: timm's defaults for the name, no classifier; a ViT with class-token pooling."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

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
    model_args["num_classes"] = 0
    try:
        with torch.device("meta"):
            trunk = timm.create_model(arch_name, pretrained=False, **model_args)
            if isinstance(trunk, VisionTransformer) and trunk.global_pool != "token":
                trunk = timm.create_model(arch_name, pretrained=False, **{**model_args, "global_pool": "token"})
            return trunk
    except Exception as e:  # noqa: BLE001 -- an unknown name or arguments that do not fit
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={name!r}: timm cannot build it ({e})") from None


def read_open_clip_folder(path: str | os.PathLike) -> LoadedCheckpoint:
    """An open_clip folder in slip's names: its image tower a timm ViT slip has a preset for, a
    timm ResNet slip has a tower for (``resnet{18,34,50,101,152}``, average-pooled), or open_clip's
    own ViT (OpenAI CLIP's layout, any size); text tower and preprocessing as its
    config says (open_clip's defaults for absent fields)."""
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
    _check_fields(model_cfg, _OC_MODEL_FIELDS, "model_cfg", path)
    _check_fields(text_cfg, _OC_TEXT_FIELDS, "model_cfg.text_cfg", path)
    # open_clip's quick_gelu: QuickGELU in the text tower and its own ViT (never in a timm tower)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    if vision_cfg.get("timm_model_name"):
        vision, layout = _timm_tower(path, vision_cfg, sd), timm_tower_layout
    else:
        vision, layout = _native_tower(path, vision_cfg, act), openai_layout
    t = {**_OC_TEXT_DEFAULTS, **{k: text_cfg[k] for k in _OC_TEXT_DEFAULTS if k in text_cfg}}
    if t["width"] % t["heads"]:
        raise CheckpointError(f"{path}: model_cfg.text_cfg.width={t['width']} is not divisible by heads={t['heads']}")
    text = TextConfig(width=t["width"], heads=t["heads"], layers=t["layers"], context_length=t["context_length"],
                      vocab_size=t["vocab_size"], act=act)
    arch = Architecture(vision=vision, text=text, embed_dim=model_cfg.get("embed_dim", 512))
    state_dict, names = _in_slip_names(sd, layout)
    _check_fits(path, arch, state_dict, names, layout, "the config says")
    preprocess = _open_clip_preprocess(cfg.get("preprocess_cfg") or {}, vision.image_size, path)
    return LoadedCheckpoint(arch, state_dict, {"open_clip_config": cfg}, "open_clip", preprocess)


def _timm_tower(path: Path, vision_cfg: dict, sd: dict) -> VisionConfig:
    """The preset tower an open_clip timm image tower is, checked against what timm builds."""
    from timm.layers import QuickGELU
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    from .export import _tower_signature
    from .models.model import build_vit
    from .models.presets import TIMM_NORM_EPS, VISION_PRESETS

    if "visual.head.proj.weight" not in sd:
        raise CheckpointError(f"{path}: missing tensor 'visual.head.proj.weight' (the image projection)")
    name = vision_cfg["timm_model_name"]
    trunk = _open_clip_trunk(path, name)
    if isinstance(trunk, ResNet):
        return _timm_resnet_tower(path, vision_cfg, trunk)
    if not isinstance(trunk, VisionTransformer):
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={name!r} is a "
                              f"{type(trunk).__name__}, neither a ViT nor a ResNet slip has a tower for")
    _check_fields(vision_cfg, _OC_VISION_FIELDS, "model_cfg.vision_cfg", path)
    vision = VisionConfig(width=trunk.embed_dim, depth=len(trunk.blocks), heads=trunk.blocks[0].attn.num_heads,
                          patch_size=trunk.patch_embed.patch_size[0], image_size=trunk.patch_embed.img_size[0],
                          pre_norm=not isinstance(trunk.norm_pre, torch.nn.Identity),
                          act="quick_gelu" if isinstance(trunk.blocks[0].mlp.act, QuickGELU) else "gelu",
                          norm_eps=getattr(trunk.norm, "eps", TIMM_NORM_EPS))
    with torch.device("meta"):
        ours = build_vit(vision)
    if vision not in VISION_PRESETS.values() or _tower_signature(trunk) != _tower_signature(ours):
        raise CheckpointError(f"{path}: vision_cfg.timm_model_name={name!r} builds a "
                              f"tower ({vision}) that is none of slip's ViT presets")
    return vision


def _timm_resnet_tower(path: Path, vision_cfg: dict, trunk) -> VisionConfig:
    """slip's ResNet tower that an open_clip timm ResNet trunk is (timm's ``resnet{depth}`` with
    its default arguments, globally average-pooled: open_clip's ``timm_pool: "avg"``, what
    ``slip export --format open_clip`` writes for it), at the config's image size."""
    from .export import _tower_signature
    from .models.model import build_tower
    from .models.presets import RESNET_WIDTHS

    _check_fields(vision_cfg, _OC_RESNET_VISION_FIELDS, "model_cfg.vision_cfg", path)
    size = _square(vision_cfg.get("image_size", _OC_NATIVE_VISION_DEFAULTS["image_size"]),
                   "model_cfg.vision_cfg.image_size", path)
    signature = _tower_signature(trunk)
    for depth, width in RESNET_WIDTHS.items():
        vision = VisionConfig(width=width, depth=depth, heads=0, patch_size=32, image_size=size, kind="resnet")
        with torch.device("meta"):
            if _tower_signature(build_tower(vision)) == signature:
                return vision
    raise CheckpointError(f"{path}: vision_cfg.timm_model_name={vision_cfg['timm_model_name']!r} builds a ResNet "
                          f"that is none of slip's towers (timm's resnet{{{','.join(map(str, RESNET_WIDTHS))}}} "
                          "with their default arguments)")


def _square(value: object, where: str, path: Path) -> int:
    """An open_clip size given as an int or as an (h, w) pair, which slip's towers need square."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{path}: {where}={value!r}: slip's ViT needs one square size")
    return value


def _native_tower(path: Path, vision_cfg: dict, act: str) -> VisionConfig:
    """open_clip's own ViT (OpenAI CLIP's layout) as slip's tower: ``ln_pre`` is timm's
    ``pre_norm``, its LayerNorms have torch's eps 1e-5 unless ``norm_kwargs`` say."""
    where = "model_cfg.vision_cfg"
    _check_fields(vision_cfg, _OC_NATIVE_VISION_FIELDS, where, path)
    v = {**_OC_NATIVE_VISION_DEFAULTS, **{k: vision_cfg[k] for k in _OC_NATIVE_VISION_DEFAULTS if k in vision_cfg}}
    if not isinstance(v["layers"], int):
        raise CheckpointError(f"{path}: {where}.layers={v['layers']!r}: a ResNet image tower, not a ViT")
    if v["width"] % v["head_width"]:
        raise CheckpointError(f"{path}: {where}.width={v['width']} is not a multiple of head_width={v['head_width']}")
    norm_kwargs = vision_cfg.get("norm_kwargs") or {}
    if set(norm_kwargs) - {"eps"}:
        raise CheckpointError(f"{path}: {where}.norm_kwargs={norm_kwargs!r}: slip's tower takes only an eps")
    return VisionConfig(width=v["width"], depth=v["layers"], heads=v["width"] // v["head_width"],
                        patch_size=_square(v["patch_size"], f"{where}.patch_size", path),
                        image_size=_square(v["image_size"], f"{where}.image_size", path),
                        pre_norm=True, act=act, norm_eps=float(norm_kwargs.get("eps", OPENAI_NORM_EPS)))


def _open_clip_preprocess(pp: dict, image_size: int, path: Path) -> dict:
    """eval_transform's arguments for an open_clip ``preprocess_cfg`` (open_clip's defaults,
    OpenAI's statistics and bicubic resizing, for absent fields)."""
    if not isinstance(pp, dict):
        raise CheckpointError(f"{path / OPEN_CLIP_CONFIG}: preprocess_cfg is not a JSON object")
    _check_fields(pp, _OC_PREPROCESS_FIELDS, "preprocess_cfg", path)
    if "size" in pp and _square(pp["size"], "preprocess_cfg.size", path) != image_size:
        raise CheckpointError(f"{path}: preprocess_cfg.size={pp['size']!r}, the image tower takes {image_size} px images")
    out = {**OPENAI_PREPROCESS, **{k: pp[k] for k in OPENAI_PREPROCESS if k in pp}}
    for key in ("mean", "std"):
        if not (isinstance(out[key], (list, tuple)) and len(out[key]) == 3):
            raise CheckpointError(f"{path}: preprocess_cfg.{key}={out[key]!r}: three numbers (R, G, B) needed")
        out[key] = tuple(float(x) for x in out[key])
    return out


# --------------------------------------------------------------------------- tensor layouts

Layout = Callable[[str, torch.Tensor, bool], "tuple[str | None, torch.Tensor]"]

# OpenAI CLIP's image tower in slip's (timm's) names, by prefix; a block's parts after
# ``transformer.resblocks.N.`` <-> ``blocks.N.``.
_OPENAI_TOWER = (("conv1.", "patch_embed.proj."), ("class_embedding", "cls_token"),
                 ("positional_embedding", "pos_embed"), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."))
_OPENAI_BLOCK = (("ln_1.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
                 ("attn.out_proj.", "attn.proj."), ("ln_2.", "norm2."), ("mlp.c_fc.", "mlp.fc1."),
                 ("mlp.c_proj.", "mlp.fc2."))
_OPENAI_MARKS = ("visual.class_embedding", "visual.conv1.weight")  # a state dict in OpenAI CLIP's layout
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")  # numbers OpenAI's files also record
_OPENAI_HEAD_WIDTH = 64  # OpenAI's CLIP: heads = width // 64 in both towers


def openai_layout(name: str, tensor: torch.Tensor, to_slip: bool) -> tuple[str | None, torch.Tensor]:
    """One tensor between OpenAI CLIP's layout (open_clip's own ViT) and slip's, in the direction
    ``to_slip`` says: ``visual.conv1`` <-> ``visual.patch_embed.proj``, ``visual.class_embedding``
    (W,) <-> ``visual.cls_token`` (1, 1, W), ``visual.positional_embedding`` (L, W) <->
    ``visual.pos_embed`` (1, L, W), ``visual.ln_pre`` <-> ``visual.norm_pre``,
    ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``
    <-> ``visual.blocks.N.{norm1, attn.qkv.*, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``visual.ln_post``
    <-> ``visual.norm``, ``visual.proj`` <-> ``image_projection`` (both (W, E), applied as x @ P).
    Text tensors keep their names. The name is None for a tensor with no counterpart."""
    proj = ("visual.proj", "image_projection")
    if name == proj[not to_slip]:
        return proj[to_slip], tensor
    if not name.startswith("visual."):
        return name, tensor
    rest = name[len("visual."):]
    block = re.match(r"transformer\.resblocks\.(\d+)\." if to_slip else r"blocks\.(\d+)\.", rest)
    pairs = _OPENAI_BLOCK if block else _OPENAI_TOWER
    prefix = ((f"blocks.{block.group(1)}." if to_slip else f"transformer.resblocks.{block.group(1)}.")
              if block else "")
    rest = rest[block.end():] if block else rest
    for theirs, ours in pairs:
        src, dst = (theirs, ours) if to_slip else (ours, theirs)
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            out = "visual." + prefix + dst + rest[len(src):]
            slip_name = out if to_slip else name
            if slip_name == "visual.cls_token":
                tensor = tensor.reshape(1, 1, -1) if to_slip else tensor.reshape(-1)
            elif slip_name == "visual.pos_embed":
                tensor = tensor.unsqueeze(0) if to_slip else tensor.squeeze(0)
            return out, tensor
    return None, tensor


def timm_tower_layout(name: str, tensor: torch.Tensor, to_slip: bool) -> tuple[str | None, torch.Tensor]:
    """One tensor between an open_clip timm image tower's layout and slip's: ``visual.trunk.X`` <->
    ``visual.X``, ``visual.head.proj.weight`` (E, W) <-> ``image_projection`` (W, E); text tensors
    keep their names. The name is None for a tensor with no counterpart (another head part)."""
    head = ("visual.head.proj.weight", "image_projection")
    if name == head[not to_slip]:
        return head[to_slip], tensor.t().contiguous()
    trunk = ("visual.trunk.", "visual.")
    if name.startswith(trunk[not to_slip]):
        return trunk[to_slip] + name[len(trunk[not to_slip]):], tensor
    return (None if name.startswith("visual.") else name), tensor


def _in_slip_names(sd: dict, layout: Layout) -> tuple[dict, dict]:
    """A file's tensors in slip's names and shapes, and slip's names -> (the file's name, shape);
    a tensor with no place in slip's model keeps the file's name behind a ``?`` (refused by
    :func:`_check_fits`, which names it)."""
    state_dict, names = {}, {}
    for k, v in sd.items():
        ours, w = layout(k, v, True)
        if ours is None:
            ours, w = "?" + k, v
        state_dict[ours], names[ours] = w, (k, tuple(v.shape))
    return state_dict, names


def _check_fits(path: object, arch: Architecture, state_dict: dict, names: dict, layout: Layout, says: str) -> None:
    """Every tensor of the file has its place and shape in slip's model of ``arch``, and every
    tensor of the model is in the file; messages name the file's tensors, with both shapes."""
    with torch.device("meta"):
        want = SLIPModel(arch).state_dict()
    wrong = []
    for k in state_dict:
        name, shape = names[k]
        if k not in want:
            raise CheckpointError(f"{path}: tensor {name!r} has no place in slip's {arch.vision} CLIP model")
        expected = tuple(layout(k, want[k], False)[1].shape)
        if shape != expected:
            wrong.append(f"tensor {name!r} has shape {shape}, {says} {expected}")
    if wrong:
        raise CheckpointError(f"{path}: " + "; ".join(wrong[:5]))
    missing = [layout(k, want[k], False)[0] for k in want if k not in state_dict]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}")


def read_openai_state_dict(state_dict: dict, path: object = "<state_dict>", meta: dict | None = None) -> LoadedCheckpoint:
    """An OpenAI CLIP state dict (names without ``module.``) in slip's names, its architecture from
    the shapes as OpenAI's code reads them: widths, depths, patch and grid, context length,
    vocabulary, 64-wide heads; QuickGELU, LayerNorm eps 1e-5, OpenAI's preprocessing."""
    sd = dict(state_dict)
    scalars = {k: sd.pop(k) for k in _OPENAI_SCALARS if k in sd}

    def need(key: str, ndim: int) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{path}: an incomplete OpenAI CLIP state dict: missing tensor {key!r}")
        if sd[key].ndim != ndim:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(sd[key].shape)}, not {ndim}-dimensional")
        return sd[key]

    width, _, _, patch = need("visual.conv1.weight", 4).shape
    t_width = need("ln_final.weight", 1).shape[0]
    for key, w in (("visual.conv1.weight", width), ("ln_final.weight", t_width)):
        if w % _OPENAI_HEAD_WIDTH:
            raise CheckpointError(f"{path}: tensor {key!r} gives a width of {w}, not a multiple of OpenAI CLIP's "
                                  f"{_OPENAI_HEAD_WIDTH}-wide attention heads (the file names no head count)")
    positions = need("visual.positional_embedding", 2).shape[0] - 1
    grid = math.isqrt(max(positions, 0))
    if grid * grid != positions or grid == 0:
        raise CheckpointError(f"{path}: tensor 'visual.positional_embedding' has {positions + 1} rows, not a class "
                              "token and a square grid of patches")
    vision = VisionConfig(width=width, depth=_count_blocks(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                          heads=width // _OPENAI_HEAD_WIDTH, patch_size=patch, image_size=grid * patch,
                          pre_norm=True, act="quick_gelu", norm_eps=OPENAI_NORM_EPS)
    text = TextConfig(width=t_width, heads=t_width // _OPENAI_HEAD_WIDTH,
                      layers=_count_blocks(sd, r"transformer\.resblocks\.(\d+)\."),
                      context_length=need("positional_embedding", 2).shape[0],
                      vocab_size=need("token_embedding.weight", 2).shape[0], act="quick_gelu")
    arch = Architecture(vision=vision, text=text, embed_dim=need("text_projection", 2).shape[1])
    recorded = {"input_resolution": vision.image_size, "context_length": text.context_length,
                "vocab_size": text.vocab_size}
    for key, value in scalars.items():
        if value.numel() != 1 or int(value) != recorded[key]:
            raise CheckpointError(f"{path}: entry {key!r} is {value.tolist()}, the tensors give {recorded[key]}")
    state_dict, names = _in_slip_names(sd, openai_layout)
    _check_fits(path, arch, state_dict, names, openai_layout,
                f"the architecture the other tensors give ({vision.width} wide, patch {patch}) needs")
    return LoadedCheckpoint(arch, state_dict, dict(meta or {}), "openai", dict(OPENAI_PREPROCESS))


# ------------------------------------------------------------------------ architecture checks


def tower_differences(theirs: Architecture, ours: Architecture) -> list[str]:
    """The tower settings in which a checkpoint's architecture (``theirs``) differs from a
    model's (``ours``), as ``"vision.act: 'gelu' in the checkpoint, 'quick_gelu' in the model"``:
    the image tower's, and the text tower's where both have one. Weights of a checkpoint load
    into a model only where this is empty; settings without tensors (heads, activation, LayerNorm
    eps) are the ones loading by shape alone would miss."""
    pairs = [("vision", theirs.vision, ours.vision)]
    if theirs.text is not None and ours.text is not None:
        pairs.append(("text", theirs.text, ours.text))
    out = []
    for where, a, b in pairs:
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                out.append(f"{where}.{f.name}: {x!r} in the checkpoint, {y!r} in the model")
    return out
