"""Zero-shot classification: prompt-ensemble classifiers and their evaluation.

The classifier follows CLIP/SLIP: each class name (and each synonym) is put into every prompt
template, the prompts are embedded and L2-normalised, averaged per class and normalised
again. An image is scored by the cosine similarity of its normalised embedding with each
class vector.

:func:`zero_shot_eval` is what the trainer calls for validation and what ``slip zero-shot``
calls per benchmark, so both give the same numbers for the same weights and data. Under
``torch.distributed`` the images are split across ranks without padding and the logits are
gathered back into dataset order, so the metric is exact and identical to one process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from slip.distributed import all_gather_object, get_rank, get_world_size, is_distributed
from slip.fileio import atomic_path
from slip.tokenizer import trim_padding
from zero_shot import Benchmark

from .datasets import make_eval_loader
from .metrics import compute_metric, voc_11pt_map

__all__ = [
    "DEFAULT_CACHE_DIR",
    "build_classifier",
    "checkpoint_identity",
    "classifier_cache_path",
    "compute_benchmark_metric",
    "evaluate",
    "run_image_model",
    "zero_shot_eval",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("SLIP_CACHE_DIR", Path.home() / ".cache" / "slip")) / "zero_shot"
# Bumped whenever the classifier computation changes, so old cache files are not reused.
_CACHE_VERSION = 1

ClassNames = Sequence[str | Sequence[str]]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel keep the model in .module; its encode_* methods are what we call.
    return getattr(model, "module", model)


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def checkpoint_identity(path: str | os.PathLike) -> str:
    """A cheap identity of a checkpoint file for cache keys: resolved path, size and mtime.

    Rewriting the file (a new training step saved over it) changes size or mtime, so a stale
    classifier is never reused; hashing gigabytes of weights on every run is avoided.
    """
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def _synonyms(classnames: ClassNames) -> list[tuple[str, ...]]:
    out = [(c,) if isinstance(c, str) else tuple(c) for c in classnames]
    if not out or any(len(s) == 0 for s in out):
        raise ValueError("every class needs at least one name")
    return out


def classifier_cache_path(cache_dir: str | os.PathLike, model_id: str, benchmark_key: str,
                          classnames: ClassNames, templates: Sequence[str], context_length: int | None = None) -> Path:
    """Cache file of one (model, benchmark, class names, templates) classifier.

    The hash covers everything the classifier depends on, so editing a template or a class
    name, or pointing at another checkpoint, gives a new file.
    """
    content = json.dumps({
        "version": _CACHE_VERSION, "model": model_id, "benchmark": benchmark_key,
        "classnames": _synonyms(classnames), "templates": list(templates), "context_length": context_length,
    }, sort_keys=True)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:24]
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in benchmark_key)
    return Path(cache_dir) / f"{safe_key}-{digest}.pt"


def _load_cached(path: Path, num_classes: int) -> torch.Tensor | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt cache file must never stop an evaluation
        logger.warning("ignoring unreadable zero-shot classifier cache %s: %s", path, e)
        return None
    weights = obj.get("classifier") if isinstance(obj, dict) else None
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or weights.shape[1] != num_classes:
        logger.warning("ignoring zero-shot classifier cache %s: unexpected content", path)
        return None
    return weights.float()


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: ClassNames,
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    benchmark_key: str = "custom",
    progress: bool | None = None,
) -> torch.Tensor:
    """The ``(E, C)`` zero-shot classifier of ``classnames`` (a name or synonyms per class).

    Every template x name prompt is embedded and normalised; a class vector is the mean over
    its prompts (all templates of all its synonyms), normalised again. Prompts are encoded in
    batches of ``batch_size`` across class boundaries.

    With ``cache_dir`` and ``model_id`` (e.g. :func:`checkpoint_identity`) both given, the
    result is read from / written to ``cache_dir`` (atomically). Leave them unset for weights
    that change, as during training. Returns a float32 tensor on ``device``.
    """
    model = _unwrap(model)
    if not getattr(model, "has_text", True):
        raise ValueError("zero-shot classification needs a text tower, and this model has none")
    device = _device_of(model, device)
    synonyms = _synonyms(classnames)
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError("templates must be non-empty and each contain exactly one '{}'")

    cache_path = None
    if cache_dir is not None and model_id is not None:
        cache_path = classifier_cache_path(cache_dir, model_id, benchmark_key, synonyms, templates,
                                           getattr(tokenizer, "context_length", None))
        cached = _load_cached(cache_path, len(synonyms))
        if cached is not None:
            return cached.to(device)

    prompts: list[str] = []
    owner: list[int] = []  # class index of each prompt
    for c, names in enumerate(synonyms):
        for name in names:
            for template in templates:
                prompts.append(template.format(name))
                owner.append(c)

    embeddings = encode_texts(model, tokenizer, prompts, batch_size, device, progress=progress)
    owner_t = torch.tensor(owner, device=embeddings.device)
    sums = torch.zeros(len(synonyms), embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
    sums.index_add_(0, owner_t, embeddings)
    counts = torch.bincount(owner_t, minlength=len(synonyms)).to(embeddings.dtype)
    means = sums / counts[:, None]
    classifier = torch.nn.functional.normalize(means, dim=-1).T.contiguous()

    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            torch.save({"classifier": classifier.cpu(), "benchmark": benchmark_key, "model": model_id}, tmp)
    return classifier


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device: torch.device, *,
                 progress: bool | None = None, desc: str = "text") -> torch.Tensor:
    """L2-normalised float32 text embeddings (len(texts), E), encoded in eval mode in batches."""
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            starts = range(0, len(texts), batch_size)
            show = _show_progress(progress) and len(starts) > 1
            for start in tqdm(starts, desc=desc, disable=not show, leave=False):
                tokens = trim_padding(tokenizer(list(texts[start:start + batch_size]))).to(device)
                chunks.append(model.encode_text(tokens, normalize=True).float())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _show_progress(progress: bool | None) -> bool:
    # Default: a bar only on an interactive terminal and only on rank 0 (logs stay clean).
    if progress is None:
        progress = sys.stderr.isatty()
    return bool(progress) and get_rank() == 0


def compute_benchmark_metric(metric: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``compute_metric`` that also reads VOC2007's label encoding.

    For ``(N, C)`` labels (multi-label) a -1 marks an image whose only instances of that class
    are "difficult": the VOC protocol leaves it out of that class's AP. The mean is over classes
    with at least one positive, as :func:`slip.eval.metrics.voc_11pt_map` does.
    """
    if labels.ndim == 2:
        if metric != "voc_11pt_map":
            raise ValueError(f"multi-label targets need the voc_11pt_map metric, not {metric!r}")
        aps = []
        for c in range(labels.shape[1]):
            keep = labels[:, c] >= 0
            column = labels[keep, c:c + 1]
            if (column == 1).any():
                aps.append(voc_11pt_map(logits[keep, c:c + 1], column))
        if not aps:
            raise ValueError("voc_11pt_map is undefined when no class has a positive target")
        return float(sum(aps) / len(aps))
    return compute_metric(metric, logits, labels)


