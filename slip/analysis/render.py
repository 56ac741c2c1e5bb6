"""A generated invariance set: simple 3D objects rendered under controlled viewpoint and light.

``slip invariance make-set OUT`` writes, with no download, a set in the layout
:func:`slip.analysis.sets.read_manifest` reads: ``OUT/manifest.csv`` (one row per image:
``path, category, object, viewpoint, light_dir, light_colour``), the PNG images under
``OUT/images/CATEGORY/OBJECT/``, and ``OUT/invariance_set.json`` (the settings and every
object's parameters). The same seed and settings give byte-identical files.

Scenes. Five categories (:data:`CATEGORIES`: sphere, cube, cylinder, cone, torus), each with
``instances`` objects that differ in proportions (seeded within per-category ranges), in
colour (two seeded colours) and in texture (plain, stripes or checker, painted in object
coordinates, so it turns with the object). Objects stand at the origin in a canonical pose;
the camera orbits them. Following ALOI's design (Geusebroek et al. 2005: one factor swept at a
time from a default), every object is rendered

* from ``viewpoints`` camera azimuths evenly spread over 360 degrees (the first at
  :data:`VIEW_AZIMUTH0`) at elevation :data:`VIEW_ELEVATION`, under the default light;
* at the default viewpoint under the first ``light_dirs`` of :data:`LIGHT_DIRECTIONS`
  (world-fixed directions the light comes from), in white light;
* at the default viewpoint and light direction under the first ``light_colours`` of
  :data:`LIGHT_COLOURS`.

The first entry of each list is the default, so each object has
``viewpoints + light_dirs + light_colours - 2`` images (26 by default: 1560 for 5 x 12 objects).

Renderer. Sphere tracing of exact signed distance functions (a ray advances by the distance to
the surface until it is within :data:`HIT_EPS`), a pinhole camera with a
:data:`FIELD_OF_VIEW` degree field of view at :data:`CAMERA_DISTANCE`, normals from central
differences of the distance function, and Lambertian shading with no shadows:
``pixel = albedo * light_rgb * (AMBIENT + DIFFUSE * max(0, n . l))``, clipped to [0, 1], on a
constant :data:`BACKGROUND`. The light colour scales the ambient term too, so a change of light
colour changes the colour of every object pixel and nothing else.
"""
from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..fileio import atomic_write_text

SET_FORMAT = "slip-invariance-set/1"
MANIFEST_NAME = "manifest.csv"
META_NAME = "invariance_set.json"
MANIFEST_FIELDS = ("path", "category", "object", "viewpoint", "light_dir", "light_colour")

CATEGORIES = ("sphere", "cube", "cylinder", "cone", "torus")
# 12 objects per category: 60 objects, so each factor's sweep has at least 480 images and a unit
# set to fire on 1% of them fires on 5 (see slip.analysis.invariance on small sets).
DEFAULT_INSTANCES = 12
TEXTURES = ("plain", "stripes", "checker")
# Per-category parameter ranges (object units; every object fits in a sphere of radius 1.3).
_SHAPE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "sphere": {"radius": (0.7, 1.0)},
    "cube": {"half_x": (0.45, 0.8), "half_y": (0.45, 0.8), "half_z": (0.45, 0.8)},
    "cylinder": {"radius": (0.35, 0.7), "half_height": (0.5, 0.9)},
    "cone": {"radius": (0.5, 0.8), "height": (1.2, 1.8)},
    "torus": {"major": (0.6, 0.85), "minor": (0.18, 0.32)},
}
_CUBE_ROUNDING = 0.03  # rounded edges, so the cube's silhouette is not aliased to a polygon

VIEW_AZIMUTH0 = 30.0  # degrees; the default viewpoint's camera azimuth
VIEW_ELEVATION = 25.0  # degrees above the ground plane, every viewpoint
DEFAULT_VIEWPOINTS = 12  # camera azimuths 30 degrees apart
# (azimuth, elevation) in degrees of the direction light comes from; the first is the default.
LIGHT_DIRECTIONS: tuple[tuple[float, float], ...] = (
    (-45.0, 40.0), (-90.0, 30.0), (90.0, 30.0), (0.0, 75.0), (45.0, 40.0), (180.0, 30.0), (-30.0, 5.0), (30.0, 5.0))
