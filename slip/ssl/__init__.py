"""The swappable self-supervised branch: one module per method, registered by name.

A method (:class:`~slip.ssl.base.SSLMethod`) owns its heads, its extra state (a momentum copy
of the image tower, a visual tokenizer), the views it needs from the data pipeline, its loss
and its per-step hook. Adding one is a new file with a
``@register_method("name")`` class, an import line below, and a config.
"""
from __future__ import annotations

# Importing a method's module registers it.
from . import amdim, beit, byol, cpc, mocov2, mocov3, pirl, relicv2, simclr, swav, yadim  # noqa: E402,F401
from .base import (  # noqa: F401
    SSLMethod,
    build_method,
    method_class,
    method_names,
    method_views,
    register_method,
    view_method_names,
)

__all__ = ["SSLMethod", "build_method", "method_class", "method_names", "method_views", "register_method",
           "view_method_names"]
