"""k-NN on frozen features: the vote equals a plain re-statement, bank/query halves are
stratified, ``slip knn`` evaluates a checkpoint, and an SSL-only run logs k-NN accuracy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import slip
from slip.eval.knn import halves, knn_eval, knn_scores
from slip.eval.linear_probe import FeatureSet
from slip.train.trainer import train
from test_train import corpus, losses_by_step, tiny  # noqa: F401  (corpus: fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_force(bank, labels, queries, num_classes, k, temperature):
    """The protocol written out one query at a time, with plain Python sorting."""
    out = []
    for q in queries:
        sims = [(float(np.dot(q, b) / (np.linalg.norm(q) * np.linalg.norm(b))), int(y)) for b, y in zip(bank, labels)]
        votes = [0.0] * num_classes
        for sim, y in sorted(sims, key=lambda t: -t[0])[:k]:
            votes[y] += math.exp(sim / temperature)
        out.append(votes)
    return np.array(out)


@pytest.mark.parametrize("k,temperature,chunk", [(20, 0.07, 4096), (5, 0.5, 7), (200, 0.1, 16)])
def test_votes_equal_a_plain_restatement_of_the_protocol(k, temperature, chunk):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(120, 16)), rng.normal(size=(30, 16))
    labels = rng.integers(0, 6, size=120)
    got = knn_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), 6, k, temperature, chunk)
    np.testing.assert_allclose(got.numpy(), _brute_force(bank, labels, queries, 6, min(k, 120), temperature), rtol=2e-4)


def test_accuracy_of_separable_and_of_shuffled_labels():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32)) * 10
    labels = np.repeat(np.arange(5), 40)
    feats = (centres[labels] + rng.normal(size=(200, 32))).astype(np.float32)
    bank, queries = halves(FeatureSet(feats, labels))
    result = knn_eval(bank, queries, 5)
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["n_bank"] == result["n_query"] == 100
    shuffled = knn_eval(FeatureSet(bank.features, rng.permutation(bank.labels)), queries, 5)
    assert shuffled["top1"] < 50.0  # chance is 20%: the labels, not the features alone, decide


def test_halves_split_every_class_in_two():
    labels = np.repeat(np.arange(4), [10, 7, 2, 5])
    feats = np.arange(len(labels), dtype=np.float32)[:, None]
    bank, queries = halves(FeatureSet(feats, labels))
    for c, n in enumerate([10, 7, 2, 5]):
        assert (bank.labels == c).sum() + (queries.labels == c).sum() == n
        assert (queries.labels == c).sum() == min(max(round(n / 2), 1), n - 1)
    assert not set(bank.features[:, 0]) & set(queries.features[:, 0])


def test_command_reports_the_knn_accuracy_of_a_checkpoint(corpus, tmp_path, capsys):
    from slip.eval.knn import tower_features
    from slip.eval.knn_cli import main
    from slip.train.validation import open_eval_dataset

    torch.manual_seed(0)
    model = slip.create_model("simclr_vit_tiny")  # no text tower: k-NN needs none
    slip.save_checkpoint(model, tmp_path / "m.pt")
    out = tmp_path / "knn.json"
    assert main(["--checkpoint", str(tmp_path / "m.pt"), "--benchmark-dir", str(corpus / "benchmark"),
                 "--workers", "0", "--k", "5", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["benchmark"] == str(corpus / "benchmark") and row["k"] == 5 and row["classes"] == 30
    loaded, preprocess = slip.load_pretrained(tmp_path / "m.pt")
    bench, data, _ = open_eval_dataset(str(corpus / "benchmark"), None, "x", ("test",), preprocess)
    bank, queries = halves(tower_features(loaded, data["test"]))
    assert row["top1"] == pytest.approx(knn_eval(bank, queries, 30, k=5)["top1"])
    assert f"{row['top1']:5.1f}" in capsys.readouterr().out


def test_an_ssl_only_run_logs_knn_accuracy_above_chance(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "run", "model.name=simclr_vit_tiny", "objective.clip=false",
               f"eval.knn={corpus / 'benchmark'}", "eval.every=2", "eval.knn_k=5", "train.max_steps=4"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["synthetic_knn_top1"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [2, 4]
    assert all(v > 2 * 100 / 30 for v in evals.values()), evals  # chance: 1 of 30 classes
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2, 3, 4]


def test_zero_shot_validation_of_a_model_without_text_is_a_config_error(corpus, tmp_path):
    from slip.train.config import ConfigError

    with pytest.raises(ConfigError, match="eval.benchmark: zero-shot validation needs a text tower.*eval.knn"):
        train(tiny(corpus, tmp_path / "run", "model.name=simclr_vit_tiny", "objective.clip=false",
                   f"eval.benchmark={corpus / 'benchmark'}", "train.max_steps=1"))
