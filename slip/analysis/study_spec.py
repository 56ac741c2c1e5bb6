"""The spec of a ``slip study``: a YAML file naming factors whose product is a grid of ordinary
training runs, the settings every run shares, and one evaluation protocol.

::

    name: synthetic_slip_vs_clip                 # default: the file's stem
    output_dir: runs/studies/synthetic_slip_vs_clip   # default: runs/studies/NAME
    recipe: ../tiny/slip_simclr.yaml             # the run's recipe when `method` is not a factor
    threads: 1                                   # torch threads for the study (default: torch's own)
    synthetic: {train_samples: 4000}             # optional: write the synthetic data (slip.analysis.study_data)
    factors:                                     # each a list (or NAME: VALUE mapping); the grid is their product
      method: {clip: ../tiny/clip.yaml, slip: ../tiny/slip_simclr.yaml}   # objective: a recipe per name
      data.train: {shapes: "${study}/data/train/", mix: "a/::0.7,b/::0.3"}  # pre-training domain
      data.subset: [0.25, 1.0]                   # nested subsets by key hash (slip.data.degrade)
      data.degrade: [none, jpeg:10, downsample:4, saltpepper:0.05]        # pre-training image quality
      train.seed: [0, 1, 2]                      # reported as mean and spread
    config:                                      # overrides applied to every run (any recipe key)
      train.epochs: 3
    evaluate: {...}                              # see slip.analysis.study_eval
    compare: {factor: method, baseline: clip}    # paired differences over seeds in the report
    plots: true                                  # false: tables only

Recipe paths are relative to the spec's folder (as a recipe's ``base:``); data paths are read
from the working directory, as in recipes. ``${study}`` in any string stands for the study's
output folder (quote it inside ``{...}`` mappings, where YAML reads ``{`` itself). A run's
folder is ``OUTPUT_DIR/runs/NAME``, NAME made of its factor values (``slip_subset-0.25_seed-1``);
it is an ordinary ``slip train`` run directory.

Mistakes (an unknown factor or key, a value of the wrong kind, a recipe that does not exist, a
setting a recipe refuses) raise :class:`~slip.errors.UserError` naming the spec file and the key.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

# The factors a spec may vary, in the order of the table's columns and of run names.
FACTORS = ("method", "data.train", "data.subset", "data.degrade", "train.seed")
SEED_FACTOR = "train.seed"
# How each factor is written in run names (the method's name stands alone).
_NAME_PREFIX = {"method": "", "data.train": "data-", "data.subset": "subset-", "data.degrade": "degrade-",
                "train.seed": "seed-"}
_TOP_LEVEL = ("name", "output_dir", "recipe", "threads", "synthetic", "factors", "config", "evaluate", "compare",
              "plots")
STUDY_PLACEHOLDER = "${study}"


class StudySpecError(UserError, ValueError):
    """A mistake in a study spec; the message names the file and the key."""


@dataclass(frozen=True)
class FactorValue:
    """One value of a factor: ``label`` names it in run names, tables and plots; ``value`` is
    what the run's config gets (a recipe path for ``method``)."""

    label: str
    value: Any


@dataclass
class StudyRun:
    """One run of the grid: its factor values, recipe, overrides and folder."""

    name: str
    factors: dict[str, FactorValue]
    recipe: Path
    overrides: list[str]
    output_dir: Path

    def labels(self) -> dict[str, str]:
        """Factor -> label of this run's value."""
        return {k: v.label for k, v in self.factors.items()}


@dataclass
class StudySpec:
    """A parsed spec; :func:`load_spec` builds it, :meth:`runs` expands the grid."""

    path: Path
    name: str
    output_dir: Path
    factors: dict[str, list[FactorValue]]
    config: dict[str, Any]
    recipe: Path | None
    threads: int | None
    synthetic: dict[str, Any] | None
    evaluate: dict[str, Any]
    compare: dict[str, str] | None
    plots: bool = True

    def where(self, key: str) -> str:
        return f"{self.path}: {key}"

    def runs(self) -> list[StudyRun]:
        """Every combination of the factors' values, in the order the spec lists them (the first
        factor varies slowest), each with its name, recipe and config overrides."""
        names = [f for f in FACTORS if f in self.factors]
        runs = []
        for combo in product(*(self.factors[f] for f in names)):
            values = dict(zip(names, combo))
            parts = [_NAME_PREFIX[f] + _safe(v.label) for f, v in values.items()]
            name = "_".join(parts) or "run"
            recipe = values["method"].value if "method" in values else self.recipe
            assert recipe is not None  # load_spec requires one of them
            out = self.output_dir / "runs" / name
            overrides = [f"{k}={json.dumps(v)}" for k, v in self.config.items()]
            overrides += [f"{f}={json.dumps(v.value)}" for f, v in values.items() if f != "method"]
            overrides.append(f"train.output_dir={json.dumps(str(out))}")
            runs.append(StudyRun(name, values, Path(recipe), overrides, out))
        seen: dict[str, StudyRun] = {}
        for run in runs:
            if run.name in seen:
                raise StudySpecError(f"{self.where('factors')}: runs {seen[run.name].labels()} and {run.labels()} get the "
                                     f"same folder name {run.name!r}; name the values with a mapping (NAME: VALUE)")
            seen[run.name] = run
        return runs


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", label).strip("-") or "x"


