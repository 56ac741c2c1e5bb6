"""benchmarks/gpu_suite.py on the CPU (``--device cpu --quick``): every section runs and reports
measured numbers, so the GPU suite cannot rot before a GPU runs it; a failing section is
recorded without losing the others, and fails the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import loaded_script

from slip.ssl import method_names, view_method_names

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = {"cuda_tests", "throughput", "data", "zero_shot"}


def test_quick_cpu_run_measures_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "| section" in proc.stdout  # the closing table
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["suite"]["quick"] and report["suite"]["seconds"] > 0
    sections = report["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "ok" and section["error"] is None and section["seconds"] > 0, name

    # pytest -m cuda: collected, and every test skipped without a GPU.
    tests = sections["cuda_tests"]["result"]
    assert tests["collected"] > 0 and tests["skipped"] == tests["collected"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0

    # Throughput: every combination of the SSL registry, at each batch size, with and without
    # activation checkpointing; the CPU has no allocator peak and no listed FLOP/s peak.
    throughput = sections["throughput"]["result"]
    rows = throughput["rows"]
    combinations = {"clip", *method_names(), *(f"slip+{m}" for m in method_names())}
    batches = throughput["config"]["batches"]
    assert {(r["combination"], r["batch"], r["grad_checkpointing"]) for r in rows} == {
        (c, b, ckpt) for c in combinations for b in batches for ckpt in (False, True)}
    for r in rows:
        assert not r["oom"] and r["samples_per_s"] > 0 and r["ms_per_step"] > 0, r
        assert r["activation_mib_per_sample"] > 0 and r["flops_per_step"] > 0 and r["tflops_per_s"] > 0, r
        assert r["peak_gib"] is None and r["mfu"] is None, r
    plain = {(r["combination"], r["batch"]): r for r in rows if not r["grad_checkpointing"]}
    for r in rows:
        if r["grad_checkpointing"]:  # recomputation: fewer saved activations, more FLOPs
            twin = plain[(r["combination"], r["batch"])]
            assert r["activation_mib_per_sample"] < twin["activation_mib_per_sample"], r["combination"]
            assert r["flops_per_step"] > twin["flops_per_step"], r["combination"]
    assert throughput["headline"]["samples_per_s"] > 0
    for fit in throughput["largest_batch"].values():
        assert fit["largest_batch"] == report["suite"]["plan"]["fit_limit"] and fit["first_oom_batch"] is None

    # Data: slip bench-data end to end, and the augmentation alone for every method's views.
    data = sections["data"]["result"]
    assert data["bench_data"]["samples"] > 0 and data["bench_data"]["samples_per_s"] > 0
    assert data["bench_data"]["augment_device"] == "cpu"
    assert [a["method"] for a in data["augment"]] == view_method_names()
    assert all(a["ms_mean"] > 0 and a["ms_min"] > 0 for a in data["augment"])
    decode = data["device_decode"]
    assert decode["batch_size"] == report["suite"]["plan"]["data_batch"] and decode["ms_mean"] > 0
    assert decode["mean_jpeg_bytes"] > 10_000  # web-like photos, not the synthetic corpus's thumbnails

    # Zero-shot: the evaluation and bare encode_image over the same images.
    zero_shot = sections["zero_shot"]["result"]
    for path in zero_shot["paths"].values():
        assert path["images"] == report["suite"]["plan"]["zs_images"] and path["images_per_s"] > 0
    assert zero_shot["classifier"]["prompts"] > 0 and zero_shot["classifier"]["seconds"] > 0


@pytest.fixture
def suite():
    with loaded_script(SCRIPT, "gpu_suite") as module:  # the script puts benchmarks/ on sys.path
        yield module


def test_a_failing_section_is_recorded_the_others_still_run_and_the_exit_status_is_1(suite, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the data section broke")

    monkeypatch.setattr(suite, "RUNNERS", {**suite.RUNNERS, "data": broken, "zero_shot": lambda ctx: {"measured": 1.0},
                                           "cuda_tests": lambda ctx: {"failure": "2 failed, 0 errors"}})
    out = tmp_path / "gpu.json"
    assert suite.main(["--device", "cpu", "--quick", "--only", "cuda_tests,data,zero_shot", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["cuda_tests", "data"]
    data = report["sections"]["data"]
    assert data["status"] == "failed" and data["error"]["type"] == "RuntimeError"
    assert "the data section broke" in data["error"]["message"] and "Traceback" in data["error"]["traceback"]
    assert report["sections"]["cuda_tests"]["error"]["message"] == "2 failed, 0 errors"
    assert report["sections"]["zero_shot"] == {"status": "ok", "seconds": pytest.approx(0, abs=5),
                                              "result": {"measured": 1.0}, "error": None}
