"""What makes a sample unusable, shared by shard writing (``slip make-shards``) and loading.

:class:`SampleSkip` carries a reason, one of the names below; they are the keys of an index's
``skipped`` counts (:mod:`slip.data.shards`) and of the loader's skip totals
(:meth:`slip.data.pipeline.SlipLoader.skipped`). One bad file gets the same reason from both.
"""
from __future__ import annotations

# The image.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
TOO_MANY_PIXELS = "too_many_pixels"
UNSUPPORTED_MODE = "unsupported_mode"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"  # a source file that exists but cannot be read (writing)
# The caption and metadata.
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
BAD_METADATA = "bad_metadata"
DUPLICATE_KEY = "duplicate_key"  # a key seen before in the same output (writing)
# The shards (loading): one count per shard, not per sample.
SHARD_UNREADABLE = "shard_unreadable"
TAR_ERROR = "tar_error"
SAMPLE_ERROR = "sample_error"  # anything unexpected while preparing one sample (loading)

IMAGE_REASONS: tuple[str, ...] = (
    EMPTY_FILE, NOT_AN_IMAGE, CORRUPT_IMAGE, TRUNCATED_IMAGE, TOO_MANY_PIXELS, UNSUPPORTED_MODE,
)
# What shard writing counts (index.json "skipped") and what the training loader counts.
WRITE_SKIP_REASONS: tuple[str, ...] = (
    *IMAGE_REASONS, MISSING_IMAGE, UNREADABLE_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8,
    BAD_METADATA, DUPLICATE_KEY,
)
LOAD_SKIP_REASONS: tuple[str, ...] = (
    *IMAGE_REASONS, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8, BAD_METADATA,
    SHARD_UNREADABLE, TAR_ERROR, SAMPLE_ERROR,
)


class SampleSkip(Exception):
    """A sample cannot be used; ``reason`` is a short counter key, ``detail`` a human note."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
