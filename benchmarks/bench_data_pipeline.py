#!/usr/bin/env python3
"""Side-by-side, single-process (per-core) throughput of SLIP training-data pipelines.

    python benchmarks/bench_data_pipeline.py IMAGE_DIR [--size 224] [--rounds 3] [--methods slip-simclr,slip-beit]

IMAGE_DIR holds ``*.jpg`` with a ``.txt`` caption beside each (for example the output of
``python benchmarks/make_bench_jpegs.py OUT --count 400 --captions``). The images are first
written as webdataset shards (``slip.data.shards.write_shards`` when available, else a plain
``webdataset.TarWriter``), then each pipeline processes every image, in one process with one
torch thread:

a. decode only: PIL decode + ``convert("RGB")`` -- the ceiling the brief measures against
   (plus, for reference, torchvision's ``decode_jpeg``, which slip uses for full-size JPEGs);
b. plain per-sample pipeline: PIL decode, SLIP's three torchvision views (CLIP view, two
   SimCLR views with torchvision's tensor GaussianBlur, kernel 23) and tokenisation, per
   sample; b' is the same with SLIP's original PIL ``ImageFilter.GaussianBlur`` blur, which
   is faster, so the ratio is taken against the faster of b and b';
c. slip's pipeline read from the shards (tar reading, shuffle, caption choice, one decode,
   uint8 crops, batched tokenisation), worker part alone and followed by the batched
   photometric augmentation on CPU (on a GPU that part leaves the CPU entirely); once per
   ``--methods`` entry (the views of SLIP with SimCLR, BYOL / MoCo v3 or BEiT, ...).
d. the same with ``decode="device"``: the CPU side alone (tar reading, shuffle, caption
   choice, header and crop boxes, tokenisation); decoding and cutting happen on the training
   device (``slip.data.decode.DeviceDecoder``), not measured here (see ``slip bench-data``).

Runs are interleaved over ``--rounds`` and the best round is reported (other processes only
ever slow a run down), both as wall-clock and as CPU-time throughput.

:func:`augment_milliseconds` times the batched augmentation alone on any device (CUDA events on
a GPU); ``benchmarks/gpu_suite.py`` uses it for the GPU milliseconds per batch of each method.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slip.cli import use_huge_pages

use_huge_pages()  # as slip's commands run: before torch is imported

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from slip.data.augment import BatchAugment  # noqa: E402
from slip.data.pipeline import PipelineConfig, build_loader, default_tokenizer  # noqa: E402
from slip.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def make_shards(image_dir: Path, out_dir: Path, per_shard: int = 100) -> int:
    """Write IMAGE_DIR's JPEG + caption pairs as shards into ``out_dir``; returns the count."""
    paths = sorted(glob.glob(str(image_dir / "*.jpg")))
    if not paths:
        raise SystemExit(f"no .jpg files in {image_dir}")

    def caption(path: str) -> str:
        txt = path[:-4] + ".txt"
        return open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else os.path.basename(path)

    try:
        from slip.data.shards import Sample, write_shards
    except ImportError:
        import webdataset as wds

        out_dir.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(paths), per_shard):
            with wds.TarWriter(str(out_dir / f"shard-{start // per_shard:06d}.tar")) as sink:
                for path in paths[start : start + per_shard]:
                    key = os.path.basename(path)[:-4]
                    sink.write({"__key__": key, "jpg": open(path, "rb").read(), "txt": caption(path)})
        return len(paths)
    samples = [Sample(key=os.path.basename(p)[:-4], image=p, caption=caption(p)) for p in paths]
    index = write_shards(samples, out_dir, samples_per_shard=per_shard, progress=False, overwrite=True)
    return int(index["total_samples"])


class _PILBlur:
    """SLIP's original blur: PIL GaussianBlur with radius ~ U(0.1, 2)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def plain_transforms(size: int, pil_blur: bool) -> tuple[Callable, Callable]:
    """SLIP's torchvision train transforms: the CLIP view and one SimCLR view."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    clip = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.ToTensor(), normalize])
    blur = _PILBlur() if pil_blur else T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))
    simclr = T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([blur], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ])
    return clip, simclr


