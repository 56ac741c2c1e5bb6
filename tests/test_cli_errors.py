"""First contact: every command answers the mistakes of a first hour with one line
``slip <command>: error: ...`` that names the offending input, exit code 2, and no traceback;
``--debug`` (or SLIP_DEBUG=1) shows the traceback; README names only paths that exist."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from braceexpand import braceexpand

import slip
from slip.cli import main

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """A pickle that would call os.system when unpickled."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files a new user might point slip at by mistake, and a few genuine ones."""
    root = tmp_path_factory.mktemp("mistakes")
    files = {
        "text_file": root / "notes.pt",
        "evil_pickle": root / "evil.pt",
        "truncated": root / "truncated.pt",
        "image_model": root / "simclr.pt",
        "empty_dir": root / "empty",
        "catalog": root / "catalog.json",
        "bench_dir": root / "not_a_benchmark",
        "missing": root / "does_not_exist",
    }
    files["text_file"].write_text("these are my notes, not a checkpoint\n")
    files["evil_pickle"].write_bytes(pickle.dumps(_RunsCode(), protocol=4))
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, root / "whole.pt")
    whole = (root / "whole.pt").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("simclr_vit_tiny"), files["image_model"])
    files["empty_dir"].mkdir()
    files["bench_dir"].mkdir()
    (files["bench_dir"] / "readme.txt").write_text("no benchmark.json here")
    files["catalog"].write_text(json.dumps({"cifar10": {"path": str(root / "cifar"), "type": "special"}}))
    return files


def _tiny(*overrides: str) -> list[str]:
    return ["train", str(ROOT / "configs" / "tiny" / "slip_simclr.yaml"), "train.max_steps=1", *overrides]


