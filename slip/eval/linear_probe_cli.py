"""``slip linear-probe``: linear classification on frozen image features of a checkpoint.

    slip linear-probe --checkpoint slip_base_25ep.pt --catalog catalog.json \\
        --benchmarks cifar10,dtd [--protocol lbfgs|sgd] [--out results.json]

For each benchmark, the train and test images are embedded once by the frozen image tower
(class token before the projection; for a ResNet tower its average-pooled feature, in eval mode
with BatchNorm's running statistics) and the features cached under ``--cache-dir``; a later run
with the same checkpoint file, catalog entry and transform reads them back instead. Then either
CLIP's L-BFGS logistic regression with a validation sweep over C (``lbfgs``, the default) or
SLIP's / MoCo v3's 90-epoch SGD linear head (``sgd``) is fitted, and the test split is scored with
the benchmark's metric (as in zero-shot evaluation). See :mod:`slip.eval.linear_probe` for the
protocols and how they differ from the papers (no augmentation on cached features).

Few-shot: ``--shots 1,5,10 [--shot-seeds 3]`` trains the probe on K images of every class drawn
from the train split instead of all of it (the test split is unchanged), once per seed ``--seed``,
``--seed + 1``, ...; the features are the same cached arrays for every K and seed. The draws are
stratified and nested (a seed's 5-shot images include its 1-shot ones). The table and the JSON
give per K the mean, the sample std, min and max of the metric over the seeds and each seed's
score. A class with fewer than K training images is an error naming it, unless
``--allow-fewer-shots`` (it then uses all it has). L-BFGS holds out its validation images from the
K-shot subset; at K = 1 it fits a fixed C instead (see ``few_shot_probe``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, command
from ..fileio import atomic_write_text
from .linear_probe import (
    PROTOCOLS,
    FeatureCache,
    FeatureKey,
    FeatureSet,
    FewShotResult,
    ProbeResult,
    SGDProbeConfig,
    ShortClassesError,
    checkpoint_identity,
    describe_transform,
    extract_features,
    few_shot_probe,
    load_or_extract,
    run_probe,
)

# Metrics whose benchmarks are multi-label; a softmax probe cannot produce them.
_MULTILABEL_METRICS = frozenset({"voc_11pt_map"})
DEFAULT_SHOT_SEEDS = 3


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/slip/linear_probe`` (``~/.cache/slip/linear_probe`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slip" / "linear_probe"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip linear-probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (slip's or SLIP's released ones)")
    p.add_argument("--catalog", required=True, help="dataset catalog JSON (see zero_shot/catalog.example.json)")
    p.add_argument("--benchmarks", required=True, help="comma-separated benchmark keys, e.g. cifar10,dtd")
    p.add_argument("--protocol", choices=PROTOCOLS, default="lbfgs",
                   help="lbfgs: CLIP's logistic regression with a C sweep; sgd: SLIP/MoCo v3 linear head")
    p.add_argument("--out", help="write the results as JSON here (atomically)")
    p.add_argument("--cache-dir", default=None, help=f"feature cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch for feature extraction")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes for feature extraction")
    p.add_argument("--seed", type=int, default=0, help="validation hold-out (lbfgs), init and shuffling (sgd)")
    g = p.add_argument_group("lbfgs protocol")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class of train held out to choose C (no catalog entry has a val split)")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    g = p.add_argument_group("sgd protocol")
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--probe-batch-size", type=int, default=1024, help="SGD batch (lr scales with it)")
    g.add_argument("--lr", type=float, default=0.1, help="base learning rate per 256 samples")
    g.add_argument("--no-batchnorm", action="store_true",
                   help="no BatchNorm1d(affine=False) before the linear layer (as SLIP's and MoCo v3's scripts)")
    g = p.add_argument_group("few-shot")
    g.add_argument("--shots", metavar="K[,K2,...]",
                   help="train on K images per class of the train split (e.g. 1,5,10) instead of all of it")
    g.add_argument("--shot-seeds", type=int, metavar="N",
                   help=f"draws per K, seeds --seed .. --seed+N-1 (default {DEFAULT_SHOT_SEEDS})")
    g.add_argument("--allow-fewer-shots", action="store_true",
                   help="a class with fewer than K training images uses all it has (default: an error naming it)")
    return p


def parse_shots(text: str) -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]`` (ascending); a user error for anything else."""
    shots: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.removeprefix("-").isdigit():
            raise UserError(f"--shots {text!r}: {item!r} is not a whole number; expected e.g. --shots 1,5,10")
        k = int(item)
        if k < 1:
            raise UserError(f"--shots {text!r}: {k} images per class is too few, K must be at least 1")
        if k in shots:
            raise UserError(f"--shots {text!r}: {k} is listed twice")
        shots.append(k)
    return sorted(shots)


