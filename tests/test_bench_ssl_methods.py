"""benchmarks/bench_ssl_methods.py runs every combination end to end at toy size."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ssl_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ssl_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_saved_tensors_counts_activations_and_parameters_apart(bench):
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(4, 64)
    with bench.SavedTensors(net) as saved:
        net(x).sum()
    # input (4x64) + GELU input and output (4x128 each); the second Linear's weight (128x64)
    assert saved.activation_bytes == 4 * (4 * 64 + 2 * 4 * 128)
    assert saved.parameter_bytes == 4 * 128 * 64
    with torch.autocast("cpu", dtype=torch.bfloat16), bench.SavedTensors(net) as saved:
        net(x).sum()
    # the same in bf16: autocast's copy of the weight counts as a parameter, not an activation
    assert saved.activation_bytes == 2 * (4 * 64 + 2 * 4 * 128)
    assert saved.parameter_bytes == 2 * 128 * 64


def test_every_combination_runs_and_reports(bench, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "results.json"
    results = bench.main(["--device", "cpu", "--size", "tiny", "--batch", "4", "--steps", "1", "--warmup", "1",
                          "--json", str(out)])
    assert [r["combination"] for r in results] == list(bench.COMBINATIONS)
    table = capsys.readouterr().out
    assert "slip+beit" in table and "x1.00" in table
    saved = json.loads(out.read_text())
    assert saved["config"]["precision"] == "fp32" and len(saved["results"]) == 9
    by_name = {r["combination"]: r for r in results}
    for r in results:
        assert r["samples_per_s"] > 0 and r["activation_mib_per_sample"] > 0 and r["peak_gib"] is None
    assert by_name["slip+simclr"]["tower_images"] == 3 and by_name["slip+beit"]["tower_images"] == 2
    # SLIP keeps CLIP's activations plus those of two more tower passes
    assert by_name["slip+simclr"]["activation_mib_per_sample"] > by_name["clip"]["activation_mib_per_sample"]
