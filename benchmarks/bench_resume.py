#!/usr/bin/env python3
"""What a mid-epoch resume costs: bytes read from the shards and seconds to the first batch,
restored by seeking (slip's default) next to replaying the epoch up to the checkpoint (the
fallback for shards that cannot seek), at several positions of one epoch, in one run.

    python benchmarks/bench_resume.py [--shards 12] [--per-shard 100] [--buffer 200] [--batch 32]
                                      [--positions 0.1,0.5,0.9] [--dir DIR]

The corpus is written first (web-like JPEGs, longer side 500-1024 px, from the photos that
scikit-image and scikit-learn ship; see make_bench_jpegs.py) unless ``--dir`` already holds
it. For each position the loader (one process, no workers: a worker's cost) consumes that
fraction of the epoch, its state is taken, and a fresh loader restored from it is timed up to
its first batch while every byte read from the shards is counted; the same state without its
stream positions is then replayed. Prints one JSON line per position and a summary line with
the corpus layout (mean sample and shard bytes) from which the README's figures are derived.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_bench_jpegs import web_like_jpegs

from slip.data import pipeline as P
from slip.data import tars


def write_corpus(root: Path, shards: int, per_shard: int, seed: int = 0) -> None:
    """``shards`` tar shards of ``per_shard`` web-like JPEG + caption samples in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    photos = iter(web_like_jpegs(shards * per_shard, seed))
    for s in range(shards):
        with tarfile.open(root / f"bench-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                _, data, _, _ = next(photos)
                key = f"{s:06d}{i:04d}"
                for name, member in ((f"{key}.jpg", data), (f"{key}.txt", f"photo {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(member)
                    tar.addfile(info, io.BytesIO(member))


class _Counted:
    """A shard stream that counts the bytes read through it."""

    total = 0

    def __init__(self, stream):
        self._stream = stream

    def read(self, *args):
        data = self._stream.read(*args)
        _Counted.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()


def _first_batch(loader: P.SlipLoader) -> tuple[float, int, list[str]]:
    _Counted.total = 0
    start = time.perf_counter()
    batch = next(iter(loader))
    return time.perf_counter() - start, _Counted.total, batch["key"]


def measure(corpus: str, config: P.PipelineConfig, fraction: float, total_batches: int) -> dict:
    k = max(1, min(total_batches - 1, round(fraction * total_batches)))
    loader = P.SlipLoader(corpus, config)
    for i, _ in enumerate(loader, start=1):
        if i == k:
            break
    state = loader.state_dict()
    seek = P.SlipLoader(corpus, config)
    seek.load_state_dict(state)
    seek_s, seek_bytes, seek_keys = _first_batch(seek)
    del state["workers"]["0"]["stream"]
    replay = P.SlipLoader(corpus, config)
    replay.load_state_dict(state)
    replay_s, replay_bytes, replay_keys = _first_batch(replay)
    assert seek_keys == replay_keys, "both resumes must give the same next batch"
    return {"position": round(k / total_batches, 3), "batches_consumed": k,
            "seek_bytes": seek_bytes, "seek_s": round(seek_s, 3),
            "replay_bytes": replay_bytes, "replay_s": round(replay_s, 3),
            "bytes_ratio": round(replay_bytes / max(seek_bytes, 1), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=200, help="shuffle buffer (samples per worker)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--positions", default="0.1,0.5,0.9", help="fractions of the epoch to resume at")
    ap.add_argument("--dir", help="corpus directory (written when empty)")
    args = ap.parse_args(argv)

    tmp = None
    root = Path(args.dir) if args.dir else Path(tmp := tempfile.mkdtemp(prefix="bench-resume-"))
    if not list(root.glob("*.tar")):
        print(f"writing {args.shards} x {args.per_shard} samples to {root} ...", file=sys.stderr)
        write_corpus(root, args.shards, args.per_shard)
    shard_sizes = [p.stat().st_size for p in sorted(root.glob("*.tar"))]
    samples = len(shard_sizes) * args.per_shard
    config = P.PipelineConfig(method="clip", size=64, batch_size=args.batch, workers=0, shuffle_buffer=args.buffer,
                              shuffle_initial=args.buffer, partial_batches=False)
    total_batches = samples // args.batch
    real_open = tars.open_shard
    tars.open_shard = lambda url: _Counted(real_open(url))
    try:
        rows = [measure(str(root), config, float(f), total_batches) for f in args.positions.split(",")]
    finally:
        tars.open_shard = real_open
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"summary": True, "shards": len(shard_sizes), "samples": samples,
                      "mean_shard_bytes": round(sum(shard_sizes) / len(shard_sizes)),
                      "mean_sample_bytes": round(sum(shard_sizes) / samples), "shuffle_buffer": args.buffer,
                      "batch_size": args.batch}))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
