"""k-nearest-neighbour classification on frozen image features: the probe SSL libraries report.

The protocol of instance discrimination (Wu et al. 2018) as DINO runs it: features are the image
tower's pre-logits (the class token after the final norm, as for the linear probe; a ResNet's
average-pooled feature, BatchNorm in eval mode with its running statistics), L2-normalised;
each query takes its ``k`` most cosine-similar images of a labelled memory bank, and each
neighbour votes for its class with weight ``exp(similarity / temperature)``; the class with the
largest summed vote wins. Defaults ``k = 20``, ``temperature = 0.07``.

A dataset with train and test splits uses train as the bank and test as the queries; a dataset
with one split (a benchmark directory such as the synthetic one) is halved per class, a seeded
stratified split, into bank and queries.

Features are computed once (every rank embeds its share of the images, gathered in dataset
order) and similarities in chunks of queries, so 50k images take seconds on a GPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .linear_probe import FeatureSet, stratified_holdout

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, chunk: int = 4096) -> torch.Tensor:
    """Summed neighbour votes ``(Q, num_classes)`` of each query (see the module docstring).

    ``bank`` ``(N, D)`` and ``queries`` ``(Q, D)`` need not be normalised; ``k`` is capped at N.
    """
    if bank.shape[0] == 0:
        raise ValueError("the k-NN memory bank is empty")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and the temperature > 0, got k={k}, temperature={temperature}")
    bank = F.normalize(bank.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    bank_labels = bank_labels.to(bank.device, torch.int64)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ bank.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


def knn_eval(bank: FeatureSet, queries: FeatureSet, num_classes: int, k: int = DEFAULT_K,
             temperature: float = DEFAULT_TEMPERATURE, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Top-1 and top-5 accuracy (percent) of k-NN classification of ``queries`` against ``bank``."""
    device = torch.device(device)
    scores = knn_scores(torch.as_tensor(bank.features, device=device), torch.as_tensor(bank.labels),
                        torch.as_tensor(queries.features, device=device), num_classes, k, temperature)
    labels = torch.as_tensor(queries.labels, device=scores.device)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    return {"top1": float((ranked[:, 0] == labels).float().mean() * 100),
            "top5": float((ranked == labels[:, None]).any(dim=1).float().mean() * 100),
            "k": min(k, len(bank.labels)), "temperature": temperature,
            "n_bank": int(len(bank.labels)), "n_query": int(len(queries.labels))}


def halves(data: FeatureSet, seed: int = 0) -> tuple[FeatureSet, FeatureSet]:
    """(bank, queries) of a single-split dataset: half of every class each, seeded."""
    bank_idx, query_idx = stratified_holdout(data.labels, fraction=0.5, seed=seed)
    return (FeatureSet(data.features[bank_idx], data.labels[bank_idx]),
            FeatureSet(data.features[query_idx], data.labels[query_idx]))


@torch.no_grad()
def tower_features(model, dataset, batch_size: int = 256, workers: int = 0,
                   device: str | torch.device | None = None, desc: str = "features") -> FeatureSet:
    """Pre-logits features of every readable image of ``dataset`` (a slip eval dataset), split
    over the ranks of a running process group and gathered in dataset order (the same on every
    rank); unreadable images are skipped."""
    from .datasets import make_eval_loader
    from .zero_shot import _unwrap, run_image_model

    visual = _unwrap(model).visual
    rank, world = _ranks()
    loader = make_eval_loader(dataset, batch_size, workers, rank, world)
    feats, labels, _ = run_image_model(
        model, loader, lambda x: visual.forward_head(visual.forward_features(x), pre_logits=True), device,
        desc=desc, progress=False)
    if len(labels) == 0:
        raise ValueError(f"{desc}: no readable image")
    return FeatureSet(feats.numpy().astype(np.float32, copy=False), labels.numpy().astype(np.int64))


def _ranks() -> tuple[int, int]:
    from ..distributed import get_rank, get_world_size

    return get_rank(), get_world_size()
