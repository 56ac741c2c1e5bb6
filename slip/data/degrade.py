"""Controlled changes to the pre-training data for studies (``slip study``, Cole et al. 2022,
"When Does Contrastive Visual Representation Learning Work?"): nested subsets of a corpus
(``data.subset``) and corrupted pre-training images (``data.degrade``).

Nested subsets
    A sample belongs to the subset of fraction ``f`` when :func:`subset_position` of its key, the
    first 8 bytes of ``sha1(key)`` read as a big-endian integer divided by 2^64 (uniform on
    [0, 1)), is below ``f``. The choice depends on the key alone: it is the same in every run,
    process, rank, loader worker, seed and epoch, and the subset of a smaller fraction lies
    inside that of a larger one (the 25% subset is part of the 50% subset). The size of a subset
    is binomial around ``f x N`` (within ``2 sqrt(N f (1 - f))`` samples or so). Keys are hashed
    as they are, so two corpora that reuse the same keys keep the same keys. :class:`KeepSubset`
    is the pipeline stage; it drops the other samples before the shuffle buffer, and they are
    not bad data: they are not counted as skipped samples.

Degradations (``data.degrade``)
    ``KIND:VALUE``, several joined by ``+`` and applied left to right, or ``none``:

    * ``downsample:K`` (integer K >= 2): the image is reduced K times in each side by area
      averaging (PIL's box filter) and brought back to its size by bilinear interpolation:
      detail finer than K pixels is gone, the size and framing stay;
    * ``jpeg:Q`` (integer quality 1-100): re-encoded as a JPEG of quality Q (Pillow's scale,
      libjpeg's quantisation tables); the JPEG bytes are what the loader decodes;
    * ``saltpepper:P`` (0 < P <= 1): each pixel independently, with probability P, becomes
      black (0) or white (255) in all three channels, with equal odds.

    The examples of the issue (``downsample:2``, ``downsample:4``, ``jpeg:10``,
    ``saltpepper:0.05``) follow the kinds of corruption Cole et al. apply to pre-training images
    (resolution, compression, pixel noise). Every random choice comes from an RNG seeded by the
    run's seed and the sample's key, so a sample is degraded the same way in every epoch, after
    a resume and in every process: a fixed corrupted copy of the corpus, made on the fly.
    :class:`DegradeImages` is the pipeline stage; it runs on the training loader only (after
    the shuffle buffer, before the one decode), never on evaluation images. Images that are
    not JPEG after the last step are stored losslessly (PNG), so nothing but the stated
    degradation changes them. A sample whose image cannot be read is passed on unchanged: the
    decode stage skips and counts it with its usual reason.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from slip.data.errors import SampleSkip
from slip.data.images import DEFAULT_MAX_PIXELS, decode_error, open_image, to_rgb
from slip.data.stages import IMAGE_EXTENSIONS
from slip.errors import UserError

__all__ = [
    "DEGRADATION_KINDS", "Degradation", "DegradeError", "DegradeImages", "KeepSubset", "check_subset",
    "degrade_image", "degrade_image_bytes", "in_subset", "parse_degradations", "subset_position",
]

# PNG compression level of degraded images handed to the decoder: 1 is the fastest level that
# still compresses (zlib); the bytes only live in the loader worker's memory.
_PNG_LEVEL = 1


class DegradeError(UserError, ValueError):
    """A malformed ``data.subset`` or ``data.degrade`` value; the message names the key."""


# --------------------------------------------------------------------------------------------
# Nested subsets
# --------------------------------------------------------------------------------------------
def subset_position(key: str) -> float:
    """Where ``key`` lies in [0, 1): the first 8 bytes of ``sha1(key)`` (UTF-8) as a big-endian
    integer, divided by 2^64."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def in_subset(key: str, fraction: float) -> bool:
    """Whether the sample ``key`` belongs to the subset of ``fraction`` (see the module doc)."""
    return subset_position(key) < fraction


def check_subset(value: Any, key: str = "data.subset") -> float:
    """``value`` as a subset fraction in (0, 1]; a :class:`DegradeError` naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise DegradeError(f"{key}: {value!r} is not a fraction in (0, 1] (the share of the corpus's samples "
                           "kept, chosen by a hash of each sample's key)")
    return float(value)


class KeepSubset:
    """Pipeline stage: raw samples -> those whose key lies in the subset of ``fraction``.

    Stateless and keyed by the sample alone, so a resumed stream drops exactly the samples the
    uninterrupted one dropped. Dropped samples are not skips (nothing is wrong with them).
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = check_subset(fraction, "subset")

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            if in_subset(str(sample.get("__key__", "")), self.fraction):
                yield sample


# --------------------------------------------------------------------------------------------
# Degradations
# --------------------------------------------------------------------------------------------
DEGRADATION_KINDS = ("downsample", "jpeg", "saltpepper")
_EXAMPLES = {"downsample": "downsample:2", "jpeg": "jpeg:10", "saltpepper": "saltpepper:0.05"}


