"""slip: language-image pretraining with self-supervision (SLIP, Mu et al. 2021).

The public names are imported on first use, so commands that need only part of the library
(writing shards, say) do not pay for importing torch, timm and open_clip up front.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SLIPModel": "slip.models",
    "create_model": "slip.models",
    "list_models": "slip.models",
    "get_tokenizer": "slip.tokenizer",
    "load_pretrained": "slip.checkpoint",
    "save_checkpoint": "slip.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