def _substitute(value: Any, study_dir: Path) -> Any:
    """``${study}`` -> the study's output folder, in every string of ``value``."""
    if isinstance(value, str):
        return value.replace(STUDY_PLACEHOLDER, str(study_dir))
    if isinstance(value, list):
        return [_substitute(v, study_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, study_dir) for k, v in value.items()}
    return value


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}, "data.workers": 0}`` -> ``{"train.epochs": 3, "data.workers": 0}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _named_values(path: Path, key: str, raw: Any) -> list[tuple[str | None, Any]]:
    """A factor's values as (name or None, value): from a non-empty list, or a NAME: VALUE mapping."""
    where = f"{path}: {key}"
    if isinstance(raw, dict):
        if not raw:
            raise StudySpecError(f"{where}: no values; give a list, or a mapping NAME: VALUE")
        return [(str(k), v) for k, v in raw.items()]
    if isinstance(raw, list) and raw:
        return [(None, v) for v in raw]
    raise StudySpecError(f"{where}: expected a non-empty list of values (or a mapping NAME: VALUE), got {raw!r}")


def _factor_values(path: Path, name: str, raw: Any, base: Path) -> list[FactorValue]:
    """Check one factor's values and give them labels (see the module docstring)."""
    from ..data.degrade import DegradeError, check_subset, parse_degradations

    key = f"factors.{name}"
    out: list[FactorValue] = []
    for i, (label, value) in enumerate(_named_values(path, key, raw)):
        where = f"{key}.{label}" if label is not None else f"{key}[{i}]"
        if name == "method":
            if not isinstance(value, str) or not value:
                raise StudySpecError(f"{path}: {where}: expected a recipe file, got {value!r}")
            recipe = Path(os.path.normpath(base / value))  # an absolute value stays as it is
            if not recipe.is_file():
                raise StudySpecError(f"{path}: {where}: recipe {recipe} not found (recipe paths are relative to the "
                                     "spec's folder)")
            out.append(FactorValue(label or Path(value).stem, str(recipe)))
        elif name == "data.subset":
            try:
                fraction = check_subset(value, where)
            except DegradeError as e:
                raise StudySpecError(f"{path}: {e}") from None
            out.append(FactorValue(label or f"{fraction:g}", fraction))
        elif name == "data.degrade":
            if value is not None and not isinstance(value, str):
                raise StudySpecError(f"{path}: {where}: expected a degradation such as jpeg:10 or none, got {value!r}")
            try:
                steps = parse_degradations(value, where)
            except DegradeError as e:
                raise StudySpecError(f"{path}: {e}") from None
            out.append(FactorValue(label or ("+".join(map(str, steps)) or "none"), value if steps else None))
        elif name == "data.train":
            if not isinstance(value, str) or not value.strip():
                raise StudySpecError(f"{path}: {where}: expected a shard spec (directory, brace pattern, or "
                                     f"a::0.7,b::0.3 mixture), got {value!r}")
            out.append(FactorValue(label or value, value))
        elif name == SEED_FACTOR:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StudySpecError(f"{path}: {where}: expected a seed (an integer >= 0), got {value!r}")
            out.append(FactorValue(label or str(value), value))
    labels = [v.label for v in out]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise StudySpecError(f"{path}: {key}: value(s) {repeated} listed twice")
    return out


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec's YAML as a mapping; a :class:`StudySpecError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise StudySpecError(f"{path}: no such study spec")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StudySpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise StudySpecError(f"{path}: expected a mapping at the top level (factors:, config:, evaluate: ...)")
    return data


