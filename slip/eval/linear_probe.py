"""Linear-probe evaluation on frozen image features, with two protocols.

Features
    The image tower is frozen and each image is embedded once, through timm's API:
    ``visual.forward_head(visual.forward_features(x), pre_logits=True)``, i.e. the class token
    after the ViT's final LayerNorm, the representation *before* CLIP's ``image_projection``.
    It is the input of timm's classifier head, which is what SLIP's ``main_linear.py`` (a
    modified MoCo v3 ``main_lincls.py``) trains on top of a frozen timm ViT. For a ResNet tower
    (``*_resnet50``, ``*_resnet_tiny``) the same call gives timm's globally average-pooled feature
    (2048-d for ResNet-50, 512-d for ResNet-18), the input of its ``fc``, which the ResNet SSL
    papers probe; the tower runs in eval mode, so BatchNorm applies its running statistics and an
    image's feature does not depend on its batch. Features and labels
    are cached on disk (:class:`FeatureCache`), keyed by the checkpoint's content hash, the
    benchmark, its catalog entry, the split and the image transform, so a second run with the
    same inputs runs no forward pass at all.

``lbfgs`` (CLIP, Radford et al. 2021, appendix A.3)
    Multinomial logistic regression with an L2 penalty, fitted with full-batch L-BFGS (at most
    1000 iterations). The objective is scikit-learn's ``LogisticRegression(C=C)``:
    ``C * sum_i CE_i + ||W||^2 / 2`` with the bias unpenalised; it is minimised here in the
    equivalent form ``mean_i CE_i + ||W||^2 / (2 C N)`` with ``torch.optim.LBFGS`` so that it
    runs on the GPU and over millions of features (the loss is accumulated in row chunks).
    ``C`` is chosen on a validation split by CLIP's parametric binary search over
    ``10^-6 .. 10^6``: the 7 values ``10^-6, 10^-4, ..., 10^6`` first, then the interval
    around the best value is halved, trying its two neighbours each time, until the step is
    1/8 decade (CLIP's 96 log-spaced steps over 12 decades) - 15 fits instead of 97. The
    score maximised is the benchmark's own metric; ties go to the smaller ``C`` (stronger
    regularisation). When the benchmark has no validation split (no catalog entry has one),
    a stratified ``val_fraction`` = 20 % of every class of the training set is held out with a
    fixed seed (CLIP says "a random held-out split of the training set" without a fraction).
    The final classifier is refitted on train + validation with the chosen ``C``.

``sgd`` (SLIP's ``main_linear.py`` / MoCo v3's ``main_lincls.py``)
    A linear layer (weights N(0, 0.01), zero bias, as both scripts initialise it) trained with
    SGD, momentum 0.9, weight decay 0, 90 epochs, learning rate ``base_lr * batch / 256`` with
    ``base_lr`` 0.1 (both scripts' default) and batch 1024 (MoCo v3's default), cosine-decayed
    once per epoch as both scripts do. The test metric is taken after the last epoch; the
    scripts report the best epoch on the evaluation set, which selects on the test data.

    Normalisation: neither MoCo v3's nor SLIP's script puts a BatchNorm before the linear
    layer (MoCo v3 instead raises the base lr to 3 for its ViTs, CONFIG.md). The
    ``BatchNorm1d(affine=False)`` variant is MAE's ViT linear probe. It is used here by default
    (``SGDProbeConfig.batchnorm``) because the scale of the class token depends on the tower
    and its training objective (the base lr that suits it went from 0.1 to 3 in MoCo v3), and
    standardising the features lets one learning rate serve CLIP, SimCLR and SLIP checkpoints
    alike; at evaluation it applies fixed running statistics, so the probe remains a linear
    classifier of the features. ``batchnorm=False`` with a suitable ``base_lr`` gives the
    scripts' un-normalised head.

    Deviation from the papers: the features are extracted once, with the checkpoint's
    evaluation transform (resize to the model's size, centre crop), and cached, so the probe
    sees no data augmentation. SLIP and MoCo v3 trained their probe on ImageNet with
    RandomResizedCrop(224) + horizontal flip, running the frozen tower on a new augmented view
    of every image in each of the 90 epochs, and evaluated with Resize(256) + CenterCrop(224).
    Without augmentation the head overfits more easily on small training sets, so ``sgd``
    scores here are not directly comparable with SLIP's ImageNet linear numbers. CLIP's L-BFGS
    protocol also fits un-augmented features, so ``lbfgs`` matches its paper in this respect.

Few-shot (:func:`few_shot_probe`, ``slip linear-probe --shots``)
    Either protocol trained on ``K`` images per class of the training split, drawn by
    :func:`few_shot_indices` (stratified, nested across ``K``, one draw per seed), and scored on
    the whole test split; the features are the same arrays for every ``K`` and seed. ``lbfgs``
    chooses ``C`` on a stratified hold-out of the ``K``-shot images (at least one per class),
    and at ``K = 1``, where nothing can be held out, fits :data:`FEW_SHOT_FIXED_C` = 1e-6 with
    no sweep: the sweep's own choice when validation cannot tell values apart, whose fit
    predicts as the centred class-mean classifier whatever the features' scale. ``sgd`` caps its
    batch at the subset's size. A class with fewer than ``K`` images is an error naming it
    (:class:`ShortClassesError`) unless ``allow_fewer``. The label-efficiency axis of Cole et
    al. 2022, "When does contrastive visual representation learning work?".

Scores are in percent, with the benchmark's metric (``zero_shot/benchmarks.json``), as in
zero-shot evaluation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..fileio import atomic_path, atomic_write_text
from .metrics import compute_metric

__all__ = [
    "CACHE_FORMAT",
    "FEATURE_KIND",
    "FEW_SHOT_FIXED_C",
    "PROTOCOLS",
    "FeatureCache",
    "FeatureKey",
    "FeatureSet",
    "FewShotResult",
    "LinearClassifier",
    "ProbeResult",
    "RegularizationSweep",
    "SGDProbeConfig",
    "ShortClassesError",
    "checkpoint_identity",
    "describe_transform",
    "extract_features",
    "few_shot_indices",
    "few_shot_probe",
    "fit_logistic_regression",
    "lbfgs_probe",
    "load_or_extract",
    "parametric_binary_search",
    "run_probe",
    "sgd_probe",
    "stratified_holdout",
    "train_sgd_probe",
]

PROTOCOLS = ("lbfgs", "sgd")
# Bumped whenever the cached arrays would change meaning (what is extracted, dtype, layout).
CACHE_FORMAT = 1
# What extract_features returns; part of the cache key so another feature kind never collides.
FEATURE_KIND = "visual.forward_head(forward_features(x), pre_logits=True)"


class FeatureSet(NamedTuple):
    """Features ``(N, D)`` float32 and integer labels ``(N,)`` of one split."""

    features: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------- features


@torch.inference_mode()
def extract_features(
    visual: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    desc: str = "features",
    total: int | None = None,
) -> FeatureSet:
    """Embed every ``(images, labels)`` batch with the frozen image tower.

    Args:
        visual: a timm ``VisionTransformer`` or ``ResNet`` (``model.visual``), already on
            ``device``. It is put in eval mode for the pass (a ResNet's BatchNorm then uses its
            running statistics) and given back in the mode it came in.
        batches: ``(images, labels)`` pairs, e.g. from a ``DataLoader`` over ``(image_tensor,
            label)`` samples; empty batches (all images unreadable and dropped) are skipped.
        progress: tqdm bar on stderr; ``None`` shows it only when stderr is a terminal.
        total: number of batches for the bar (``len(batches)`` when it has one).

    Returns the pre-logits features (a ViT's class token, a ResNet's pooled feature; float32,
    numpy) and int64 labels, in input order.
    """
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    was_training = visual.training
    visual.eval()
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        # disable=None is tqdm's "off when not a TTY".
        for images, target in tqdm(batches, desc=desc, total=total, disable=None if progress is None else not progress,
                                   leave=False, dynamic_ncols=True):
            if len(target) == 0:  # a batch whose every image was unreadable and dropped
                continue
            images = images.to(device, non_blocking=True)
            x = visual.forward_head(visual.forward_features(images), pre_logits=True)
            feats.append(x.float().cpu().numpy())
            labels.append(torch.as_tensor(target).cpu().numpy())
    finally:
        visual.train(was_training)
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty, there is nothing to probe")
    y = np.concatenate(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{desc}: labels must be integer class indices of shape (N,), got dtype {y.dtype} "
                         f"and shape {y.shape}; multi-label benchmarks (VOC2007) are not supported by the probe")
    return FeatureSet(np.concatenate(feats).astype(np.float32, copy=False), y.astype(np.int64))


def checkpoint_identity(path: str | os.PathLike, chunk_size: int = 8 << 20) -> str:
    """``sha256:<hex>`` of the checkpoint file's bytes.

    The content rather than the path or modification time keys the cache, so retraining into
    the same file name invalidates it while a copied or renamed file still hits it.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def describe_transform(transform: object) -> str:
    """A run-independent description of an image transform, for cache keys.

    torchvision's ``repr`` lists every step and its parameters (sizes, interpolation, mean and
    std); plain functions in it print with their memory address, which changes from run to run
    and is removed here.
    """
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


