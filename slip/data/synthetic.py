"""A deterministic synthetic corpus of captioned shapes, with a compositional zero-shot benchmark.

Each image shows one shape (circle, square, triangle, star, cross) of one colour (red, green,
blue, yellow, purple, orange), small or big, in one of five positions, on a plain, striped,
dotted or checkered grey background. Captions vary in wording (templates, synonyms, optional
attributes) but always name the colour and the shape, e.g. "a small red circle on a striped
background" or "photo of a big blue triangle in the top left".

Some colour x shape combinations are *held out*: they never occur in the training images or
captions but do occur in the benchmark, so zero-shot accuracy on them measures compositional
generalisation (the model has seen "red" and "triangle", never a red triangle).

Output of :func:`generate_synthetic` (``slip make-synthetic OUT``)::

    OUT/train/train-000000.tar ...   training shards (corpus "synthetic"), json: the scene's
    OUT/train/index.json             colour, shape, size, position, background
    OUT/benchmark/test-000000.tar .. labelled test shards (corpus "synthetic-benchmark"); json:
    OUT/benchmark/index.json         "cls" (index into classes), "class_name", "held_out", scene
    OUT/benchmark/benchmark.json     classes, prompt templates, held-out classes (see below)

Everything is a function of the seed: the same seed gives byte-identical shards (on the same
Pillow/libjpeg build), another seed gives different images, captions and held-out classes.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from slip.data.shards import Sample, write_json_atomic, write_shards
from slip.errors import command

logger = logging.getLogger(__name__)

BENCHMARK_FORMAT = "slip-synthetic-benchmark/1"
BENCHMARK_NAME = "benchmark.json"
JPEG_QUALITY = 90
# Shapes are drawn this many times larger and averaged down, for smooth (anti-aliased) edges.
SUPERSAMPLE = 4

# Saturated colours far apart in hue, so that colour is easy to see even at 32 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "big")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")

# Prompt templates for zero-shot classification; "{}" is replaced by a class name ("red circle").
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
    "a picture of the {}.",
    "an image of a {}.",
    "the {}.",
    "{}.",
)

_POSITION_CENTRES = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
# Radius of the shape as a fraction of the image side.
_SIZE_RADII = {"small": (0.12, 0.16), "big": (0.21, 0.26)}
# Farthest point of each outline from its centre, in radii (see _shape_outline).
_SHAPE_EXTENT = {"circle": 1.0, "square": 1.2, "triangle": 1.25, "star": 1.25, "cross": math.hypot(1.1, 0.38)}

# Caption vocabulary. The first entry is the canonical word, used most of the time.
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "square tile"),
    "triangle": ("triangle", "triangular shape", "three-cornered shape"),
    "star": ("star", "star shape", "five-pointed star"),
    "cross": ("cross", "plus sign", "plus shape"),
}
_POSITION_PHRASES = {
    "top left": ("in the top left", "in the upper left corner", "at the top left"),
    "top right": ("in the top right", "in the upper right corner", "at the top right"),
    "bottom left": ("in the bottom left", "in the lower left corner", "at the bottom left"),
    "bottom right": ("in the bottom right", "in the lower right corner", "at the bottom right"),
    "center": ("in the center", "in the middle", "at the centre of the image"),
}
_BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a blank background", "against a plain backdrop"),
    "striped": ("on a striped background", "on stripes", "against a striped backdrop"),
    "dotted": ("on a dotted background", "on a polka dot background", "against a dotted backdrop"),
    "checkered": ("on a checkered background", "on a checkerboard", "against a checkered backdrop"),
}
_PREFIXES = ("", "a photo of ", "photo of ", "an image of ", "a picture of ", "a drawing of ", "there is ")
_COLOUR_VERBS = ("coloured", "colored", "painted", "in")


@dataclasses.dataclass(frozen=True)
class Scene:
    """The attributes of one synthetic image."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def class_name(self) -> str:
        """Zero-shot class of the scene: ``"{colour} {shape}"``."""
        return f"{self.colour} {self.shape}"

    def as_dict(self) -> dict[str, str]:
        """The attributes as a JSON-ready dict."""
        return dataclasses.asdict(self)


