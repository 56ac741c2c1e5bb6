"""Zero-shot validation during training, through the same code as ``slip zero-shot``."""
from __future__ import annotations

from pathlib import Path

import torch

from ..eval.datasets import build_dataset, load_benchmark_dir
from ..eval.zero_shot import zero_shot_eval
from ..tokenizer import get_tokenizer
from ..transforms import eval_transform
from .config import ConfigError, EvalConfig


class ZeroShotValidator:
    """``eval.benchmark`` is a benchmark directory (the synthetic one: ``OUT/benchmark``) or a
    key of the dataset catalog ``eval.catalog`` (``imagenet`` for real runs).

    Called on every rank: the images are split over ranks and the exact metric gathered.
    """

    def __init__(self, cfg: EvalConfig, image_size: int):
        from zero_shot import load_benchmarks, load_catalog

        self.batch_size = cfg.batch_size
        self.tokenizer = get_tokenizer()
        transform = eval_transform(image_size)
        if Path(cfg.benchmark).is_dir():
            local = load_benchmark_dir(cfg.benchmark)
            self.benchmark, self.groups = local.benchmark, local.groups
            self.dataset = build_dataset(local.benchmark.key, local.entry, "test", transform, benchmark=local.benchmark)
        else:
            if cfg.catalog is None:
                raise ConfigError(f"eval.benchmark {cfg.benchmark!r} is not a directory, so eval.catalog must "
                                  "name the dataset catalog that holds it")
            benchmarks = load_benchmarks()
            if cfg.benchmark not in benchmarks:
                raise ConfigError(f"eval.benchmark: {cfg.benchmark!r} is neither a directory nor a known benchmark")
            catalog = load_catalog(cfg.catalog)
            if cfg.benchmark not in catalog:
                raise ConfigError(f"eval.benchmark: {cfg.benchmark!r} is not in the catalog {cfg.catalog}")
            self.benchmark, self.groups = benchmarks[cfg.benchmark], None
            self.dataset = build_dataset(cfg.benchmark, catalog[cfg.benchmark], "test", transform,
                                         benchmark=self.benchmark)

    @torch.no_grad()
    def __call__(self, model, device: torch.device) -> dict:
        result = zero_shot_eval(model, self.tokenizer, self.benchmark, self.dataset, batch_size=self.batch_size,
                                device=device, groups=self.groups or None, progress=False)
        out = {f"{self.benchmark.key}_{result['metric']}": result["value"]}
        for name, group in (result.get("groups") or {}).items():
            out[f"{self.benchmark.key}_{name}"] = group["value"]
        return out
