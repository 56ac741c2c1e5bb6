"""``slip knn``: k-nearest-neighbour accuracy of a checkpoint's image tower (any model, with or
without text), the probe SSL libraries report.

    slip knn --checkpoint C --catalog CATALOG --benchmarks cifar10,stl10   # train -> bank, test -> queries
    slip knn --checkpoint C --benchmark-dir OUT/benchmark                  # one split, halved per class

Cosine similarity of pre-logits features, ``--k`` neighbours voting with weight
``exp(cosine / --temperature)`` (defaults 20 and 0.07, DINO's). Runs under torchrun (every rank
embeds its share of the images). See :mod:`slip.eval.knn`.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import runtime
from ..errors import UserError, command
from ..fileio import atomic_write_text
from .knn import DEFAULT_K, DEFAULT_TEMPERATURE, halves, knn_eval, tower_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip knn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (slip's or SLIP's released ones)")
    p.add_argument("--catalog", help="dataset catalog JSON (see zero_shot/catalog.example.json)")
    p.add_argument("--benchmarks", default="", help="comma-separated catalog keys (train split: bank, test: queries)")
    p.add_argument("--benchmark-dir", action="append", default=[],
                   help="a benchmark directory (e.g. the synthetic OUT/benchmark): its one split halved per class")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours that vote (default {DEFAULT_K})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"vote weight exp(cosine / T) (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", help="write the results as JSON here (atomically)")
    return p


@command("knn")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 1 or args.temperature <= 0:
        raise UserError("--k must be at least 1 and --temperature positive")
    keys = [k.strip() for k in args.benchmarks.split(",") if k.strip()]
    if not keys and not args.benchmark_dir:
        raise UserError("give --catalog with --benchmarks, and/or --benchmark-dir")
    if keys and not args.catalog:
        raise UserError("--benchmarks names catalog keys, so --catalog is needed")
    from ..checkpoint import load_pretrained
    from ..train.validation import open_eval_dataset

    try:
        rt = runtime.start(args.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    model, preprocess = load_pretrained(args.checkpoint, rt.device)
    rows = []
    for name in [*keys, *args.benchmark_dir]:
        splits = ("train", "test") if name in keys else ("test",)
        bench, data, _ = open_eval_dataset(name, args.catalog, "--benchmarks", splits, preprocess)
        feats = {s: tower_features(model, d, args.batch_size, args.workers, rt.device, desc=f"{name} {s}")
                 for s, d in data.items()}
        bank, queries = (feats["train"], feats["test"]) if "train" in feats else halves(feats["test"])
        result = knn_eval(bank, queries, len(bench.classnames), args.k, args.temperature, rt.device)
        rows.append({"benchmark": name, "name": bench.name, "classes": len(bench.classnames), **result})
    if rt.is_main:
        width = max(len(r["benchmark"]) for r in rows)
        print(f"{'benchmark':<{width}}  top-1  top-5  bank  queries  (k={args.k}, T={args.temperature:g})")
        for r in rows:
            print(f"{r['benchmark']:<{width}}  {r['top1']:5.1f}  {r['top5']:5.1f}  {r['n_bank']:4d}  {r['n_query']:7d}")
        if args.out:
            atomic_write_text(args.out, json.dumps({"checkpoint": str(args.checkpoint), "results": rows}, indent=2) + "\n")
            print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