# (id, argv built from the inputs, text the error line must contain)
CASES = [
    ("train/missing-config", lambda f: ["train", str(f["missing"] / "recipe.yaml")], "{missing}/recipe.yaml"),
    ("train/missing-shards", lambda f: _tiny(f"data.train={f['missing']}/"), "{missing}"),
    ("train/empty-shard-dir", lambda f: _tiny(f"data.train={f['empty_dir']}"), "{empty_dir}"),
    ("train/unknown-key", lambda f: _tiny("train.batchsize=8"), "train.batchsize"),
    ("train/bad-value", lambda f: _tiny("train.precision=fp8"), "train.precision"),
    ("train/missing-tokenizer", lambda f: _tiny("objective.ssl=beit", f"objective.tokenizer={f['missing']}"),
     "{missing}"),
    ("zero-shot/missing-checkpoint", lambda f: ["zero-shot", "--checkpoint", str(f["missing"]), "--catalog",
                                                str(f["catalog"])], "{missing}"),
    ("zero-shot/text-file", lambda f: ["zero-shot", "--checkpoint", str(f["text_file"]), "--catalog",
                                       str(f["catalog"])], "{text_file}: not a PyTorch checkpoint"),
    ("zero-shot/pickle-that-runs-code", lambda f: ["zero-shot", "--checkpoint", str(f["evil_pickle"]), "--catalog",
                                                   str(f["catalog"])], "{evil_pickle}: refused"),
    ("zero-shot/truncated", lambda f: ["zero-shot", "--checkpoint", str(f["truncated"]), "--catalog",
                                       str(f["catalog"])], "{truncated}: a damaged or truncated"),
    ("zero-shot/image-only-model", lambda f: ["zero-shot", "--checkpoint", str(f["image_model"]), "--catalog",
                                              str(f["catalog"])], "{image_model}: this model has no text tower"),
    ("zero-shot/missing-catalog", lambda f: ["zero-shot", "--checkpoint", str(f["image_model"]), "--catalog",
                                             str(f["missing"])], "{missing}"),
    ("zero-shot/not-a-benchmark-dir", lambda f: ["zero-shot", "--checkpoint", str(f["image_model"]),
                                                 "--benchmark-dir", str(f["bench_dir"])], "{bench_dir}"),
    ("linear-probe/text-file", lambda f: ["linear-probe", "--checkpoint", str(f["text_file"]), "--catalog",
                                          str(f["catalog"]), "--benchmarks", "cifar10"], "{text_file}"),
    ("linear-probe/missing-dataset", lambda f: ["linear-probe", "--checkpoint", str(f["image_model"]), "--catalog",
                                                str(f["catalog"]), "--benchmarks", "cifar10"], "cifar10"),
    ("finetune/text-file", lambda f: ["finetune", "--checkpoint", str(f["text_file"]), "--catalog",
                                      str(f["catalog"]), "--benchmark", "cifar10", "--output-dir",
                                      str(f["empty_dir"] / "ft")], "{text_file}"),
    ("finetune/missing-catalog", lambda f: ["finetune", "--checkpoint", str(f["image_model"]), "--catalog",
                                            str(f["missing"]), "--benchmark", "cifar10", "--output-dir",
                                            str(f["empty_dir"] / "ft")], "{missing}"),
    ("knn/text-file", lambda f: ["knn", "--checkpoint", str(f["text_file"]), "--benchmark-dir", str(f["bench_dir"])],
     "{text_file}"),
    ("knn/not-a-benchmark-dir", lambda f: ["knn", "--checkpoint", str(f["image_model"]), "--benchmark-dir",
                                           str(f["bench_dir"])], "{bench_dir}"),
    ("bench-data/missing-shards", lambda f: ["bench-data", str(f["missing"]), "--seconds", "1"], "{missing}"),
    ("bench-data/empty-shard-dir", lambda f: ["bench-data", str(f["empty_dir"]), "--seconds", "1"], "{empty_dir}"),
    ("fit-tokenizer/missing-shards", lambda f: ["fit-tokenizer", str(f["missing"]), str(f["empty_dir"] / "t.st")],
     "{missing}"),
    ("make-shards/missing-source", lambda f: ["make-shards", str(f["missing"]), str(f["empty_dir"] / "out")],
     "{missing}"),
    ("make-synthetic/output-is-a-file", lambda f: ["make-synthetic", str(f["text_file"]), "--train-samples", "8"],
     "{text_file}"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_ends_in_one_error_line_naming_the_input(case, inputs, capsys, monkeypatch, one_torch_thread):
    name, argv, named = case
    monkeypatch.delenv("SLIP_DEBUG", raising=False)
    command = name.split("/")[0]
    assert main(argv(inputs)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith(f"slip {command}: error: ")]
    assert len(lines) == 1, err
    assert named.format(**{k: str(v) for k, v in inputs.items()}) in lines[0]
    assert "weights_only=False" not in err  # torch's advice is exactly what must not be done


def test_a_rendezvous_port_in_use_is_one_error_line(monkeypatch, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        assert main(_tiny()) == 2
    err = capsys.readouterr().err
    assert f"slip train: error: MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}: the port is already in use" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback_for_a_user_error(inputs, monkeypatch):
    from slip.checkpoint import CheckpointError

    argv = ["zero-shot", "--checkpoint", str(inputs["text_file"]), "--catalog", str(inputs["catalog"])]
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        main([*argv, "--debug"])
    monkeypatch.setenv("SLIP_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(argv)


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    import slip.smoke

    def broken(*args, **kwargs):
        raise KeyError("a bug, not a mistake of the user")

    monkeypatch.setattr(slip.smoke, "create_model", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["smoke", "--model", "clip_vit_tiny"])


def test_a_missing_optional_package_names_its_extra(monkeypatch, tmp_path):
    import builtins

    from slip.errors import MissingExtra
    from slip.ssl.visual_tokenizers import load_visual_tokenizer

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    (tmp_path / "codebook").mkdir()
    with pytest.raises(MissingExtra, match=r"needs the 'transformers' package.*pip install 'slip\[beit\]'"):
        load_visual_tokenizer(tmp_path / "codebook")


def _readme_paths() -> list[str]:
    """Every repository path README names in backticks (braces expanded)."""
    text = (ROOT / "README.md").read_text()
    # Top-level folders of the repository, not of what runs leave beside it (runs/, .venv/: git-ignored).
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    tops = {p.name for p in ROOT.iterdir() if p.name not in ignored} | {"shared"}
    paths = []
    for code in re.findall(r"`([^`\n]+)`", text):
        for token in code.split():
            token = token.strip("\"',;:()")
            if "/" in token and token.split("/")[0] in tops:
                paths += list(braceexpand(token))
    return paths


def test_every_repository_path_readme_names_exists():
    paths = _readme_paths()
    assert len(paths) > 30  # the scan finds README's paths (configs alone are 27)
    assert [p for p in paths if not (ROOT / p).exists()] == []
