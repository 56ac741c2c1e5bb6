"""Models and the representations whose invariance is measured.

A model is given as anything :func:`slip.load_pretrained` reads (slip's checkpoints, SLIP's
released ones, open_clip folders, OpenAI CLIP state dicts), with that model's evaluation
transform, or as ``random:NAME``: a freshly initialised registered model (``slip.list_models()``,
e.g. ``random:slip_vit_tiny``), seeded, with slip's evaluation transform at the preset's image
size (ImageNet statistics, bilinear resizing), to compare random initialisation with training.

Layers (``--layer``):

* ``pooled`` (default): the image tower's pooled feature before any projection, timm's
  ``forward_head(forward_features(x), pre_logits=True)`` (the class token after the final
  norm for slip's towers), the feature slip's linear probe and k-NN read;
* ``embedding``: the projected joint image-text embedding (``encode_image``, unnormalised);
  models with a text tower only;
* ``block:N``: the output tokens of transformer block N (0-based; negative counts from the
  end), taken with a forward hook and mean-pooled over the patch tokens (class and other prefix
  tokens left out).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..eval.datasets import BAD_IMAGE_ERRORS, _open_image, make_eval_loader
from ..eval.zero_shot import run_image_model
from .sets import Occluder, occlude

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
LAYERS_HELP = "pooled (default), embedding, or block:N"


@dataclass
class LoadedModel:
    """A model in eval mode on its device, its evaluation transform, and how it was given."""

    model: Any
    preprocess: Callable
    spec: str
    label: str


def load_model(spec: str, device: str | torch.device = "cpu", seed: int = 0, label: str | None = None) -> LoadedModel:
    """Load ``spec``: a checkpoint path, or ``random:NAME`` initialised under ``seed`` (module doc)."""
    from ..transforms import eval_transform

    if spec.startswith(RANDOM_PREFIX):
        from ..models import create_model, get_architecture

        name = spec[len(RANDOM_PREFIX):]
        try:
            arch = get_architecture(name)
        except ValueError as e:
            raise UserError(f"{spec}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(arch)
        model = model.to(device).eval()
        preprocess = eval_transform(arch.vision.image_size)
    else:
        from ..checkpoint import load_pretrained

        model, preprocess = load_pretrained(spec, device)
    return LoadedModel(model, preprocess, spec, label or spec)


def parse_layer(layer: str) -> str | int:
    """``"pooled"``, ``"embedding"``, or the block index of ``"block:N"``."""
    if layer in ("pooled", "embedding"):
        return layer
    head, sep, index = layer.partition(":")
    if head == "block" and sep:
        try:
            return int(index)
        except ValueError:
            pass
    raise UserError(f"--layer {layer!r}: expected {LAYERS_HELP}")


def check_layer(model, layer: str) -> str | int:
    """:func:`parse_layer`, and a :class:`UserError` if ``model`` has no such layer."""
    which = parse_layer(layer)
    model = getattr(model, "module", model)
    if which == "embedding" and not model.has_text:
        raise UserError("--layer embedding: this model has no text tower, so no projected embedding "
                        "(an image-only model); use --layer pooled")
    if isinstance(which, int) and not hasattr(model.visual, "blocks"):
        raise UserError(f"--layer {layer}: this image tower ({type(model.visual).__name__}) has no transformer "
                        "blocks; use --layer pooled")
    depth = len(model.visual.blocks) if hasattr(model.visual, "blocks") else 0
    if isinstance(which, int) and not -depth <= which < depth:
        raise UserError(f"--layer {layer}: the image tower has {depth} blocks (block:0 to block:{depth - 1})")
    return which


@contextlib.contextmanager
def layer_features(model, layer: str) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function ``images (B, 3, H, W) -> features (B, D)`` of ``layer`` (module docstring);
    a block's forward hook lives as long as the context."""
    which = check_layer(model, layer)
    model = getattr(model, "module", model)
    visual = model.visual
    if which == "pooled":
        yield lambda x: visual.forward_head(visual.forward_features(x), pre_logits=True)
        return
    if which == "embedding":
        yield model.encode_image
        return
    captured: list[torch.Tensor] = []
    handle = visual.blocks[which].register_forward_hook(lambda _m, _i, out: captured.append(out))
    prefix = visual.num_prefix_tokens

    def run(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        visual.forward_features(x)
        return captured[-1][:, prefix:].mean(dim=1)

    try:
        yield run
    finally:
        handle.remove()


class ImageItems(Dataset):
    """``(transform(image), index)`` for ``(path, occluder or None)`` items; an unreadable image
    gives ``None`` and a warning (the loader drops it, see :func:`embed`)."""

    def __init__(self, items: Sequence[tuple[Any, Occluder | None]], transform: Callable) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, occluder = self.items[index]
        try:
            image = _open_image(path)
        except BAD_IMAGE_ERRORS as e:
            logger.warning("unreadable image %s: %s", path, e)
            return None
        if occluder is not None:
            image = occlude(image, occluder)
        return self.transform(image), index


def embed(loaded: LoadedModel, items: Sequence[tuple[Any, Occluder | None]], layer: str = "pooled",
          batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
          desc: str = "images", progress: bool | None = None) -> np.ndarray:
    """``(len(items), D)`` float32 features of ``layer`` for every item, in order, with a
    progress line on stderr before and after (and a bar on a terminal).

    Raises :class:`UserError` naming the images that could not be read.
    """
    print(f"{loaded.label}: embedding {len(items)} {desc} ({layer})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    loader = make_eval_loader(ImageItems(items, loaded.preprocess), batch_size, workers)
    with layer_features(loaded.model, layer) as fn:
        feats, indices, skipped = run_image_model(loaded.model, loader, fn, device, desc=desc, progress=progress,
                                                  distributed=False)
    if skipped:
        bad = sorted(set(range(len(items))) - set(indices.tolist()))
        names = ", ".join(str(items[i][0]) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{len(bad)} image(s) could not be read: {names}")
    print(f"{loaded.label}: {len(items)} {desc} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return feats.numpy().astype(np.float32, copy=False)
