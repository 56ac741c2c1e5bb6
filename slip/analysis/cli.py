"""``slip invariance``: how invariant a model's image representation is to occlusion, viewpoint,
illumination direction and colour, and category instance (Purushwalkam & Gupta 2020).

    slip invariance make-set OUT                       # render the generated set (no download)
    slip invariance score OUT --model random:slip_vit_tiny --model trained=CKPT.pt --out DIR
    slip invariance score PHOTOS --model CKPT.pt        # any image folder: occlusion only

``score`` prints the Top-K Representation Invariance Score of every model for every
transformation the set can measure (see :mod:`slip.analysis.invariance` for the exact formula,
:mod:`slip.analysis.sets` for the layouts read and the trajectories of each transformation,
:mod:`slip.analysis.features` for models and layers), and with ``--out`` writes
``DIR/invariance.json`` (scores and settings) and ``DIR/invariance.png`` (a bar chart of the
models side by side, one panel per K; needs ``pip install 'slip[analysis]'``). A unit scores 1
at chance and at most ``1/rate`` (100 at the default rate 0.01).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError, command
from ..fileio import atomic_path, atomic_write_text
from .invariance import DEFAULT_RATE, DEFAULT_TOP_K
from .plotting import pyplot
from .render import (
    CATEGORIES,
    DEFAULT_INSTANCES,
    DEFAULT_VIEWPOINTS,
    LIGHT_COLOURS,
    LIGHT_DIRECTIONS,
)
from .sets import (
    DEFAULT_OCCLUDERS_PER_SIZE,
    DEFAULT_OCCLUSION_SIZES,
    DEFAULT_OCCLUSION_SOURCES,
    TRANSFORMATIONS,
    VARIED,
)

RESULT_FORMAT = "slip-invariance/1"
JSON_NAME = "invariance.json"
CHART_NAME = "invariance.png"
FEW_FIRING = 5  # below this many firing images per unit the scores are coarse (see invariance.py)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated numbers") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    values = _floats(text, what)
    if not values or any(v != int(v) or v < 1 for v in values):
        raise UserError(f"{what} {text!r}: expected comma-separated positive integers")
    return tuple(int(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip invariance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="{make-set,score}")
    m = sub.add_parser("make-set", help="render the generated invariance set (see slip.analysis.render)",
                       description="Render simple 3D objects under controlled viewpoint, light direction and light "
                                   "colour into OUT (manifest.csv, images/, invariance_set.json).")
    m.add_argument("out", type=Path, help="output folder")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    m.add_argument("--instances", type=int, default=DEFAULT_INSTANCES,
                   help=f"objects per category (default {DEFAULT_INSTANCES})")
    m.add_argument("--categories", default=",".join(CATEGORIES), help=f"comma-separated (default {','.join(CATEGORIES)})")
    m.add_argument("--viewpoints", type=int, default=DEFAULT_VIEWPOINTS,
                   help=f"camera azimuths per object (default {DEFAULT_VIEWPOINTS})")
    m.add_argument("--light-dirs", type=int, default=len(LIGHT_DIRECTIONS),
                   help=f"light directions per object (default and most {len(LIGHT_DIRECTIONS)})")
    m.add_argument("--light-colours", type=int, default=len(LIGHT_COLOURS),
                   help=f"light colours per object (default and most {len(LIGHT_COLOURS)})")
    m.add_argument("--overwrite", action="store_true", help="render again over an existing set")

    s = sub.add_parser("score", help="Top-K invariance scores of one or more models on a set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("set", type=Path, help="a folder with manifest.csv (make-set's layout), or any image folder")
    s.add_argument("--model", action="append", required=True, metavar="[LABEL=]SPEC",
                   help="a checkpoint slip.load_pretrained reads, or random:NAME (e.g. random:slip_vit_tiny); "
                        "repeat to compare models")
    s.add_argument("--out", type=Path, help=f"write {JSON_NAME} and {CHART_NAME} into this folder")
    s.add_argument("--layer", default="pooled", help="pooled (default): the tower's pooled feature; embedding: "
                                                     "the projected image embedding; block:N: block N's mean token")
    s.add_argument("--transformations", default="all",
                   help=f"comma-separated of {', '.join(TRANSFORMATIONS)}; default all the set can measure")
    s.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help=f"global firing rate each unit's threshold is set to (default {DEFAULT_RATE}, Goodfellow et "
                        "al. 2009)")
    s.add_argument("--top-k", default=",".join(map(str, DEFAULT_TOP_K)),
                   help=f"comma-separated K of the Top-K scores (default {','.join(map(str, DEFAULT_TOP_K))})")
    s.add_argument("--include-reference", action="store_true",
                   help="average the local firing rate over the whole trajectory, the reference image too "
                        "(Goodfellow et al.'s T(z)); by default the other versions only, so chance is about 1")
    s.add_argument("--occlusion-sizes", default=",".join(map(str, DEFAULT_OCCLUSION_SIZES)),
                   help="occluder areas as fractions of the visible square (default "
                        f"{','.join(map(str, DEFAULT_OCCLUSION_SIZES))})")
    s.add_argument("--occluders-per-size", type=int, default=DEFAULT_OCCLUDERS_PER_SIZE,
                   help=f"occluded versions per size and source image (default {DEFAULT_OCCLUDERS_PER_SIZE})")
    s.add_argument("--occlusion-sources", type=int, default=DEFAULT_OCCLUSION_SOURCES,
                   help=f"at most this many source images for occlusion, a seeded sample (default "
                        f"{DEFAULT_OCCLUSION_SOURCES})")
    s.add_argument("--seed", type=int, default=0, help="occluders, occlusion sources and random:NAME weights")
    s.add_argument("--no-chart", action="store_true", help=f"with --out, write {JSON_NAME} only")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only on a terminal)")
    return p


def _model_specs(values: list[str]) -> list[tuple[str, str]]:
    """``(label, spec)`` of every --model: ``LABEL=SPEC`` unless the whole value is a path that exists."""
    out = []
    for value in values:
        label, sep, spec = value.partition("=")
        if not sep or not label or Path(value).exists() or "/" in label:
            label, spec = value, value
        out.append((label, spec))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"--model labels must differ, got {labels}; name them with --model LABEL=SPEC")
    return out


def _transformations(text: str, has_manifest: bool, root: Path) -> tuple[list[str], dict[str, str]]:
    """(transformations to measure, those left out with the reason)."""
    available = list(TRANSFORMATIONS) if has_manifest else ["occlusion"]
    if text.strip() == "all":
        return available, {t: "measured on a manifest set only" for t in TRANSFORMATIONS if t not in available}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSFORMATIONS]
    if unknown or not names:
        raise UserError(f"--transformations: unknown {unknown}; known: {', '.join(TRANSFORMATIONS)}")
    if not has_manifest and any(t in VARIED for t in names):
        raise UserError(f"{root}: {', '.join(t for t in names if t in VARIED)} need(s) a manifest set "
                        "(manifest.csv); an image folder measures occlusion only")
    return [t for t in TRANSFORMATIONS if t in names], {}


def score_models(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every model on the set: the report written as JSON (see the module docstring)."""
    from ..runtime import pick_device
    from .features import check_layer, embed, load_model, parse_layer
    from .invariance import firing_count, invariance_summary
    from .sets import factor_groups, make_occluders, occlusion_sources, open_set

    ks = _ints(args.top_k, "--top-k")
    sizes = _floats(args.occlusion_sizes, "--occlusion-sizes")
    if not 0 < args.rate < 1:
        raise UserError(f"--rate {args.rate}: the firing rate must be in (0, 1)")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    parse_layer(args.layer)
    specs = _model_specs(args.model)
    data = open_set(args.set)
    wanted, left_out = _transformations(args.transformations, data.has_manifest, data.root)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None

    groups = {t: factor_groups(data.factors, t) for t in wanted if t != "occlusion"} if data.has_manifest else {}
    for t, g in list(groups.items()):
        if not g:
            left_out[t] = f"no two images of {data.root / 'manifest.csv'} differ in {' and '.join(VARIED[t])} alone"
            del groups[t]
    occlusion_items, occlusion_groups = [], []
    if "occlusion" in wanted:
        for source in occlusion_sources(len(data.paths), args.occlusion_sources, args.seed):
            start = len(occlusion_items)
            occluders = make_occluders(source, sizes, args.occluders_per_size, args.seed)
            occlusion_items += [(data.paths[source], None)] + [(data.paths[source], o) for o in occluders]
            occlusion_groups.append(list(range(start, len(occlusion_items))))
    measured = [t for t in wanted if t in groups or (t == "occlusion" and occlusion_groups)]
    if not measured:
        raise UserError(f"{data.root}: nothing to measure: " + "; ".join(f"{t}: {r}" for t, r in left_out.items()))

    images = {t: sum(map(len, occlusion_groups if t == "occlusion" else groups[t])) for t in measured}
    few = {t: m for t, m in ((t, firing_count(n, args.rate)) for t, n in images.items()) if m < FEW_FIRING}
    if few:
        print(f"note: at --rate {args.rate:g} each unit fires on only " +
              ", ".join(f"{m} image(s) for {t}" for t, m in few.items()) +
              f"; scores move in coarse steps below {FEW_FIRING} (use a larger set or a larger --rate)",
              file=sys.stderr)
    models = []
    for label, spec in specs:
        loaded = load_model(spec, device, args.seed, label)
        check_layer(loaded.model, args.layer)
        options = {"layer": args.layer, "batch_size": args.batch_size, "workers": args.workers, "device": device,
                   "progress": args.progress}
        results = {}
        if groups:
            # Every image of the set once; each transformation then reads the rows of its trajectories.
            feats = embed(loaded, [(p, None) for p in data.paths], desc="set images", **options)
        for t in measured:
            if t == "occlusion":
                rows = embed(loaded, occlusion_items, desc="occlusion images", **options)
                members = occlusion_groups
            else:
                order = [i for g in groups[t] for i in g]
                rows, members, k = feats[order], [], 0
                for g in groups[t]:
                    members.append(list(range(k, k + len(g))))
                    k += len(g)
            results[t] = invariance_summary(rows, members, ks, args.rate, args.include_reference)
        models.append({"label": label, "spec": spec, "results": results})

    return {
        "format": RESULT_FORMAT,
        "set": str(data.root),
        "layout": "manifest" if data.has_manifest else "image folder",
        "settings": {"layer": args.layer, "rate": args.rate, "top_k": list(ks),
                     "include_reference": args.include_reference, "seed": args.seed,
                     "occlusion": {"sizes": list(sizes), "per_size": args.occluders_per_size,
                                   "max_sources": args.occlusion_sources}},
        "transformations": measured,
        "left_out": left_out,
        "models": models,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: one row per model and transformation."""
    ks = report["settings"]["top_k"]
    header = ["model", "transformation", *(f"top-{k}" for k in ks), "mean", "chance", "images", "groups"]
    body = []
    for m in report["models"]:
        for t, r in m["results"].items():
            values = [*(r[f"top{k}"] for k in ks), r["mean_all"], r["chance"]]
            body.append([m["label"], t, *("-" if v is None else f"{v:.2f}" for v in values), str(r["images"]),
                         str(r["groups"])])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rate = report["settings"]["rate"]
    title = (f"Top-K representation invariance, layer {report['settings']['layer']}, firing rate {rate:g}: at most "
             f"{1 / rate:g}; chance: the score of units unrelated to the transformation; mean: of all units")
    return "\n".join([title, line.format(*header), line.format(*("-" * w for w in widths)),
                      *(line.format(*row) for row in body)])


def write_chart(report: dict[str, Any], path: Path) -> None:
    """A bar chart of the report: one panel per K, transformations along x, models side by side,
    each transformation's chance level as a black tick."""
    plt = pyplot("the invariance bar chart (slip invariance score --out)")
    ks = report["settings"]["top_k"]
    transformations = report["transformations"]
    models = report["models"]
    width = 0.8 / len(models)
    fig, axes = plt.subplots(1, len(ks), figsize=(max(6.0, 1.3 * len(transformations)) * len(ks), 4.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for j, m in enumerate(models):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(transformations))]
            values = [m["results"][t][f"top{k}"] for t in transformations]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, label=m["label"])
        chance = [models[0]["results"][t]["chance"] for t in transformations]
        ax.hlines(chance, [i - 0.45 for i in range(len(transformations))],
                  [i + 0.45 for i in range(len(transformations))], colors="black", linewidth=1, label="chance")
        ax.set_xticks(range(len(transformations)))
        ax.set_xticklabels([t.replace("_", "\n") for t in transformations], fontsize=8)
        ax.set_ylabel(f"Top-{k} invariance score")
        ax.set_title(f"Top-{k} (layer {report['settings']['layer']}, rate {report['settings']['rate']:g})")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _make_set(args: argparse.Namespace) -> int:
    from .render import make_set

    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    manifest = make_set(args.out, seed=args.seed, size=args.size, instances=args.instances, categories=categories,
                        viewpoints=args.viewpoints, light_dirs=args.light_dirs, light_colours=args.light_colours,
                        overwrite=args.overwrite, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {manifest}")
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.out is not None and not args.no_chart:
        pyplot("the invariance bar chart (slip invariance score --out)")  # fail before the work, not after it
    report = score_models(args)
    print(format_table(report))
    by_reason: dict[str, list[str]] = {}
    for t, reason in report["left_out"].items():
        by_reason.setdefault(reason, []).append(t)
    for reason, names in by_reason.items():
        print(f"left out {', '.join(names)}: {reason}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / JSON_NAME, json.dumps(report, indent=2) + "\n")
        written = [args.out / JSON_NAME]
        if not args.no_chart:
            write_chart(report, args.out / CHART_NAME)
            written.append(args.out / CHART_NAME)
        print("wrote " + " and ".join(map(str, written)))
    return 0


@command("invariance")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return _make_set(args) if args.action == "make-set" else _score(args)


if __name__ == "__main__":
    sys.exit(main())
