"""Loading and saving checkpoints, safely.

Two formats are read:

* the project's own: ``{"format": "slip/1", "arch": {...}, "state_dict": {...}, ...}`` written
  with ``torch.save``, or a ``.safetensors`` file whose metadata holds ``format`` and ``arch``;
* the checkpoints SLIP's authors released: ``{"epoch", "args": argparse.Namespace,
  "state_dict"}`` with DDP's ``module.`` prefix on every key.

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
    source: str  # "slip" or "released"


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
