"""``slip export-benchmark``: a classification benchmark in CLIP_benchmark's webdataset layout.

    slip export-benchmark OUT --benchmark-dir runs/demo/corpus/benchmark
    slip export-benchmark OUT --catalog CATALOG.json --benchmark mine [--split test]

writes ``OUT/classnames.txt`` (one class per line, label order; a class's first synonym),
``OUT/zeroshot_classification_templates.txt`` (one template per line, ``{c}`` for the class) and
``OUT/<split>/nshards.txt`` with ``OUT/<split>/0.tar, 1.tar ...``: one sample per image with the
image's bytes as read from the source (``.jpg``/``.png``/``.webp``, re-encoded as PNG only when
the source is not an image file already) and its label in ``.cls``. CLIP_benchmark evaluates it
offline with ``clip_benchmark eval --dataset wds/NAME --dataset_root OUT --model local-dir:EXPORT
--no_amp`` (``--dataset_root`` is OUT itself, or ``'PARENT/{dataset}'``, which CLIP_benchmark fills
with NAME; ``--no_amp`` evaluates in float32 as ``slip zero-shot`` does: its default autocast
rounds the logits and ties change the figures; see ``slip export``), and slip reads it back as a
catalog entry of type ``wds``.
Unreadable images of the source are skipped and counted. Written into a temporary sibling folder
and renamed into place; an existing OUT is refused.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

from ..errors import UserError, command
from ..fileio import temporary_dir_beside

SHARD_SIZE = 1000  # images per tar


def _source_bytes(dataset, index: int) -> tuple[bytes, str] | None:
    """The image of ``dataset[index]`` as (encoded bytes, extension), or None if unreadable."""
    from PIL import Image

    raw = dataset._read(index)  # a path or the bytes of a member (slip's eval datasets)
    data = Path(raw).read_bytes() if isinstance(raw, (str, os.PathLike)) else bytes(raw)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind = (image.format or "").lower()
    except Exception:  # noqa: BLE001 -- an unreadable image is skipped and counted
        return None
    if kind in ("jpeg", "png", "webp"):
        return data, {"jpeg": "jpg"}.get(kind, kind)
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(buf, "PNG")
    return buf.getvalue(), "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def export_benchmark(benchmark, dataset, out: str | os.PathLike, split: str = "test",
                     shard_size: int = SHARD_SIZE) -> dict:
    """Write ``dataset`` (a slip eval dataset of ``benchmark``) to ``out`` in CLIP_benchmark's
    layout; returns ``{"images", "skipped", "shards"}``."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new folder")
    if not hasattr(dataset, "_read"):
        raise UserError(f"{benchmark.key}: this dataset type cannot be exported image by image")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir_beside(out)
    try:
        (tmp / "classnames.txt").write_text("".join(f"{c[0]}\n" for c in benchmark.class_synonyms), encoding="utf-8")
        (tmp / "zeroshot_classification_templates.txt").write_text(
            "".join(t.replace("{}", "{c}") + "\n" for t in benchmark.templates), encoding="utf-8")
        (tmp / split).mkdir()
        written = skipped = shards = 0
        tar = None
        for index in range(len(dataset)):
            item = _source_bytes(dataset, index)
            if item is None:
                skipped += 1
                continue
            if written % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(tmp / split / f"{shards}.tar", "w")
                shards += 1
            data, ext = item
            key = f"s{index:08d}"
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.cls", str(int(dataset.targets[index])).encode())
            written += 1
        if tar is not None:
            tar.close()
        if written == 0:
            raise UserError(f"{benchmark.key}: no readable image to export ({skipped} skipped)")
        (tmp / split / "nshards.txt").write_text(f"{shards}\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"images": written, "skipped": skipped, "shards": shards}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip export-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--benchmark-dir", help="a benchmark directory (the synthetic one: OUT/benchmark)")
    p.add_argument("--catalog", help="dataset catalog JSON")
    p.add_argument("--benchmark", help="a catalog key (one of SLIP's benchmarks or a dataset of your own)")
    p.add_argument("--split", default="test", help="the split to export (default test)")
    return p


@command("export-benchmark")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.benchmark_dir) == bool(args.benchmark):
        raise UserError("give either --benchmark-dir, or --catalog with --benchmark")
    from .datasets import build_dataset, load_benchmark_dir

    if args.benchmark_dir:
        if args.split != "test":
            raise UserError("a benchmark directory has only the test split")
        local = load_benchmark_dir(args.benchmark_dir)
        bench, dataset = local.benchmark, build_dataset(local.benchmark.key, local.entry, "test", None,
                                                        benchmark=local.benchmark)
    else:
        if not args.catalog:
            raise UserError("--benchmark names a catalog key, so --catalog is needed")
        from zero_shot import benchmarks_with_catalog, load_catalog

        catalog = load_catalog(args.catalog)
        benchmarks = benchmarks_with_catalog(catalog, args.catalog)
        if args.benchmark not in catalog or args.benchmark not in benchmarks:
            raise UserError(f"--benchmark {args.benchmark!r} is not a classification entry of {args.catalog}")
        bench = benchmarks[args.benchmark]
        dataset = build_dataset(args.benchmark, catalog[args.benchmark], args.split, None, benchmark=bench)
    summary = export_benchmark(bench, dataset, args.out, args.split)
    print(f"wrote {summary['images']} images of {bench.num_classes} classes in {summary['shards']} shards to "
          f"{args.out} (skipped {summary['skipped']} unreadable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