def _use_ranks(distributed: bool | None) -> bool:
    """Whether to split work over the process group: by default whenever one is running."""
    running = is_distributed() and get_world_size() > 1
    if distributed and not running:
        raise ValueError("distributed=True but no torch.distributed process group with several ranks is running")
    return running if distributed is None else distributed


def _rank_and_world(distributed: bool | None) -> tuple[int, int]:
    return (get_rank(), get_world_size()) if _use_ranks(distributed) else (0, 1)


def _merge_ranks(local: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
                 distributed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's (indices, outputs, labels, skipped) -> (outputs, labels, skipped) in dataset order."""
    parts: list[Any] = [local]
    if _use_ranks(distributed):
        # Objects rather than tensors: ranks hold different numbers of rows (nothing is padded).
        parts = all_gather_object(tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in local))
    skipped = sum(int(p[3]) for p in parts)
    # A rank without readable images holds placeholder shapes that torch.cat cannot join.
    full = [p for p in parts if len(p[0])]
    if not full:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64), skipped
    indices = torch.cat([p[0] for p in full])
    outputs = torch.cat([p[1] for p in full])
    labels = torch.cat([p[2] for p in full])
    order = torch.argsort(indices)
    if not torch.equal(indices[order], torch.unique(indices)):
        raise RuntimeError("an image was evaluated more than once; the ranks' samplers overlap")
    return outputs[order], labels[order], skipped


