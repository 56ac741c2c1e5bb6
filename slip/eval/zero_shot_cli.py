"""``slip zero-shot`` / ``python -m zero_shot``: evaluate a checkpoint on the zero-shot benchmarks.

    slip zero-shot --checkpoint ckpt.pt --catalog my_catalog.json --out results.json
    slip zero-shot --checkpoint ckpt.pt --benchmark-dir OUT/benchmark      # synthetic benchmark
    torchrun --nproc-per-node 8 -m zero_shot --checkpoint ... --catalog ...  # images split over ranks

Every benchmark of the catalog (or those named by ``--benchmarks``) whose files exist is
evaluated with the benchmark's metric; those whose files are missing are listed with the
reason and skipped. Catalog entries of type ``retrieval`` report image-text recall@1/5/10.
Results are printed as a table and, with ``--out``, written to JSON and to a CSV of the same
stem. Exit status: 0 if everything asked for that exists was evaluated, 1 if a benchmark
failed or none could be evaluated, 2 for a usage error (unknown benchmark, bad catalog or
checkpoint, a model without a text tower).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slip import distributed as D
from slip import runtime
from slip.checkpoint import load_pretrained
from slip.distributed import get_rank, is_distributed
from slip.errors import UserError, command
from slip.fileio import atomic_write_text
from slip.tokenizer import get_tokenizer
from zero_shot import (
    RETRIEVAL_TYPE,
    Benchmark,
    benchmarks_with_catalog,
    load_benchmarks,
    load_catalog,
)

from .datasets import (
    DatasetNotFoundError,
    LocalBenchmark,
    build_dataset,
    load_benchmark_dir,
)
from .retrieval import build_retrieval_dataset, evaluate_retrieval
from .zero_shot import DEFAULT_CACHE_DIR, checkpoint_identity, zero_shot_eval

PROG = "slip zero-shot"
CSV_FIELDS = ("benchmark", "name", "metric", "value", "n", "skipped")


class UsageError(UserError):
    """A mistake in the command line or its inputs (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="any checkpoint slip.load_pretrained reads")
    parser.add_argument("--catalog", help="dataset catalog JSON (see zero_shot/catalog.example.json)")
    parser.add_argument("--benchmark-dir", action="append", default=[], metavar="[KEY=]DIR",
                        help="a benchmark directory with benchmark.json, e.g. the synthetic benchmark "
                             "OUT/benchmark (key 'synthetic' unless given); repeatable")
    parser.add_argument("--benchmarks", default="all",
                        help="comma-separated benchmark keys, or 'all' (default): every catalog entry "
                             "and benchmark directory")
    parser.add_argument("--out", type=Path, help="results JSON; a CSV with the same stem is written beside it")
    parser.add_argument("--clip-benchmark-out", metavar="TEMPLATE",
                        help="also write each classification result as CLIP_benchmark's JSON (dataset, model, "
                             "pretrained, task, metrics acc1/acc5/mean_per_class_recall as fractions, computed as it "
                             "computes them), to TEMPLATE with {dataset} {model} {pretrained} {language} {task} filled "
                             "in, like its --output; a benchmark read from webdataset shards is named wds/KEY, as "
                             "clip_benchmark's --dataset names it (slashes become _ in file names)")
    parser.add_argument("--model-name", help="model name in CLIP_benchmark records (default: the architecture)")
    parser.add_argument("--pretrained-name", help="pretrained name in CLIP_benchmark records (default: the "
                                                  "checkpoint's file name without suffix)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="data loader processes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where text classifiers are cached (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-cache", action="store_true", help="always recompute the text classifiers")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")
    return parser


def _parse_benchmark_dirs(values: list[str]) -> dict[str, LocalBenchmark]:
    out: dict[str, LocalBenchmark] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep:
            key, path = "synthetic", value
        if key in out:
            raise UsageError(f"benchmark key {key!r} given twice; name them with --benchmark-dir KEY=DIR")
        try:
            out[key] = load_benchmark_dir(path, key=key)
        except (DatasetNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    return out


def _select(requested: str, known: dict[str, Benchmark], catalog: dict[str, dict[str, str]],
            local: dict[str, LocalBenchmark]) -> tuple[list[str], dict[str, str]]:
    """Keys to evaluate (benchmarks.json order, then retrieval, then directories) and the
    requested keys that have no data source at all (key -> reason)."""
    clashes = sorted(set(local) & (set(known) | set(catalog)))
    if clashes:
        raise UsageError(f"--benchmark-dir key(s) {clashes} clash with benchmark or catalog keys")
    retrieval = [k for k, e in catalog.items() if e["type"] == RETRIEVAL_TYPE]
    ordered = [k for k in known if k in catalog] + retrieval + list(local)
    if requested.strip() == "all":
        return ordered, {}
    names = [k.strip() for k in requested.split(",") if k.strip()]
    selectable = set(known) | set(retrieval) | set(local)
    unknown = [k for k in names if k not in selectable]
    if unknown:
        extra = f"; retrieval entries: {', '.join(retrieval)}" if retrieval else ""
        extra += f"; benchmark directories: {', '.join(local)}" if local else ""
        raise UsageError(f"unknown benchmark(s) {unknown}; known benchmarks: {', '.join(known)}{extra}")
    wanted = set(names)
    no_entry = {k: "no entry in the catalog" for k in names if k in known and k not in catalog}
    return [k for k in ordered if k in wanted], no_entry


def clip_benchmark_record(dataset: str, model_name: str, pretrained: str, logits: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, Any]:
    """One zero-shot classification result in CLIP_benchmark's JSON layout, computed as
    CLIP_benchmark computes it (so the numbers compare with ``==``): ``acc1`` and ``acc5`` are
    hits over images from the top-5 classes, ``mean_per_class_recall`` the mean over the classes
    present of their argmax recall (scikit-learn's balanced accuracy)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    n = len(labels)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    predicted = logits.argmax(dim=1).numpy()
    truth = labels.numpy()
    classes = np.unique(truth)
    recall = [float(np.sum((truth == c) & (predicted == c))) / float(np.sum(truth == c)) for c in classes]
    metrics = {"acc1": int(hits[:, 0].sum()) / n, "acc5": int(hits.any(dim=1).sum()) / n,
               "mean_per_class_recall": float(np.mean(np.asarray(recall, dtype=np.float64)))}
    return {"dataset": dataset, "model": model_name, "pretrained": pretrained, "task": "zeroshot_classification",
            "metrics": metrics, "language": "en"}


def _write_clip_benchmark(args: argparse.Namespace, key: str, model, logits: torch.Tensor, labels: torch.Tensor,
                          webdataset: bool = False) -> None:
    from slip.models import get_architecture, list_models

    arch_name = next((n for n in list_models() if get_architecture(n) == model.arch), "slip")
    # CLIP_benchmark names a webdataset benchmark "wds/NAME" (its --dataset argument).
    record = clip_benchmark_record(f"wds/{key}" if webdataset else key, args.model_name or arch_name,
                                   args.pretrained_name or Path(args.checkpoint).stem, logits, labels)
    fields = {k: record[k] for k in ("dataset", "model", "pretrained", "language", "task")}
    try:
        path = Path(args.clip_benchmark_out.format(**{k: str(v).replace("/", "_") for k, v in fields.items()}))
    except (KeyError, IndexError) as e:
        raise UsageError(f"--clip-benchmark-out {args.clip_benchmark_out!r}: unknown field {e}; use {{dataset}} "
                         "{model} {pretrained} {language} {task}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _rows(key: str, name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat (benchmark, name, metric, value, n, skipped) rows of one result."""
    if "recalls" in result:
        return [{"benchmark": key, "name": name, "metric": metric, "value": value,
                 "n": result["n_images"], "skipped": result["skipped"]}
                for metric, value in result["recalls"].items()]
    rows = [{"benchmark": key, "name": name, "metric": result["metric"], "value": result["value"],
             "n": result["n"], "skipped": result["skipped"]}]
    for group, sub in result.get("groups", {}).items():
        rows.append({"benchmark": key, "name": name, "metric": f"{result['metric']} ({group})",
                     "value": sub["value"], "n": sub["n"], "skipped": ""})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of result rows."""
    header = ("benchmark", "metric", "value", "n")
    body = [(r["name"], r["metric"], f"{r['value']:.2f}", str(r["n"])) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join("{:<%d}" % w if i < 2 else "{:>%d}" % w for i, w in enumerate(widths))
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths))] + [line.format(*b) for b in body])


def _write_outputs(out: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out.with_suffix(".csv")
    atomic_write_text(csv_path, buffer.getvalue())
    return csv_path


def _run(args: argparse.Namespace) -> int:
    if args.catalog is None and not args.benchmark_dir:
        raise UsageError("give --catalog and/or --benchmark-dir")
    catalog = load_catalog(args.catalog) if args.catalog else {}
    known = benchmarks_with_catalog(catalog, args.catalog) if catalog else load_benchmarks()
    local = _parse_benchmark_dirs(args.benchmark_dir)
    keys, missing = _select(args.benchmarks, known, catalog, local)

    started = not is_distributed()
    try:
        rt = runtime.start(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    try:
        return _evaluate_all(args, known, catalog, local, keys, missing, rt.device)
    finally:
        if started:
            D.shutdown()


def _evaluate_all(args: argparse.Namespace, known: dict[str, Benchmark], catalog: dict[str, dict[str, str]],
                  local: dict[str, LocalBenchmark], keys: list[str], missing: dict[str, str],
                  device: torch.device) -> int:
    main_process = get_rank() == 0
    model, preprocess = load_pretrained(args.checkpoint, device)
    if not model.has_text:
        raise UsageError(f"{args.checkpoint}: this model has no text tower (an image-only SimCLR model), "
                         "so it cannot classify zero-shot; evaluate it with the linear probe instead")
    # Built on first use: reading the BPE vocabulary takes a while, and may not be needed at all.
    tokenizer = functools.cache(get_tokenizer)
    model_id = None if args.no_cache else checkpoint_identity(args.checkpoint)
    cache_dir = None if args.no_cache else args.cache_dir

    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    want_outputs = args.clip_benchmark_out is not None
    for key in keys:
        try:
            if key in local:
                lb = local[key]
                dataset = build_dataset(key, lb.entry, "test", preprocess, benchmark=lb.benchmark)
                result = zero_shot_eval(model, tokenizer(), lb.benchmark, dataset, args.batch_size, args.workers,
                                        device, cache_dir=cache_dir, model_id=model_id, groups=lb.groups,
                                        progress=args.progress, return_outputs=want_outputs)
                name = lb.benchmark.name
            elif catalog[key]["type"] == RETRIEVAL_TYPE:
                dataset = build_retrieval_dataset(key, catalog[key], preprocess)
                result = evaluate_retrieval(model, tokenizer(), dataset, args.batch_size, args.workers, device,
                                            progress=args.progress)
                name = key
            else:
                dataset = build_dataset(key, catalog[key], "test", preprocess, benchmark=known[key])
                result = zero_shot_eval(model, tokenizer(), known[key], dataset, args.batch_size, args.workers,
                                        device, cache_dir=cache_dir, model_id=model_id, progress=args.progress,
                                        return_outputs=want_outputs)
                name = known[key].name
        except DatasetNotFoundError as e:
            missing[key] = str(e)
            continue
        except Exception as e:  # one broken dataset must not cost the results of the others
            failed[key] = f"{type(e).__name__}: {e}"
            if main_process:
                print(f"{PROG}: {key} failed: {failed[key]}", file=sys.stderr)
            continue
        if "logits" in result:
            logits, labels = result.pop("logits"), result.pop("labels")
            if main_process and labels.dim() == 1:  # single-label: CLIP_benchmark's classification metrics
                entry = local[key].entry if key in local else catalog[key]
                _write_clip_benchmark(args, key, model, logits, labels, webdataset=entry.get("type") == "wds")
        results[key] = {"name": name, **result}
        rows.extend(_rows(key, name, result))
        if main_process:
            print(f"{name}: " + ", ".join(f"{r['metric']} {r['value']:.2f}" for r in _rows(key, name, result)),
                  file=sys.stderr)

    if main_process:
        if rows:
            print(format_table(rows))
        for title, problems in (("missing (skipped)", missing), ("failed", failed)):
            if problems:
                print(f"\n{title}:")
                for key, reason in problems.items():
                    print(f"  {key}: {reason}")
        if args.out is not None:
            report = {"checkpoint": str(args.checkpoint), "results": results, "rows": rows,
                      "missing": missing, "failed": failed}
            csv_path = _write_outputs(args.out, report, rows)
            print(f"\nwrote {args.out} and {csv_path}")
    if failed:
        return 1
    if not results:
        if main_process:
            print(f"{PROG}: no benchmark could be evaluated", file=sys.stderr)
        return 1
    return 0


@command("zero-shot")
def main(argv: list[str]) -> int:
    """Entry point of ``slip zero-shot`` and ``python -m zero_shot``."""
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
