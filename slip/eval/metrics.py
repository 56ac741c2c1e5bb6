"""Evaluation metrics of the zero-shot / linear-probe benchmarks, as reported by SLIP and CLIP.

Every function takes numpy arrays or torch tensors (any device or dtype), computes in
float64 numpy, and returns a Python ``float`` **in percent (0-100)**, the unit of SLIP's
tables. ``logits`` are ``(N, C)`` scores (any monotone score works: logits, cosine
similarities, probabilities); ``labels`` are ``(N,)`` integer class indices in ``[0, C)``.

Which metric each benchmark uses is data (``zero_shot/benchmarks.json``); this module only
maps those names to functions through :data:`METRICS`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = [
    "METRICS",
    "compute_metric",
    "mean_per_class_recall",
    "mean_top1_top5",
    "roc_auc",
    "top1",
    "top5",
    "topk",
    "voc_11pt_map",
]

ArrayLike = Any  # numpy array, torch tensor, or nested sequence


def _to_numpy(x: ArrayLike) -> np.ndarray:
    # Duck-typed so this module does not import torch; .float() first because numpy has
    # no bfloat16 and half-precision logits would otherwise fail to convert.
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _scores(x: ArrayLike, name: str = "logits") -> np.ndarray:
    s = _to_numpy(x).astype(np.float64, copy=False)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, C) array, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN")
    return s


def _class_logits_and_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(logits)
    y = _to_numpy(labels)
    if y.ndim != 1 or y.shape[0] != s.shape[0]:
        raise ValueError(f"labels must have shape ({s.shape[0]},) to match logits {s.shape}, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= s.shape[1]:
        raise ValueError(f"labels must lie in [0, {s.shape[1]}), got range [{y.min()}, {y.max()}]")
    return s, y


def _rank_of_label(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of the true class among the scores, ties going to the lower class index.

    The tie rule matches ``argmax`` (first maximum), so ``top1`` and ``topk(k=1)`` agree
    even for tied logits, e.g. from a collapsed model.
    """
    rows = np.arange(len(y))
    true = s[rows, y][:, None]
    lower_index = np.arange(s.shape[1])[None, :] < y[:, None]
    return ((s > true) | ((s == true) & lower_index)).sum(axis=1)


def topk(logits: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Top-k accuracy in percent: the true class is among the k highest scores.

    Ties are broken in favour of the lower class index (as ``argmax`` does).

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` class indices.
        k: 1 <= k <= C.
    """
    s, y = _class_logits_and_labels(logits, labels)
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in [1, {s.shape[1]}] for {s.shape[1]} classes, got {k}")
    return float(100.0 * np.mean(_rank_of_label(s, y) < k))


def top1(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy in percent (``argmax`` of each row equals the label)."""
    return topk(logits, labels, 1)


def top5(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-5 accuracy in percent."""
    return topk(logits, labels, 5)


def mean_per_class_recall(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean over classes of the top-1 recall, in percent ("balanced accuracy").

    Only classes that occur in ``labels`` enter the mean: a class with no test images has
    no recall, and counting it as 0 would penalise a subsampled test set.
    """
    s, y = _class_logits_and_labels(logits, labels)
    correct = (s.argmax(axis=1) == y).astype(np.float64)
    present = np.unique(y)
    hits = np.bincount(y, weights=correct, minlength=s.shape[1])[present]
    counts = np.bincount(y, minlength=s.shape[1])[present]
    return float(100.0 * np.mean(hits / counts))


def mean_top1_top5(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean of top-1 and top-5 accuracy in percent (CLIP's Kinetics-700 metric)."""
    return 0.5 * (topk(logits, labels, 1) + topk(logits, labels, 5))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # rank of the first element of each value
    return (first_rank + (counts - 1) / 2.0)[inverse]


def roc_auc(logits: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve in percent, binary case (CLIP's Hateful Memes metric).

    The positive-class score is ``logits[:, 1] - logits[:, 0]``; labels are 0/1 with 1 the
    positive class. Computed as the Mann-Whitney U statistic over average ranks, so a tied
    positive/negative pair counts one half, as the trapezoidal ROC area does.
    """
    s, y = _class_logits_and_labels(logits, labels)
    if s.shape[1] != 2:
        raise ValueError(f"roc_auc needs (N, 2) logits for a binary task, got {s.shape}")
    score = s[:, 1] - s[:, 0]
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc is undefined unless both classes occur in labels")
    rank_sum = _average_ranks(score)[positive].sum()
    auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return float(100.0 * auc)


def _voc_11pt_ap(score: np.ndarray, positive: np.ndarray) -> float:
    """11-point interpolated AP of one class (PASCAL VOC 2007), as a fraction."""
    order = np.argsort(-score, kind="stable")
    score, positive = score[order], positive[order]
    tp = np.cumsum(positive)
    fp = np.cumsum(~positive)
    # Evaluate precision/recall only at the last sample of each run of tied scores: a
    # threshold cannot separate tied samples, and this makes the AP independent of how
    # a sort happens to order them.
    last_of_tie = np.r_[score[1:] != score[:-1], True]
    recall = tp[last_of_tie] / positive.sum()
    precision = tp[last_of_tie] / (tp[last_of_tie] + fp[last_of_tie])
    ap = 0.0
    # i / 10 rather than linspace/arange steps: a correctly rounded division gives the
    # same double as any recall tp / npos equal to it (e.g. 3/10 == 6/20), whereas
    # np.arange(0, 1.1, 0.1)[3] == 0.30000000000000004 would miss recall exactly 0.3.
    for t in np.arange(11) / 10.0:
        reached = recall >= t
        ap += precision[reached].max() if reached.any() else 0.0
    return ap / 11.0


def voc_11pt_map(scores: ArrayLike, targets: ArrayLike) -> float:
    """Mean over classes of the 11-point interpolated average precision, in percent.

    PASCAL VOC 2007 classification protocol: per class, rank images by score; at each
    recall level t in {0, 0.1, ..., 1} take the highest precision reached at recall >= t
    (0 if recall t is never reached); AP is the mean of these 11 values.

    Args:
        scores: ``(N, C)`` scores, one column per class (multi-label).
        targets: ``(N, C)`` 0/1 ground truth (VOC "difficult" images should be dropped by
            the caller for the classes where they are difficult).

    Classes without any positive target have no recall and are left out of the mean.
    """
    s = _scores(scores, "scores")
    t = _to_numpy(targets)
    if t.shape != s.shape:
        raise ValueError(f"targets must have the shape of scores {s.shape}, got {t.shape}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("targets must contain only 0 and 1")
    t = t.astype(bool)
    aps = [_voc_11pt_ap(s[:, c], t[:, c]) for c in range(s.shape[1]) if t[:, c].any()]
    if not aps:
        raise ValueError("voc_11pt_map is undefined when no class has a positive target")
    return float(100.0 * np.mean(aps))


MetricFn = Callable[[ArrayLike, ArrayLike], float]

# Names are the ones used by zero_shot/benchmarks.json ("metric" field).
METRICS: dict[str, MetricFn] = {
    "top1": top1,
    "top5": top5,
    "mean_per_class_recall": mean_per_class_recall,
    "mean_top1_top5": mean_top1_top5,
    "roc_auc": roc_auc,
    "voc_11pt_map": voc_11pt_map,
}


def compute_metric(name: str, logits: ArrayLike, labels: ArrayLike) -> float:
    """Evaluate the metric registered as ``name``; percent, as a Python float.

    Raises:
        ValueError: for a name not in :data:`METRICS` (the message lists the known ones).
    """
    try:
        fn = METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    return fn(logits, labels)