def _milliseconds(step: Callable[[int], None], device: torch.device, iterations: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``iterations`` calls ``step(i)`` after ``warmup`` untimed ones: CUDA
    events recorded around each call on a GPU (device time), the wall clock on the CPU."""
    times: list[float] = []
    events = []
    for i in range(warmup + iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            if i >= warmup:
                events.append((start, end))
        else:
            t0 = time.perf_counter()
            step(i)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    return times


def augment_milliseconds(shards: str, method: str, *, size: int, batch_size: int, device: torch.device,
                         iterations: int, warmup: int = 2, workers: int = 0, seed: int = 0,
                         out_dtype: torch.dtype = torch.float32) -> dict:
    """Milliseconds per batch of the batched photometric augmentation alone, as the trainer runs it.

    One real batch of ``method``'s views comes from slip's loader on ``shards`` (uint8 crops,
    made on the CPU), is moved to ``device`` and augmented ``warmup + iterations`` times by
    :class:`~slip.data.augment.BatchAugment` with the trainer's call (a fresh generator of the
    device per step, ``out_dtype`` out). On CUDA each call is timed by CUDA events recorded
    around it (device time, including any wait for the host between its kernels); on the CPU
    by the wall clock. The crops do not change the work, so one batch serves every iteration.
    """
    from slip.ssl import method_views

    views = method_views(method, size)
    config = PipelineConfig(views=views, batch_size=batch_size, workers=workers, mode="resampled",
                            shuffle_buffer=0, seed=seed, rank=0, world_size=1, pin_memory=False)
    loader = build_loader(shards, config)
    batches = iter(loader)
    batch = next(batches)
    del batches
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                 [t.to(device) for t in v] if k == "views" else v) for k, v in batch.items()}
    augment = BatchAugment(views, out_dtype=out_dtype).to(device)

    def step(i: int) -> None:
        augment(batch, generator=torch.Generator(device).manual_seed(seed * 1_000_003 + i))

    times = _milliseconds(step, device, iterations, warmup)
    return {
        "method": method, "views": len(views.all), "batch_size": len(batch["key"]), "size": size,
        "device": device.type, "timer": "cuda events" if device.type == "cuda" else "wall clock",
        "out_dtype": str(out_dtype).removeprefix("torch."), "iterations": iterations,
        "ms_mean": statistics.fmean(times), "ms_median": statistics.median(times), "ms_min": min(times),
    }


def device_decode_milliseconds(images: list[bytes], method: str, *, size: int, device: torch.device,
                               iterations: int, warmup: int = 2, seed: int = 0) -> dict:
    """Milliseconds per batch of ``data.decode=device``'s device part alone: one batch of the
    JPEGs ``images`` (their bytes and each view's crop box, as the workers ship them) decoded in
    one ``decode_jpeg`` call and cut into ``method``'s views by
    :class:`~slip.data.decode.DeviceDecoder`, ``warmup + iterations`` times; CUDA events on a GPU,
    the wall clock on the CPU."""
    from slip.data.decode import DeviceDecoder, EncodedBatch, plan_views
    from slip.ssl import method_views

    views = method_views(method, size)
    rng = random.Random(seed)
    planned = [plan_views(data, views.all, rng) for data in images]
    if any(p.data is None for p in planned):
        raise ValueError("device_decode_milliseconds needs JPEGs the device decoder takes")
    decoder = DeviceDecoder(views.all, device, has_clip=views.clip is not None)

    def step(_: int) -> None:
        decoder({"key": [str(k) for k in range(len(images))], "encoded": EncodedBatch.collate(planned)})

    times = _milliseconds(step, device, iterations, warmup)
    return {
        "method": method, "views": len(views.all), "batch_size": len(images), "size": size, "device": device.type,
        "timer": "cuda events" if device.type == "cuda" else "wall clock", "iterations": iterations,
        "mean_jpeg_bytes": round(sum(map(len, images)) / len(images)),
        "ms_mean": statistics.fmean(times), "ms_median": statistics.median(times), "ms_min": min(times),
    }


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """Run ``fn`` (returns a sample count); (samples, wall seconds, CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_dir", type=Path)
    ap.add_argument("--shards", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="slip-simclr",
                    help="comma-separated views to measure the slip pipeline with (slip.ssl.view_method_names()), "
                         "e.g. slip-simclr,slip-byol,slip-beit")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory() if args.shards is None else None
    shard_dir = args.shards or Path(tmp.name)
    count = make_shards(args.image_dir, shard_dir)
    paths = sorted(glob.glob(str(args.image_dir / "*.jpg")))
    images = [open(p, "rb").read() for p in paths]
    captions = [open(p[:-4] + ".txt", encoding="utf-8").read() if os.path.exists(p[:-4] + ".txt") else "" for p in paths]
    tokenizer = default_tokenizer()
    print(f"{count} images in shards at {shard_dir}; output {args.size}px, {args.rounds} rounds, 1 thread; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")

    def decode_pil() -> int:
        for data in images:
            Image.open(io.BytesIO(data)).convert("RGB")
        return len(images)

    def decode_tv() -> int:
        from torchvision.io import decode_jpeg

        for data in images:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return len(images)

    def plain(pil_blur: bool) -> Callable[[], int]:
        clip, simclr = plain_transforms(args.size, pil_blur)

        def run() -> int:
            for data, text in zip(images, captions):
                img = Image.open(io.BytesIO(data)).convert("RGB")
                clip(img), simclr(img), simclr(img)
                tokenizer([text])
            return len(images)

        return run

    def slip(augment: bool, method: str, decode: str = "workers") -> Callable[[], int]:
        config = PipelineConfig(
            method=method, size=args.size, batch_size=args.batch_size, workers=0,
            shuffle_buffer=100, rank=0, world_size=1, decode=decode,
        )
        loader = build_loader(str(shard_dir), config, tokenizer=tokenizer)
        aug = BatchAugment(loader.views, seed=0) if augment else None

        def run() -> int:
            n = 0
            for batch in loader:
                if aug is not None:
                    aug(batch)
                n += len(batch["key"])
            return n

        return run

    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    runs: dict[str, Callable[[], int]] = {
        "a  decode only (PIL decode + convert RGB)": decode_pil,
        "a* decode only (torchvision decode_jpeg)": decode_tv,
        "b  plain per-sample (torchvision, tensor blur)": plain(False),
        "b' plain per-sample (torchvision, SLIP's PIL blur)": plain(True),
    }
    for method in args.methods.split(","):
        runs[f"c  slip worker part (uint8 views + tokens) [{method}]"] = slip(False, method)
        runs[f"c+ slip worker part + batched augment on CPU [{method}]"] = slip(True, method)
        runs[f"d  slip worker part, decode on the device (JPEG bytes + boxes + tokens) [{method}]"] = slip(
            False, method, "device")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            n, wall, cpu = timed(fn)
            if n != count:
                raise SystemExit(f"{name}: processed {n} samples, expected {count}")
            results[name].append((n / wall, n / cpu))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    best = {name: (max(w for w, _ in v), max(c for _, c in v)) for name, v in results.items()}
    median = {name: statistics.median(w for w, _ in v) for name, v in results.items()}
    plain_best = max(best["b  plain per-sample (torchvision, tensor blur)"][1], best["b' plain per-sample (torchvision, SLIP's PIL blur)"][1])
    plain_best_wall = max(best["b  plain per-sample (torchvision, tensor blur)"][0], best["b' plain per-sample (torchvision, SLIP's PIL blur)"][0])
    width = max(map(len, runs))
    print()
    print(f"{'pipeline (1 process, 1 thread)':<{width}}  {'samples/s':>9}  {'median':>7}  {'per CPU-s':>9}  {'x plain':>7}")
    for name in runs:
        wall, cpu = best[name]
        print(f"{name:<{width}}  {wall:9.1f}  {median[name]:7.1f}  {cpu:9.1f}  {cpu / plain_best:7.2f}")
    print()
    for method in args.methods.split(","):
        c = best[f"c  slip worker part (uint8 views + tokens) [{method}]"]
        cplus = best[f"c+ slip worker part + batched augment on CPU [{method}]"]
        d = best[f"d  slip worker part, decode on the device (JPEG bytes + boxes + tokens) [{method}]"]
        print(f"[{method}] (c)/(b) worker part: {c[1] / plain_best:.2f}x per CPU-second, "
              f"{c[0] / plain_best_wall:.2f}x wall clock; (c+)/(b) with CPU augmentation: "
              f"{cplus[1] / plain_best:.2f}x per CPU-second, {cplus[0] / plain_best_wall:.2f}x wall clock; "
              f"(d)/(b) decoding on the device: {d[1] / plain_best:.2f}x per CPU-second ({d[1]:.0f} samples/CPU-s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