def class_names() -> list[str]:
    """All colour x shape classes, colour-major: ``["red circle", "red square", ...]``."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def choose_held_out(seed: int) -> list[tuple[str, str]]:
    """Held-out ``(colour, shape)`` pairs for ``seed``: one per shape, each with a different colour.

    Every shape and every colour therefore still appears in training with other partners,
    which is what makes the held-out pairs a test of composition rather than of new words.
    """
    rng = np.random.default_rng([seed, 0])
    colours = list(COLOURS)
    order = rng.permutation(len(colours))
    return [(colours[int(order[i])], shape) for i, shape in enumerate(SHAPES)]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _word(rng: np.random.Generator, options: Sequence[str], canonical_p: float = 0.7) -> str:
    # Mostly the canonical word (the class-name vocabulary), sometimes a synonym for variety.
    if len(options) == 1 or rng.random() < canonical_p:
        return options[0]
    return _pick(rng, options[1:])


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A randomly worded caption that always names the scene's colour and shape."""
    shape = _word(rng, _SHAPE_WORDS[scene.shape])
    size = _word(rng, _SIZE_WORDS[scene.size], canonical_p=0.5) if rng.random() < 0.5 else ""
    position = _pick(rng, _POSITION_PHRASES[scene.position]) if rng.random() < 0.5 else ""
    background = _pick(rng, _BACKGROUND_PHRASES[scene.background]) if rng.random() < 0.5 else ""
    noun = " ".join(w for w in (size, scene.colour, shape) if w)
    structure = rng.random()
    if structure < 0.5:
        words = [_pick(rng, _PREFIXES) + _with_article(noun), position, background]
    elif structure < 0.65:
        words = [noun]
    elif structure < 0.8:
        plain_noun = " ".join(w for w in (size, shape) if w)
        words = [_with_article(plain_noun), _pick(rng, _COLOUR_VERBS), scene.colour, position, background]
    elif structure < 0.9:
        where = position or _pick(rng, _POSITION_PHRASES[scene.position])
        words = [f"the {scene.colour} {shape} is {where}", background]
    else:
        where = position or _pick(rng, _POSITION_PHRASES[scene.position])
        words = [f"{where}, {_with_article(noun)}", background]
    return " ".join(w for w in words if w)