def _collate_readable(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples, dropping the ``None`` items that slip's dataset
    loaders return for unreadable images (zero-shot evaluation skips them the same way)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.stack([image for image, _ in kept]), torch.as_tensor([int(label) for _, label in kept])


def _dataset_identity(entry: dict) -> dict:
    # Relative paths are keyed by where they point from here, so runs from another directory
    # that read other data do not share features.
    return {**entry, "path": os.path.abspath(entry["path"])}


def _format_table(rows: list[tuple[str, str, ProbeResult]]) -> str:
    header = ("benchmark", "metric", "score", "train", "test", "details")
    lines = []
    for key, name, r in rows:
        if r.protocol == "lbfgs":
            detail = f"C={r.details['C']:.3g} (val {r.details['val_score']:.2f})"
        else:
            detail = f"lr={r.details['lr']:.3g} epochs={r.details['epochs']}"
        lines.append((key, r.metric, f"{r.score:.2f}", str(r.num_train), str(r.num_test), detail))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (2, 3, 4) else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines])


def _format_few_shot_table(rows: list[tuple[str, str, list[FewShotResult]]]) -> str:
    header = ("benchmark", "metric", "shots", "train", "mean", "std", "min", "max", "per seed")
    lines = []
    for key, _, results in rows:
        for r in results:
            first = next(iter(r.runs.values()))
            per_seed = " ".join(f"{seed}:{x.score:.2f}" for seed, x in r.runs.items())
            lines.append((key, r.metric, str(r.shots), str(first.num_train), f"{r.mean:.2f}",
                          "-" if r.std is None else f"{r.std:.2f}", f"{r.min:.2f}", f"{r.max:.2f}", per_seed))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if 2 <= i <= 7 else '<'}{w}}}" for i, w in enumerate(widths))
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*header), rule] + [fmt.format(*row) for row in lines])


def _class_name(bench, c: int) -> str:
    synonyms = bench.class_synonyms
    return f"class {c} ({synonyms[c][0]!r})" if 0 <= c < len(synonyms) else f"class {c}"


