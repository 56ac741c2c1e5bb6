"""``slip linear-probe`` reads what the newer SSL methods' trainings write: a tiny ViT trained two
steps by each tiny recipe, its checkpoint probed on a small image-folder benchmark, with the
probed tower the checkpoint's trained one (the SSL heads, PIRL's memory bank and CPC's context
network are training-only state)."""
from __future__ import annotations

import json

import pytest
import torch
from test_eval_finetune import KEY, N_TEST, bench  # noqa: F401  (bench: fixture)
from test_ssl import _run, corpus  # noqa: F401  (corpus: fixture)

import slip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("recipe", ["relicv2", "pirl", "amdim", "cpc", "yadim"])
def test_linear_probe_reads_the_checkpoint_of_each_method(recipe, corpus, bench, tmp_path):  # noqa: F811
    from slip.checkpoint import read_checkpoint
    from slip.eval import linear_probe_cli

    result, _ = _run(corpus, tmp_path / "run", recipe, "train.max_steps=2")
    assert result.step == 2 and result.checkpoint.exists()
    catalog, _ = bench
    out = tmp_path / "probe.json"
    common = ["--checkpoint", str(result.checkpoint), "--catalog", str(catalog), "--benchmarks", KEY,
              "--workers", "0", "--device", "cpu", "--no-cache"]
    assert linear_probe_cli.main([*common, "--out", str(out), "--max-iter", "30"]) == 0
    row = json.loads(out.read_text())["results"][KEY]
    assert row["num_test"] == 4 * N_TEST and 0 <= row["score"] <= 100
    # The probe's model is the trained tower: every tower tensor as the training wrote it (the
    # momentum copies, heads and banks are training-only), and not the untrained initialisation.
    model, _ = slip.load_pretrained(result.checkpoint)
    saved = read_checkpoint(result.checkpoint).state_dict
    tower = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    assert all(torch.equal(v, saved[f"visual.{k}"]) for k, v in tower.items())
    torch.manual_seed(0)
    fresh = slip.create_model(model.arch).visual.state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in tower.items())
