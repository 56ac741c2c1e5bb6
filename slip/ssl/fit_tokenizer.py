"""``slip fit-tokenizer``: fit a k-means patch codebook (a BEiT target tokenizer that needs no
downloaded weights) on images from webdataset shards.

    slip fit-tokenizer data/cc3m/ codebook.safetensors --k 512 --patch 8 --input-size 112 \\
        --samples 20000 --iters 20 --seed 0

Images are read in shard order (the shard list is shuffled by ``--seed`` so that ``--samples``
draws from the whole corpus, not its first shards), decoded once, cropped and resized to
``--input-size`` (a centre square crop by default; ``--min-scale < 1`` draws random resized
crops instead, like the training views), and ``--patches-per-image`` random patches of each go
into k-means. Unreadable images are skipped and counted. The result is written atomically with
:meth:`slip.ssl.visual_tokenizers.KMeansPatchTokenizer.save`; the last line printed is a JSON
summary (k, inertia, code usage).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator

import torch
from tqdm import tqdm

from slip.data.decode import decode_views
from slip.data.errors import SampleSkip
from slip.data.specs import parse_shard_spec
from slip.data.stages import IMAGE_EXTENSIONS
from slip.data.views import ViewSpec
from slip.errors import UserError, command
from slip.ssl.visual_tokenizers import PATCH_NORMS, KMeansPatchTokenizer

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slip fit-tokenizer",
        description="Fit a k-means codebook over image patches (a visual tokenizer for BEiT-style "
        "masked image modelling) on webdataset shards.",
    )
    parser.add_argument("shards", help="shard spec: brace pattern, directory, index.json, or several joined by ','")
    parser.add_argument("out", help="output codebook file (.safetensors)")
    parser.add_argument("--k", type=int, default=512, help="codebook size (default 512)")
    parser.add_argument("--patch", type=int, default=8, help="patch side in pixels (default 8)")
    parser.add_argument("--input-size", type=int, default=112, help="image side the tokenizer takes (default 112)")
    parser.add_argument("--samples", type=int, default=20000, help="images to read (default 20000)")
    parser.add_argument("--patches-per-image", type=int, default=16,
                        help="random patches kept per image; 0 keeps all (default 16)")
    parser.add_argument("--iters", type=int, default=20, help="maximum Lloyd iterations (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of shard order, crops, patches and init (default 0)")
    parser.add_argument("--patch-norm", choices=PATCH_NORMS, default="none",
                        help="'none': raw [0,1] pixels; 'standardize': per-patch mean/std (default none)")
    parser.add_argument("--min-scale", type=float, default=1.0,
                        help="1 = centre square crop; below 1 = random resized crops of area fraction "
                        "[min-scale, 1] (default 1)")
    parser.add_argument("--init", choices=("k-means++", "random"), default="k-means++", help="initialisation")
    parser.add_argument("--device", default="cpu", help="where to run k-means (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _image_member(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def iter_images(
    urls: list[str],
    view: ViewSpec,
    seed: int,
    skipped: Counter,
) -> Iterator[torch.Tensor]:
    """Decode every image of ``urls`` (in order) to one ``(3, S, S)`` uint8 crop.

    Bad samples and unreadable tars are counted in ``skipped`` by reason and passed over.
    Each crop is drawn from an RNG keyed by (seed, shard, key), so a run is reproducible.
    """
    import webdataset as wds

    def on_error(exc: BaseException) -> bool:
        skipped["tar_error"] += 1
        logger.warning("shard read error (skipping the rest of that shard): %s", exc)
        return True

    # A bare pipeline (no node/worker splitting): this command reads every listed shard itself.
    dataset = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=on_error))
    for sample in dataset:
        data = _image_member(sample)
        key = str(sample.get("__key__", "?"))
        if data is None:
            skipped["missing_image"] += 1
            continue
        rng = random.Random(f"{seed}:{sample.get('__url__')}:{key}")
        try:
            (crop,) = decode_views(data, [view], rng)
        except SampleSkip as skip:
            skipped[skip.reason] += 1
            logger.debug("skipped %s: %s", key, skip)
            continue
        except Exception as exc:  # noqa: BLE001 -- one odd image must not end a long read
            skipped["sample_error"] += 1
            logger.debug("skipped %s: %s: %s", key, type(exc).__name__, exc)
            continue
        yield crop


def _batched(images: Iterator[torch.Tensor], limit: int, batch: int, bar: tqdm, taken: Counter) -> Iterator[torch.Tensor]:
    """Stack up to ``limit`` images into batches of ``batch``, advancing ``bar`` and counting
    them in ``taken["images"]`` (a disabled bar counts nothing)."""
    buffer: list[torch.Tensor] = []
    for image in images:
        buffer.append(image)
        taken["images"] += 1
        bar.update(1)
        if len(buffer) == batch:
            yield torch.stack(buffer)
            buffer = []
        if taken["images"] >= limit:
            break
    if buffer:
        yield torch.stack(buffer)


def fit_from_shards(args: argparse.Namespace) -> tuple[KMeansPatchTokenizer, dict]:
    """Read images, fit the codebook, return it with the summary printed by :func:`main`."""
    sources = parse_shard_spec(args.shards)
    urls = [url for source in sources for url in source.urls]
    random.Random(args.seed).shuffle(urls)
    # ratio (1, 1) with scale (1, 1) makes decode_views take its fallback: the centred square.
    view = ViewSpec(
        "tokenizer",
        (args.input_size, args.input_size),
        scale=(args.min_scale, 1.0),
        ratio=(1.0, 1.0) if args.min_scale >= 1.0 else (3.0 / 4.0, 4.0 / 3.0),
    )
    skipped: Counter = Counter()
    taken: Counter = Counter()
    start = time.perf_counter()
    with tqdm(total=args.samples, desc="images", unit="img", disable=args.no_progress) as bar:
        batches = _batched(iter_images(urls, view, args.seed, skipped), args.samples, 256, bar, taken)
        iter_bar = tqdm(total=args.iters, desc="k-means", disable=args.no_progress, leave=False)

        def on_iteration(iteration: int, inertia: float) -> None:
            if iteration > 0:
                iter_bar.update(1)
            iter_bar.set_postfix(inertia=f"{inertia:.4g}")

        try:
            tokenizer = KMeansPatchTokenizer.fit(
                batches,
                args.k,
                patch_size=args.patch,
                input_size=args.input_size,
                iters=args.iters,
                seed=args.seed,
                patch_norm=args.patch_norm,
                patches_per_image=args.patches_per_image or None,
                init=args.init,
                device=args.device,
                callback=on_iteration,
            )
        finally:
            iter_bar.close()
    result = tokenizer.fit_result
    assert result is not None
    counts = result.counts.double()
    probs = counts[counts > 0] / counts.sum()
    summary = {
        "k": args.k,
        "patch": args.patch,
        "input_size": args.input_size,
        "patch_norm": args.patch_norm,
        "images": taken["images"],
        "patches": result.num_points,
        "skipped": dict(sorted(skipped.items())),
        "iterations": result.iterations,
        "converged": result.converged,
        "reseeded": result.reseeded,
        "inertia": result.inertia[-1],
        "inertia_per_patch": result.inertia[-1] / max(result.num_points, 1),
        "inertia_initial": result.inertia[0],
        "codes_used": int((result.counts > 0).sum()),
        # exp(entropy) of the code distribution: the effective number of codes in use.
        "code_perplexity": float(math.exp(-(probs * probs.log()).sum())),
        "largest_code_fraction": float(counts.max() / counts.sum()),
        "seconds": round(time.perf_counter() - start, 2),
        "out": str(args.out),
    }
    return tokenizer, summary


@command("fit-tokenizer")
def main(argv: list[str]) -> int:
    """Entry point of ``slip fit-tokenizer``; the last line printed is the JSON summary."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.k < 1 or args.samples < 1 or args.iters < 0 or args.patches_per_image < 0:
        raise UserError("--k >= 1, --samples >= 1, --iters >= 0, --patches-per-image >= 0 required")
    if args.patch < 1 or args.input_size % args.patch:
        raise UserError(f"--input-size {args.input_size} must be a multiple of --patch {args.patch}")
    if not 0.0 < args.min_scale <= 1.0:
        raise UserError("--min-scale must lie in (0, 1]")
    try:
        tokenizer, summary = fit_from_shards(args)
    except ValueError as exc:  # too few patches for k codes, a bad shard spec
        raise UserError(str(exc)) from None
    tokenizer.save(args.out)
    print(
        f"k={summary['k']}: {summary['codes_used']} codes used (perplexity {summary['code_perplexity']:.1f}), "
        f"inertia/patch {summary['inertia_per_patch']:.4g} after {summary['iterations']} iterations "
        f"(from {summary['inertia_initial'] / max(summary['patches'], 1):.4g}); {summary['images']} images, "
        f"{summary['patches']} patches, skipped {summary['skipped'] or 'none'}; wrote {args.out}",
        flush=True,
    )
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
