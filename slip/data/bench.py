"""``slip bench-data``: measure the real training-data pipeline's throughput.

Runs :func:`slip.data.pipeline.build_loader` on the given shards (resampled mode by default,
so it never runs dry), applies the batched photometric augmentation
(:class:`slip.data.augment.BatchAugment`) on the chosen device exactly as a trainer would, and
prints progress lines followed by one JSON line with the figures::

    slip bench-data shards/ --method slip-simclr --workers 2 --seconds 20

JSON fields: ``samples_per_s`` (wall clock, after warm-up), ``samples``, ``seconds``,
``batches``, ``skipped`` (by reason), ``workers``, ``cores`` (processes doing data work:
the workers plus the main process when it augments on CPU, at most the CPU count),
``per_core_samples_per_s`` (``samples_per_s / cores``), ``samples_per_cpu_s`` (all samples
over the CPU seconds of the main process and its workers: a per-core figure that does not
depend on other load on the machine), ``loader_samples_per_cpu_s`` (all samples over the CPU
seconds of the loader side alone: the workers, or this process inside ``next()`` with
``--workers 0``; what stays on the CPU when images are decoded on the device), ``decode``
(``workers``, or ``device``: JPEGs decoded and cut on ``--device``),
``device_ms_per_batch`` (milliseconds per batch of the device's part: decoding when
``--decode device``, and the augmentation), ``device_cpu_fallback`` (JPEGs the device decoder
refused, decoded on the CPU instead), ``augment_device``, ``method``, ``size``, ``batch_size``.

    slip bench-data shards/ --decode device --workers 0 --no-augment   # the loader side per core
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch

from slip.data.augment import BatchAugment
from slip.data.images import DEFAULT_MAX_PIXELS
from slip.data.pipeline import PipelineConfig, build_loader
from slip.errors import UserError, command
from slip.runtime import pick_device
from slip.ssl import view_method_names


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (finished DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (finished DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for name in ("image", "text"):
        if name in out:
            out[name] = out[name].to(device, non_blocking=True)
    if "views" in out:
        out["views"] = [v.to(device, non_blocking=True) for v in out["views"]]
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="slip bench-data",
        description="Measure the training-data pipeline (decode, crops, tokenisation, batched augmentation).",
    )
    ap.add_argument("shards", help="shard spec: brace pattern, directory, index.json, or 'a::0.7,b::0.3'")
    ap.add_argument("--method", choices=view_method_names(), default="slip-simclr")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers (0: in process)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement time after warm-up")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224, help="output size of every view")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where BatchAugment runs")
    ap.add_argument("--no-augment", action="store_true", help="measure the worker half only")
    ap.add_argument("--mode", choices=("resampled", "epoch"), default="resampled")
    ap.add_argument("--warmup-batches", type=int, default=2, help="batches excluded from the timing")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    ap.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size")
    ap.add_argument("--decode", choices=("workers", "device"), default="workers",
                    help="decode images in the loader workers, or ship JPEGs to --device and decode them there")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurement described by parsed ``args``; returns the JSON-able result."""
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    config = PipelineConfig(
        method=args.method,
        size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        mode=args.mode,
        shuffle_buffer=args.shuffle_buffer,
        max_pixels=args.max_pixels,
        allow_draft=not args.no_draft,
        seed=args.seed,
        rank=0,
        world_size=1,
        decode=args.decode,
    )
    loader = build_loader(args.shards, config)
    decoder = loader.device_decoder(device)
    augment = None if args.no_augment else BatchAugment(loader.views, seed=args.seed).to(device)
    if device.type == "cpu":
        # One core per process: the per-core figure must not hide intra-op threads.
        torch.set_num_threads(1)
    where = "off" if augment is None else device.type
    print(
        f"slip bench-data: {args.shards} method={args.method} size={args.size} batch={args.batch_size} "
        f"workers={args.workers} mode={args.mode} decode={args.decode} batched augmentation on: {where}",
        flush=True,
    )
    cpu_start = _cpu_seconds()
    children_start = _children_cpu_seconds()
    samples = batches = total_samples = 0
    in_process_loader_cpu = device_seconds = 0.0
    warmup = max(0, args.warmup_batches)
    start = time.perf_counter() if warmup == 0 else None
    iterator = iter(loader)
    seen = 0
    while True:
        before = time.process_time()
        batch = next(iterator, None)
        in_process_loader_cpu += time.process_time() - before  # workers=0: the whole loader side
        if batch is None:
            break
        seen += 1
        n = len(batch["key"])
        total_samples += n
        if decoder is not None or augment is not None:
            begin = time.perf_counter()
            out = _to_device(batch, device)
            if decoder is not None:
                out = decoder(out)
            if augment is not None:
                out = augment(out)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if seen > warmup:
                device_seconds += time.perf_counter() - begin
            del out
        if seen <= warmup:
            if seen == warmup:  # the clock starts once the warm-up batches are done
                start = time.perf_counter()
            continue
        samples += n
        batches += 1
        if time.perf_counter() - start >= args.seconds:
            break
    elapsed = time.perf_counter() - start if start is not None else 0.0
    # Shut the workers down so their CPU time is accounted (RUSAGE_CHILDREN counts reaped ones).
    del iterator
    cpu = _cpu_seconds() - cpu_start
    # The loader side alone: the workers' CPU time, or with workers=0 this process's time in next().
    loader_cpu = _children_cpu_seconds() - children_start if args.workers > 0 else in_process_loader_cpu
    if start is None or samples == 0:
        print("slip bench-data: the pipeline produced too few batches to measure", file=sys.stderr)
    cpu_count = os.cpu_count() or 1
    if args.workers > 0:
        cores = args.workers + (1 if augment is not None and device.type == "cpu" else 0)
    else:
        cores = 1
    cores = min(cores, cpu_count)
    rate = samples / elapsed if elapsed > 0 else 0.0
    return {
        "samples_per_s": round(rate, 2),
        "samples": samples,
        "seconds": round(elapsed, 3),
        "batches": batches,
        "skipped": loader.skipped(),
        "workers": args.workers,
        "cores": cores,
        "per_core_samples_per_s": round(rate / cores, 2),
        "samples_per_cpu_s": round(total_samples / cpu, 2) if cpu > 0 else None,
        "loader_samples_per_cpu_s": round(total_samples / loader_cpu, 2) if loader_cpu > 0 else None,
        "decode": args.decode,
        "device_ms_per_batch": round(1000 * device_seconds / batches, 3) if batches and device_seconds else None,
        "device_cpu_fallback": None if decoder is None else decoder.cpu_fallback,
        "augment_device": where,
        "method": args.method,
        "size": args.size,
        "batch_size": args.batch_size,
    }


@command("bench-data")
def main(argv: list[str]) -> int:
    """Entry point of ``slip bench-data``; the last line printed is the JSON result."""
    args = _parser().parse_args(argv)
    if args.workers < 0 or args.batch_size < 1 or args.seconds <= 0:
        raise UserError("--workers >= 0, --batch-size >= 1 and --seconds > 0 are required")
    result = run_benchmark(args)
    print(
        f"{result['samples']} samples in {result['seconds']} s: {result['samples_per_s']} samples/s, "
        f"{result['per_core_samples_per_s']} per core ({result['cores']} cores), "
        f"{result['samples_per_cpu_s']} per CPU-second; skipped: {result['skipped'] or 'none'}",
        flush=True,
    )
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if result["samples"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
