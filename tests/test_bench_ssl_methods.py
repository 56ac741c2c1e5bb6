"""benchmarks/bench_ssl_methods.py runs every combination end to end at toy size."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ssl_methods.py"


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT, "bench_ssl_methods") as module:
        yield module


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
    assert saved["config"]["precision"] == "fp32" and len(saved["results"]) == len(bench.COMBINATIONS)
    by_name = {r["combination"]: r for r in results}
    for r in results:
        assert r["samples_per_s"] > 0 and r["activation_mib_per_sample"] > 0 and r["peak_gib"] is None
        assert r["flops_per_step"] > 0 and r["mfu"] is None  # no listed peak for a CPU
    assert by_name["slip+simclr"]["tower_images"] == 3 and by_name["slip+beit"]["tower_images"] == 2
    assert by_name["slip+swav"]["tower_images"] == 9 and by_name["mocov2"]["tower_images"] == 1
    # State across steps: none for SimCLR's BatchNorm-only head beyond its statistics; MoCo v2's
    # queue of 65,536 keys of the tiny head's 32 dimensions (8 MiB) plus its momentum copies.
    assert by_name["clip"]["ssl_state_mib"] == 0 and by_name["simclr"]["ssl_state_mib"] < 0.1
    assert 8 < by_name["mocov2"]["ssl_state_mib"] < 9 and by_name["mocov3"]["ssl_state_mib"] > 0.5
    # SLIP keeps CLIP's activations plus those of two more tower passes
    assert by_name["slip+simclr"]["activation_mib_per_sample"] > by_name["clip"]["activation_mib_per_sample"]


def test_combinations_cover_the_ssl_registry(bench):
    from slip.ssl import method_names

    assert set(bench.COMBINATIONS) == {"clip", *method_names(), *(f"slip+{m}" for m in method_names())}


def test_flop_counter_counts_matmuls_and_cpu_attention_forward_and_backward(bench):
    x = torch.randn(4, 64, requires_grad=True)
    layer = torch.nn.Linear(64, 32)
    with bench.flop_counter() as counter:
        layer(x).sum().backward()
    # forward 2*4*64*32; backward: the input's and the weight's gradients, as much again each
    assert counter.get_total_flops() == 3 * 2 * 4 * 64 * 32
    q = torch.randn(1, 2, 8, 16, requires_grad=True)  # (batch, heads, tokens, head dim)
    with bench.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * 2 * (2 * 8 * 8 * 16)  # q @ k^T and p @ v, per head
    assert counter.get_total_flops() == forward + 5 * forward // 2  # backward: five matmuls


def test_peak_flops_by_device_name(bench):
    assert bench.peak_bf16_flops("NVIDIA H200") == 989e12
    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe") is None  # another part, not in the table
    assert bench.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


def test_one_build_measures_several_batches_and_checkpointing_trades_activations_for_flops(bench, one_torch_thread):
    tokenizer = bench.random_tokenizer(32, 4)
    combo = bench.combination("simclr", "tiny")
    runs = {}
    for checkpointing in (False, True):
        args = argparse.Namespace(precision="fp32", warmup=1, steps=1, grad_checkpointing=checkpointing)
        runs[checkpointing] = bench.measure_batches(combo, [2, 4], args, torch.device("cpu"), tokenizer)
    for checkpointing, rows in runs.items():
        assert [r["batch"] for r in rows] == [2, 4] and all(r["grad_checkpointing"] == checkpointing for r in rows)
        assert rows[1]["flops_per_step"] > rows[0]["flops_per_step"] > 0
    for plain, recomputed in zip(runs[False], runs[True]):
        assert recomputed["activation_mib_per_sample"] < plain["activation_mib_per_sample"]
        assert recomputed["flops_per_step"] > plain["flops_per_step"]
    table = bench.format_table(runs[False] + runs[True])
    assert table.count("| simclr ") == 4 and "| yes " in table
