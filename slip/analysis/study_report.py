"""A study's results: the table (one row per run x evaluation), its summary over seeds (mean and
sample standard deviation), paired differences against a baseline, and the plots.

Plots (PNG, matplotlib: ``pip install 'slip[analysis]'``), only those whose factors vary:

* ``quantity.png``: the metric against the fraction of pre-training data (log x), one line per
  combination of the other factors (method ...), one panel per evaluation;
* ``domain.png``: a heat map of pre-training domain (``data.train``, fused pairs included) x
  evaluation dataset, when both vary;
* ``degrade.png``: bars per pre-training degradation;
* ``granularity.png``: bars per label level (fine and the coarser ones).

Error bars are the sample standard deviation over seeds (none for one seed); a dotted line marks
chance for top-1 accuracy (100 / classes). Rows of class groups (``top1 (held_out)``) are in the
tables, not in the plots.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_path, atomic_write_text
from .plotting import pyplot
from .study_spec import SEED_FACTOR

EVAL_COLUMNS = ("eval", "dataset", "level", "shots", "metric")
COLUMNS_AFTER = ("value", "n_train", "n_test", "classes")


def table_columns(factors: Sequence[str]) -> list[str]:
    """The result table's columns: run, the study's factors, the evaluation, the figures."""
    return ["run", *factors, *EVAL_COLUMNS, *COLUMNS_AFTER]


def _csv(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def write_results(out_dir: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                  comparison: list[dict[str, Any]], factors: Sequence[str], meta: dict[str, Any]) -> list[Path]:
    """``results.csv`` / ``results.json`` (every row), ``summary.csv`` (over seeds) and, with a
    comparison, ``compare.csv``; all written atomically. Returns the paths."""
    columns = table_columns(factors)
    group = [f for f in factors if f != SEED_FACTOR]
    written = [out_dir / "results.csv", out_dir / "results.json", out_dir / "summary.csv"]
    atomic_write_text(written[0], _csv(rows, columns))
    atomic_write_text(written[1], json.dumps({**meta, "columns": columns, "rows": rows, "summary": summary,
                                              "compare": comparison}, indent=1) + "\n")
    atomic_write_text(written[2], _csv(summary, [*group, *EVAL_COLUMNS, "mean", "std", "n", "min", "max", "classes"]))
    if comparison:
        written.append(out_dir / "compare.csv")
        atomic_write_text(written[-1], _csv(comparison, ["factor", "value", "baseline", *[g for g in group if g !=
                                                         comparison[0]["factor"]], *EVAL_COLUMNS, "mean_difference",
                                                         "std", "n", "higher", "t"]))
    return written


def summarize(rows: list[dict[str, Any]], factors: Sequence[str]) -> list[dict[str, Any]]:
    """Rows grouped over the seed: per combination of the other factors and evaluation, the mean,
    sample standard deviation (None for one seed), count, min and max of ``value``."""
    group = [f for f in factors if f != SEED_FACTOR]
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault(tuple(row.get(k) for k in (*group, *EVAL_COLUMNS)), []).append(row)
    out = []
    for key, members in buckets.items():
        values = np.array([m["value"] for m in members], dtype=np.float64)
        out.append({**dict(zip((*group, *EVAL_COLUMNS), key)), "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else None, "n": len(values),
                    "min": float(values.min()), "max": float(values.max()), "classes": members[0].get("classes"),
                    "values": values.tolist(), "seeds": [m.get(SEED_FACTOR) for m in members]})
    return out


def compare(rows: list[dict[str, Any]], factors: Sequence[str], factor: str, baseline: str) -> list[dict[str, Any]]:
    """Paired differences ``value - baseline value`` between rows that differ only in ``factor``
    (same seed, other factors and evaluation); per value, other factors and evaluation: the mean
    difference, its sample standard deviation over seeds, the number of pairs, how many were
    higher than the baseline, and the paired t statistic ``mean / (std / sqrt(n))`` (None for one
    pair or no spread). With n pairs, |t| beyond Student's t quantile 0.975 at n - 1 degrees of
    freedom (12.71, 4.30, 3.18, 2.78 for n = 2 ... 5) is a difference at the two-sided 5% level."""
    others = [f for f in factors if f != factor]
    by_key = {tuple(r.get(k) for k in (*others, *EVAL_COLUMNS)): r for r in rows if r.get(factor) == baseline}
    group = [f for f in others if f != SEED_FACTOR]
    buckets: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get(factor) == baseline:
            continue
        base = by_key.get(tuple(row.get(k) for k in (*others, *EVAL_COLUMNS)))
        if base is not None:
            key = (row[factor], *(row.get(k) for k in (*group, *EVAL_COLUMNS)))
            buckets.setdefault(key, []).append(row["value"] - base["value"])
    out = []
    for key, diffs in buckets.items():
        d = np.array(diffs, dtype=np.float64)
        std = float(d.std(ddof=1)) if len(d) > 1 else None
        t = float(d.mean() / (std / math.sqrt(len(d)))) if std else None
        out.append({"factor": factor, "value": key[0], "baseline": baseline,
                    **dict(zip((*group, *EVAL_COLUMNS), key[1:])), "mean_difference": float(d.mean()),
                    "std": std, "n": len(d), "higher": int((d > 0).sum()), "t": t, "differences": d.tolist()})
    return out


def _fixed_width(header: Sequence[str], body: list[list[str]], numeric_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(f"{{:{'>' if i >= numeric_from else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in body)])


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_summary(summary: list[dict[str, Any]], factors: Sequence[str]) -> str:
    """The summary as a plain-text table: mean ± sample std over seeds (n seeds)."""
    group = [f for f in factors if f != SEED_FACTOR]
    header = [*group, *EVAL_COLUMNS, "mean ± std", "n"]
    body = [[*(str(s.get(k) if s.get(k) is not None else "") for k in (*group, *EVAL_COLUMNS)),
             _pm(s["mean"], s["std"]), str(s["n"])] for s in summary]
    return _fixed_width(header, body, len(header) - 2)


def format_comparison(comparison: list[dict[str, Any]], factors: Sequence[str]) -> str:
    """The paired differences as a plain-text table."""
    if not comparison:
        return ""
    factor, baseline = comparison[0]["factor"], comparison[0]["baseline"]
    group = [f for f in factors if f not in (SEED_FACTOR, factor)]
    header = [factor, *group, *EVAL_COLUMNS, f"- {baseline}: mean ± std", "higher", "t"]
    body = [[str(c["value"]), *(str(c.get(k) if c.get(k) is not None else "") for k in (*group, *EVAL_COLUMNS)),
             ("+" if c["mean_difference"] >= 0 else "") + _pm(c["mean_difference"], c["std"]),
             f"{c['higher']} of {c['n']}", "" if c["t"] is None else f"{c['t']:+.1f}"] for c in comparison]
    return _fixed_width(header, body, len(header) - 3)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _eval_label(key: Sequence[Any]) -> str:
    return _panel_title(dict(zip(EVAL_COLUMNS, key)))


def _order(values: Iterable[Any], order: Sequence[str]) -> list[Any]:
    values = list(dict.fromkeys(values))
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), str(v)))


def _grid(plt, count: int, width: float = 4.6, height: float = 3.6):
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _chance(entry: dict[str, Any]) -> float | None:
    """Chance level of a top-1 accuracy in percent (100 / classes), else None."""
    return 100.0 / entry["classes"] if entry.get("metric") == "top1" and entry.get("classes") else None


def _series_label(entry: dict[str, Any], series: Sequence[str]) -> str:
    return ", ".join(f"{entry[f]}" if f == "method" else f"{f}={entry[f]}" for f in series) or "all runs"


def _plotted(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in summary if " (" not in str(s["metric"])]


def _bars(plt, summary: list[dict[str, Any]], x_field: str, x_order: Sequence[str], panel_fields: Sequence[str],
          series: Sequence[str], orders: dict[str, list[str]], xlabel: str, path: Path) -> Path:
    """Grouped bars: ``x_field`` along x, one bar per series, one panel per ``panel_fields`` value."""
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        panels.setdefault(tuple(s[k] for k in panel_fields), []).append(s)
    fig, axes = _grid(plt, len(panels))
    for ax, (key, entries) in zip(axes, panels.items()):
        xs = _order((e[x_field] for e in entries), x_order)
        spec_order = [_series_label(dict(zip(series, combo)), series) for combo in _combos(series, orders)]
        ordered = _order((_series_label(e, series) for e in entries), spec_order)
        width = 0.8 / max(1, len(ordered))
        for j, label in enumerate(ordered):
            means, stds = [], []
            for x in xs:
                match = [e for e in entries if e[x_field] == x and _series_label(e, series) == label]
                means.append(match[0]["mean"] if match else math.nan)
                stds.append((match[0]["std"] or 0.0) if match else 0.0)
            ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(xs))], means, width, yerr=stds, capsize=3,
                   label=label)
        for i, x in enumerate(xs):
            chance = next((_chance(e) for e in entries if e[x_field] == x and _chance(e) is not None), None)
            if chance is not None:
                ax.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles=":", linewidth=1.2,
                          label="chance" if i == 0 else None)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(str(entries[0]["metric"]))
        ax.set_title(_panel_title(dict(zip(panel_fields, key))), fontsize=8)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _combos(series: Sequence[str], orders: dict[str, list[str]]) -> list[tuple]:
    from itertools import product

    return list(product(*(orders.get(f, []) for f in series)))


def _panel_title(fields: dict[str, Any]) -> str:
    """``linear probe: shapes (shape, 5-shot) top1`` from the evaluation fields a panel shares,
    with the panel's factor values on a second line."""
    inside = [str(fields["level"])] if fields.get("level") not in ("", None) else []
    if fields.get("shots") not in ("", "all", None):
        inside.append(f"{fields['shots']}-shot")
    dataset = f": {fields['dataset']}" if fields.get("dataset") else ""
    title = f"{str(fields.get('eval', '')).replace('_', ' ')}{dataset}" \
        + (f" ({', '.join(inside)})" if inside else "") + f" {fields.get('metric', '')}"
    extra = ", ".join(f"{k}={v}" for k, v in fields.items() if k not in EVAL_COLUMNS)
    return f"{title}\n{extra}" if extra else title


