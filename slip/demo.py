"""``slip demo``: the whole system in a few minutes on a CPU.

1. writes the synthetic captioned-shapes corpus and its zero-shot benchmark (``make-synthetic``);
2. trains a tiny SLIP on it with ``configs/demo.yaml`` (the same trainer as real runs);
3. evaluates zero-shot on the benchmark, including colour x shape combinations that never
   appear in training, and prints top-1 against chance;
4. says where the checkpoint is and how to load it.

Rerunning with the same ``--out`` reuses the corpus and resumes (or re-evaluates) the run.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .errors import command

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@command("demo")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slip demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="working directory (default runs/demo)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from .data.shards import INDEX_NAME
    from .data.synthetic import generate_synthetic
    from .train.config import load_config
    from .train.trainer import train

    start = time.perf_counter()
    corpus = args.out / "corpus"
    if (corpus / "train" / INDEX_NAME).is_file() and (corpus / "benchmark" / "benchmark.json").is_file():
        print(f"[1/3] reusing the synthetic corpus in {corpus}")
    else:
        print(f"[1/3] writing the synthetic corpus to {corpus} ({args.train_samples} captioned images)")
        generate_synthetic(corpus, seed=args.seed, train_samples=args.train_samples, overwrite=True)
    cfg = load_config(args.config, [
        f"data.train={corpus / 'train'}", f"eval.benchmark={corpus / 'benchmark'}",
        f"train.output_dir={args.out / 'run'}", f"train.seed={args.seed}", *args.overrides])
    print(f"[2/3] training {cfg.model.name} "
          f"for {cfg.train.epochs:g} epochs, batch {cfg.train.batch_size}, on the CPU")
    result = train(cfg)

    from .eval.datasets import load_benchmark_dir

    bench = load_benchmark_dir(corpus / "benchmark")
    n_classes = len(bench.benchmark.classnames)
    chance = 100.0 / n_classes
    key = bench.benchmark.key
    v = result.validation
    print(f"[3/3] zero-shot on the synthetic benchmark ({n_classes} colour x shape classes; "
          f"{len(bench.groups.get('held_out', ()))} of them never seen in training)\n")
    rows = [
        ("all classes", v.get(f"{key}_top1")),
        ("seen colour x shape", v.get(f"{key}_seen")),
        ("held-out colour x shape", v.get(f"{key}_held_out")),
    ]
    o = cfg.objective
    method = ("SLIP" if o.ssl != "none" else "CLIP") if o.clip else o.ssl
    print(f"  {'method':<10} {'images':<26} {'top-1':>7} {'chance':>7}")
    for label, value in rows:
        if value is not None:
            print(f"  {method:<10} {label:<26} {value:>6.1f}% {chance:>6.1f}%")
    print(f"\ncheckpoint: {result.checkpoint}")
    print("load it with:\n"
          f"  import slip; model, preprocess = slip.load_pretrained({str(result.checkpoint)!r})\n"
          f"or evaluate it with:\n"
          f"  slip zero-shot --checkpoint {result.checkpoint} --benchmark-dir {corpus / 'benchmark'}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0
