"""Regenerate ``benchmarks.json`` and ``catalog.example.json`` from SLIP's reference files.

Usage::

    python zero_shot/build_metadata.py /path/to/reference/zero_shot [--out-dir zero_shot]

The reference directory must contain the three files SLIP ships next to its zero-shot
evaluation (they follow CLIP's prompt-engineering notebook):

``labels.json``
    benchmark key -> class names, in label-index order. An entry may be a list of synonyms
    (FER-2013 does this). Source of every benchmark's ``classnames`` and of its key.
``templates.json``
    benchmark key -> prompt templates, each with one ``{}``. Source of ``templates``.
``dataset_catalog.example.json``
    benchmark key -> {"path", "type", "train", "test"}. Source of ``catalog.example.json``.

What is *not* in the reference and is therefore defined here, in ``_BENCHMARKS``: the order
benchmarks are listed in, their display names, the metric each is reported with, and the
on-disk folder names of the few benchmarks whose folders do not sort into label order.

The output is deterministic (fixed benchmark order, ``indent=2``, ASCII-escaped, trailing
newline) so that ``tests/test_zero_shot_metadata.py`` can check that the committed files are
exactly what this script produces.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

FORMAT_VERSION = 1

# key -> (display name, metric). Order = SLIP's zero-shot table (CLIP's order without
# Birdsnap and VOC2007, plus CUB-200), then Birdsnap and VOC2007, which CLIP reports and
# SLIP's labels.json still contains.
# Metrics follow CLIP's protocol (paper, Table 9): mean per-class recall for the
# class-imbalanced Aircraft, Pets, Caltech-101 and Flowers; mean(top-1, top-5) for
# Kinetics-700; ROC AUC for the binary, imbalanced Hateful Memes; 11-point mAP for the
# multi-label VOC2007; top-1 everywhere else.
_BENCHMARKS: dict[str, tuple[str, str]] = {
    "food101": ("Food-101", "top1"),
    "cifar10": ("CIFAR-10", "top1"),
    "cifar100": ("CIFAR-100", "top1"),
    "cub200": ("CUB-200-2011", "top1"),
    "sun397": ("SUN397", "top1"),
    "cars": ("Stanford Cars", "top1"),
    "aircraft": ("FGVC Aircraft", "mean_per_class_recall"),
    "dtd": ("Describable Textures (DTD)", "top1"),
    "pets": ("Oxford-IIIT Pets", "mean_per_class_recall"),
    "caltech101": ("Caltech-101", "mean_per_class_recall"),
    "flowers": ("Oxford Flowers-102", "mean_per_class_recall"),
    "mnist": ("MNIST", "top1"),
    "fer2013": ("FER-2013", "top1"),
    "stl10": ("STL-10", "top1"),
    "eurosat": ("EuroSAT", "top1"),
    "resisc45": ("RESISC45", "top1"),
    "gtsrb": ("GTSRB", "top1"),
    "kitti_distance": ("KITTI distance", "top1"),
    "country211": ("Country211", "top1"),
    "patch_camelyon": ("PatchCamelyon", "top1"),
    "ucf101_frames": ("UCF101 (frames)", "top1"),
    "kinetics700_frames": ("Kinetics-700 (frames)", "mean_top1_top5"),
    "clevr_counts": ("CLEVR counts", "top1"),
    "hateful_memes": ("Hateful Memes", "roc_auc"),
    "rendered_sst2": ("Rendered SST2", "top1"),
    "imagenet": ("ImageNet", "top1"),
    "birdsnap": ("Birdsnap", "top1"),
    "voc2007": ("PASCAL VOC 2007", "voc_11pt_map"),
}


def _folder_names(key: str, num_classes: int) -> list[str] | None:
    """On-disk folder name of each class, in label-index order, or None if sorting works.

    ``None`` means: an ImageFolder-style loader that sorts folder names as strings gets the
    label order of ``labels.json`` for free (true of every benchmark whose folders are
    class names or zero-padded ids). The exceptions are spelled out here because a plain
    string sort silently permutes their labels.
    """
    if key == "flowers":
        # Oxford Flowers-102 labels are the integers 1..102 of imagelabels.mat and the
        # folders are conventionally named after them, unpadded; CLIP's class list is in
        # that numeric order. A string sort gives "1", "10", "100", ... instead.
        if num_classes != 102:
            raise ValueError(f"flowers: expected 102 classes in the reference, got {num_classes}")
        return [str(i) for i in range(1, num_classes + 1)]
    if key == "hateful_memes":
        # The dataset's jsonl files label not-hateful 0 and hateful 1, and the reference
        # lists the not-hateful class first. Naming the folders "0"/"1" is this project's
        # layout; declaring it lets a loader reject e.g. "hateful"/"not_hateful", whose
        # string sort would swap the classes and turn the AUC into 100 - AUC.
        if num_classes != 2:
            raise ValueError(f"hateful_memes: expected 2 classes in the reference, got {num_classes}")
        return ["0", "1"]
    return None


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _check_templates(key: str, templates: Any) -> list[str]:
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"templates.json: {key!r} has no templates")
    for t in templates:
        # str.format would also expand stray braces; exactly one "{}" and no other brace
        # keeps a template usable with both t.format(c) and t.replace("{}", c).
        if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{"):
            raise ValueError(f"templates.json: {key!r} template {t!r} must contain exactly one '{{}}'")
    return list(templates)


def _check_classnames(key: str, classnames: Any) -> list[str | list[str]]:
    if not isinstance(classnames, list) or not classnames:
        raise ValueError(f"labels.json: {key!r} has no class names")
    for c in classnames:
        ok = isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(s, str) for s in c))
        if not ok:
            raise ValueError(f"labels.json: {key!r} class entry {c!r} is not a name or a list of names")
    return list(classnames)


def build_benchmarks(reference_dir: Path) -> dict[str, Any]:
    """Build the content of ``benchmarks.json`` from ``labels.json`` and ``templates.json``."""
    labels = _read_json(reference_dir / "labels.json")
    templates = _read_json(reference_dir / "templates.json")
    if set(labels) != set(templates):
        raise ValueError(
            f"labels.json and templates.json disagree on benchmarks: "
            f"only labels {sorted(set(labels) - set(templates))}, "
            f"only templates {sorted(set(templates) - set(labels))}"
        )
    unknown = sorted(set(labels) - set(_BENCHMARKS))
    if unknown:
        raise ValueError(f"reference has benchmarks this script does not know: {unknown}; add them to _BENCHMARKS")

    benchmarks: dict[str, Any] = {}
    for key, (name, metric) in _BENCHMARKS.items():
        if key not in labels:
            continue  # the design lists it but the reference lacks it: nothing to invent
        classnames = _check_classnames(key, labels[key])
        benchmarks[key] = {
            "name": name,
            "metric": metric,
            "classnames": classnames,
            "templates": _check_templates(key, templates[key]),
            "folder_names": _folder_names(key, len(classnames)),
        }
    return {
        "format_version": FORMAT_VERSION,
        "generated_by": "zero_shot/build_metadata.py from SLIP's labels.json and templates.json",
        "benchmarks": benchmarks,
    }


def build_catalog(reference_dir: Path, benchmark_keys: Sequence[str]) -> dict[str, Any]:
    """Build ``catalog.example.json``: the reference catalog, in benchmark order.

    Entries keep the reference's fields (path, type, train, test) unchanged; keys are
    checked against the benchmark keys so a catalog key always names a known benchmark.
    """
    reference = _read_json(reference_dir / "dataset_catalog.example.json")
    unknown = sorted(set(reference) - set(benchmark_keys))
    if unknown:
        raise ValueError(f"dataset_catalog.example.json: keys {unknown} are not benchmarks")
    return {key: dict(reference[key]) for key in benchmark_keys if key in reference}


def _dump(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=True) + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Regenerate benchmarks.json and catalog.example.json from SLIP's reference files."
    )
    parser.add_argument("reference_dir", type=Path, help="directory holding labels.json, templates.json, "
                        "dataset_catalog.example.json")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write benchmarks.json and catalog.example.json (default: this package)")
    args = parser.parse_args(argv)

    benchmarks = build_benchmarks(args.reference_dir)
    catalog = build_catalog(args.reference_dir, list(benchmarks["benchmarks"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _dump(benchmarks, args.out_dir / "benchmarks.json")
    _dump(catalog, args.out_dir / "catalog.example.json")
    missing = [k for k in _BENCHMARKS if k not in benchmarks["benchmarks"]]
    print(f"wrote {len(benchmarks['benchmarks'])} benchmarks and {len(catalog)} catalog entries to {args.out_dir}"
          + (f"; not in the reference: {missing}" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
