"""Encoded image bytes -> a checked PIL image -> RGB pixels, one way for shard writing
(:func:`slip.data.shards.prepare_image`) and for the training loader
(:func:`slip.data.decode.decode_views`), so a file gets the same skip reason and the same
pixels whichever tool reads it.

* :func:`open_image` parses the header only and applies the pixel cap before any pixel is
  decoded (a decompression bomb costs microseconds);
* :func:`decode_error` names what a failed decode means (``truncated_image`` or
  ``corrupt_image``);
* :func:`to_rgb` converts every PIL mode: alpha composited on white, 16-bit and 32-bit integer
  images rescaled from their full range and float images from [0, 1] (PIL's plain ``convert``
  would clip them at 255, turning most of a 16-bit image white), anything else through PIL.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

from slip.data.errors import (
    CORRUPT_IMAGE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    UNSUPPORTED_MODE,
    SampleSkip,
)

# PIL's own default cap (about 89.5 megapixels); larger images are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485



@contextlib.contextmanager
def pixel_cap(max_pixels: int) -> Iterator[None]:
    """PIL refuses images above 2 x ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open``; raising it to
    our cap keeps PIL from rejecting images we allow (our own check rejects those above it), and
    its bomb and EXIF warnings, which would flood the logs from every worker, are silenced."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_error(exc: BaseException) -> SampleSkip:
    """The skip for an exception raised while decoding an image's pixels."""
    if isinstance(exc, Image.DecompressionBombError):
        return SampleSkip(TOO_MANY_PIXELS, str(exc)[:200])
    message = str(exc)
    if "truncated" in message.lower() or "incomplete" in message.lower():
        return SampleSkip(TRUNCATED_IMAGE, message[:200])
    return SampleSkip(CORRUPT_IMAGE, f"{type(exc).__name__}: {message[:200]}")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open encoded image bytes lazily (header only) and check them.

    Raises:
        SampleSkip: ``empty_file``, ``not_an_image``, ``too_many_pixels`` (width x height over
            ``max_pixels``), ``corrupt_image`` (an unreadable header or an empty size) or
            ``truncated_image``.
    """
    if not data:
        raise SampleSkip(EMPTY_FILE)
    try:
        with pixel_cap(max_pixels):
            im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise SampleSkip(NOT_AN_IMAGE, f"{len(data)} bytes, starts with {bytes(data[:8])!r}") from None
    except Exception as exc:  # noqa: BLE001 -- PIL's plugins raise many types on broken headers
        raise decode_error(exc) from None
    width, height = im.size
    if width < 1 or height < 1:
        raise SampleSkip(CORRUPT_IMAGE, f"size {width}x{height}")
    if width * height > max_pixels:
        raise SampleSkip(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels")
    if im.format == "PNG":
        # Pillow's PNG decoder ignores chunk checksums, so corrupted pixel data would decode to
        # garbage silently; verify() checks every chunk's CRC (and needs an image of its own).
        try:
            with pixel_cap(max_pixels), Image.open(io.BytesIO(data)) as check:
                check.verify()
        except Exception as exc:  # noqa: BLE001 -- verify raises SyntaxError, OSError ...
            raise decode_error(exc) from None
    return im


def has_alpha(img: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a transparent colour)."""
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info


def _high_depth_to_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float single-band image -> 8-bit "L", rescaled from its range."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        arr = np.nan_to_num(arr)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    else:
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            full = 65535.0
        else:
            # 32-bit "I" holds 16-bit PNG data in some Pillow versions and 8-bit data in others.
            full = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
        scale = 255.0 / full
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, *, keep_gray: bool = False) -> tuple[Image.Image, bool]:
    """Convert an image of any PIL mode to RGB; returns the image and whether it was converted.

    With ``keep_gray`` a grayscale result stays one band ("L", the same pixels as its RGB
    conversion, three times smaller), for callers that expand it later.

    Raises:
        SampleSkip: ``unsupported_mode`` when PIL cannot convert the mode.
    """
    try:
        return _to_rgb(img, keep_gray)
    except (ValueError, OSError) as exc:  # what PIL raises for modes it cannot convert
        raise SampleSkip(UNSUPPORTED_MODE, f"{img.mode}: {exc!r}") from None


def _to_rgb(img: Image.Image, keep_gray: bool) -> tuple[Image.Image, bool]:
    mode = img.mode
    transparent = "transparency" in img.info
    if (mode == "RGB" or (keep_gray and mode == "L")) and not transparent:
        return img, False
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = _high_depth_to_gray(img)
        return (gray if keep_gray else gray.convert("RGB")), True
    if has_alpha(img):
        # Transparent pixels' colours are arbitrary; white is what viewers show for most web images.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB"), True
    # CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, 1, P without transparency.
    return img.convert("RGB"), True
