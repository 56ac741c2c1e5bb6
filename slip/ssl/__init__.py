"""The swappable self-supervised branch: one module per method, registered by name.

A method (:class:`~slip.ssl.base.SSLMethod`) owns its heads, its extra state (a momentum copy
of the image tower, a visual tokenizer), the views it needs from the data pipeline, its loss
and its per-step hook. Adding one is a new file with a
``@register_method("name")`` class, an import line below, and a config.
"""
from __future__ import annotations

from .base import SSLMethod, build_method, method_class, method_names, register_method  # noqa: F401

# Importing a method's module registers it.
from . import simclr, mocov3, byol, beit  # noqa: E402,F401

__all__ = ["SSLMethod", "build_method", "method_class", "method_names", "register_method"]