# Light colours (RGB, brightest channel 1); the first is the default.
LIGHT_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "warm": (1.0, 0.78, 0.5), "cool": (0.55, 0.75, 1.0),
    "red": (1.0, 0.4, 0.35), "green": (0.45, 1.0, 0.45), "blue": (0.4, 0.5, 1.0),
    "magenta": (1.0, 0.45, 1.0), "yellow": (1.0, 1.0, 0.4)}

CAMERA_DISTANCE = 4.0
FIELD_OF_VIEW = 42.0  # degrees, vertical and horizontal (square images)
AMBIENT = 0.25
DIFFUSE = 0.85
BACKGROUND = (0.1, 0.1, 0.1)
HIT_EPS = 1e-3
MAX_STEPS = 96
_BOUND = 1.4  # radius of the sphere around the origin that holds every object


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its category, name, shape parameters (see :data:`_SHAPE_RANGES`), two
    colours (RGB in [0, 1]), texture and texture frequency (stripes/checks per object unit)."""

    category: str
    name: str
    shape: dict[str, float]
    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]
    texture: str
    frequency: float


# --- signed distance functions (exact; p is (..., 3) in object coordinates) -------------------

def _revolved(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of a body of revolution about the y axis: distance from the axis, height."""
    return np.hypot(p[..., 0], p[..., 2]), p[..., 1]


def _box_2d(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sdf_sphere(p: np.ndarray, s: dict) -> np.ndarray:
    return np.linalg.norm(p, axis=-1) - s["radius"]


def _sdf_cube(p: np.ndarray, s: dict) -> np.ndarray:
    half = np.array([s["half_x"], s["half_y"], s["half_z"]]) - _CUBE_ROUNDING
    q = np.abs(p) - half
    outside = np.linalg.norm(np.maximum(q, 0), axis=-1)
    return outside + np.minimum(q.max(axis=-1), 0) - _CUBE_ROUNDING


def _sdf_cylinder(p: np.ndarray, s: dict) -> np.ndarray:
    rho, y = _revolved(p)
    return _box_2d(rho, y, s["radius"], s["half_height"])


def _sdf_cone(p: np.ndarray, s: dict) -> np.ndarray:
    """A solid cone standing on its base (base at y = -h/2, apex at y = +h/2): the distance to
    the triangle (0, -h/2), (R, -h/2), (0, h/2) of the (radius, height) half-plane."""
    rho, y = _revolved(p)
    r, h = s["radius"], s["height"]
    y = y + h / 2  # base at 0, apex at h
    # Distance to the slanted edge from (R, 0) to (0, h), and to the base segment.
    ex, ey = -r, h
    t = np.clip(((rho - r) * ex + y * ey) / (ex * ex + ey * ey), 0, 1)
    d_slant = np.hypot(rho - (r + t * ex), y - t * ey)
    d_base = np.hypot(rho - np.clip(rho, 0, r), y)
    # The axis edge of the triangle is no surface of the solid, so it is left out of the distance.
    d = np.minimum(d_slant, d_base)
    inside = (y >= 0) & (rho * h + y * r <= r * h)
    return np.where(inside, -d, d)


def _sdf_torus(p: np.ndarray, s: dict) -> np.ndarray:
    rho, y = _revolved(p)
    return np.hypot(rho - s["major"], y) - s["minor"]


_SDFS: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "sphere": _sdf_sphere, "cube": _sdf_cube, "cylinder": _sdf_cylinder, "cone": _sdf_cone, "torus": _sdf_torus}


# --- objects, camera, shading ---------------------------------------------------------------

def make_objects(seed: int = 0, instances: int = DEFAULT_INSTANCES,
                 categories: tuple[str, ...] = CATEGORIES) -> list[ObjectSpec]:
    """``instances`` seeded objects of every category (names ``CATEGORY_I``). Textures cycle
    through :data:`TEXTURES` from a seeded start, so a category holds every texture once it has
    three instances."""
    unknown = [c for c in categories if c not in _SHAPE_RANGES]
    if unknown:
        raise UserError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    if instances < 1:
        raise UserError(f"instances must be at least 1, got {instances}")
    objects = []
    for ci, category in enumerate(categories):
        rng = np.random.default_rng([seed, CATEGORIES.index(category)])
        start = int(rng.integers(len(TEXTURES)))
        for i in range(instances):
            shape = {k: round(float(rng.uniform(lo, hi)), 4) for k, (lo, hi) in _SHAPE_RANGES[category].items()}
            hue = float(rng.uniform())
            colour = colorsys.hsv_to_rgb(hue, float(rng.uniform(0.45, 0.9)), float(rng.uniform(0.75, 1.0)))
            colour2 = colorsys.hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1.0, float(rng.uniform(0.2, 0.8)),
                                          float(rng.uniform(0.35, 0.6)))
            objects.append(ObjectSpec(category, f"{category}_{i}", shape,
                                      tuple(round(c, 4) for c in colour), tuple(round(c, 4) for c in colour2),
                                      TEXTURES[(start + i) % len(TEXTURES)], round(float(rng.uniform(2.0, 4.0)), 3)))
    return objects