def write_plots(out_dir: Path, summary: list[dict[str, Any]], factors: Sequence[str],
                orders: dict[str, list[str]]) -> list[Path]:
    """The plots of the module docstring whose factors vary; returns the paths written."""
    summary = _plotted(summary)
    if not summary:
        return []
    plt = pyplot("the study's plots (slip study)")
    varying = [f for f in factors if f != SEED_FACTOR and len({s[f] for s in summary}) > 1]
    written = []
    if "data.subset" in varying:
        written.append(_quantity(plt, summary, varying, orders, out_dir / "quantity.png"))
    datasets = {s["dataset"] for s in summary}
    if "data.train" in varying and len(datasets) > 1:
        written.append(_domain(plt, summary, varying, orders, out_dir / "domain.png"))
    if "data.degrade" in varying:
        series = [f for f in varying if f != "data.degrade"]
        written.append(_bars(plt, summary, "data.degrade", orders.get("data.degrade", []), EVAL_COLUMNS, series,
                             orders, "pre-training images (data.degrade)", out_dir / "degrade.png"))
    levels = _order((s["level"] for s in summary), ["fine"])
    if len(levels) > 1:
        panel = [k for k in EVAL_COLUMNS if k != "level"]
        written.append(_bars(plt, summary, "level", levels, panel, varying, orders, "label level",
                             out_dir / "granularity.png"))
    return written