@dataclass(frozen=True)
class FeatureKey:
    """Everything the cached features of one split depend on.

    Attributes:
        checkpoint: :func:`checkpoint_identity` of the weights (or any string naming them).
        benchmark: benchmark key, e.g. ``"cifar10"``.
        split: ``"train"``, ``"test"`` or ``"val"``.
        transform: :func:`describe_transform` of the preprocessing.
        image_size: input resolution of the tower.
        dataset: the catalog entry (path, type, split names), so two catalogs that place the
            same benchmark in different folders do not share features.
    """

    checkpoint: str
    benchmark: str
    split: str
    transform: str
    image_size: int
    dataset: dict = field(default_factory=dict)
    feature: str = FEATURE_KIND
    format: int = CACHE_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class FeatureCache:
    """Features on disk: ``<root>/<benchmark>/<split>-<digest>.{features.npy,labels.npy,json}``.

    Both arrays are written atomically first and the JSON last, so an entry whose JSON exists
    is complete; the JSON repeats the full key, and a lookup only succeeds when it matches and
    the arrays have the recorded shapes. Anything unreadable counts as a miss and is rewritten.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _stem(self, key: FeatureKey) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key.benchmark)
        return self.root / safe / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key.split)}-{key.digest()[:20]}"

    def paths(self, key: FeatureKey) -> tuple[Path, Path, Path]:
        """(features .npy, labels .npy, meta .json) of ``key``."""
        stem = self._stem(key)
        return (stem.with_name(stem.name + ".features.npy"), stem.with_name(stem.name + ".labels.npy"),
                stem.with_name(stem.name + ".json"))

    def load(self, key: FeatureKey, num_samples: int | None = None) -> FeatureSet | None:
        """The cached split, or ``None`` when absent, stale or unreadable.

        ``num_samples`` (the dataset's current length, when known) guards against a dataset
        that changed on disk under an unchanged catalog entry; it is compared with the length
        recorded at :meth:`save`, which may exceed the number of features when unreadable
        images were skipped.
        """
        feats_path, labels_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") != key.to_dict():
                return None
            feats = np.load(feats_path, allow_pickle=False)
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if list(feats.shape) != meta.get("features_shape") or list(labels.shape) != [feats.shape[0]]:
            return None
        if num_samples is not None and meta.get("num_samples") != num_samples:
            return None
        return FeatureSet(feats, labels)

    def save(self, key: FeatureKey, data: FeatureSet, num_samples: int | None = None) -> None:
        """Store ``data``; ``num_samples`` is the dataset length (default: the number of rows)."""
        feats_path, labels_path, meta_path = self.paths(key)
        for path, array in ((feats_path, data.features), (labels_path, data.labels)):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                # Through a file object: np.save(path) would append ".npy" to the temporary name.
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        meta = {"key": key.to_dict(), "features_shape": list(data.features.shape),
                "num_samples": int(data.features.shape[0] if num_samples is None else num_samples),
                "features_dtype": str(data.features.dtype), "labels_dtype": str(data.labels.dtype)}
        atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_or_extract(
    cache: FeatureCache | None,
    key: FeatureKey,
    extract: Callable[[], FeatureSet],
    num_samples: int | None = None,
) -> tuple[FeatureSet, bool]:
    """Features of one split from ``cache`` if present, else ``extract()`` and store them.

    Returns the features and whether they came from the cache. ``cache=None`` always extracts.
    ``num_samples`` is the dataset's length (see :meth:`FeatureCache.load`).
    """
    if cache is not None:
        hit = cache.load(key, num_samples)
        if hit is not None:
            return hit, True
    data = extract()
    if cache is not None:
        cache.save(key, data, num_samples)
    return data, False


# --------------------------------------------------------------------------- helpers


def stratified_holdout(labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, validation), holding out ``fraction`` of every class.

    Per class, ``round(fraction * n)`` random samples go to validation, at least one and at most
    ``n - 1`` for classes with two or more samples, none for singleton classes (which stay in
    train so the final fit still sees them). Stratifying keeps rare classes in both parts of
    small, imbalanced benchmarks (Flowers-102 has 10 training images per class).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        n_val = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        held.append(rng.permutation(idx)[:n_val])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(val) == 0:
        raise ValueError("cannot hold out a validation split: no class has two or more training samples")
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class ShortClassesError(ValueError):
    """Classes with fewer training images than the shots asked for.

    Attributes:
        shots: the number of images per class asked for.
        counts: ``{class index: images it has}`` for every class short of ``shots``.
    """

    def __init__(self, shots: int, counts: dict[int, int]) -> None:
        self.shots, self.counts = shots, dict(counts)
        listed = ", ".join(f"class {c} has {n}" for c, n in list(self.counts.items())[:5])
        more = f" and {len(self.counts) - 5} more classes" if len(self.counts) > 5 else ""
        super().__init__(f"{shots}-shot needs {shots} training images per class, but {listed}{more}")


def few_shot_indices(
    labels: np.ndarray,
    shots: int,
    seed: int,
    num_classes: int | None = None,
    allow_fewer: bool = False,
) -> np.ndarray:
    """Indices of a stratified ``shots``-per-class subset of ``labels``, sorted ascending.

    Each class ``c`` is shuffled by its own generator, seeded by ``(seed, c)``, and its first
    ``shots`` images are taken. Hence the subset is

    * stratified: exactly ``shots`` images of every class;
    * nested across ``shots`` for one seed: the 5-shot subset contains the 1-shot one;
    * stable: the same ``(labels, shots, seed)`` gives the same subset, and a class's images do
      not depend on the other classes (their number, sizes or order) nor on the other shot
      counts a caller asks for.

    Args:
        labels: integer class indices ``(N,)`` of the training split, ``>= 0``.
        shots: images per class, ``>= 1``.
        seed: ``>= 0``; different seeds draw (almost always) different subsets.
        num_classes: when given, classes ``0 .. num_classes - 1`` are expected, and one with no
            image at all is short like any other; otherwise the classes present in ``labels``.
        allow_fewer: a class with fewer than ``shots`` images contributes all it has, instead of
            raising :class:`ShortClassesError` (which lists each short class and its count).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"labels must be integer class indices of shape (N,), got {labels.dtype} {labels.shape}")
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min()}")
    classes = np.arange(num_classes) if num_classes is not None else np.unique(labels)
    picked: list[np.ndarray] = []
    short: dict[int, int] = {}
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            short[int(c)] = len(members)
        # One permutation per (seed, class), whatever ``shots`` is: its prefixes are nested.
        order = np.random.default_rng([int(seed), int(c)]).permutation(len(members))
        picked.append(members[order[:shots]])
    if short and not allow_fewer:
        raise ShortClassesError(int(shots), short)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _check_labels(name: str, data: FeatureSet, num_classes: int) -> None:
    f, y = data
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integer class indices of shape (N,), got {y.dtype} {y.shape} "
                         "(multi-label benchmarks such as VOC2007 are not supported by the probe)")
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] == 0:
        raise ValueError(f"{name}: expected features (N, D) and labels (N,) with N > 0, got {f.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")