def load_spec(path: str | Path, output_dir: str | Path | None = None) -> StudySpec:
    """Read, check and resolve a study spec (see the module docstring).

    Args:
        path: the YAML file.
        output_dir: replaces the spec's ``output_dir`` (``slip study --out``).

    Raises:
        StudySpecError: naming the file and the key of the first mistake.
    """
    from .study_eval import parse_evaluate

    path = Path(path)
    data = read_spec_file(path)
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        raise StudySpecError(f"{path}: unknown key {unknown[0]!r}; a study spec holds {', '.join(_TOP_LEVEL)} "
                             "(settings of the runs go under config:)")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or _safe(name) != name:
        raise StudySpecError(f"{path}: name: expected a plain name ([A-Za-z0-9._+=-]), got {name!r}")
    out = Path(output_dir) if output_dir is not None else Path(data.get("output_dir") or f"runs/studies/{name}")
    data = _substitute(data, out)
    base = path.resolve().parent

    raw_factors = data.get("factors") or {}
    if not isinstance(raw_factors, dict):
        raise StudySpecError(f"{path}: factors: expected a mapping of factor -> values, got {raw_factors!r}")
    for factor in raw_factors:
        if factor not in FACTORS:
            raise StudySpecError(f"{path}: factors.{factor}: unknown factor; the factors are {', '.join(FACTORS)} "
                                 "(any other setting goes under config:, the same for every run)")
    factors = {f: _factor_values(path, f, raw_factors[f], base) for f in FACTORS if f in raw_factors}

    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise StudySpecError(f"{path}: config: expected a mapping of settings (train.epochs: 3 ...), got {config!r}")
    config = _flatten(config)
    for key in config:
        if key in factors:
            raise StudySpecError(f"{path}: config.{key}: {key} is a factor of this study; set it under factors only")
        if key == "train.output_dir":
            raise StudySpecError(f"{path}: config.train.output_dir: each run's folder is OUTPUT_DIR/runs/NAME; set the "
                                 "study's output_dir instead")

    recipe = data.get("recipe")
    if "method" in factors:
        if recipe is not None:
            raise StudySpecError(f"{path}: recipe: the method factor gives each run its recipe; remove recipe:")
        recipe_path = None
    else:
        if not isinstance(recipe, str) or not recipe:
            raise StudySpecError(f"{path}: recipe: name the runs' recipe (a YAML file, relative to the spec), or "
                                 "vary factors.method")
        recipe_path = Path(os.path.normpath(base / recipe))
        if not recipe_path.is_file():
            raise StudySpecError(f"{path}: recipe: {recipe_path} not found (relative to the spec's folder)")

    threads = data.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise StudySpecError(f"{path}: threads: expected an integer >= 1 (torch threads), got {threads!r}")
    synthetic = data.get("synthetic")
    if synthetic is not None:
        from .study_data import check_synthetic

        synthetic = check_synthetic(path, synthetic)
    plots = data.get("plots", True)
    if not isinstance(plots, bool):
        raise StudySpecError(f"{path}: plots: expected true or false, got {plots!r}")

    spec = StudySpec(path=path, name=name, output_dir=out, factors=factors, config=config, recipe=recipe_path,
                     threads=threads, synthetic=synthetic, evaluate={}, compare=None, plots=plots)
    spec.evaluate = parse_evaluate(path, data.get("evaluate"), factors)
    spec.compare = _parse_compare(path, data.get("compare"), factors)
    return spec


def _parse_compare(path: Path, raw: Any, factors: dict[str, list[FactorValue]]) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"factor", "baseline"}:
        raise StudySpecError(f"{path}: compare: expected {{factor: FACTOR, baseline: VALUE}}, got {raw!r}")
    factor, baseline = raw["factor"], str(raw["baseline"])
    if factor not in factors or factor == SEED_FACTOR:
        raise StudySpecError(f"{path}: compare.factor: {factor!r} is not a factor of this study (other than the seed): "
                             f"{', '.join(f for f in factors if f != SEED_FACTOR) or 'none'}")
    labels = [v.label for v in factors[factor]]
    if baseline not in labels:
        raise StudySpecError(f"{path}: compare.baseline: {baseline!r} is not a value of {factor} ({', '.join(labels)})")
    return {"factor": factor, "baseline": baseline}


def build_configs(spec: StudySpec, runs: list[StudyRun]) -> dict[str, Any]:
    """Every run's :class:`~slip.train.config.Config` (recipe <- config <- factor values), checked
    as ``slip train`` checks it; a :class:`StudySpecError` naming the run and the key otherwise."""
    from ..train.config import ConfigError, load_config

    configs = {}
    for run in runs:
        try:
            configs[run.name] = load_config(run.recipe, run.overrides)
        except ConfigError as e:
            raise StudySpecError(f"{spec.path}: run {run.name}: {e}") from None
    return configs
