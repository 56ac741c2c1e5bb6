"""Evaluation metrics against scikit-learn and naive references."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from slip.eval.metrics import (
    METRICS,
    compute_metric,
    mean_per_class_recall,
    mean_top1_top5,
    roc_auc,
    top1,
    topk,
    voc_11pt_map,
)


def _random_problem(seed: int, n: int = 200, c: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    # Signal on the true class so accuracies are far from both 0 and 100.
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    return logits, labels


@pytest.mark.parametrize("seed", range(5))
def test_top1_matches_sklearn(seed: int) -> None:
    logits, labels = _random_problem(seed)
    expected = 100 * accuracy_score(labels, logits.argmax(1))
    assert top1(logits, labels) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_topk_matches_sklearn(seed: int, k: int) -> None:
    logits, labels = _random_problem(seed)
    expected = 100 * top_k_accuracy_score(labels, logits, k=k, labels=np.arange(logits.shape[1]))
    assert topk(logits, labels, k) == pytest.approx(expected, abs=1e-9)


def test_topk_all_classes_is_100_and_k_out_of_range_raises() -> None:
    logits, labels = _random_problem(0, c=6)
    assert topk(logits, labels, 6) == 100.0
    with pytest.raises(ValueError, match="k must be"):
        topk(logits, labels, 7)
    with pytest.raises(ValueError, match="k must be"):
        topk(logits, labels, 0)


def test_top1_ties_break_like_argmax() -> None:
    # All-equal logits (a collapsed model): argmax says class 0 for every row.
    logits = np.zeros((4, 3))
    labels = np.array([0, 1, 2, 0])
    assert top1(logits, labels) == 50.0
    assert topk(logits, labels, 2) == 75.0


@pytest.mark.parametrize("seed", range(5))
def test_mean_per_class_recall_matches_sklearn(seed: int) -> None:
    logits, labels = _random_problem(seed, n=150, c=9)
    pred = logits.argmax(1)
    expected = 100 * balanced_accuracy_score(labels, pred)
    assert mean_per_class_recall(logits, labels) == pytest.approx(expected, abs=1e-9)
    assert mean_per_class_recall(logits, labels) == pytest.approx(
        100 * recall_score(labels, pred, average="macro", labels=np.unique(labels)), abs=1e-9
    )


def test_mean_per_class_recall_excludes_absent_class() -> None:
    # Class 2 never occurs in labels but is predicted once; it must not enter the mean.
    logits = np.array([[5, 0, 0], [5, 0, 0], [0, 0, 5], [0, 5, 0]], dtype=float)
    labels = np.array([0, 0, 1, 1])
    # class 0 recall 1, class 1 recall 1/2 -> 75 (a 0 for class 2 would give 50).
    assert mean_per_class_recall(logits, labels) == pytest.approx(75.0)
    assert mean_per_class_recall(logits, labels) == pytest.approx(
        100 * recall_score(labels, logits.argmax(1), average="macro", labels=[0, 1])
    )


def test_mean_per_class_recall_differs_from_accuracy_when_imbalanced() -> None:
    logits = np.array([[1, 0]] * 9 + [[1, 0]], dtype=float)
    labels = np.array([0] * 9 + [1])
    assert top1(logits, labels) == pytest.approx(90.0)
    assert mean_per_class_recall(logits, labels) == pytest.approx(50.0)


@pytest.mark.parametrize("seed", range(3))
def test_mean_top1_top5(seed: int) -> None:
    logits, labels = _random_problem(seed, c=20)
    classes = np.arange(20)
    expected = 50 * (
        top_k_accuracy_score(labels, logits, k=1, labels=classes)
        + top_k_accuracy_score(labels, logits, k=5, labels=classes)
    )
    assert mean_top1_top5(logits, labels) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=300)
    logits = rng.normal(size=(300, 2))
    logits[:, 1] += 0.8 * labels
    expected = 100 * roc_auc_score(labels, logits[:, 1] - logits[:, 0])
    assert roc_auc(logits, labels) == pytest.approx(expected, abs=1e-9)


def test_roc_auc_with_ties_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    # Integer-valued scores: many ties, within and across classes.
    logits = np.stack([np.zeros(200), rng.integers(0, 4, size=200) + labels], axis=1)
    expected = 100 * roc_auc_score(labels, logits[:, 1])
    assert roc_auc(logits, labels) == pytest.approx(expected, abs=1e-9)


def test_roc_auc_hand_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([[0, 0], [0, 1], [0, 2], [0, 3]], dtype=float)
    assert roc_auc(perfect, labels) == pytest.approx(100.0)
    assert roc_auc(perfect[::-1], labels) == pytest.approx(0.0)
    all_tied = np.zeros((4, 2))
    assert roc_auc(all_tied, labels) == pytest.approx(50.0)
    # score = l1 - l0, not l1 alone: here l1 is constant and only l0 carries the signal.
    signal_in_l0 = np.array([[3, 1], [2, 1], [1, 1], [0, 1]], dtype=float)
    assert roc_auc(signal_in_l0, labels) == pytest.approx(100.0)


def test_roc_auc_rejects_single_class_and_multiclass() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.zeros((3, 2)), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="binary"):
        roc_auc(np.zeros((3, 3)), np.array([0, 1, 2]))


def _naive_voc_11pt_ap(score: np.ndarray, positive: np.ndarray) -> float:
    """Direct transcription of the VOC 2007 definition with exact fractions.

    Precision/recall are computed at each distinct score threshold (predict positive when
    score >= threshold); interpolated precision at t is the max precision over thresholds
    with recall >= t.
    """
    n_pos = int(positive.sum())
    points = []
    for thr in np.unique(score):
        predicted = score >= thr
        tp = int((predicted & positive).sum())
        points.append((Fraction(tp, n_pos), Fraction(tp, int(predicted.sum()))))
    total = Fraction(0)
    for i in range(11):
        t = Fraction(i, 10)
        total += max((p for r, p in points if r >= t), default=Fraction(0))
    return float(total / 11)


@pytest.mark.parametrize("seed", range(4))
def test_voc_11pt_map_matches_naive_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 60, 5
    targets = (rng.random((n, c)) < 0.3).astype(int)
    targets[0] = 1  # every class has a positive
    scores = rng.normal(size=(n, c)) + targets
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    expected = 100 * np.mean([_naive_voc_11pt_ap(scores[:, j], targets[:, j] == 1) for j in range(c)])
    assert voc_11pt_map(scores, targets) == pytest.approx(expected, abs=1e-9)


def test_voc_11pt_map_hand_computed() -> None:
    # One class, 5 images ranked by score; positives at ranks 1, 3, 5 (3 positives).
    # precision/recall after each: (1, 1/3), (1/2, 1/3), (2/3, 2/3), (1/2, 2/3), (3/5, 1).
    # t=0..0.3: max prec at recall>=t -> 1      (4 points)
    # t=0.4..0.6: recall>=t at ranks 3,4,5 -> 2/3 (3 points)
    # t=0.7..1.0: only rank 5 -> 3/5            (4 points)
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[1], [0], [1], [0], [1]])
    expected = (4 * 1 + 3 * (2 / 3) + 4 * (3 / 5)) / 11
    assert voc_11pt_map(scores, targets) == pytest.approx(100 * expected)


def test_voc_11pt_map_recall_exactly_on_grid() -> None:
    # 10 positives: recall hits 0.3 exactly after 3 of them; with a float-stepped grid
    # (0.30000000000000004) the precision at that point would be missed.
    scores = np.arange(20, 0, -1, dtype=float)[:, None]
    targets = np.array([1, 1, 1] + [0] * 10 + [1] * 7)[:, None]
    assert voc_11pt_map(scores, targets) == pytest.approx(
        100 * _naive_voc_11pt_ap(scores[:, 0], targets[:, 0] == 1)
    )
    # t = 0..0.3 -> 1 (4 points); t = 0.4..1.0 -> 10/20 (7 points)
    assert voc_11pt_map(scores, targets) == pytest.approx(100 * (4 + 7 * 0.5) / 11)


def test_voc_11pt_map_skips_class_without_positives_and_ignores_tie_order() -> None:
    scores = np.array([[0.5, 0.1], [0.5, 0.2], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    one_class = voc_11pt_map(scores[:, :1], targets[:, :1])
    assert voc_11pt_map(scores, targets) == pytest.approx(one_class)
    # Swapping the two tied rows must not change the AP.
    assert voc_11pt_map(scores[[1, 0, 2]], targets[[1, 0, 2]]) == pytest.approx(one_class)
    with pytest.raises(ValueError, match="no class has a positive"):
        voc_11pt_map(scores[:, 1:], targets[:, 1:])


def test_torch_inputs_agree_with_numpy() -> None:
    logits, labels = _random_problem(7, c=8)
    t_logits = torch.from_numpy(logits).to(torch.bfloat16)
    t_labels = torch.from_numpy(labels)
    rounded = t_logits.double().numpy()
    for name in ("top1", "top5", "mean_per_class_recall", "mean_top1_top5"):
        value = compute_metric(name, t_logits, t_labels)
        assert isinstance(value, float)
        assert value == pytest.approx(METRICS[name](rounded, labels), abs=1e-9)
    binary = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 2
    assert roc_auc(binary, y) == pytest.approx(roc_auc(binary.numpy(), y.numpy()))


def test_registry_results_are_python_floats_in_percent() -> None:
    assert set(METRICS) == {"top1", "top5", "mean_per_class_recall", "mean_top1_top5", "roc_auc", "voc_11pt_map"}
    perfect_5 = (np.eye(5), np.arange(5))  # 5 classes so top5 is defined
    inputs = {
        "roc_auc": (np.eye(2), np.arange(2)),
        "voc_11pt_map": (np.eye(5), np.eye(5, dtype=int)),
    }
    for name in METRICS:
        value = compute_metric(name, *inputs.get(name, perfect_5))
        assert type(value) is float
        assert value == pytest.approx(100.0)


def test_compute_metric_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown metric 'top_1'.*mean_per_class_recall.*top1"):
        compute_metric("top_1", np.zeros((2, 2)), np.array([0, 1]))


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros(3), np.zeros(3, dtype=int), "must be a non-empty"),
        (np.zeros((3, 2)), np.zeros(4, dtype=int), "labels must have shape"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), r"labels must lie in \[0, 2\)"),
        (np.zeros((3, 2)), np.array([0.0, 1.0, 0.0]), "integer class indices"),
        (np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
    ],
)
def test_invalid_inputs_raise(logits: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        top1(logits, labels)
