"""Invariance sets on disk, and the trajectories (groups of transformed versions) each measures.

``slip invariance score SET`` reads SET in one of two layouts:

* **a manifest set**: ``SET/manifest.csv`` (what ``slip invariance make-set`` writes), a CSV
  with the header ``path,category,object,viewpoint,light_dir,light_colour`` and one row per
  image. ``path`` is relative to SET (or absolute); ``object`` names one physical object (an
  instance) within its ``category``; ``viewpoint``, ``light_dir`` and ``light_colour`` are labels
  of the camera pose, the light's direction and its colour (any text; equal text means equal
  setting; a blank is a value like any other, for a factor the set does not vary). This can
  express ALOI (Geusebroek et al. 2005: objects x viewpoints, illumination directions and
  illumination colours) and PASCAL3D+-style category sets (objects of a category x
  viewpoints). Every image is also a source for occlusion.
* **an image folder**: any folder of images (read recursively, hidden files skipped, the
  extensions of :data:`slip.eval.datasets.IMAGE_EXTENSIONS`), for occlusion only.

Trajectories of a manifest set (:data:`VARIED`): images are grouped by every factor of
:data:`FACTORS` except the ones the transformation varies, and a group is kept when it holds at
least two distinct values of each varied factor:

============================  ===================  =========================================
transformation                varies               held fixed
============================  ===================  =========================================
``viewpoint``                 viewpoint            category, object, light_dir, light_colour
``illumination_direction``    light_dir            category, object, viewpoint, light_colour
``illumination_colour``       light_colour         category, object, viewpoint, light_dir
``instance``                  object               category, viewpoint, light_dir, light_colour
``instance_viewpoint``        object, viewpoint    category, light_dir, light_colour
============================  ===================  =========================================

Occlusion (Purushwalkam & Gupta crop occluded objects from GOT-10k videos; here the occluders
are synthetic, seeded and of stated sizes): each source image's trajectory is the image itself
and, for every area fraction of ``sizes``, ``per_size`` versions with one occluding rectangle
(:func:`make_occluders`). Rectangles are placed inside the centred square of side
``min(width, height)``, the part of the image slip's evaluation transform keeps (resize the short
side, centre crop), and the fraction is of that square's area; each has a seeded aspect ratio in
[1/2, 2], a seeded position (wholly inside the square) and a seeded solid colour. At most
``max_sources`` source images are used: a seeded sample, in file order.
"""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from ..eval.datasets import IMAGE_EXTENSIONS
from .render import MANIFEST_FIELDS, MANIFEST_NAME

FACTORS = ("category", "object", "viewpoint", "light_dir", "light_colour")
VARIED: dict[str, tuple[str, ...]] = {
    "viewpoint": ("viewpoint",),
    "illumination_direction": ("light_dir",),
    "illumination_colour": ("light_colour",),
    "instance": ("object",),
    "instance_viewpoint": ("object", "viewpoint"),
}
TRANSFORMATIONS = ("occlusion", *VARIED)
DEFAULT_OCCLUSION_SIZES = (0.1, 0.2, 0.3, 0.4)  # fractions of the visible square's area
DEFAULT_OCCLUDERS_PER_SIZE = 2
DEFAULT_OCCLUSION_SOURCES = 100
MAX_OCCLUSION_SIZE = 0.5  # larger rectangles of aspect ratio 2 would not fit in the square


@dataclass(frozen=True)
class InvarianceSet:
    """The images of SET (absolute paths, in manifest or file order) and, for a manifest set,
    every image's factors (None for an image folder)."""

    root: Path
    paths: list[Path]
    factors: list[dict[str, str]] | None

    @property
    def has_manifest(self) -> bool:
        return self.factors is not None


@dataclass(frozen=True)
class Occluder:
    """A rectangle ``[x0, x1) x [y0, y1)`` in fractions of the visible square, and its RGB colour."""

    x0: float
    y0: float
    x1: float
    y1: float
    colour: tuple[int, int, int]
    size: float  # the area fraction it was drawn for


def _layout_help(root: Path) -> str:
    return (f"expected {root / MANIFEST_NAME} (columns {','.join(MANIFEST_FIELDS)}; "
            "'slip invariance make-set OUT' writes one) or a folder of images for occlusion")


