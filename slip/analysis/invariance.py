"""The Top-K Representation Invariance Score (Purushwalkam & Gupta 2020, after Goodfellow et al. 2009).

Purushwalkam & Gupta, "Demystifying Contrastive Self-Supervised Learning: Invariances,
Augmentations and Dataset Biases" (NeurIPS 2020, arXiv 2007.13916) measure how invariant a
representation is to occlusion, viewpoint, illumination direction, illumination colour,
category instance and instance + viewpoint with the firing-rate measure of Goodfellow, Le,
Saxe, Lee & Ng, "Measuring Invariances in Deep Networks" (NIPS 2009). For a representation
``h`` (one feature vector per image) and a transformation, the evaluated set ``X`` is a union of
disjoint *trajectories*: groups of images that are transformed versions of one another (the
views of one object under one light, say), ``T(x)`` being the group of image ``x``. For every
unit (feature dimension) ``i``:

* firing threshold ``t_i``: the unit *fires* on ``x`` when ``h_i(x) > t_i``, with ``t_i`` set
  from the unit's own distribution over ``X`` so that it fires on a fraction ``rate`` of ``X``
  (Goodfellow et al. set the global firing rate to 0.01, and Purushwalkam & Gupta follow them;
  ``rate`` defaults to :data:`DEFAULT_RATE` = 0.01). Here ``t_i`` is the ``(m + 1)``-th largest
  value of ``h_i`` over ``X`` with ``m = max(1, round(rate * |X|))``, so exactly ``m`` images fire
  unless values tie at the threshold (then fewer do);
* global firing rate ``G(i) = (1/|X|) sum_{x in X} f_i(x)``, ``f_i(x) = [h_i(x) > t_i]``
  (the rate realised, which ties can make lower than ``rate``);
* local firing rate ``L(i) = (1/|Z_i|) sum_{z in Z_i} (1/|T'(z)|) sum_{x in T'(z)} f_i(x)``, where
  ``Z_i = {z in X : f_i(z) = 1}`` are the inputs the unit fires on (its top inputs) and
  ``T'(z) = T(z) \\ {z}`` the *other* transformed versions of ``z``;
* invariance score ``S(i) = L(i) / G(i)``.

The score of a representation is the mean ``S(i)`` of its ``K`` most invariant units, the
*Top-K* score of Purushwalkam & Gupta (Goodfellow et al. average the top 20% of units instead);
``K`` defaults to 10 and 25 (:data:`DEFAULT_TOP_K`, the two values issue 15 asks for; the paper
reports Top-K scores of this form). A unit that never fires (``G(i) = 0``, a constant unit) has
no score and is left out; when fewer than ``K`` units have one, the mean is over those.

On ``T'(z)``: Goodfellow et al. average over the whole trajectory ``T(z)``, which contains ``z``
itself, so a unit firing at random already scores about ``1 + 1/(G |T|)`` (12 for ``G = 0.01``
and trajectories of 9). Leaving ``z`` out makes the expected score of a unit whose firing is
unrelated to the trajectories (it fires on ``m`` images drawn at random)
``(m - 1) |X| / (m (|X| - 1))``, about 1 whatever the group sizes: chance.
``include_reference=True`` averages over ``T(z)`` as they write it. :func:`chance_score` gives the chance level of either; either way
``S(i) <= 1/G(i)`` (100 at ``G = 0.01``), reached when a unit fires on every version of every
image it fires on. The measure is coarse when ``m`` is small (``L`` moves in steps of about
``1/m``): ``rate * |X|`` should be 5 or more, so at 0.01 a transformation needs 500 images.

The representation: Purushwalkam & Gupta take ReLU outputs (non-negative); a ViT's pooled
feature, its projected embedding and mean-pooled block tokens can be negative. The threshold is
a quantile of each unit's own values, so the measure needs no sign or scale: units are used as
they are (no ReLU), firing on their upper tail.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RATE = 0.01
DEFAULT_TOP_K = (10, 25)


@dataclass(frozen=True)
class UnitScores:
    """Per-unit results of :func:`unit_scores` (arrays of length D, the number of units).

    ``score`` is NaN for units that never fire. ``images`` and ``groups`` are the sizes of
    the evaluated set.
    """

    score: np.ndarray
    local: np.ndarray
    global_rate: np.ndarray
    threshold: np.ndarray
    images: int
    groups: int


def firing_count(n: int, rate: float = DEFAULT_RATE) -> int:
    """``m``, the number of the ``n`` images a unit is set to fire on: ``round(rate * n)``, at
    least 1 and at most ``n - 1``."""
    return min(max(1, round(rate * n)), n - 1)


def firing(features: np.ndarray, rate: float = DEFAULT_RATE) -> tuple[np.ndarray, np.ndarray]:
    """``(fires (N, D) bool, thresholds (D,))``: unit ``i`` fires on image ``n`` when
    ``features[n, i] > thresholds[i]``, the ``(m + 1)``-th largest value of the unit with
    ``m = max(1, round(rate * N))`` (see the module docstring)."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 images, got shape {features.shape}")
    if not 0 < rate < 1:
        raise ValueError(f"the firing rate must be in (0, 1), got {rate}")
    m = firing_count(features.shape[0], rate)
    thresholds = -np.partition(-features, m, axis=0)[m]  # the (m + 1)-th largest of every column
    return features > thresholds, thresholds


