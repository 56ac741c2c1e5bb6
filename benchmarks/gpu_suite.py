"""Everything slip has never measured on a GPU, in one command: a table on stdout and a JSON file.

    python benchmarks/gpu_suite.py --out gpu.json             # one H100/H200, within 8 minutes
    python benchmarks/gpu_suite.py --device cpu --quick --out cpu.json   # the same, shrunk (CI)
    python benchmarks/gpu_suite.py --only throughput,data --out part.json

Sections, in the order they run (each catches its own exceptions and records them; the exit
status is 1 if any section failed, 2 for a bad command line; the JSON is rewritten after each
section, so a run cut short keeps what it measured):

throughput  benchmarks/bench_ssl_methods.py's measure_batches on every combination (CLIP,
            each registered SSL method alone and with CLIP) at ViT-B/16 in bf16 (``--quick``:
            the tiny ViT, fp32 on the CPU), at batch 64, 128 and 256, without and with
            activation checkpointing: samples/s, ms/step, CUDA peak memory, saved activations,
            FLOPs per step (FlopCounterMode on one step) and MFU = achieved FLOP/s / peak dense
            bf16 FLOP/s of the device (bench_ssl_methods.PEAK_BF16_FLOPS; null for a device not
            listed there, or for the CPU). With checkpointing, MFU counts the model's FLOPs (the
            run without checkpointing at the same batch) and HFU the executed ones (with the
            recomputation). Then the largest batch that fits for SLIP (slip+simclr): batches
            doubling from 64 until CUDA runs out of memory (two steps each, so the AdamW state
            is there), without and with checkpointing; on the CPU the doubling stops at a cap.
data        ``slip bench-data`` (slip.data.bench) with the augmentation on the device, on
            synthetic shards the suite writes (``slip make-synthetic``'s code path) into a temp
            dir: end-to-end samples/s of the loader + augmentation; then, per method's views
            (slip.ssl.view_method_names()), the milliseconds per batch of 256 of BatchAugment alone,
            timed by CUDA events (bench_data_pipeline.augment_milliseconds; wall clock on CPU);
            and data.decode=device's device part (one decode_jpeg call for a batch of web-like
            JPEGs + every view's crops; bench_data_pipeline.device_decode_milliseconds).
zero_shot   images/s of slip.eval.zero_shot.zero_shot_eval (classifier from the prompts, eval
            loader, fp32 as evaluation runs) against bare ``model.encode_image`` on the same
            images: in fp32, in fp32 with TF32 matmuls (which slip never enables) and under bf16
            autocast. The images are the synthetic benchmark's, decoded once with the eval
            transform and repeated; the weights are random (speed does not depend on them;
            accuracy would mean nothing and is not reported).
cuda_tests  ``pytest -m cuda`` over tests/ in a subprocess (tests/test_cuda.py: bf16 and
            fp16 + GradScaler steps of every SSL combination, fused AdamW, SyncBatchNorm on
            NCCL, BatchAugment on CUDA against the CPU, GPU checkpoints on the CPU, the trainer
            under torchrun with gloo). Counts from pytest's JUnit XML; the section fails if a
            test fails or errors, or if no test is collected. With ``--device cpu`` the GPU is
            hidden from pytest, so every test reports skipped. Last, so that a hang (killed
            after pytest_timeout_s) costs none of the measurements.

The JSON holds ``suite`` (device, settings, total seconds, budget) and per section ``status``
("ok" / "failed"), ``seconds``, ``result`` and ``error`` (type, message, traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the sibling benchmarks, and slip from this checkout

import bench_data_pipeline as data_bench  # noqa: E402
import bench_ssl_methods as ssl_bench  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("throughput", "data", "zero_shot", "cuda_tests")
BUDGET_S = 480  # what a full run on one H100/H200 must fit in
FIT_COMBINATION = "slip+simclr"  # SLIP as the paper trains it


@dataclass(frozen=True)
class Plan:
    """How big each measurement is; ``FULL`` on a GPU, ``QUICK`` for the CPU check."""

    size: str  # bench_ssl_methods.SIZES key
    precision: str
    sweep_batches: tuple[int, ...]
    warmup: int
    steps: int
    fit_start: int
    fit_limit: int  # the doubling stops here even if memory is left (the CPU has no OOM)
    corpus_samples: int
    corpus_image_size: int
    corpus_test_per_class: int
    data_size: int
    data_batch: int
    data_workers: int
    data_seconds: float
    augment_iterations: int
    zs_model: str
    zs_images: int
    zs_batch: int
    pytest_timeout_s: int


FULL = Plan(size="b16", precision="bf16", sweep_batches=(64, 128, 256), warmup=2, steps=5, fit_start=64,
            fit_limit=16384, corpus_samples=1024, corpus_image_size=256, corpus_test_per_class=4, data_size=224,
            data_batch=256, data_workers=min(8, os.cpu_count() or 1), data_seconds=10.0, augment_iterations=10,
            zs_model="slip_vit_b16", zs_images=4096, zs_batch=256, pytest_timeout_s=240)
QUICK = Plan(size="tiny", precision="bf16", sweep_batches=(4, 8), warmup=1, steps=1, fit_start=4, fit_limit=8,
             corpus_samples=64, corpus_image_size=64, corpus_test_per_class=1, data_size=64, data_batch=16,
             data_workers=0, data_seconds=1.0, augment_iterations=2, zs_model="slip_vit_tiny", zs_images=64,
             zs_batch=16, pytest_timeout_s=150)


class Context:
    """What the sections share: the device, the plan, a temp dir and the synthetic corpus."""

    def __init__(self, device: torch.device, plan: Plan, workdir: Path):
        self.device = device
        self.plan = plan
        self.workdir = workdir
        self._corpus: Path | None = None

    def corpus(self) -> Path:
        """Synthetic training shards (``train/``) and benchmark (``benchmark/``), written once."""
        if self._corpus is None:
            from slip.data.synthetic import generate_synthetic

            out = self.workdir / "corpus"
            p = self.plan
            generate_synthetic(out, seed=0, train_samples=p.corpus_samples, test_per_class=p.corpus_test_per_class,
                               image_size=p.corpus_image_size, samples_per_shard=max(8, p.corpus_samples // 16))
            self._corpus = out
        return self._corpus


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# cuda_tests: pytest -m cuda in a subprocess
# ----------------------------------------------------------------------------------------------
def cuda_tests(ctx: Context) -> dict:
    report = ctx.workdir / "cuda-tests.xml"
    env = dict(os.environ)
    if ctx.device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run skips the GPU tests even on a GPU machine
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", str(ROOT / "tests"), "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={report}", "-o", "junit_family=xunit2"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a timeout also ends torchrun's workers
    try:
        output, _ = proc.communicate(timeout=ctx.plan.pytest_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(f"pytest -m cuda did not finish in {ctx.plan.pytest_timeout_s} s; its output ended "
                           f"with:\n{output[-3000:]}") from None
    print(output[-6000:], end="", flush=True)
    if not report.is_file():
        raise RuntimeError(f"pytest -m cuda exited with {proc.returncode} and wrote no report:\n{output[-3000:]}")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    problems, skip_reasons = [], {}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for kind in ("failure", "error"):
                for node in case.findall(kind):
                    problems.append({"test": name, "kind": kind, "message": (node.get("message") or "")[:500]})
            for node in case.findall("skipped"):
                reason = node.get("message") or ""
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    result = {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "collected": counts["tests"],
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "skip_reasons": skip_reasons,
        "problems": problems,
    }
    print(_table(("collected", "passed", "failed", "errors", "skipped"),
                 [(result["collected"], result["passed"], result["failed"], result["errors"], result["skipped"])]))
    if counts["tests"] == 0:
        result["failure"] = "no test marked cuda was collected"
    elif proc.returncode != 0 or counts["failures"] or counts["errors"]:
        result["failure"] = f"{counts['failures']} failed, {counts['errors']} errors (pytest exit {proc.returncode})"
    return result


# ----------------------------------------------------------------------------------------------
# throughput: bench_ssl_methods over every combination, batch size and checkpointing setting
# ----------------------------------------------------------------------------------------------
def throughput(ctx: Context) -> dict:
    device, plan = ctx.device, ctx.plan
    precision = plan.precision if device.type == "cuda" else "fp32"  # bf16 autocast on CPU measures nothing useful
    vision = ssl_bench.get_architecture(f"clip_{ssl_bench.SIZES[plan.size]}").vision
    tokenizer = ssl_bench.random_tokenizer(vision.image_size, vision.image_size // vision.patch_size)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = ssl_bench.peak_bf16_flops(device_name) if device.type == "cuda" else None

    def settings(checkpointing: bool, warmup: int, steps: int) -> SimpleNamespace:
        return SimpleNamespace(precision=precision, warmup=warmup, steps=steps, grad_checkpointing=checkpointing)

    rows: list[dict] = []
    for checkpointing in (False, True):
        for name in ssl_bench.COMBINATIONS:
            t0 = time.perf_counter()
            combo = ssl_bench.combination(name, plan.size)
            measured = ssl_bench.measure_batches(combo, list(plan.sweep_batches),
                                                 settings(checkpointing, plan.warmup, plan.steps), device, tokenizer)
            rows += measured
            figures = ", ".join("OOM" if r["oom"] else f"{r['samples_per_s']:.1f}" for r in measured)
            print(f"  {name:<14} ckpt={'yes' if checkpointing else 'no ':<3} samples/s at {plan.sweep_batches}: "
                  f"{figures} ({time.perf_counter() - t0:.1f} s)", flush=True)
    # MFU counts the model's FLOPs; with checkpointing those are the run's without it at the same batch.
    model_flops = {(r["combination"], r["batch"]): r["flops_per_step"] for r in rows
                   if not r["grad_checkpointing"] and not r["oom"]}
    for r in rows:
        if r["grad_checkpointing"] and not r["oom"] and peak and precision == "bf16":
            flops = model_flops.get((r["combination"], r["batch"]))
            r["mfu"] = flops / (r["ms_per_step"] / 1e3) / peak if flops else None
    print(ssl_bench.format_table(rows))

    fits = {}
    for checkpointing in (False, True):
        t0 = time.perf_counter()
        sizes, size = [], plan.fit_start
        while size <= plan.fit_limit:
            sizes.append(size)
            size *= 2
        tried = ssl_bench.measure_batches(ssl_bench.combination(FIT_COMBINATION, plan.size), sizes,
                                          settings(checkpointing, 1, 1), device, tokenizer, stop_at_oom=True)
        fitting = [r for r in tried if not r["oom"]]
        oom = next((r["batch"] for r in tried if r["oom"]), None)
        largest = fitting[-1] if fitting else None
        fits["checkpointing" if checkpointing else "plain"] = {
            "combination": FIT_COMBINATION, "grad_checkpointing": checkpointing, "tried": [r["batch"] for r in tried],
            "largest_batch": largest["batch"] if largest else None,
            "peak_gib_at_largest": largest["peak_gib"] if largest else None,
            "samples_per_s_at_largest": largest["samples_per_s"] if largest else None,
            "first_oom_batch": oom,
            "stopped_by": "out of memory" if oom else f"the cap of {plan.fit_limit} (no OOM on this device)",
        }
        print(f"  largest {FIT_COMBINATION} batch, ckpt={'yes' if checkpointing else 'no'}: "
              f"{fits['checkpointing' if checkpointing else 'plain']['largest_batch']} (tried {sizes[:len(tried)]}; "
              f"stopped by {fits['checkpointing' if checkpointing else 'plain']['stopped_by']}; "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)

    slip_rows = [r for r in rows if r["combination"] == FIT_COMBINATION and not r["grad_checkpointing"] and not r["oom"]]
    headline = None
    if slip_rows:
        best = slip_rows[-1]  # the largest batch of the sweep that fit
        headline = {"combination": FIT_COMBINATION, "model": best["model"], "batch": best["batch"],
                    "samples_per_s": best["samples_per_s"], "tflops_per_s": best["tflops_per_s"], "mfu": best["mfu"],
                    "peak_gib": best["peak_gib"]}
        mfu = "n/a" if best["mfu"] is None else f"{best['mfu']:.1%}"
        print(f"SLIP {best['model']} ({precision}) batch {best['batch']}: {best['samples_per_s']:.1f} samples/s, "
              f"{best['tflops_per_s']:.3g} TFLOP/s, MFU {mfu}")
    total_memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    return {
        "config": {"size": plan.size, "precision": precision, "batches": list(plan.sweep_batches),
                   "warmup": plan.warmup, "steps": plan.steps, "device_name": device_name,
                   "device_memory_gib": total_memory, "peak_bf16_flops": peak,
                   "peak_source": "bench_ssl_methods.PEAK_BF16_FLOPS" if peak else
                   f"none: {device_name!r} is not listed (MFU is null)",
                   "tokenizer": f"random KMeansPatchTokenizer, {tokenizer.vocab_size} codes"},
        "headline": headline,
        "rows": rows,
        "largest_batch": fits,
    }


# ----------------------------------------------------------------------------------------------
# data: slip bench-data with augmentation on the device, and BatchAugment's device time
# ----------------------------------------------------------------------------------------------
def data(ctx: Context) -> dict:
    from slip.data import bench as bench_data
    from slip.ssl import view_method_names

    device, plan = ctx.device, ctx.plan
    shards = str(ctx.corpus() / "train")
    argv = [shards, "--method", "slip-simclr", "--workers", str(plan.data_workers), "--seconds", str(plan.data_seconds),
            "--batch-size", str(plan.data_batch), "--size", str(plan.data_size), "--device", device.type,
            "--warmup-batches", "2"]
    print("$ slip bench-data " + " ".join(argv), flush=True)
    threads = torch.get_num_threads()  # bench-data sets one thread when it augments on the CPU
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            status = bench_data.main(argv)
    finally:
        torch.set_num_threads(threads)
    lines = captured.getvalue().strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if status != 0 or not lines:
        raise RuntimeError(f"slip bench-data exited with {status}:\n{captured.getvalue()[-2000:]}")
    end_to_end = json.loads(lines[-1])  # its last line is the JSON result

    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the trainer hands views on
    augment = []
    for method in view_method_names():
        augment.append(data_bench.augment_milliseconds(
            shards, method, size=plan.data_size, batch_size=plan.data_batch, device=device,
            iterations=plan.augment_iterations, out_dtype=out_dtype))
    print(_table(("views of", "views", "batch", "size", "out", "ms/batch (mean)", "median", "min", "timer"),
                 [(a["method"], a["views"], a["batch_size"], a["size"], a["out_dtype"], f"{a['ms_mean']:.2f}",
                   f"{a['ms_median']:.2f}", f"{a['ms_min']:.2f}", a["timer"]) for a in augment]))
    # data.decode=device: the device's part (one decode_jpeg call + every view's crops) on a batch
    # of web-like JPEGs (500-1024 px; the synthetic corpus's images are too small to tell).
    from make_bench_jpegs import web_like_jpegs

    jpegs = [data for _, data, _, _ in web_like_jpegs(plan.data_batch, seed=0)]
    decode = data_bench.device_decode_milliseconds(jpegs, "slip-simclr", size=plan.data_size, device=device,
                                                   iterations=plan.augment_iterations)
    print(f"device decode (slip-simclr views, {decode['batch_size']} JPEGs of {decode['mean_jpeg_bytes']} bytes): "
          f"{decode['ms_mean']:.2f} ms/batch (median {decode['ms_median']:.2f}, {decode['timer']})", flush=True)
    return {"bench_data": {"argv": argv, **end_to_end}, "augment": augment, "device_decode": decode,
            "corpus": {"samples": plan.corpus_samples, "image_size": plan.corpus_image_size}}


# ----------------------------------------------------------------------------------------------
# zero_shot: zero_shot_eval against bare encode_image on the same images
# ----------------------------------------------------------------------------------------------
class _Repeated(torch.utils.data.Dataset):
    """``n`` items cycling over ``items`` (decoded once)."""

    def __init__(self, items: list, n: int):
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.items[index % len(self.items)]


def zero_shot(ctx: Context) -> dict:
    from slip.eval.datasets import build_dataset, load_benchmark_dir
    from slip.eval.zero_shot import build_classifier, zero_shot_eval
    from slip.models import create_model
    from slip.tokenizer import get_tokenizer
    from slip.transforms import eval_transform

    device, plan = ctx.device, ctx.plan
    local = load_benchmark_dir(ctx.corpus() / "benchmark")
    torch.manual_seed(0)
    model = create_model(plan.zs_model).to(device).eval()
    size = model.arch.vision.image_size
    dataset = build_dataset(local.benchmark.key, local.entry, "test", eval_transform(size), benchmark=local.benchmark)
    decoded = [dataset[i] for i in range(len(dataset))]
    if not decoded or any(item is None for item in decoded):
        raise RuntimeError(f"the synthetic benchmark has {len(decoded)} images, some unreadable")
    images = _Repeated(decoded, plan.zs_images)
    tokenizer = get_tokenizer()
    batches = [torch.stack([images[i][0] for i in range(s, min(s + plan.zs_batch, len(images)))])
               for s in range(0, len(images), plan.zs_batch)]

    def classifier() -> None:
        build_classifier(model, tokenizer, local.benchmark.class_synonyms, local.benchmark.templates,
                         batch_size=plan.zs_batch, device=device, progress=False)

    def evaluation() -> None:
        result = zero_shot_eval(model, tokenizer, local.benchmark, images, batch_size=plan.zs_batch, workers=0,
                                device=device, progress=False)
        if result["n"] != len(images):
            raise RuntimeError(f"zero_shot_eval scored {result['n']} of {len(images)} images")

    def bare(dtype: torch.dtype | None, tf32: bool = False):
        def run() -> None:
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            tf32_before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32  # slip never enables it: fp32 matmuls stay fp32
            try:
                with torch.no_grad(), autocast:
                    for x in batches:
                        model.encode_image(x.to(device, non_blocking=True), normalize=True)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32_before
        return run

    def warm_up(dtype: torch.dtype | None) -> None:  # kernels chosen, caches allocated, off the clock
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            model.encode_image(batches[0].to(device), normalize=True)

    paths = {
        "zero_shot_eval (fp32)": (evaluation, None),
        "encode_image (fp32)": (bare(None), None),
        "encode_image (fp32, TF32 matmuls)": (bare(None, tf32=True), None),
        "encode_image (bf16 autocast)": (bare(torch.bfloat16), torch.bfloat16),
    }
    figures = {}
    classifier()  # warms the text tower up, off the clock
    for name, (fn, dtype) in paths.items():
        warm_up(dtype)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - start
        figures[name] = {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}
    _sync(device)
    start = time.perf_counter()
    classifier()  # part of zero_shot_eval's time: the prompts of every class through the text tower
    _sync(device)
    prompts = sum(len(s) for s in local.benchmark.class_synonyms) * len(local.benchmark.templates)
    classifier_s = time.perf_counter() - start
    reference = figures["encode_image (fp32)"]["images_per_s"]
    print(_table(("path", "images", "seconds", "images/s", "x encode_image fp32"),
                 [(k, v["images"], f"{v['seconds']:.2f}", f"{v['images_per_s']:.1f}",
                   f"x{v['images_per_s'] / reference:.2f}") for k, v in figures.items()]))
    print(f"  of which the classifier ({prompts} prompts): {classifier_s:.3f} s")
    return {"model": plan.zs_model, "image_size": size, "batch_size": plan.zs_batch, "classes": len(local.benchmark.classnames),
            "templates": len(local.benchmark.templates), "distinct_images": len(decoded), "paths": figures,
            "classifier": {"prompts": prompts, "seconds": classifier_s},
            "eval_over_bare": figures["zero_shot_eval (fp32)"]["images_per_s"] / reference}


RUNNERS = {"cuda_tests": cuda_tests, "throughput": throughput, "data": data, "zero_shot": zero_shot}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _summary(name: str, section: dict) -> str:
    """One line per section for the closing table."""
    if section["status"] != "ok":
        message = (section.get("error") or {}).get("message") or ""
        return (message.splitlines() or [""])[0][:120]
    try:
        return _figures(name, section["result"])
    except (KeyError, TypeError, StopIteration):
        return "(see the JSON)"


def _figures(name: str, r: dict) -> str:
    if name == "cuda_tests":
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if name == "throughput":
        h = r.get("headline") or {}
        mfu = "n/a" if h.get("mfu") is None else f"{h['mfu']:.1%}"
        fit = r["largest_batch"]
        return (f"{h.get('model')} batch {h.get('batch')}: {h.get('samples_per_s', 0):.1f} samples/s, MFU {mfu}; "
                f"largest batch {fit['plain']['largest_batch']} / {fit['checkpointing']['largest_batch']} (ckpt)")
    if name == "data":
        slip_views = next(a for a in r["augment"] if a["method"] == "slip-simclr")
        return (f"bench-data {r['bench_data']['samples_per_s']} samples/s; slip-simclr augment "
                f"{slip_views['ms_mean']:.2f} ms/batch of {slip_views['batch_size']}; device decode "
                f"{r['device_decode']['ms_mean']:.2f} ms/batch")
    if name == "zero_shot":
        p = r["paths"]
        return (f"eval {p['zero_shot_eval (fp32)']['images_per_s']:.1f} img/s vs encode_image "
                f"{p['encode_image (fp32)']['images_per_s']:.1f} (fp32), {p['encode_image (bf16 autocast)']['images_per_s']:.1f} (bf16)")
    return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (rewritten after every section)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny models, small batches, few steps (the CPU check)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (shards, pytest report)")
    args = parser.parse_args(argv)
    args.sections = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu --quick on a machine without one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    plan = QUICK if args.quick else FULL
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        "suite": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "quick": args.quick, "plan": asdict(plan), "sections": list(args.sections),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget_s": BUDGET_S, "seconds": None, "within_budget": None,
        },
        "sections": {},
        "failed": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="slip-gpu-suite-"))
    ctx = Context(device, plan, workdir)
    print(f"slip GPU suite: device={device} ({report['suite']['device_name']}) quick={args.quick} "
          f"sections={','.join(args.sections)} torch={torch.__version__} temp={workdir}", flush=True)
    try:
        for name in args.sections:
            print(f"\n=== {name} ===", flush=True)
            t0 = time.perf_counter()
            section: dict = {"status": "ok", "seconds": None, "result": None, "error": None}
            try:
                section["result"] = RUNNERS[name](ctx)
                if section["result"].get("failure"):  # a section may fail without raising (failing tests)
                    section["status"] = "failed"
                    section["error"] = {"type": "SectionFailed", "message": section["result"]["failure"],
                                        "traceback": None}
            except Exception as e:  # noqa: BLE001 -- recorded; the other sections still run
                section["status"] = "failed"
                section["error"] = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
                print(traceback.format_exc(), file=sys.stderr, flush=True)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            section["seconds"] = time.perf_counter() - t0
            report["sections"][name] = section
            if section["status"] != "ok":
                report["failed"].append(name)
            print(f"=== {name}: {section['status']} in {section['seconds']:.1f} s ===", flush=True)
            report["suite"]["seconds"] = time.perf_counter() - started
            out.write_text(json.dumps(report, indent=2, default=str))  # partial results survive a kill
    finally:
        if args.keep_temp:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    total = time.perf_counter() - started
    report["suite"]["seconds"] = total
    report["suite"]["within_budget"] = total <= BUDGET_S if not args.quick else None
    out.write_text(json.dumps(report, indent=2, default=str))
    print("\n" + _table(("section", "status", "seconds", "summary"),
                        [(n, s["status"], f"{s['seconds']:.1f}", _summary(n, s)) for n, s in report["sections"].items()]))
    budget = "" if args.quick else f" (budget {BUDGET_S} s: {'within' if total <= BUDGET_S else 'OVER'})"
    print(f"total {total:.1f} s{budget}; wrote {out}")
    if report["failed"]:
        print(f"FAILED sections: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