def _quantity(plt, summary, varying, orders, path: Path) -> Path:
    series = [f for f in varying if f != "data.subset"]
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        panels.setdefault(tuple(s[k] for k in EVAL_COLUMNS), []).append(s)
    fig, axes = _grid(plt, len(panels))
    for ax, (key, entries) in zip(axes, panels.items()):
        lines: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            lines.setdefault(_series_label(e, series), []).append(e)
        for label, points in lines.items():
            points = sorted(points, key=lambda e: float(e["data.subset"]))
            ax.errorbar([float(e["data.subset"]) for e in points], [e["mean"] for e in points],
                        yerr=[e["std"] or 0.0 for e in points], marker="o", capsize=3, label=label)
        chance = next((_chance(e) for e in entries if _chance(e) is not None), None)
        if chance is not None:
            ax.axhline(chance, color="black", linestyle=":", linewidth=1.2, label="chance")
        fractions = sorted({float(e["data.subset"]) for e in entries})
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("fraction of the pre-training data (data.subset)")
        ax.set_ylabel(str(key[-1]))
        ax.set_title(_eval_label(key), fontsize=8)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _domain(plt, summary, varying, orders, path: Path) -> Path:
    others = [f for f in varying if f != "data.train"]
    panel_fields = [*others, "eval", "level", "shots", "metric"]
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        panels.setdefault(tuple(s[k] for k in panel_fields), []).append(s)
    fig, axes = _grid(plt, len(panels), width=5.2, height=4.2)
    for ax, (key, entries) in zip(axes, panels.items()):
        domains = _order((e["data.train"] for e in entries), orders.get("data.train", []))
        datasets = _order((e["dataset"] for e in entries), [])
        grid = np.full((len(domains), len(datasets)), np.nan)
        for e in entries:
            grid[domains.index(e["data.train"]), datasets.index(e["dataset"])] = e["mean"]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        middle = np.nanmin(grid) + 0.5 * (np.nanmax(grid) - np.nanmin(grid))
        for i in range(len(domains)):
            for j in range(len(datasets)):
                if not np.isnan(grid[i, j]):  # dark text on viridis's bright upper half
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if grid[i, j] > middle else "white")
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels(datasets, fontsize=8)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains, fontsize=8)
        ax.set_xlabel("evaluation dataset")
        ax.set_ylabel("pre-training data (data.train)")
        ax.set_title(_panel_title(dict(zip(panel_fields, key))), fontsize=8)
        fig.colorbar(image, ax=ax, label=str(key[-1]))
    return _save(plt, fig, path)