def group_ids(groups: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """``(n,)`` index of the group of every image; every image must be in exactly one group of
    at least two images."""
    ids = np.full(n, -1, dtype=np.int64)
    for g, members in enumerate(groups):
        members = np.asarray(members, dtype=np.int64)
        if len(members) < 2:
            raise ValueError(f"group {g} has {len(members)} image(s); a trajectory needs at least two")
        if (ids[members] != -1).any():
            raise ValueError(f"group {g} shares images with an earlier group; groups must be disjoint")
        ids[members] = g
    if (ids == -1).any():
        raise ValueError(f"{int((ids == -1).sum())} image(s) belong to no group")
    return ids


def unit_scores(features: np.ndarray, groups: Sequence[Sequence[int]], rate: float = DEFAULT_RATE,
                include_reference: bool = False) -> UnitScores:
    """Invariance score ``S(i) = L(i) / G(i)`` of every unit of ``features`` (N images x D units)
    for the trajectories ``groups`` (lists of row indices partitioning the N images); the
    definitions are in the module docstring."""
    features = np.asarray(features, dtype=np.float64)
    ids = group_ids(groups, features.shape[0] if features.ndim == 2 else 0)
    fires, thresholds = firing(features, rate)
    sizes = np.bincount(ids).astype(np.float64)  # (n_groups,)
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
    counts = np.add.reduceat(fires[order].astype(np.float64), starts, axis=0)  # (n_groups, D): images firing per group
    if include_reference:
        per_image = counts[ids] / sizes[ids, None]
    else:  # the firing image itself is one of its group's count
        per_image = (counts[ids] - 1) / (sizes[ids, None] - 1)
    n_fire = fires.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        local = np.where(fires, per_image, 0).sum(axis=0) / n_fire
        global_rate = n_fire / features.shape[0]
        score = local / global_rate
    return UnitScores(score=np.where(n_fire > 0, score, np.nan), local=np.where(n_fire > 0, local, np.nan),
                      global_rate=global_rate, threshold=thresholds, images=features.shape[0], groups=len(sizes))


def top_k(scores: np.ndarray, k: int | None) -> float:
    """Mean of the ``k`` largest finite scores (of all finite ones when ``k`` is None or larger
    than their number); NaN when no unit has a score."""
    finite = np.sort(scores[np.isfinite(scores)])[::-1]
    if k is not None:
        if k < 1:
            raise ValueError(f"K must be at least 1, got {k}")
        finite = finite[:k]
    return float(finite.mean()) if finite.size else float("nan")


def chance_score(group_sizes: Sequence[int], rate: float = DEFAULT_RATE, include_reference: bool = False) -> float:
    """Expected ``S(i)`` of a unit that fires on ``m`` images drawn at random from the set (see
    :func:`firing` for ``m``), for trajectories of the given sizes: the score of a representation
    unrelated to the transformation."""
    sizes = np.asarray(group_sizes, dtype=np.float64)
    n = sizes.sum()
    m = firing_count(int(n), rate)
    others = (m - 1) / (n - 1)  # the chance that another given image fires, given that z does
    if include_reference:  # each of the s images of a group: (1 + (s - 1) * others) / s, averaged
        local = float(np.sum(1 + (sizes - 1) * others) / n)
    else:
        local = others
    return float(local / (m / n))


def invariance_summary(features: np.ndarray, groups: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_TOP_K,
                       rate: float = DEFAULT_RATE, include_reference: bool = False) -> dict:
    """Top-K scores (``top{K}`` for every K of ``ks``; None when no unit fires) and what they
    were measured on: the mean score over all scored units (``mean_all``), the chance level
    (:func:`chance_score`), units, units with a score, images, groups, mean group size, the
    images each unit is set to fire on (``m``) and the mean realised global firing rate."""
    u = unit_scores(features, groups, rate, include_reference)
    scored = np.isfinite(u.score)
    out: dict = {f"top{k}": _or_none(top_k(u.score, k)) for k in ks}
    sizes = [len(g) for g in groups]
    out.update({"mean_all": _or_none(top_k(u.score, None)), "chance": chance_score(sizes, rate, include_reference),
                "units": int(u.score.size), "units_scored": int(scored.sum()), "images": u.images,
                "groups": u.groups, "mean_group_size": u.images / u.groups,
                "firing_per_unit": firing_count(u.images, rate),
                "global_rate": float(u.global_rate[scored].mean()) if scored.any() else 0.0})
    return out


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else value
