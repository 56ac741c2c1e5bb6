"""The console script and README's commands."""
from __future__ import annotations

from pathlib import Path

from slip.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_command_embeds_and_round_trips(capsys):
    assert main(["smoke", "--model", "slip_vit_tiny"]) == 0
    out = capsys.readouterr().out
    assert "text embedding  (1, 32)" in out and "smoke test passed" in out


def test_unknown_command_fails_and_lists_commands(capsys):
    assert main(["frobnicate"]) == 2
    assert "smoke" in capsys.readouterr().err


def test_list_models_prints_the_registry(capsys):
    assert main(["list-models"]) == 0
    assert "slip_vit_b16" in capsys.readouterr().out.split()


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2, block
    assert "slip demo" in block[0] or "slip smoke" in block[0]
    assert "pytest" in block[1]
    assert "sed -n 2p" in (ROOT / ".ci" / "run").read_text()
