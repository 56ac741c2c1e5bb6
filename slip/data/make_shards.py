"""``slip make-shards``: convert an image-caption corpus on disk into webdataset shards.

Examples::

    slip make-shards /data/yfcc100m /data/shards/yfcc15m --corpus yfcc15m --max-side 512 --workers 16
    slip make-shards /data/cc3m/cc3m.npy /data/shards/cc3m --image-root /data/cc3m --corpus cc3m
    slip make-shards /data/coco/annotations/captions_train2017.json /data/shards/coco --corpus coco
    slip make-shards captions.tsv /data/shards/mine --image-column filepath --caption-column title
    slip make-shards /data/my_folder /data/shards/mine
    slip make-shards /data/imagenet/train /data/shards/imagenet --no-captions   # SSL alone
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from slip.data import sources
from slip.data.images import DEFAULT_MAX_PIXELS
from slip.data.shards import DEFAULT_JPEG_QUALITY, write_shards
from slip.data.sources import SampleSource
from slip.errors import UserError, command

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``slip make-shards``."""
    parser = argparse.ArgumentParser(
        prog="slip make-shards",
        description=(
            "Convert a corpus (image folder, TSV/CSV/parquet table, SLIP's YFCC15M, CC3M/CC12M "
            "or COCO captions layout) into webdataset shards with an index.json."
        ),
    )
    parser.add_argument("source", type=Path, help="corpus directory or metadata/table file")
    parser.add_argument("out", type=Path, help="output directory for the shards and index.json")
    parser.add_argument(
        "--format",
        choices=("auto", *sources.SOURCE_FORMATS),
        default="auto",
        help="source layout (default: detected from SOURCE)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    parser.add_argument(
        "--max-side", type=int, default=None, metavar="S",
        help="downscale images whose shorter side is longer than S (default: keep sizes)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="W",
        help="processes decoding and validating images (default: number of CPUs)",
    )
    parser.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    parser.add_argument(
        "--no-captions", action="store_true",
        help="an image-only corpus for self-supervised training alone (e.g. an ImageNet-style folder): "
             "captions are neither read nor required, and the shards hold none",
    )
    parser.add_argument("--corpus", default=None, help="corpus name recorded in index.json")
    parser.add_argument(
        "--image-root", type=Path, default=None, metavar="ROOT",
        help="image directory: relative table paths, CC images, COCO root, YFCC root for a .pkl SOURCE",
    )
    parser.add_argument("--image-column", default=None, help="table column with image paths")
    parser.add_argument("--caption-column", default=None, help="table column with captions")
    parser.add_argument("--delimiter", default=None, help="table field separator (default: from suffix)")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, help="quality of re-encoded images")
    parser.add_argument("--coco-split", default="train2017", help="COCO image folder under the root")
    parser.add_argument(
        "--image-field", default=None,
        help="CC: metadata field naming the image (default: image_name, else image_id)",
    )
    parser.add_argument(
        "--path-template", default=None,
        help="CC/COCO: image path template, e.g. '{root}/{image_id}.jpg' (fields of the entry, root, split)",
    )
    parser.add_argument(
        "--yfcc-unquote", choices=("auto", "yes", "no"), default="auto",
        help="URL-decode YFCC titles/descriptions: auto decodes only text that looks quoted",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards and index in OUT")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return parser


def open_source(args: argparse.Namespace) -> SampleSource:
    """Build the sample reader described by parsed ``slip make-shards`` arguments."""
    source: Path = args.source
    fmt = sources.detect_format(source) if args.format == "auto" else args.format
    logger.info("reading %s as %s", source, fmt)
    if fmt == "folder":
        return sources.read_folder(source)
    if fmt == "table":
        return sources.read_table(
            source,
            image_column=args.image_column,
            caption_column=args.caption_column,
            image_root=args.image_root,
            delimiter=args.delimiter,
        )
    if fmt == "yfcc":
        unquote = {"auto": None, "yes": True, "no": False}[args.yfcc_unquote]
        if source.is_dir():
            return sources.read_yfcc(source, metadata=sources.find_yfcc_metadata(source), unquote=unquote)
        root = args.image_root if args.image_root is not None else source.parent
        return sources.read_yfcc(root, metadata=source, unquote=unquote)
    if fmt == "cc":
        root = args.image_root if args.image_root is not None else source.parent
        return sources.read_cc(source, root, image_field=args.image_field, path_template=args.path_template)
    if fmt == "coco":
        root = args.image_root if args.image_root is not None else sources.default_coco_root(source)
        return sources.read_coco(source, root, split=args.coco_split, path_template=args.path_template)
    raise ValueError(f"unknown source format {fmt!r}")


@command("make-shards")
def main(argv: list[str]) -> int:
    """Run ``slip make-shards``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("samples_per_shard", "workers", "max_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_side is not None and args.max_side < 1:
        parser.error("--max-side must be at least 1")
    # No-op when the caller (slip's CLI, pytest) already configured logging.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        samples = open_source(args)
        index = write_shards(
            samples,
            args.out,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            max_side=args.max_side,
            workers=args.workers,
            corpus=args.corpus,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
            jpeg_quality=args.jpeg_quality,
            overwrite=args.overwrite,
            captions=not args.no_captions,
        )
    except ImportError as exc:  # pyarrow for parquet tables
        raise UserError(f"{args.source}: {exc}") from None
    skipped = index["skipped"]
    print(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {args.out}")
    if skipped:
        details = ", ".join(f"{reason}={count}" for reason, count in skipped.items())
        print(f"skipped {sum(skipped.values())} samples: {details}")
    else:
        print("skipped 0 samples")
    print(f"index: {Path(args.out) / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