def direction(azimuth: float, elevation: float) -> np.ndarray:
    """Unit vector pointing from the origin towards azimuth / elevation (degrees): azimuth 0 is
    +z, 90 is +x; elevation 90 is +y (up)."""
    az, el = math.radians(azimuth), math.radians(elevation)
    return np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


def _rays(azimuth: float, elevation: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera position (3,) and unit ray directions (size * size, 3), row-major from the top left."""
    eye = CAMERA_DISTANCE * direction(azimuth, elevation)
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    half = math.tan(math.radians(FIELD_OF_VIEW) / 2)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    u, v = np.meshgrid(coords * half, -coords * half)
    dirs = forward + u.reshape(-1, 1) * right + v.reshape(-1, 1) * up
    return eye, dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def _trace(sdf: Callable[[np.ndarray], np.ndarray], eye: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sphere tracing: (hit mask (R,), ray length (R,))."""
    # Start every ray where it enters the bounding sphere (or mark it a miss).
    b = dirs @ eye
    disc = b * b - (eye @ eye - _BOUND**2)
    t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    far = -b + np.sqrt(np.maximum(disc, 0))
    active = np.flatnonzero(disc > 0)
    hit = np.zeros(len(dirs), dtype=bool)
    for _ in range(MAX_STEPS):
        if active.size == 0:
            break
        d = sdf(eye + t[active, None] * dirs[active])
        done = d < HIT_EPS
        hit[active[done]] = True
        t[active[~done]] += d[~done]
        active = active[~done]
        active = active[t[active] <= far[active]]
    return hit, t


def _normals(sdf: Callable[[np.ndarray], np.ndarray], p: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    grad = np.stack([sdf(p + e) - sdf(p - e) for e in np.eye(3) * eps], axis=-1)
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def _albedo(obj: ObjectSpec, p: np.ndarray) -> np.ndarray:
    """(R, 3) surface colour at object-space points ``p``."""
    a, b = np.array(obj.colour), np.array(obj.colour2)
    f = obj.frequency * math.pi
    if obj.texture == "plain":
        second = np.zeros(len(p), dtype=bool)
    elif obj.texture == "stripes":
        second = np.sin(f * (p[:, 0] + 0.5 * p[:, 1])) > 0
    elif obj.texture == "checker":
        second = np.sin(f * p[:, 0]) * np.sin(f * p[:, 1]) * np.sin(f * p[:, 2]) > 0
    else:
        raise ValueError(f"unknown texture {obj.texture!r}; known: {', '.join(TEXTURES)}")
    return np.where(second[:, None], b, a)


def render(obj: ObjectSpec, view: tuple[float, float], light_dir: tuple[float, float],
           light_rgb: tuple[float, float, float], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render ``obj`` seen from ``view`` (camera azimuth, elevation in degrees) lit from
    ``light_dir`` (azimuth, elevation) in colour ``light_rgb``.

    Returns ``(image, mask)``: ``(size, size, 3)`` uint8 RGB and the ``(size, size)`` bool object
    silhouette (pixels whose ray hits the object).
    """
    shape_sdf = _SDFS[obj.category]

    def sdf(p: np.ndarray) -> np.ndarray:
        return shape_sdf(p, obj.shape)

    eye, dirs = _rays(view[0], view[1], size)
    hit, t = _trace(sdf, eye, dirs)
    image = np.tile(np.array(BACKGROUND), (len(dirs), 1))
    idx = np.flatnonzero(hit)
    if idx.size:
        p = eye + t[idx, None] * dirs[idx]
        lambert = np.maximum(_normals(sdf, p) @ direction(*light_dir), 0)
        image[idx] = _albedo(obj, p) * np.array(light_rgb) * (AMBIENT + DIFFUSE * lambert)[:, None]
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return pixels.reshape(size, size, 3), hit.reshape(size, size)


# --- the set ----------------------------------------------------------------------------------

def _angle(value: float) -> str:
    degrees = round(value)
    return f"{degrees:+04d}" if degrees < 0 else f"{degrees:03d}"


def view_name(view: tuple[float, float]) -> str:
    """A viewpoint or light direction as a manifest value, e.g. ``az030_el25``."""
    return f"az{_angle(view[0])}_el{_angle(view[1])}"


def render_plan(viewpoints: int = DEFAULT_VIEWPOINTS, light_dirs: int = len(LIGHT_DIRECTIONS),
                light_colours: int = len(LIGHT_COLOURS)) -> list[tuple[tuple[float, float], tuple[float, float], str]]:
    """The (viewpoint, light direction, light colour name) of every image of one object, in
    the order of the module docstring: the viewpoint sweep, then the light-direction and
    light-colour sweeps without repeating the default image."""
    if viewpoints < 1 or not 1 <= light_dirs <= len(LIGHT_DIRECTIONS) or not 1 <= light_colours <= len(LIGHT_COLOURS):
        raise UserError(f"need 1+ viewpoints, 1-{len(LIGHT_DIRECTIONS)} light directions and "
                        f"1-{len(LIGHT_COLOURS)} light colours; got {viewpoints}, {light_dirs}, {light_colours}")
    views = [((VIEW_AZIMUTH0 + 360.0 * k / viewpoints) % 360.0, VIEW_ELEVATION) for k in range(viewpoints)]
    colours = list(LIGHT_COLOURS)[:light_colours]
    default_light, default_colour = LIGHT_DIRECTIONS[0], colours[0]
    plan = [(v, default_light, default_colour) for v in views]
    plan += [(views[0], d, default_colour) for d in LIGHT_DIRECTIONS[1:light_dirs]]
    plan += [(views[0], default_light, c) for c in colours[1:]]
    return plan


def make_set(out: str | os.PathLike, seed: int = 0, size: int = 64, instances: int = DEFAULT_INSTANCES,
             categories: tuple[str, ...] = CATEGORIES, viewpoints: int = DEFAULT_VIEWPOINTS,
             light_dirs: int = len(LIGHT_DIRECTIONS), light_colours: int = len(LIGHT_COLOURS), overwrite: bool = False,
             progress: Callable[[str], None] | None = None) -> Path:
    """Render the set described in the module docstring into ``out``; returns the manifest's path.

    Raises :class:`UserError` if ``out`` already holds a manifest and ``overwrite`` is False.
    """
    if size < 8:
        raise UserError(f"image size must be at least 8 pixels, got {size}")
    root = Path(out)
    manifest = root / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise UserError(f"{manifest} already exists; pass --overwrite to render the set again")
    objects = make_objects(seed, instances, tuple(categories))
    plan = render_plan(viewpoints, light_dirs, light_colours)
    rows = []
    start = time.perf_counter()
    for n, obj in enumerate(objects):
        folder = root / "images" / obj.category / obj.name
        folder.mkdir(parents=True, exist_ok=True)
        for view, light, colour in plan:
            image, _ = render(obj, view, light, LIGHT_COLOURS[colour], size)
            rel = f"images/{obj.category}/{obj.name}/{view_name(view)}__light_{view_name(light)}_{colour}.png"
            Image.fromarray(image).save(root / rel, format="PNG")
            rows.append({"path": rel, "category": obj.category, "object": obj.name, "viewpoint": view_name(view),
                         "light_dir": view_name(light), "light_colour": colour})
        if progress is not None:
            progress(f"rendered {obj.name} ({n + 1}/{len(objects)} objects, {len(rows)} images, "
                     f"{time.perf_counter() - start:.1f} s)")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    meta = {"format": SET_FORMAT, "seed": seed, "image_size": size, "viewpoints": viewpoints,
            "light_dirs": light_dirs, "light_colours": light_colours,
            "light_colour_rgb": {c: LIGHT_COLOURS[c] for c in list(LIGHT_COLOURS)[:light_colours]},
            "renderer": {"camera_distance": CAMERA_DISTANCE, "field_of_view": FIELD_OF_VIEW, "ambient": AMBIENT,
                         "diffuse": DIFFUSE, "background": BACKGROUND},
            "images": len(rows), "objects": [asdict(o) for o in objects]}
    atomic_write_text(root / META_NAME, json.dumps(meta, indent=2) + "\n")
    atomic_write_text(manifest, buffer.getvalue())  # last: a manifest means a complete set
    return manifest