@dataclass(frozen=True)
class Degradation:
    """One step of a ``data.degrade`` value: ``kind`` and its ``value`` (see the module doc)."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def _parse_one(text: str, key: str) -> Degradation:
    kind, _, raw = text.partition(":")
    kind = kind.strip().lower()
    if kind not in DEGRADATION_KINDS:
        raise DegradeError(f"{key}: unknown degradation {text!r}; known: downsample:K (K >= 2), jpeg:Q (quality "
                           "1-100), saltpepper:P (fraction of pixels, 0 < P <= 1), joined by '+', or none")
    try:
        value = float(raw)
    except ValueError:
        raise DegradeError(f"{key}: {text!r} needs a number after '{kind}:', e.g. {_EXAMPLES[kind]}") from None
    if kind == "downsample" and not (value == int(value) and value >= 2):
        raise DegradeError(f"{key}: {text!r}: the downsampling factor must be a whole number >= 2")
    if kind == "jpeg" and not (value == int(value) and 1 <= value <= 100):
        raise DegradeError(f"{key}: {text!r}: the JPEG quality must be a whole number from 1 to 100")
    if kind == "saltpepper" and not 0 < value <= 1:
        raise DegradeError(f"{key}: {text!r}: the salt-and-pepper fraction must lie in (0, 1]")
    return Degradation(kind, value)


def parse_degradations(text: str | None, key: str = "data.degrade") -> tuple[Degradation, ...]:
    """``"downsample:2+jpeg:30"`` -> its steps; ``None``, ``""`` and ``"none"`` -> no step.

    Raises:
        DegradeError: naming ``key`` and the step for an unknown kind or a bad value.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        raise DegradeError(f"{key}: expected a string such as 'jpeg:10' or 'none', got {text!r}")
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(_parse_one(part.strip(), key) for part in text.split("+"))


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"slip-degrade:{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def degrade_image(image: Image.Image, steps: Sequence[Degradation], seed: int, key: str
                  ) -> tuple[Image.Image, bytes]:
    """Apply ``steps`` to an RGB image; returns the result and its encoded bytes (the JPEG of a
    final ``jpeg`` step, else a lossless PNG). Random choices come from ``(seed, key)``."""
    rng = _rng(seed, key)
    encoded: bytes | None = None
    for step in steps:
        encoded = None
        if step.kind == "downsample":
            factor = int(step.value)
            small = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
            image = image.resize(small, Image.BOX).resize(image.size, Image.BILINEAR)
        elif step.kind == "jpeg":
            encoded = _encode(image, "JPEG", quality=int(step.value))
            with Image.open(io.BytesIO(encoded)) as decoded:
                image = decoded.convert("RGB")
        elif step.kind == "saltpepper":
            pixels = np.array(image, dtype=np.uint8)
            hit = rng.random(pixels.shape[:2]) < step.value
            white = rng.random(pixels.shape[:2]) < 0.5
            pixels[hit] = np.where(white[hit], 255, 0)[:, None].astype(np.uint8)
            image = Image.fromarray(pixels, mode="RGB")
        else:  # parse_degradations admits only the kinds above
            raise ValueError(f"unknown degradation kind {step.kind!r}")
    if encoded is None:
        encoded = _encode(image, "PNG", compress_level=_PNG_LEVEL)
    return image, encoded


def degrade_image_bytes(data: bytes, steps: Sequence[Degradation], seed: int, key: str,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Encoded image bytes -> the encoded bytes of the degraded RGB image (see the module doc).

    Raises:
        SampleSkip: when the image cannot be read (the reason the loader would give).
    """
    try:
        with open_image(data, max_pixels) as im:
            im.load()
            rgb, _ = to_rgb(im)
            rgb = rgb.convert("RGB")  # one band ("L") images too: the steps work on three
    except SampleSkip:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what PIL raises for broken pixel data
        raise decode_error(exc) from None
    return degrade_image(rgb, steps, seed, key)[1]


class DegradeImages:
    """Pipeline stage: raw samples -> the same samples with their image member degraded.

    ``spec`` is a ``data.degrade`` value (:func:`parse_degradations`); ``seed`` the run's seed.
    The image member keeps its name (``jpg`` ...): the decoder reads any format by content. A
    sample without an image, or whose image cannot be read, is passed on unchanged for the
    decode stage to skip and count.
    """

    def __init__(self, spec: str, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.steps = parse_degradations(spec, "degrade")
        self.seed, self.max_pixels = seed, max_pixels

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            yield self.degrade(sample)

    def degrade(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One sample with its first image member (in the loader's order of preference) degraded."""
        if not self.steps:
            return sample
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return sample
        try:
            data = degrade_image_bytes(sample[ext], self.steps, self.seed, str(sample.get("__key__", "")),
                                       self.max_pixels)
        except SampleSkip:
            return sample
        return {**sample, ext: data}
