"""The data a study can write for itself: the synthetic captioned-shapes corpus and a labelled
copy of its classes with a train and a test split, so that a study runs with no download.

A spec's ``synthetic:`` section (all keys optional)::

    synthetic:
      seed: 0                    # the corpus seed (slip make-synthetic's default)
      train_samples: 4000        # captioned pre-training images (make-synthetic's default)
      test_per_class: 20         # labelled test images per class (make-synthetic's default)
      probe_train_per_class: 20  # labelled train images per class for the probe (as many as the test split)
      image_size: 64             # pixels (make-synthetic's default)
      samples_per_shard: 1000    # (make-synthetic's default)

writes, under ``OUTPUT_DIR/data``:

* ``train/``, ``benchmark/``: exactly ``slip make-synthetic`` (:func:`slip.data.synthetic.generate_synthetic`);
* ``shapes/{train,test}/*.tar``: labelled images of all 30 colour x shape classes (the
  benchmark's generator: the test split is the benchmark's own images, the train split draws
  new ones with seed + 1), with ``classnames.txt``, the zero-shot templates, and two label
  hierarchies for coarse evaluation: ``hierarchy_shape.json`` (colour x shape -> shape, 5
  classes) and ``hierarchy_colour.json`` (-> colour, 6 classes);
* ``catalog.json``: the catalog entry ``shapes`` (type ``wds``) that ``evaluate:`` names;
* ``synthetic.json``: the settings, written last. A later study with the same settings reuses
  the data; other settings are refused (the runs trained on the old data would be mixed in).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_text

SYNTHETIC_FORMAT = "slip-study-synthetic/1"
CATALOG_KEY = "shapes"
# Defaults: slip make-synthetic's (slip.data.synthetic.build_parser); the probe's train split is
# as large as its test split.
SYNTHETIC_DEFAULTS = {"seed": 0, "train_samples": 4000, "test_per_class": 20, "probe_train_per_class": 20,
                      "image_size": 64, "samples_per_shard": 1000}


def check_synthetic(path: Path, raw: Any) -> dict[str, int]:
    """The ``synthetic:`` section with its defaults filled in; a UserError naming the key otherwise."""
    from .study_spec import StudySpecError

    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise StudySpecError(f"{path}: synthetic: expected a mapping of settings ({', '.join(SYNTHETIC_DEFAULTS)}), "
                             f"got {raw!r}")
    unknown = sorted(set(raw) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise StudySpecError(f"{path}: synthetic.{unknown[0]}: unknown setting; known: {', '.join(SYNTHETIC_DEFAULTS)}")
    out = {**SYNTHETIC_DEFAULTS, **raw}
    for key, value in out.items():
        low = {"seed": 0, "image_size": 16}.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StudySpecError(f"{path}: synthetic.{key}: expected an integer >= {low}, got {value!r}")
    return out


def _labelled_split(out: Path, samples, total: int, settings: dict[str, int]) -> None:
    from ..data.shards import write_shards

    write_shards(samples, out, prefix=out.name, samples_per_shard=settings["samples_per_shard"],
                 corpus="synthetic-shapes", progress=False, overwrite=True, total=total)


def prepare_synthetic(data_dir: str | Path, settings: dict[str, int],
                      progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write (or reuse) the synthetic data under ``data_dir`` (see the module docstring);
    returns the catalog's path."""
    from ..data.synthetic import (
        ZERO_SHOT_TEMPLATES,
        class_names,
        generate_synthetic,
        iter_benchmark_samples,
    )

    root = Path(data_dir)
    marker = root / "synthetic.json"
    catalog = root / "catalog.json"
    wanted = {"format": SYNTHETIC_FORMAT, **settings}
    if marker.is_file():
        found = json.loads(marker.read_text(encoding="utf-8"))
        if found == wanted:
            progress(f"reusing the synthetic data in {root}")
            return catalog
        raise UserError(f"{marker}: the study's data was written with other synthetic settings ({found}, now "
                        f"{wanted}); its runs trained on that data. Use another output_dir, or delete {root} and the "
                        "runs")
    progress(f"writing the synthetic corpus and a labelled probe set to {root}")
    result = generate_synthetic(root, seed=settings["seed"], train_samples=settings["train_samples"],
                                test_per_class=settings["test_per_class"], image_size=settings["image_size"],
                                samples_per_shard=settings["samples_per_shard"], overwrite=True)
    held_out = [tuple(name.split(" ")) for name in result["benchmark"]["held_out"]]
    names = class_names()
    shapes = root / CATALOG_KEY
    size = settings["image_size"]
    # The test split is the benchmark's generator with its seed (the same images); the train
    # split draws others from seed + 1.
    _labelled_split(shapes / "train", iter_benchmark_samples(settings["seed"] + 1, settings["probe_train_per_class"],
                                                             image_size=size, held_out=held_out),
                    settings["probe_train_per_class"] * len(names), settings)
    _labelled_split(shapes / "test", iter_benchmark_samples(settings["seed"], settings["test_per_class"],
                                                            image_size=size, held_out=held_out),
                    settings["test_per_class"] * len(names), settings)
    atomic_write_text(shapes / "classnames.txt", "\n".join(names) + "\n")
    atomic_write_text(shapes / "zeroshot_classification_templates.txt", "\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    for level, part in (("shape", 1), ("colour", 0)):
        hierarchy = {name: name.split(" ")[part] for name in names}
        atomic_write_text(shapes / f"hierarchy_{level}.json", json.dumps(hierarchy, indent=1) + "\n")
    entry = {"type": "wds", "path": str(shapes.resolve()), "train": "train", "test": "test",
             "name": "Synthetic shapes (colour x shape)"}
    atomic_write_text(catalog, json.dumps({CATALOG_KEY: entry}, indent=2) + "\n")
    atomic_write_text(marker, json.dumps(wanted, indent=2) + "\n")
    return catalog