def open_set(root: str | os.PathLike) -> InvarianceSet:
    """Read SET in either layout of the module docstring.

    Raises :class:`UserError` naming the path when it is missing, not a folder, holds neither
    layout, or its manifest is malformed or names missing files.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such folder; {_layout_help(root)}")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; {_layout_help(root)}")
    if (root / MANIFEST_NAME).is_file():
        paths, factors = read_manifest(root / MANIFEST_NAME)
        return InvarianceSet(root, paths, factors)
    paths = list_images(root)
    if not paths:
        raise UserError(f"{root}: no {MANIFEST_NAME} and no images; {_layout_help(root)}")
    return InvarianceSet(root, paths, None)


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted, skipping hidden files and folders."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_manifest(path: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """(absolute image paths, factors of every image) of a manifest CSV (see the module docstring)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing_columns = [c for c in MANIFEST_FIELDS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise UserError(f"{path}: missing column(s) {', '.join(missing_columns)}; "
                            f"the header must name {','.join(MANIFEST_FIELDS)}")
        rows = list(reader)
    if not rows:
        raise UserError(f"{path}: no images listed")
    paths, factors, seen = [], [], set()
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise UserError(f"{path}, line {line}: empty path")
        p = Path(row["path"].strip())
        p = p if p.is_absolute() else path.parent / p
        if p in seen:
            raise UserError(f"{path}, line {line}: {row['path']} is listed twice")
        seen.add(p)
        paths.append(p)
        factors.append({k: (row.get(k) or "").strip() for k in FACTORS})
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{path}: {len(missing)} listed image(s) not found: {', '.join(missing[:3])}{more}")
    return paths, factors


def factor_groups(factors: Sequence[dict[str, str]], transformation: str) -> list[list[int]]:
    """Trajectories of ``transformation`` (one of :data:`VARIED`) as lists of image indices, in
    order of first appearance (see the module docstring)."""
    if transformation not in VARIED:
        raise ValueError(f"unknown transformation {transformation!r}; factor transformations: {', '.join(VARIED)}")
    varied = VARIED[transformation]
    fixed = [f for f in FACTORS if f not in varied]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(factors):
        groups[tuple(row[f] for f in fixed)].append(i)
    return [members for members in groups.values()
            if all(len({factors[i][f] for i in members}) >= 2 for f in varied)]


def occlusion_sources(n_images: int, max_sources: int, seed: int = 0) -> list[int]:
    """Indices of the source images for occlusion: all, or a seeded sample of ``max_sources``,
    in increasing order."""
    if max_sources < 1:
        raise UserError(f"the number of occlusion sources must be at least 1, got {max_sources}")
    if n_images <= max_sources:
        return list(range(n_images))
    return sorted(np.random.default_rng([seed, n_images]).choice(n_images, max_sources, replace=False).tolist())


def make_occluders(source: int, sizes: Sequence[float] = DEFAULT_OCCLUSION_SIZES,
                   per_size: int = DEFAULT_OCCLUDERS_PER_SIZE, seed: int = 0) -> list[Occluder]:
    """The occluders of source image number ``source``: ``per_size`` for each area fraction of
    ``sizes``, seeded by ``(seed, source)`` alone, so a source's occluders do not depend on the
    other sources."""
    bad = [s for s in sizes if not 0 < s <= MAX_OCCLUSION_SIZE]
    if bad or not sizes:
        raise UserError(f"occlusion sizes must be area fractions in (0, {MAX_OCCLUSION_SIZE}], got {list(sizes)}")
    if per_size < 1:
        raise UserError(f"occluders per size must be at least 1, got {per_size}")
    rng = np.random.default_rng([seed, source])
    out = []
    for size in sizes:
        for _ in range(per_size):
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w, h = math.sqrt(size * aspect), math.sqrt(size / aspect)
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            out.append(Occluder(x0, y0, x0 + w, y0 + h, colour, size))  # type: ignore[arg-type]
    return out


def occlude(image: Image.Image, occluder: Occluder) -> Image.Image:
    """A copy of ``image`` with ``occluder`` painted inside its centred square (module docstring)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    x0, y0 = round(occluder.x0 * side), round(occluder.y0 * side)
    x1, y1 = max(round(occluder.x1 * side), x0 + 1), max(round(occluder.y1 * side), y0 + 1)  # 1 pixel at least
    out = image.convert("RGB")  # a copy (convert always returns a new image)
    ImageDraw.Draw(out).rectangle((left + x0, top + y0, left + x1 - 1, top + y1 - 1), fill=occluder.colour)
    return out
