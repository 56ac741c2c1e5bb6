"""benchmarks/bench_resume.py measures both ways of resuming on a corpus it writes itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_resume.py"


@pytest.mark.usefixtures("one_torch_thread")
def test_seeking_reads_less_than_replaying_late_in_the_epoch(tmp_path, capsys):
    from slip.data import tars

    real_open = tars.open_shard
    with loaded_script(SCRIPT, "bench_resume") as bench:
        rows = bench.main(["--shards", "6", "--per-shard", "8", "--buffer", "6", "--batch", "4",
                           "--positions", "0.2,0.9", "--dir", str(tmp_path / "corpus")])
    assert tars.open_shard is real_open  # the byte counting is undone
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[:-1] == rows and printed[-1]["summary"] and printed[-1]["samples"] == 48
    early, late = rows
    assert early["batches_consumed"] == 2 and late["batches_consumed"] == 11
    # Replaying re-reads everything consumed; seeking reads the buffer and what the next batch needs.
    assert late["replay_bytes"] > 3 * late["seek_bytes"]
    assert late["bytes_ratio"] > early["bytes_ratio"]
