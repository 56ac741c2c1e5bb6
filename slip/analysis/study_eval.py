"""The evaluation protocol of a ``slip study``: the same for every run, through slip's own
evaluation code (zero-shot, linear and few-shot probes, fine-tuning), at each label level.

A spec's ``evaluate:`` section::

    evaluate:
      catalog: ${study}/data/catalog.json   # dataset catalog (catalog keys below); benchmark folders need none
      zero_shot: [shapes]                   # models with a text tower; others get no zero-shot row
      linear_probe:
        datasets: [shapes]                  # catalog entries with a train and a test split
        protocol: lbfgs                     # lbfgs (CLIP's, default) | sgd (SLIP's), as slip linear-probe
        shots: [all, 5]                     # all: the whole train split; K: K images per class (few-shot)
        shot_seeds: 3                       # draws per K, seeds 0..N-1 (slip linear-probe's default)
        val_fraction: 0.2                   # lbfgs hold-out for C (slip linear-probe's default)
        max_iter: 1000                      # lbfgs iterations (slip linear-probe's default)
        sgd: {epochs: 90}                   # SGDProbeConfig fields for protocol sgd
      levels:                               # coarser label levels: {fine class name: coarse class name} files
        shapes: {shape: "${study}/data/shapes/hierarchy_shape.json"}
      finetune: {datasets: [shapes], epochs: 2, batch_size: 64}   # optional; FinetuneConfig fields
      fuse:                                 # the linear probe on two runs' features, concatenated
        - {factor: data.train, values: [imagenet, inat]}
      batch_size: 256                       # images per forward pass (the evaluation CLIs' default)
      workers: 4                            # loader processes (the evaluation CLIs' default)
      device: null                          # default: cuda if available, else cpu

Every evaluation runs at the dataset's own classes (level ``fine``) and at each level that
``levels`` gives it: the labels are mapped through the file (a zero-shot classifier is built from
the coarse names with the dataset's templates; the probe is refitted on the mapped labels of the
same features). Fine-tuning runs at level ``fine`` only. ``fuse`` pairs every run whose
``factor`` has the first value with the run that differs from it only there, taking the second
value, concatenates their probe features (the frozen towers' pre-logits, the linear probe's
features) and probes them as one model, at every level and shot count; the row's factor value
reads ``a+b``.

Probe features are cached under ``OUTPUT_DIR/cache/features`` (slip linear-probe's
:class:`~slip.eval.linear_probe.FeatureCache`, keyed by the checkpoint's content), zero-shot
text classifiers under ``OUTPUT_DIR/cache/zero_shot``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

_KEYS = ("catalog", "zero_shot", "linear_probe", "levels", "finetune", "fuse", "batch_size", "workers", "device")
_PROBE_KEYS = ("datasets", "protocol", "shots", "shot_seeds", "val_fraction", "max_iter", "sgd")
# Defaults of the evaluation commands (slip zero-shot / linear-probe / knn --batch-size, --workers).
DEFAULT_BATCH_SIZE = 256
DEFAULT_WORKERS = 4
FINE = "fine"
# Settings that change how an evaluation runs, not its figures: left out of the plan's digest.
_NOT_IN_DIGEST = ("batch_size", "workers", "device", "fuse")


def _error(path: Path, key: str, message: str) -> UserError:
    from .study_spec import StudySpecError

    return StudySpecError(f"{path}: evaluate.{key}: {message}")


def _names(path: Path, key: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
        raise _error(path, key, f"expected a list of datasets (catalog keys or benchmark folders), got {raw!r}")
    if len(set(raw)) != len(raw):
        raise _error(path, key, f"a dataset is listed twice in {raw}")
    return list(raw)


def _positive_int(path: Path, key: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _error(path, key, f"expected an integer >= {low}, got {value!r}")
    return value


def _parse_probe(path: Path, raw: Any) -> dict[str, Any]:
    from ..eval.linear_probe import PROTOCOLS, SGDProbeConfig
    from ..eval.linear_probe_cli import DEFAULT_SHOT_SEEDS

    if isinstance(raw, (list, str)):
        raw = {"datasets": raw}
    if not isinstance(raw, dict):
        raise _error(path, "linear_probe", f"expected a mapping with datasets:, got {raw!r}")
    unknown = sorted(set(raw) - set(_PROBE_KEYS))
    if unknown:
        raise _error(path, f"linear_probe.{unknown[0]}", f"unknown setting; known: {', '.join(_PROBE_KEYS)}")
    protocol = raw.get("protocol", "lbfgs")
    if protocol not in PROTOCOLS:
        raise _error(path, "linear_probe.protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    shots = raw.get("shots", ["all"])
    shots = shots if isinstance(shots, list) else [shots]
    if not shots or any(s != "all" and (isinstance(s, bool) or not isinstance(s, int) or s < 1) for s in shots) \
            or len(set(map(str, shots))) != len(shots):
        raise _error(path, "linear_probe.shots", f"expected a list of distinct 'all' and K >= 1 (images per class), "
                                                 f"got {raw.get('shots')!r}")
    val_fraction = raw.get("val_fraction", 0.2)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise _error(path, "linear_probe.val_fraction", f"expected a fraction in (0, 1), got {val_fraction!r}")
    sgd = raw.get("sgd") or {}
    known = {f.name for f in fields(SGDProbeConfig)} - {"seed"}
    if not isinstance(sgd, dict) or set(sgd) - known:
        raise _error(path, "linear_probe.sgd", f"expected SGDProbeConfig settings ({', '.join(sorted(known))}), "
                                               f"got {sgd!r}")
    return {"datasets": _names(path, "linear_probe.datasets", raw.get("datasets")), "protocol": protocol,
            "shots": [str(s) if s == "all" else int(s) for s in shots],
            "shot_seeds": _positive_int(path, "linear_probe.shot_seeds", raw.get("shot_seeds", DEFAULT_SHOT_SEEDS)),
            "val_fraction": float(val_fraction),
            "max_iter": _positive_int(path, "linear_probe.max_iter", raw.get("max_iter", 1000)), "sgd": dict(sgd)}


def _parse_finetune(path: Path, raw: Any) -> dict[str, Any]:
    from ..eval.finetune import FinetuneConfig

    if not isinstance(raw, dict):
        raise _error(path, "finetune", f"expected a mapping with datasets: and FinetuneConfig settings, got {raw!r}")
    options = {k: v for k, v in raw.items() if k != "datasets"}
    settable = {f.name for f in fields(FinetuneConfig)} - {"checkpoint", "catalog", "benchmark", "output_dir"}
    unknown = sorted(set(options) - settable)
    if unknown:
        raise _error(path, f"finetune.{unknown[0]}", f"unknown setting; FinetuneConfig has {', '.join(sorted(settable))}")
    return {"datasets": _names(path, "finetune.datasets", raw.get("datasets")), "options": options}


def parse_evaluate(path: Path, raw: Any, factors: dict[str, list]) -> dict[str, Any]:
    """The ``evaluate:`` section checked and with its defaults (see the module docstring), as
    plain data; a StudySpecError naming the key otherwise."""
    if not isinstance(raw, dict) or not raw:
        raise _error(path, "", "missing: a study needs an evaluation (zero_shot, linear_probe and/or finetune)")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise _error(path, unknown[0], f"unknown setting; known: {', '.join(_KEYS)}")
    plan: dict[str, Any] = {
        "catalog": raw.get("catalog"),
        "zero_shot": _names(path, "zero_shot", raw["zero_shot"]) if raw.get("zero_shot") is not None else [],
        "linear_probe": _parse_probe(path, raw["linear_probe"]) if raw.get("linear_probe") is not None else None,
        "finetune": _parse_finetune(path, raw["finetune"]) if raw.get("finetune") is not None else None,
        "levels": {}, "fuse": [],
        "batch_size": _positive_int(path, "batch_size", raw.get("batch_size", DEFAULT_BATCH_SIZE)),
        "workers": _positive_int(path, "workers", raw.get("workers", DEFAULT_WORKERS), low=0),
        "device": raw.get("device"),
    }
    if plan["catalog"] is not None and not isinstance(plan["catalog"], str):
        raise _error(path, "catalog", f"expected a path, got {plan['catalog']!r}")
    if not (plan["zero_shot"] or plan["linear_probe"] or plan["finetune"]):
        raise _error(path, "", "nothing to evaluate: give zero_shot, linear_probe and/or finetune")
    if plan["finetune"] and not plan["catalog"]:
        raise _error(path, "finetune", "fine-tuning reads catalog entries: give evaluate.catalog")
    evaluated = set(plan["zero_shot"]) | set(plan["linear_probe"]["datasets"] if plan["linear_probe"] else ())
    levels = raw.get("levels") or {}
    if not isinstance(levels, dict):
        raise _error(path, "levels", f"expected DATASET: {{LEVEL: hierarchy.json}}, got {levels!r}")
    for dataset, files in levels.items():
        if dataset not in evaluated:
            raise _error(path, f"levels.{dataset}", "not a dataset of zero_shot or linear_probe")
        if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
            raise _error(path, f"levels.{dataset}", f"expected LEVEL: hierarchy.json, got {files!r}")
        if FINE in files:
            raise _error(path, f"levels.{dataset}.{FINE}", f"'{FINE}' names the dataset's own classes; pick another name")
        plan["levels"][dataset] = dict(files)
    fuse = raw.get("fuse") or []
    if not isinstance(fuse, list):
        raise _error(path, "fuse", f"expected a list of {{factor: F, values: [A, B]}}, got {fuse!r}")
    for i, rule in enumerate(fuse):
        key = f"fuse[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"factor", "values"} or not isinstance(rule["values"], list) \
                or len(rule["values"]) != 2:
            raise _error(path, key, f"expected {{factor: F, values: [A, B]}}, got {rule!r}")
        if plan["linear_probe"] is None:
            raise _error(path, key, "fused representations are evaluated by the linear probe: give linear_probe")
        factor, values = rule["factor"], [str(v) for v in rule["values"]]
        labels = [v.label for v in factors.get(factor, ())]
        if factor not in factors or factor == "train.seed":
            raise _error(path, f"{key}.factor", f"{factor!r} is not a factor of this study (other than the seed)")
        missing = [v for v in values if v not in labels]
        if missing or values[0] == values[1]:
            raise _error(path, f"{key}.values", f"expected two different values of {factor} ({', '.join(labels)}), "
                                                f"got {rule['values']}")
        plan["fuse"].append({"factor": factor, "values": values})
    return plan


def plan_digest(plan: dict[str, Any]) -> str:
    """A digest of everything in the plan that changes a run's evaluation figures."""
    relevant = {k: v for k, v in plan.items() if k not in _NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Datasets and label levels
# --------------------------------------------------------------------------------------------
def open_dataset(plan: dict[str, Any], name: str, splits: tuple[str, ...], transform):
    """(benchmark, {split: dataset}, class groups) of a dataset the plan names."""
    from ..train.validation import open_eval_dataset

    if Path(name).is_dir() and "train" in splits:
        raise UserError(f"evaluate: {name} is a benchmark folder, whose one split is test; the linear probe needs a "
                        "catalog entry with a train and a test split")
    return open_eval_dataset(name, plan["catalog"], f"evaluate: dataset {name!r}", splits, transform)


def load_hierarchy(path: str | Path, benchmark) -> tuple[tuple[str, ...], np.ndarray]:
    """(coarse class names in order of first use, fine label -> coarse label) from a JSON file
    ``{fine class name: coarse class name}`` covering every class of ``benchmark``."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: label hierarchy not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise UserError(f"{path}: expected a JSON object {{fine class name: coarse class name}}")
    fine = [c if isinstance(c, str) else c[0] for c in benchmark.classnames]
    missing = [c for c in fine if c not in mapping]
    extra = sorted(set(mapping) - set(fine))
    if missing or extra:
        raise UserError(f"{path}: must map every class of {benchmark.key} and nothing else; "
                        + "; ".join(p for p in (f"missing {missing[:5]}" if missing else "",
                                                f"not classes of {benchmark.key}: {extra[:5]}" if extra else "") if p))
    coarse = tuple(dict.fromkeys(mapping[c] for c in fine))
    return coarse, np.array([coarse.index(mapping[c]) for c in fine], dtype=np.int64)


def label_levels(plan: dict[str, Any], name: str, benchmark) -> list[tuple[str, Any, np.ndarray | None]]:
    """(level, its benchmark, fine -> level labels or None) for the fine level and each level
    of ``levels`` for this dataset; a coarse benchmark keeps the templates and metric."""
    from zero_shot import Benchmark

    out: list[tuple[str, Any, np.ndarray | None]] = [(FINE, benchmark, None)]
    for level, file in plan["levels"].get(name, {}).items():
        coarse, mapping = load_hierarchy(file, benchmark)
        out.append((level, Benchmark(key=f"{benchmark.key}@{level}", name=f"{benchmark.name} ({level})",
                                     classnames=coarse, templates=benchmark.templates, metric=benchmark.metric),
                    mapping))
    return out


class Relabelled:
    """A slip evaluation dataset with its labels mapped (fine -> coarse); unreadable items stay None."""

    def __init__(self, dataset, mapping: np.ndarray) -> None:
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (item[0], int(self.mapping[int(item[1])]))


def check_inputs(plan: dict[str, Any]) -> None:
    """Open every dataset and hierarchy the plan names (files listed, nothing decoded), so that a
    missing one fails the study before any training."""
    if plan["catalog"] is not None and not Path(plan["catalog"]).is_file():
        raise UserError(f"evaluate.catalog: {plan['catalog']} not found")
    probe = plan["linear_probe"]["datasets"] if plan["linear_probe"] else []
    finetune = plan["finetune"]["datasets"] if plan["finetune"] else []
    for name in dict.fromkeys([*plan["zero_shot"], *probe, *finetune]):
        splits = ("train", "test") if name in probe or name in finetune else ("test",)
        bench, _, _ = open_dataset(plan, name, splits, None)
        label_levels(plan, name, bench)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
def _row(kind: str, dataset: str, level: str, shots: str, metric: str, value: float, n_train: int | None,
         n_test: int, classes: int | None, **detail: Any) -> dict[str, Any]:
    """One result: ``n_train`` is the number of labelled images the classifier was fitted on (0
    for zero-shot, None where the evaluation does not report it), ``classes`` the number of
    classes at the row's level."""
    return {"eval": kind, "dataset": dataset, "level": level, "shots": shots, "metric": metric,
            "value": float(value), "n_train": None if n_train is None else int(n_train), "n_test": int(n_test),
            "classes": classes, "detail": detail}


def eval_device(plan: dict[str, Any]):
    """The plan's ``device``, by default cuda when available, else the CPU."""
    import torch

    return torch.device(plan["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))


def feature_key(identity: str, name: str, split: str, transform: str, image_size: int, plan: dict[str, Any]):
    """The :class:`~slip.eval.linear_probe.FeatureKey` of one run's probe features."""
    from ..eval.linear_probe import FeatureKey

    where = {"path": os.path.abspath(name)} if Path(name).is_dir() else \
        {"catalog": os.path.abspath(plan["catalog"]), "key": name}
    return FeatureKey(checkpoint=identity, benchmark=name, split=split, transform=transform, image_size=image_size,
                      dataset=where)


def probe_rows(plan: dict[str, Any], name: str, benchmark, train, test, device) -> list[dict[str, Any]]:
    """The linear probe on one dataset's features at every level and shot count of the plan."""
    from ..eval.linear_probe import (
        FeatureSet,
        SGDProbeConfig,
        ShortClassesError,
        few_shot_probe,
        run_probe,
    )

    lp = plan["linear_probe"]
    if lp["protocol"] == "lbfgs":
        options: dict[str, Any] = {"val_fraction": lp["val_fraction"], "max_iter": lp["max_iter"]}
    else:
        options = {"config": SGDProbeConfig(**lp["sgd"])}
    rows = []
    for level, bench, mapping in label_levels(plan, name, benchmark):
        tr = train if mapping is None else FeatureSet(train.features, mapping[train.labels])
        te = test if mapping is None else FeatureSet(test.features, mapping[test.labels])
        for shots in lp["shots"]:
            if shots == "all":
                r = run_probe(lp["protocol"], tr, te, bench.num_classes, bench.metric, device=device,
                              **({**options, "seed": 0} if lp["protocol"] == "lbfgs" else options))
                detail = {"C": r.details["C"]} if lp["protocol"] == "lbfgs" else {"lr": r.details["lr"]}
                rows.append(_row("linear_probe", name, level, "all", r.metric, r.score, r.num_train, r.num_test,
                                 bench.num_classes, **detail))
                continue
            try:
                (few,) = few_shot_probe(lp["protocol"], tr, te, bench.num_classes, [shots], range(lp["shot_seeds"]),
                                        bench.metric, device=device, **options)
            except ShortClassesError as e:
                raise UserError(f"evaluate.linear_probe.shots: {name} at level {level}: {e}") from None
            first = next(iter(few.runs.values()))
            rows.append(_row("linear_probe", name, level, str(shots), few.metric, few.mean, first.num_train,
                             first.num_test, bench.num_classes, draws=few.scores, draw_std=few.std))
    return rows


def run_identity(checkpoint: str | Path) -> dict[str, Any]:
    """What identifies a run's final checkpoint for the study's records: the cheap identity
    (path, size, mtime; :func:`slip.eval.zero_shot.checkpoint_identity`)."""
    from ..eval.zero_shot import checkpoint_identity

    return {"checkpoint": str(checkpoint), "identity": checkpoint_identity(checkpoint)}


def evaluate_run(plan: dict[str, Any], checkpoint: str | Path, run_dir: Path, cache_dir: Path,
                 progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Evaluate one run's checkpoint with the plan: ``{"rows": [...], "features": {...}}``, the
    rows without factor columns, and what the probe features are keyed by (for ``fuse``)."""
    from ..checkpoint import load_pretrained
    from ..eval.knn import tower_features
    from ..eval.linear_probe import (
        FeatureCache,
        checkpoint_identity,
        describe_transform,
        load_or_extract,
    )
    from ..eval.zero_shot import zero_shot_eval
    from ..tokenizer import get_tokenizer

    device = eval_device(plan)
    model, preprocess = load_pretrained(checkpoint, device=device)
    content_id = checkpoint_identity(checkpoint)
    transform = describe_transform(preprocess)
    image_size = model.arch.vision.image_size
    rows: list[dict[str, Any]] = []
    if plan["zero_shot"] and not model.has_text:
        progress("  zero-shot: left out, the model has no text tower")
    elif plan["zero_shot"]:
        tokenizer = get_tokenizer()
        for name in plan["zero_shot"]:
            bench, data, groups = open_dataset(plan, name, ("test",), preprocess)
            for level, level_bench, mapping in label_levels(plan, name, bench):
                dataset = data["test"] if mapping is None else Relabelled(data["test"], mapping)
                r = zero_shot_eval(model, tokenizer, level_bench, dataset, plan["batch_size"], plan["workers"], device,
                                   cache_dir=cache_dir / "zero_shot", model_id=content_id,
                                   groups=(groups or None) if mapping is None else None, progress=False)
                rows.append(_row("zero_shot", name, level, "", r["metric"], r["value"], 0, r["n"],
                                 level_bench.num_classes))
                for group, sub in (r.get("groups") or {}).items():
                    rows.append(_row("zero_shot", name, level, "", f"{r['metric']} ({group})", sub["value"], 0,
                                     sub["n"], level_bench.num_classes))
                progress(f"  zero-shot {name} ({level}): {r['metric']} {r['value']:.2f}")
    if plan["linear_probe"]:
        cache = FeatureCache(cache_dir / "features")
        for name in plan["linear_probe"]["datasets"]:
            bench, data, _ = open_dataset(plan, name, ("train", "test"), preprocess)
            feats = {}
            for split, dataset in data.items():
                key = feature_key(content_id, name, split, transform, image_size, plan)
                feats[split], _ = load_or_extract(
                    cache, key, functools.partial(tower_features, model, dataset, plan["batch_size"], plan["workers"],
                                                  device, desc=f"{name} {split}"),
                    num_samples=len(dataset))
            new = probe_rows(plan, name, bench, feats["train"], feats["test"], device)
            rows += new
            progress("  linear probe " + ", ".join(f"{name} ({r['level']}, {r['shots']}) {r['value']:.2f}" for r in new))
    if plan["finetune"]:
        rows += _finetune(plan, checkpoint, run_dir, progress)
    return {"rows": rows, "features": {"checkpoint_id": content_id, "transform": transform, "image_size": image_size}}


def _finetune(plan: dict[str, Any], checkpoint: str | Path, run_dir: Path,
              progress: Callable[[str], None]) -> list[dict[str, Any]]:
    from ..eval.finetune import FinetuneConfig, finetune

    rows = []
    for name in plan["finetune"]["datasets"]:
        out = run_dir / f"finetune-{name}"
        cfg = FinetuneConfig(checkpoint=str(checkpoint), catalog=plan["catalog"], benchmark=name, output_dir=str(out),
                             **{"device": plan["device"], **plan["finetune"]["options"]})
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "finetune.log", "a", encoding="utf-8") as log:
            result = finetune(cfg, log_stream=log)
        bench, data, _ = open_dataset(plan, name, ("train",), None)  # lists the files only: its size and classes
        rows.append(_row("finetune", name, FINE, "all", result.metric, result.value, len(data["train"]), result.n,
                         bench.num_classes,
                         best=result.best["value"], epochs=result.epochs_done))
        progress(f"  fine-tuning {name}: {result.metric} {result.value:.2f}")
    return rows


def fused_features(plan: dict[str, Any], records: list[dict[str, Any]], name: str, split: str, cache_dir: Path):
    """The probe features of several runs on one split, concatenated along the feature axis (the
    runs' cached features; a missing entry is extracted again from the run's checkpoint)."""
    from ..checkpoint import load_pretrained
    from ..eval.knn import tower_features
    from ..eval.linear_probe import FeatureCache, FeatureSet, load_or_extract

    cache = FeatureCache(cache_dir / "features")
    parts = []
    for record in records:
        f = record["features"]
        key = feature_key(f["checkpoint_id"], name, split, f["transform"], f["image_size"], plan)

        def extract(record=record) -> FeatureSet:
            model, preprocess = load_pretrained(record["checkpoint"], device=eval_device(plan))
            _, data, _ = open_dataset(plan, name, (split,), preprocess)
            return tower_features(model, data[split], plan["batch_size"], plan["workers"], eval_device(plan))

        parts.append(load_or_extract(cache, key, extract)[0])
    if any(not np.array_equal(p.labels, parts[0].labels) for p in parts[1:]):
        raise UserError(f"fuse: the runs' features of {name} {split} hold different images; their labels differ")
    return FeatureSet(np.concatenate([p.features for p in parts], axis=1), parts[0].labels)