def _as_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), device=device, dtype=dtype)


# --------------------------------------------------------------------------- L-BFGS (CLIP)


@dataclass
class LinearClassifier:
    """``logits = x @ weight + bias``; weight ``(D, C)``, bias ``(C,)``."""

    weight: torch.Tensor
    bias: torch.Tensor

    @torch.no_grad()
    def logits(self, features: np.ndarray | torch.Tensor, chunk_size: int = 65536) -> np.ndarray:
        x = torch.as_tensor(features, device=self.weight.device, dtype=self.weight.dtype)
        out = [(x[i:i + chunk_size] @ self.weight + self.bias).cpu() for i in range(0, x.shape[0], chunk_size)]
        return torch.cat(out).numpy()


def fit_logistic_regression(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    C: float,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 65536,
) -> LinearClassifier:
    """Multinomial L2 logistic regression fitted with full-batch L-BFGS.

    Minimises ``mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C N)``, whose minimiser is that of
    scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` (bias unpenalised). Starts from
    zero weights, so the fit is deterministic. Cross-entropy is summed over row chunks of
    ``chunk_size``, so the logits of a large training set never exist all at once.
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    device = torch.device(device)
    x = torch.as_tensor(features, device=device, dtype=dtype)
    y = torch.as_tensor(labels, device=device, dtype=torch.long)
    n, d = x.shape
    weight = torch.zeros(d, num_classes, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True)
    reg = 1.0 / (2.0 * C * n)
    # 1000 iterations as CLIP; 10 correction pairs, scipy's L-BFGS-B default that scikit-learn uses.
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            history_size=10, tolerance_grad=1e-7, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure() -> torch.Tensor:
        # Loss and gradient written out rather than through autograd: L-BFGS calls this up to
        # ~1250 times per fit and 16 fits make a sweep, so per-call overhead dominates on
        # small benchmarks. d CE / d logits = softmax - onehot.
        loss = torch.zeros((), device=device, dtype=dtype)
        grad_w = 2.0 * reg * weight
        grad_b = torch.zeros_like(bias)
        for i in range(0, n, chunk_size):
            xc, yc = x[i:i + chunk_size], y[i:i + chunk_size]
            logits = torch.addmm(bias, xc, weight)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            loss += (lse.squeeze(1) - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            delta = (logits - lse).exp_()
            delta[torch.arange(len(yc), device=device), yc] -= 1.0
            grad_w.addmm_(xc.T, delta, alpha=1.0 / n)
            grad_b += delta.sum(0) / n
        weight.grad, bias.grad = grad_w, grad_b
        return loss / n + reg * weight.square().sum()

    opt.step(closure)
    return LinearClassifier(weight.detach(), bias.detach())


@dataclass
class RegularizationSweep:
    """Outcome of :func:`parametric_binary_search`: scores by ``log10(C)`` and the best."""

    best_log10_C: float
    scores: dict[float, float]  # log10(C) -> validation score, in evaluation order

    @property
    def best_C(self) -> float:
        return 10.0 ** self.best_log10_C


def _best_exponent(scores: dict[float, float]) -> float:
    # Highest score; among equal scores the smallest C, i.e. the strongest regularisation.
    return min(scores, key=lambda e: (-scores[e], e))


def parametric_binary_search(
    score: Callable[[float], float],
    low: float = -6.0,
    high: float = 6.0,
    coarse_step: float = 2.0,
    steps_per_decade: int = 8,
) -> RegularizationSweep:
    """CLIP's search for the regularisation constant ``C`` maximising ``score(C)``.

    Evaluates ``C = 10^e`` for ``e = low, low + coarse_step, ..., high``, then repeatedly halves
    the step and evaluates the two neighbours of the best exponent found so far, until the step
    reaches ``1 / steps_per_decade``. Exponents outside ``[low, high]`` are not tried and no
    exponent is evaluated twice. With the defaults this is 7 + 2 x 4 = 15 evaluations on a grid
    of 1/8 decade (exact binary fractions, so exponents compare exactly).
    """
    if high < low or coarse_step <= 0 or steps_per_decade < 1:
        raise ValueError(f"bad search range: low={low}, high={high}, step={coarse_step}, steps={steps_per_decade}")
    scores: dict[float, float] = {}

    def evaluate(e: float) -> None:
        if low <= e <= high and e not in scores:
            value = float(score(10.0 ** e))
            if math.isnan(value):
                raise ValueError(f"score(C=1e{e}) is NaN")
            scores[e] = value

    for i in range(int(round((high - low) / coarse_step)) + 1):
        evaluate(low + i * coarse_step)
    step = coarse_step
    finest = 1.0 / steps_per_decade
    while step > finest:
        step /= 2.0
        best = _best_exponent(scores)
        evaluate(best - step)
        evaluate(best + step)
    return RegularizationSweep(_best_exponent(scores), scores)


@dataclass
class ProbeResult:
    """Test score of one probe. ``test_logits`` stay out of :meth:`to_dict` (they are large)."""

    protocol: str
    metric: str
    score: float
    num_train: int
    num_test: int
    details: dict = field(default_factory=dict)
    test_logits: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "metric": self.metric, "score": self.score,
                "num_train": self.num_train, "num_test": self.num_test, **self.details}


def lbfgs_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    metric: str = "top1",
    val: FeatureSet | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
    search: Callable[..., RegularizationSweep] = parametric_binary_search,
    C: float | None = None,
) -> ProbeResult:
    """CLIP's protocol: choose ``C`` on validation, refit on train + validation, score test.

    Args:
        val: the benchmark's own validation split; ``None`` holds out ``val_fraction`` of
            every class of ``train`` (seeded by ``seed``, see :func:`stratified_holdout`).
        metric: name in :data:`slip.eval.metrics.METRICS`; used for the sweep and the test.
        C: a fixed regularisation constant: no sweep, one fit on train (+ ``val`` if given).
            The few-shot probe uses it where nothing can be held out (one image per class).
    """
    for name, data in (("train", train), ("test", test)) + ((("val", val),) if val is not None else ()):
        _check_labels(name, data, num_classes)
    device = torch.device(device)
    if C is not None:
        full = train if val is None else FeatureSet(np.concatenate([train.features, val.features]),
                                                    np.concatenate([train.labels, val.labels]))
        clf = fit_logistic_regression(full.features, full.labels, num_classes, C, max_iter=max_iter, device=device)
        logits = clf.logits(test.features)
        return ProbeResult(
            protocol="lbfgs", metric=metric, score=compute_metric(metric, logits, test.labels),
            num_train=len(full.labels), num_test=len(test.labels), test_logits=logits,
            details={"C": float(C), "val_score": None, "num_val": 0, "val_source": "none: fixed C, no sweep",
                     "sweep": []},
        )
    if val is None:
        tr_idx, val_idx = stratified_holdout(train.labels, val_fraction, seed)
        fit_set = FeatureSet(train.features[tr_idx], train.labels[tr_idx])
        val = FeatureSet(train.features[val_idx], train.labels[val_idx])
        full = train
        val_source = f"held out {val_fraction:g} of train (stratified, seed {seed})"
    else:
        fit_set = train
        full = FeatureSet(np.concatenate([train.features, val.features]), np.concatenate([train.labels, val.labels]))
        val_source = "benchmark validation split"
    x_fit = _as_tensor(fit_set.features, device, torch.float32)
    y_fit = _as_tensor(fit_set.labels, device, torch.long)

    def val_score(C: float) -> float:
        clf = fit_logistic_regression(x_fit, y_fit, num_classes, C, max_iter=max_iter, device=device)
        return compute_metric(metric, clf.logits(val.features), val.labels)

    sweep = search(val_score)
    del x_fit, y_fit
    clf = fit_logistic_regression(full.features, full.labels, num_classes, sweep.best_C, max_iter=max_iter,
                                  device=device)
    logits = clf.logits(test.features)
    return ProbeResult(
        protocol="lbfgs", metric=metric, score=compute_metric(metric, logits, test.labels),
        num_train=len(full.labels), num_test=len(test.labels), test_logits=logits,
        details={"C": sweep.best_C, "val_score": sweep.scores[sweep.best_log10_C], "num_val": len(val.labels),
                 "val_source": val_source,
                 "sweep": [{"log10_C": e, "C": 10.0 ** e, "val_score": s} for e, s in sorted(sweep.scores.items())]},
    )


# --------------------------------------------------------------------------- SGD (SLIP / MoCo v3)


@dataclass(frozen=True)
class SGDProbeConfig:
    """SLIP's / MoCo v3's linear-classification recipe (see the module docstring)."""

    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 0.1  # per 256 samples: lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the linear layer (MAE's ViT probe)
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def train_sgd_probe(
    train: FeatureSet,
    num_classes: int,
    config: SGDProbeConfig = SGDProbeConfig(),
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    """Train ``[BatchNorm1d(affine=False)] -> Linear`` on cached features; returned in eval mode."""
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {config.epochs} and {config.batch_size}")
    device = torch.device(device)
    x = _as_tensor(train.features, device, torch.float32)
    y = _as_tensor(train.labels, device, torch.long)
    n, d = x.shape
    gen = torch.Generator().manual_seed(config.seed)
    linear = nn.Linear(d, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=gen)
    nn.init.zeros_(linear.bias)
    layers: list[nn.Module] = [nn.BatchNorm1d(d, affine=False)] if config.batchnorm else []
    head = nn.Sequential(*layers, linear).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    # BatchNorm cannot normalise a batch of one sample: drop such a last batch.
    drop_last = config.batchnorm and n % config.batch_size == 1 and n > 1
    head.train()
    for epoch in range(config.epochs):
        for group in opt.param_groups:  # cosine decay, stepped per epoch as in both scripts
            group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
        order = torch.randperm(n, generator=gen).to(device)
        stop = n - 1 if drop_last else n
        for i in range(0, stop, config.batch_size):
            idx = order[i:min(i + config.batch_size, stop)]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def sgd_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    metric: str = "top1",
    config: SGDProbeConfig = SGDProbeConfig(),
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """SLIP's / MoCo v3's protocol on cached features: train on train, score the last epoch on test."""
    _check_labels("train", train, num_classes)
    _check_labels("test", test, num_classes)
    head = train_sgd_probe(train, num_classes, config, device)
    with torch.no_grad():
        x = _as_tensor(test.features, torch.device(device), torch.float32)
        logits = torch.cat([head(x[i:i + 65536]).cpu() for i in range(0, x.shape[0], 65536)]).numpy()
    return ProbeResult(
        protocol="sgd", metric=metric, score=compute_metric(metric, logits, test.labels),
        num_train=len(train.labels), num_test=len(test.labels), test_logits=logits,
        details={"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
                 "base_lr": config.base_lr, "batchnorm": config.batchnorm},
    )


def run_probe(
    protocol: str,
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    metric: str = "top1",
    device: str | torch.device = "cpu",
    **options: Any,
) -> ProbeResult:
    """Dispatch to :func:`lbfgs_probe` or :func:`sgd_probe`; ``options`` go to that function."""
    if protocol == "lbfgs":
        return lbfgs_probe(train, test, num_classes, metric, device=device, **options)
    if protocol == "sgd":
        return sgd_probe(train, test, num_classes, metric, device=device, **options)
    raise ValueError(f"unknown linear-probe protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


# --------------------------------------------------------------------------- few-shot


# C of the L-BFGS protocol where nothing can be held out to choose it (one image per class):
# the lower end of CLIP's search range. It is what the sweep itself picks when validation cannot
# tell the C values apart (ties go to the smallest C), and in this strongly regularised limit the
# fit's argmax is that of the centred class-mean classifier, logits x . (mean_c - mean), which a
# common rescaling of the features does not change; any intermediate C would regularise towers
# with large and small feature norms differently. Class means are the usual 1-shot baseline.
FEW_SHOT_FIXED_C = 1e-6


@dataclass
class FewShotResult:
    """The probes of one shot count, one per seed, and their spread.

    ``std`` is the sample standard deviation over seeds (``ddof=1``), ``None`` for one seed.
    """

    protocol: str
    metric: str
    shots: int
    runs: dict[int, ProbeResult]  # seed -> its probe, in the order run

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.runs.values()]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float | None:
        return float(np.std(self.scores, ddof=1)) if len(self.runs) > 1 else None

    @property
    def min(self) -> float:
        return float(np.min(self.scores))

    @property
    def max(self) -> float:
        return float(np.max(self.scores))

    def to_dict(self) -> dict:
        runs = [{"seed": seed, **{k: v for k, v in r.to_dict().items() if k not in ("protocol", "metric")}}
                for seed, r in self.runs.items()]
        return {"shots": self.shots, "metric": self.metric, "mean": self.mean, "std": self.std, "min": self.min,
                "max": self.max, "seeds": list(self.runs), "scores": self.scores, "runs": runs}


def few_shot_probe(
    protocol: str,
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    shots: Iterable[int],
    seeds: Iterable[int],
    metric: str = "top1",
    device: str | torch.device = "cpu",
    allow_fewer: bool = False,
    **options: Any,
) -> list[FewShotResult]:
    """The probe trained on ``K`` images per class of ``train``, for every ``K`` and seed.

    The subsets are :func:`few_shot_indices` rows of the one ``train`` array (features are
    never recomputed); ``test`` is scored whole. Each run uses its seed for everything random:
    the subset, the L-BFGS hold-out, the SGD head's initialisation and shuffling.

    ``lbfgs``: C is chosen as in :func:`lbfgs_probe` on a stratified hold-out of the subset
    (``val_fraction`` of each class, at least one image and at most ``K - 1``: 1 of 2, 1 of 5, 2
    of 10 at the default 0.2), then refitted on the whole subset. With ``K = 1`` nothing can be
    held out and :data:`FEW_SHOT_FIXED_C` is used, with no sweep (see there why).

    ``sgd``: the recipe of ``config`` on the subset, with the batch capped at the subset's size
    (so the lr, ``base_lr * batch / 256``, follows the batch that is really used).

    Returns one :class:`FewShotResult` per ``K``, in ascending order. Raises
    :class:`ShortClassesError` when a class of ``num_classes`` has fewer than ``max(shots)``
    training images, unless ``allow_fewer`` (such a class then gives all it has).
    """
    shots, seeds = sorted({int(k) for k in shots}), list(dict.fromkeys(int(s) for s in seeds))
    if not shots or not seeds:
        raise ValueError(f"few-shot probe needs shots and seeds, got {shots} and {seeds}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown linear-probe protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if options.get("val") is not None:
        raise ValueError("a few-shot probe holds out its validation images from the K-shot subset; val must be None")
    _check_labels("train", train, num_classes)
    _check_labels("test", test, num_classes)
    # Before any fit: a short class fails the largest K, whatever the seed.
    few_shot_indices(train.labels, shots[-1], seeds[0], num_classes, allow_fewer)
    base_config: SGDProbeConfig = options.pop("config", SGDProbeConfig()) if protocol == "sgd" else SGDProbeConfig()
    results = []
    for k in shots:
        runs: dict[int, ProbeResult] = {}
        for seed in seeds:
            idx = few_shot_indices(train.labels, k, seed, num_classes, allow_fewer)
            subset = FeatureSet(train.features[idx], train.labels[idx])
            if protocol == "lbfgs":
                # Nothing to hold out when no class has two images (K = 1): fixed C, no sweep.
                holdout = np.bincount(subset.labels).max() >= 2
                result = lbfgs_probe(subset, test, num_classes, metric, device=device,
                                     **{**options, "seed": seed, "C": None if holdout else FEW_SHOT_FIXED_C})
                result.details["val_source"] = (
                    f"held out {options.get('val_fraction', 0.2):g} of each class of the {k}-shot subset "
                    f"(stratified, seed {seed})" if holdout
                    else f"none: one image per class, fixed C={FEW_SHOT_FIXED_C:g} (no sweep)")
            else:
                config = replace(base_config, seed=seed, batch_size=min(base_config.batch_size, len(idx)))
                result = sgd_probe(subset, test, num_classes, metric, config, device=device, **options)
            runs[seed] = result
        results.append(FewShotResult(protocol, metric, k, runs))
    return results