def canonical_caption(scene: Scene) -> str:
    """The fixed, fully specified caption used for benchmark images."""
    noun = f"{scene.size} {scene.colour} {scene.shape}"
    return (
        f"{_with_article(noun)} {_POSITION_PHRASES[scene.position][0]} "
        f"{_BACKGROUND_PHRASES[scene.background][0]}"
    )


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel coordinates, shared by all backgrounds of one size (rebuilding them costs ~10%).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey (slightly tinted) background with a two-tone pattern, uint8 HxWx3."""
    dark = rng.random() < 0.3
    base = rng.uniform(35, 85) if dark else rng.uniform(165, 235)
    first = base + rng.uniform(-8, 8, 3)
    second = first + (45.0 if dark else -45.0)
    yy, xx = _grid(size)
    period = size * rng.uniform(0.10, 0.16)
    phase = rng.uniform(0, period)
    if kind == "plain":
        pattern = np.zeros((size, size), dtype=np.float32)
    elif kind == "striped":
        direction = int(rng.integers(3))
        coord = (yy, xx, (xx + yy) / math.sqrt(2))[direction] + phase
        pattern = np.floor(coord / (period / 2)) % 2
    elif kind == "dotted":
        spacing = period * 1.3
        dx = (xx + phase) % spacing - spacing / 2
        dy = (yy + phase) % spacing - spacing / 2
        pattern = (dx * dx + dy * dy < (spacing * 0.24) ** 2).astype(np.float32)
    elif kind == "checkered":
        cell = period * 0.8
        pattern = (np.floor((xx + phase) / cell) + np.floor((yy + phase) / cell)) % 2
    else:
        raise ValueError(f"unknown background {kind!r}")
    pixels = first.astype(np.float32) + pattern[..., None] * (second - first).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _shape_outline(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices around the origin for every shape except the circle."""
    if shape == "square":
        points = [(radius * 1.2, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        points = [(radius * 1.25, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        points = [(radius * (1.25 if k % 2 == 0 else 0.5), -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        w, r = 0.38 * radius, 1.1 * radius
        corners = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)]
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(rho * math.cos(theta + angle), rho * math.sin(theta + angle)) for rho, theta in points]


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image; jitter (position, size, angle, tints) comes from ``rng``."""
    background = _background(scene.background, rng, image_size)
    low, high = _SIZE_RADII[scene.size]
    radius = image_size * rng.uniform(low, high)
    fx, fy = _POSITION_CENTRES[scene.position]
    jitter = rng.uniform(-0.03, 0.03, 2) * image_size
    # Keep the whole shape inside the image: corners of rotated polygons reach past the radius.
    margin = radius * _SHAPE_EXTENT[scene.shape] + 1.0
    cx = float(np.clip(fx * image_size + jitter[0], margin, image_size - margin))
    cy = float(np.clip(fy * image_size + jitter[1], margin, image_size - margin))
    angle = rng.uniform(-0.3, 0.3)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-15, 16, 3), 0, 255)

    big = image_size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    s = SUPERSAMPLE
    if scene.shape == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=255)
    else:
        draw.polygon([((cx + x) * s, (cy + y) * s) for x, y in _shape_outline(scene.shape, radius, angle)], fill=255)
    # reduce() averages SUPERSAMPLE x SUPERSAMPLE blocks: the coverage of each output pixel.
    alpha = mask.reduce(SUPERSAMPLE)
    paint = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in colour))
    return Image.composite(paint, Image.fromarray(background), alpha)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _random_scene(rng: np.random.Generator, colour: str, shape: str) -> Scene:
    return Scene(colour, shape, _pick(rng, SIZES), _pick(rng, POSITIONS), _pick(rng, BACKGROUNDS))


def iter_train_samples(
    seed: int, count: int, *, image_size: int = 64, held_out: Sequence[tuple[str, str]] = ()
) -> Iterator[Sample]:
    """``count`` training samples; colour x shape pairs in ``held_out`` never occur."""
    excluded = set(map(tuple, held_out))
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]
    if not pairs:
        raise ValueError("every colour x shape combination is held out")
    rng = np.random.default_rng([seed, 1])
    for i in range(count):
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        scene = _random_scene(rng, colour, shape)
        image = render_scene(scene, rng, image_size)
        yield Sample(key=f"{i:08d}", image=_jpeg(image), caption=describe_scene(scene, rng), extra=scene.as_dict())


def iter_benchmark_samples(
    seed: int, per_class: int, *, image_size: int = 64, held_out: Sequence[tuple[str, str]] = ()
) -> Iterator[Sample]:
    """``per_class`` labelled test images of every class, in a seeded shuffled order."""
    names = class_names()
    excluded = {f"{c} {s}" for c, s in held_out}
    rng = np.random.default_rng([seed, 2])
    labels = np.repeat(np.arange(len(names)), per_class)
    labels = labels[rng.permutation(len(labels))]
    for i, label in enumerate(labels):
        colour, shape = names[int(label)].split(" ")
        scene = _random_scene(rng, colour, shape)
        image = render_scene(scene, rng, image_size)
        extra: dict[str, Any] = {
            "cls": int(label),
            "class_name": scene.class_name,
            "held_out": scene.class_name in excluded,
            **scene.as_dict(),
        }
        yield Sample(key=f"test{i:06d}", image=_jpeg(image), caption=canonical_caption(scene), extra=extra)


def generate_synthetic(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_samples: int = 4000,
    test_per_class: int = 20,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    held_out: Sequence[tuple[str, str]] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the synthetic training shards and the zero-shot benchmark under ``out_dir``.

    Args:
        out_dir: output root; ``train/`` and ``benchmark/`` are created inside.
        seed: everything (images, captions, held-out pairs, order) derives from it.
        train_samples: number of training image-caption pairs.
        test_per_class: benchmark images per colour x shape class (held-out ones included).
        image_size: side of the square images in pixels.
        samples_per_shard: samples per shard for both splits.
        held_out: ``(colour, shape)`` pairs to keep out of training; default
            :func:`choose_held_out` of the seed.
        overwrite: replace existing output.
        progress: show progress bars.

    Returns:
        ``{"train": train index, "benchmark": benchmark.json contents, "benchmark_index": index}``.
    """
    if image_size < 16:
        raise ValueError("image_size must be at least 16 pixels")
    if train_samples < 0 or test_per_class < 0:
        raise ValueError("sample counts must not be negative")
    pairs = [tuple(p) for p in (choose_held_out(seed) if held_out is None else held_out)]
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown held-out class {colour!r} {shape!r}")
    out = Path(out_dir)
    bench_dir = out / "benchmark"
    existing = [p for p in (out / "train" / "index.json", bench_dir / "index.json", bench_dir / BENCHMARK_NAME) if p.exists()]
    if existing and not overwrite:
        # Checked up front so a refusal never leaves a new train split beside an old benchmark.
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) to replace it")
    train_index = write_shards(
        iter_train_samples(seed, train_samples, image_size=image_size, held_out=pairs),
        out / "train",
        prefix="train",
        samples_per_shard=samples_per_shard,
        corpus="synthetic",
        progress=progress,
        overwrite=overwrite,
        total=train_samples,
    )
    names = class_names()
    if overwrite:
        (bench_dir / BENCHMARK_NAME).unlink(missing_ok=True)
    test_index = write_shards(
        iter_benchmark_samples(seed, test_per_class, image_size=image_size, held_out=pairs),
        bench_dir,
        prefix="test",
        samples_per_shard=samples_per_shard,
        corpus="synthetic-benchmark",
        progress=progress,
        overwrite=overwrite,
        total=test_per_class * len(names),
    )
    held_names = [f"{c} {s}" for c, s in pairs]
    benchmark = {
        "format": BENCHMARK_FORMAT,
        "seed": seed,
        "image_size": image_size,
        "classes": names,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "templates": list(ZERO_SHOT_TEMPLATES),
        "held_out": held_names,
        "held_out_indices": [names.index(n) for n in held_names],
        "label_field": "cls",
        "index": "index.json",
        "test_per_class": test_per_class,
        "num_test": test_index["total_samples"],
        "train_samples": train_index["total_samples"],
    }
    write_json_atomic(bench_dir / BENCHMARK_NAME, benchmark)
    logger.info("synthetic corpus in %s; held-out classes: %s", out, ", ".join(held_names))
    return {"train": train_index, "benchmark": benchmark, "benchmark_index": test_index}


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``slip make-synthetic``."""
    parser = argparse.ArgumentParser(
        prog="slip make-synthetic",
        description="Generate the synthetic captioned-shapes corpus and its zero-shot benchmark.",
    )
    parser.add_argument("out", type=Path, help="output directory (train/ and benchmark/ are created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=4000, metavar="N")
    parser.add_argument("--test-per-class", type=int, default=20, metavar="K")
    parser.add_argument("--image-size", type=int, default=64, metavar="PX")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus in OUT")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return parser


@command("make-synthetic")
def main(argv: list[str]) -> int:
    """Run ``slip make-synthetic``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    if args.train_samples < 0 or args.test_per_class < 0 or args.samples_per_shard < 1:
        parser.error("sample counts must be non-negative and --samples-per-shard at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = generate_synthetic(
        args.out,
        seed=args.seed,
        train_samples=args.train_samples,
        test_per_class=args.test_per_class,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    bench = result["benchmark"]
    print(
        f"wrote {result['train']['total_samples']} training samples to {args.out / 'train'} and "
        f"{bench['num_test']} benchmark images ({len(bench['classes'])} classes) to {args.out / 'benchmark'}"
    )
    print(f"held-out classes (never in training): {', '.join(bench['held_out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
