"""Validation during training: zero-shot (``eval.benchmark``, through the same code as ``slip
zero-shot``) for runs with text, and k-NN on frozen features (``eval.knn``, as ``slip knn``) for
any run, with or without text."""
from __future__ import annotations

from pathlib import Path

import torch

from ..eval.datasets import build_dataset, load_benchmark_dir
from ..eval.zero_shot import zero_shot_eval
from ..tokenizer import get_tokenizer
from ..transforms import eval_transform
from .config import ConfigError, EvalConfig


def open_eval_dataset(name: str, catalog: str | None, setting: str, splits: tuple[str, ...], transform):
    """(benchmark, {split: dataset}, groups) of ``name``: a benchmark directory (the synthetic
    one: ``OUT/benchmark``, whose one split is ``test``) or a key of the dataset catalog."""
    from zero_shot import benchmarks_with_catalog, load_catalog

    if Path(name).is_dir():
        local = load_benchmark_dir(name)
        data = {"test": build_dataset(local.benchmark.key, local.entry, "test", transform, benchmark=local.benchmark)}
        return local.benchmark, data, local.groups
    if catalog is None:
        raise ConfigError(f"{setting} {name!r} is not a directory, so eval.catalog must name the dataset catalog "
                          "that holds it")
    entries = load_catalog(catalog)
    benchmarks = benchmarks_with_catalog(entries, catalog)
    if name not in benchmarks:
        raise ConfigError(f"{setting}: {name!r} is neither a directory nor a benchmark or dataset of {catalog}")
    if name not in entries:
        raise ConfigError(f"{setting}: {name!r} is not in the catalog {catalog}")
    bench = benchmarks[name]
    return bench, {s: build_dataset(name, entries[name], s, transform, benchmark=bench) for s in splits}, None


class ZeroShotValidator:
    """Zero-shot top-1 (and the benchmark's groups) on ``eval.benchmark``'s test split.

    Called on every rank: the images are split over ranks and the exact metric gathered.
    """

    def __init__(self, cfg: EvalConfig, image_size: int):
        self.batch_size = cfg.batch_size
        self.tokenizer = get_tokenizer()
        self.benchmark, data, self.groups = open_eval_dataset(cfg.benchmark, cfg.catalog, "eval.benchmark", ("test",),
                                                              eval_transform(image_size))
        self.dataset = data["test"]

    @torch.no_grad()
    def __call__(self, model, device: torch.device) -> dict:
        result = zero_shot_eval(model, self.tokenizer, self.benchmark, self.dataset, batch_size=self.batch_size,
                                device=device, groups=self.groups or None, progress=False)
        out = {f"{self.benchmark.key}_{result['metric']}": result["value"]}
        for name, group in (result.get("groups") or {}).items():
            out[f"{self.benchmark.key}_{name}"] = group["value"]
        return out


class KNNValidator:
    """k-NN top-1 of the image tower's features on ``eval.knn``: its train split as the memory
    bank and its test split as queries, or, for a benchmark directory, each class halved."""

    def __init__(self, cfg: EvalConfig, image_size: int):
        self.batch_size, self.k, self.temperature = cfg.batch_size, cfg.knn_k, cfg.knn_temperature
        transform = eval_transform(image_size)
        splits = ("test",) if Path(cfg.knn).is_dir() else ("train", "test")
        self.benchmark, self.datasets, _ = open_eval_dataset(cfg.knn, cfg.catalog, "eval.knn", splits, transform)

    @torch.no_grad()
    def __call__(self, model, device: torch.device) -> dict:
        from ..eval.knn import halves, knn_eval, tower_features

        feats = {s: tower_features(model, d, self.batch_size, device=device, desc=f"k-NN {s}")
                 for s, d in self.datasets.items()}
        bank, queries = (feats["train"], feats["test"]) if "train" in feats else halves(feats["test"])
        result = knn_eval(bank, queries, len(self.benchmark.classnames), self.k, self.temperature, device)
        return {f"{self.benchmark.key}_knn_top1": result["top1"]}