@torch.no_grad()
def run_image_model(
    model: nn.Module,
    loader: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    device: str | torch.device | None = None,
    desc: str = "images",
    progress: bool | None = None,
    distributed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Apply ``fn(images on device)`` to every batch; results of all ranks in dataset order.

    ``loader`` yields ``(images, labels, indices, skipped)`` (see
    :func:`slip.eval.datasets.make_eval_loader`) or plain ``(images, labels)`` batches; the
    latter only in a single process, since their order cannot be restored after gathering.
    ``distributed``: gather over the process group (default: whenever one is running); pass
    False to evaluate a whole loader on one rank alone.

    Returns ``(outputs, labels, skipped)``, identical on every rank.
    """
    model = _unwrap(model)
    device = _device_of(model, device)
    outs, labs, idxs = [], [], []
    skipped, seen = 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for batch in tqdm(loader, desc=desc, disable=not _show_progress(progress), leave=False):
                if len(batch) == 4:
                    images, labels, indices, n_bad = batch
                elif len(batch) == 2:
                    if _use_ranks(distributed):
                        raise ValueError("under torch.distributed the loader must come from make_eval_loader")
                    images, labels = batch
                    indices, n_bad = torch.arange(seen, seen + len(labels)), 0
                else:
                    raise ValueError(f"expected batches of (images, labels[, indices, skipped]), got {len(batch)} items")
                seen += len(labels)
                skipped += int(n_bad)
                if len(labels) == 0:
                    continue
                outs.append(fn(images.to(device, non_blocking=True)).float().cpu())
                labs.append(torch.as_tensor(labels).cpu())
                idxs.append(torch.as_tensor(indices).cpu())
    finally:
        model.train(was_training)
    if outs:
        local = (torch.cat(idxs), torch.cat(outs), torch.cat(labs), skipped)
    else:
        local = (torch.empty(0, dtype=torch.int64), torch.empty(0, 0), torch.empty(0, dtype=torch.int64), skipped)
    return _merge_ranks(local, distributed)


def evaluate(
    model: nn.Module,
    classifier: torch.Tensor,
    loader: Any,
    metric: str,
    device: str | torch.device | None = None,
    *,
    groups: Mapping[str, Sequence[int]] | None = None,
    return_outputs: bool = False,
    progress: bool | None = None,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Score every image against ``classifier`` (``(E, C)``) and compute ``metric``.

    Returns ``{"metric", "value", "n", "skipped"}`` (value in percent, ``n`` images scored,
    ``skipped`` unreadable ones); with ``groups`` (name -> class indices) also
    ``"groups": {name: {"value", "n"}}``, the metric over the images whose label is in the group
    (still choosing among all classes); with ``return_outputs`` also ``"logits"`` (cosine
    similarities, ``(n, C)``) and ``"labels"``, in dataset order. Under ``torch.distributed``
    the loader must give each rank its share (:func:`~slip.eval.datasets.make_eval_loader`);
    see :func:`run_image_model` for ``distributed``.
    """
    inner = _unwrap(model)
    device = _device_of(inner, device)
    weights = classifier.to(device=device, dtype=torch.float32)

    def score(images: torch.Tensor) -> torch.Tensor:
        return inner.encode_image(images, normalize=True).float() @ weights

    logits, labels, skipped = run_image_model(inner, loader, score, device, desc="zero-shot", progress=progress,
                                              distributed=distributed)
    if skipped:
        logger.warning("zero-shot evaluation skipped %d unreadable image(s)", skipped)
    if len(labels) == 0:
        raise ValueError(f"no readable images to evaluate ({skipped} skipped)")
    result: dict[str, Any] = {
        "metric": metric, "value": compute_benchmark_metric(metric, logits, labels),
        "n": int(len(labels)), "skipped": int(skipped),
    }
    if groups:
        if labels.ndim != 1:
            raise ValueError("class groups need single-label targets")
        result["groups"] = {}
        for name, classes in groups.items():
            member = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
            if member.any():
                value = compute_benchmark_metric(metric, logits[member], labels[member])
                result["groups"][name] = {"value": value, "n": int(member.sum())}
    if return_outputs:
        result["logits"], result["labels"] = logits, labels
    return result


def zero_shot_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    benchmark: Benchmark,
    dataset: Dataset,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    return_outputs: bool = False,
    progress: bool | None = None,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy (or the benchmark's metric) of ``model`` on ``dataset``.

    Builds the classifier from ``benchmark.class_synonyms`` and ``benchmark.templates``, then
    :func:`evaluate` over a loader of this rank's share of ``dataset``. Under
    ``torch.distributed`` call it on every rank (it gathers; a call on one rank alone would
    wait for the others forever): each rank embeds its share and every rank returns the same
    result. To evaluate on one rank only, pass ``distributed=False`` there. The model's
    train/eval mode is restored afterwards.

    ``dataset`` comes from :func:`slip.eval.datasets.build_dataset` with the model's eval
    transform (``slip.transforms.eval_transform(model.arch.vision.image_size)``), as
    ``slip zero-shot`` does. Returns :func:`evaluate`'s dict plus ``"benchmark"`` and ``"name"``.
    """
    classifier = build_classifier(model, tokenizer, benchmark.class_synonyms, benchmark.templates,
                                  batch_size=batch_size, device=device, cache_dir=cache_dir,
                                  model_id=model_id, benchmark_key=benchmark.key, progress=progress)
    rank, world = _rank_and_world(distributed)
    loader = make_eval_loader(dataset, batch_size, workers, rank, world)
    result = evaluate(model, classifier, loader, benchmark.metric, device, groups=groups,
                      return_outputs=return_outputs, progress=progress, distributed=distributed)
    return {"benchmark": benchmark.key, "name": benchmark.name, **result}