@command("linear-probe")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from zero_shot import benchmarks_with_catalog, load_catalog

    from ..checkpoint import load_pretrained

    keys = [k.strip() for k in args.benchmarks.split(",") if k.strip()]
    shots: list[int] | None = None
    if args.shots is not None:
        shots = parse_shots(args.shots)
        shot_seeds = DEFAULT_SHOT_SEEDS if args.shot_seeds is None else args.shot_seeds
        if shot_seeds < 1:
            raise UserError(f"--shot-seeds {shot_seeds}: at least one draw per K is needed")
        if args.seed < 0:
            raise UserError(f"--seed {args.seed}: few-shot draws need a seed >= 0")
        seeds = list(range(args.seed, args.seed + shot_seeds))
    elif args.shot_seeds is not None or args.allow_fewer_shots:
        raise UserError("--shot-seeds and --allow-fewer-shots apply to a few-shot probe; give --shots too")
    try:
        catalog = load_catalog(args.catalog)
        benchmarks = benchmarks_with_catalog(catalog, args.catalog)  # SLIP's benchmarks and your own datasets
        for key in keys:
            if key not in benchmarks:
                raise UserError(f"unknown benchmark {key!r}; known: {', '.join(benchmarks)}")
            if key not in catalog:
                raise UserError(f"benchmark {key!r} has no entry in {args.catalog}")
            if benchmarks[key].metric in _MULTILABEL_METRICS:
                raise UserError(f"{key} is multi-label ({benchmarks[key].metric}); the linear probe is single-label")
        if not keys:
            raise UserError("--benchmarks names no benchmark")
        model, preprocess = load_pretrained(args.checkpoint, device=args.device)
        # Imported here: the dataset loaders are only needed once there is work to do.
        from .datasets import build_dataset

        # Every split is opened (files listed, not decoded) before any feature is extracted,
        # so a missing dataset fails the run at once rather than after hours of other work.
        datasets = {(key, split): build_dataset(key, catalog[key], split, preprocess, benchmark=benchmarks[key])
                    for key in keys for split in ("train", "test")}
    except ValueError as e:  # a dataset's files or the device named on the command line
        raise UserError(str(e)) from None

    identity = checkpoint_identity(args.checkpoint)
    image_size = model.arch.vision.image_size
    transform_id = describe_transform(preprocess)
    cache = None if args.no_cache else FeatureCache(args.cache_dir or default_cache_dir())
    device = torch.device(args.device)

    def features(key: str, split: str) -> FeatureSet:
        dataset = datasets[key, split]
        fkey = FeatureKey(checkpoint=identity, benchmark=key, split=split, transform=transform_id,
                          image_size=image_size, dataset=_dataset_identity(catalog[key]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, collate_fn=_collate_readable,
                                             pin_memory=device.type == "cuda")
        data, hit = load_or_extract(cache, fkey, lambda: extract_features(model.visual, loader, device,
                                                                          desc=f"{key} {split}"),
                                    num_samples=len(dataset))
        skipped = len(dataset) - len(data.labels)
        print(f"{key} {split}: {len(data.labels)} images{f' ({skipped} unreadable, skipped)' if skipped else ''}, "
              f"features {'from cache' if hit else 'extracted'}", file=sys.stderr)
        return data

    if args.protocol == "lbfgs":
        options = {"val_fraction": args.val_fraction, "seed": args.seed, "max_iter": args.max_iter}
    else:
        options = {"config": SGDProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, base_lr=args.lr,
                                            batchnorm=not args.no_batchnorm, seed=args.seed)}
    rows: list[tuple[str, str, ProbeResult]] = []
    few_rows: list[tuple[str, str, list[FewShotResult]]] = []
    for key in keys:
        bench = benchmarks[key]
        train, test = features(key, "train"), features(key, "test")
        if shots is None:
            result = run_probe(args.protocol, train, test, bench.num_classes, bench.metric, device=device, **options)
            rows.append((key, bench.name, result))
            continue
        counts = np.bincount(train.labels, minlength=bench.num_classes)[:bench.num_classes]
        short = {c: int(counts[c]) for c in np.flatnonzero(counts < shots[-1])}
        if short and not args.allow_fewer_shots:
            listed = ", ".join(f"{_class_name(bench, c)} has {n}" for c, n in list(short.items())[:3])
            more = f" (and {len(short) - 3} more classes)" if len(short) > 3 else ""
            raise UserError(f"{key}: --shots {shots[-1]} needs {shots[-1]} training images per class, but {listed}"
                            f"{more}; --allow-fewer-shots uses all the images such classes have")
        if short:
            print(f"{key}: {len(short)} classes have fewer than {shots[-1]} training images and use all they have",
                  file=sys.stderr)
        try:
            results = few_shot_probe(args.protocol, train, test, bench.num_classes, shots, seeds, bench.metric,
                                     device=device, allow_fewer=args.allow_fewer_shots, **options)
        except ShortClassesError as e:  # checked above; kept so that no short class ends in a traceback
            raise UserError(f"{key}: {e}") from None
        few_rows.append((key, bench.name, results))

    print(_format_table(rows) if shots is None else _format_few_shot_table(few_rows))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "catalog", "out", "benchmarks")}
        if shots is None:
            for k in ("shots", "shot_seeds", "allow_fewer_shots"):  # the report without --shots is unchanged
                settings.pop(k)
            results_json = {key: {"name": name, **r.to_dict()} for key, name, r in rows}
        else:
            settings.update(shots=shots, shot_seeds=len(seeds))
            results_json = {key: {"name": name, "protocol": args.protocol, "metric": rs[0].metric,
                                  "num_test": next(iter(rs[0].runs.values())).num_test, "seeds": seeds,
                                  "few_shot": {str(r.shots): r.to_dict() for r in rs}}
                            for key, name, rs in few_rows}
        report = {
            "checkpoint": str(args.checkpoint), "checkpoint_id": identity, "protocol": args.protocol,
            "settings": settings,
            "results": results_json,
        }
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
