"""The console script and README's commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


_FIRST_WRITE_FAULTS = (
    "import os, resource, sys\n"
    "from slip.cli import main\n"
    "main(['--help'])\n"
    "import torch\n"
    "torch.empty(1)\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "torch.empty(19 * 2**20, dtype=torch.uint8).fill_(1)\n"
    "print(os.environ['THP_MEM_ALLOC_ENABLE'], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)


def _huge_pages_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never), None if unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.parametrize("setting, expected", [(None, "1"), ("0", "0")])
def test_the_commands_back_large_cpu_tensors_with_huge_pages_unless_told_otherwise(setting, expected):
    # slip's entry points set THP_MEM_ALLOC_ENABLE=1 before torch is imported, unless the user
    # set it: where the kernel gives huge pages on request (madvise), a fresh 19 MB tensor is
    # then written with a few hundred page faults instead of about 3,900.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    out = subprocess.run([sys.executable, "-c", _FIRST_WRITE_FAULTS], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1].split()
    assert out[0] == expected
    faults, mode = int(out[1]), _huge_pages_mode()
    if expected == "1" and mode in ("madvise", "always"):
        assert faults < 1500, faults
    if expected == "0" and mode == "madvise":  # with "always" the kernel uses huge pages regardless
        assert faults > 3000, faults
