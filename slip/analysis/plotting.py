"""matplotlib for the analysis commands' charts, an optional extra (``pip install 'slip[analysis]'``)."""
from __future__ import annotations

from typing import Any

from ..errors import MissingExtra


def pyplot(what: str) -> Any:
    """matplotlib's pyplot on the Agg backend (files, no display), or :class:`MissingExtra`
    naming ``what`` needs it and the extra that brings it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(what, "matplotlib", "analysis") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
