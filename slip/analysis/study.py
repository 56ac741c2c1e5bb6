"""``slip study SPEC.yaml``: a grid of ordinary slip training runs that differ in named factors
(objective, pre-training data and its quantity, domain and quality, seed), each evaluated with
one protocol (zero-shot, linear and few-shot probes, fine-tuning, at coarse and fine label
levels), summarised in one table and a few plots. After Cole et al. 2022, "When Does
Contrastive Visual Representation Learning Work?" (CVPR), and Falcon & Cho 2020's call to
compare methods under identical conditions.

    slip study configs/studies/synthetic_slip_vs_clip.yaml            # run (or continue) the study
    slip study configs/studies/cole2022_imagenet_subsets.yaml --dry-run   # check the spec, list the runs
    slip study SPEC --report                                          # the table and plots of what is done

The spec's format is in :mod:`slip.analysis.study_spec`, the evaluation's in
:mod:`slip.analysis.study_eval`, the synthetic data a study can write for itself in
:mod:`slip.analysis.study_data`, the outputs in :mod:`slip.analysis.study_report`.

Every run is an ordinary ``slip train`` run directory, ``OUTPUT_DIR/runs/NAME`` (NAME from its
factor values), with ``train.log`` (the trainer's lines), ``study_train.json`` (the final
checkpoint, written when training ends) and ``study_eval.json`` (the evaluation's rows, keyed
by the checkpoint and the evaluation settings). Rerunning the study skips every run whose final
checkpoint and evaluation exist for the same config and evaluation; a run interrupted in
training resumes through slip's own resume (same step, data position and RNG), one whose
evaluation is missing or out of date is evaluated again without training. ``study.json``, the
study's manifest (factors, runs and their states, outputs), is rewritten atomically after every
run. Outputs beside it: ``results.csv`` / ``results.json`` (one row per run x evaluation, with
the factor columns), ``summary.csv`` (mean, sample std, n over seeds), ``compare.csv`` (paired
differences against ``compare``'s baseline) and the PNG plots; the terminal gets the summary as
mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError, command
from ..fileio import atomic_write_text
from .study_eval import (
    check_inputs,
    evaluate_run,
    open_dataset,
    plan_digest,
    probe_rows,
    run_identity,
)
from .study_report import (
    compare,
    format_comparison,
    format_summary,
    pyplot,
    summarize,
    write_plots,
    write_results,
)
from .study_spec import FACTORS, StudyRun, StudySpec, build_configs, load_spec

STUDY_FORMAT = "slip-study/1"
MANIFEST = "study.json"
TRAIN_RECORD = "study_train.json"
EVAL_RECORD = "study_eval.json"
FUSED_DIR = "fused"


def train_run(cfg, log_stream):
    """Train one run with slip's trainer (resuming from its output folder); a module-level name
    so that tests can count the calls."""
    from ..train.trainer import train

    return train(cfg, log_stream=log_stream)


def _read_record(path: Path) -> dict[str, Any] | None:
    """A study record, or None when absent or unreadable (then the step is simply done again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Study:
    """A study read from its spec: :meth:`run` trains and evaluates what is missing, then
    :meth:`report` writes the table and plots."""

    def __init__(self, spec: StudySpec, progress: Callable[[str], None] = _stderr) -> None:
        self.spec, self.progress = spec, progress
        self.runs = spec.runs()
        self.configs = build_configs(spec, self.runs)  # every run's config checked before any work
        self.plan = spec.evaluate
        self.digest = plan_digest(self.plan)
        self.out = spec.output_dir
        self.cache = self.out / "cache"
        self.states: dict[str, dict[str, Any]] = {}
        self.outputs: list[str] = []

    # ------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The runs and the evaluation, for ``--dry-run``."""
        factors = [f for f in FACTORS if f in self.spec.factors]
        lines = [f"study {self.spec.name}: {len(self.runs)} runs in {self.out / 'runs'}, factors "
                 + "; ".join(f"{f} = {', '.join(v.label for v in self.spec.factors[f])}" for f in factors)]
        for i, run in enumerate(self.runs, 1):
            cfg = self.configs[run.name]
            lines.append(f"  {i:>3}. {run.name}: {cfg.model.name}, clip={cfg.objective.clip}, ssl={cfg.objective.ssl}, "
                         f"data.train={cfg.data.train}, subset={cfg.data.subset}, degrade={cfg.data.degrade}, "
                         f"seed={cfg.train.seed}, epochs={cfg.train.epochs:g}, batch={cfg.train.batch_size}")
            # The same run by hand (e.g. under torchrun): the study then finds it and evaluates it.
            lines.append("       slip train " + " ".join(shlex.quote(str(a)) for a in (run.recipe, *run.overrides)))
        p = self.plan
        parts = [f"zero-shot on {', '.join(p['zero_shot'])}" if p["zero_shot"] else "",
                 (f"linear probe ({p['linear_probe']['protocol']}, shots {', '.join(map(str, p['linear_probe']['shots']))})"
                  f" on {', '.join(p['linear_probe']['datasets'])}") if p["linear_probe"] else "",
                 f"fine-tuning on {', '.join(p['finetune']['datasets'])}" if p["finetune"] else "",
                 f"label levels {p['levels']}" if p["levels"] else "",
                 "fused: " + ", ".join(f"{r['factor']} {r['values'][0]}+{r['values'][1]}" for r in p["fuse"])
                 if p["fuse"] else ""]
        lines.append("evaluation: " + "; ".join(x for x in parts if x))
        return "\n".join(lines)

    def _manifest(self, state: str) -> None:
        spec = self.spec
        manifest = {
            "format": STUDY_FORMAT, "name": spec.name, "spec": str(spec.path), "output_dir": str(self.out),
            "state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "factors": {f: [v.label for v in vals] for f, vals in spec.factors.items()},
            "config": spec.config, "evaluate": self.plan, "evaluation_digest": self.digest,
            "runs": [{"name": r.name, "dir": str(r.output_dir), "factors": r.labels(),
                      **self.states.get(r.name, {"state": "pending"})} for r in self.runs],
            "outputs": self.outputs,
        }
        atomic_write_text(self.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    # ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Prepare the data, then train and evaluate every run that is not done (see the module doc)."""
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        self._manifest("running")
        if self.spec.synthetic is not None:
            from .study_data import prepare_synthetic

            prepare_synthetic(self.out / "data", self.spec.synthetic, self.progress)
        check_inputs(self.plan)  # a missing dataset or hierarchy fails now, not after the training
        threads = torch.get_num_threads()
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        spent: list[float] = []
        try:
            for i, run in enumerate(self.runs, 1):
                start = time.perf_counter()
                state = self._run_one(run, f"[{i}/{len(self.runs)}] {run.name}")
                elapsed = time.perf_counter() - start
                self.states[run.name] = {**state, "seconds": round(elapsed, 1)}
                if state["state"] != "done earlier":
                    spent.append(elapsed)
                left = len(self.runs) - i
                eta = f"; about {sum(spent) / len(spent) * left / 60:.1f} min for the {left} left" if spent and left else ""
                self.progress(f"[{i}/{len(self.runs)}] {run.name}: {state['state']} ({elapsed:.0f} s){eta}")
                self._manifest("running")
        except BaseException as e:
            self._manifest(f"stopped: {type(e).__name__}: {e}")
            raise
        finally:
            torch.set_num_threads(threads)
        self._manifest("trained and evaluated")

    def _run_one(self, run: StudyRun, who: str) -> dict[str, Any]:
        cfg = self.configs[run.name]
        config = cfg.to_dict()
        trained = _read_record(run.output_dir / TRAIN_RECORD)
        did = []
        if not (trained and trained.get("config") == config and Path(trained.get("checkpoint", "")).is_file()):
            run.output_dir.mkdir(parents=True, exist_ok=True)
            resuming = any((run.output_dir / "checkpoints").glob("*.pt")) if (run.output_dir / "checkpoints").is_dir() \
                else False
            self.progress(f"{who}: {'resuming' if resuming else 'training'} (log: {run.output_dir / 'train.log'})")
            start = time.perf_counter()
            with open(run.output_dir / "train.log", "a", encoding="utf-8") as log:
                result = train_run(cfg, log)
            trained = {"config": config, "checkpoint": str(result.checkpoint), "step": result.step,
                       "seconds": round(time.perf_counter() - start, 1), "skipped_samples": result.skipped_samples,
                       "last_losses": result.last_losses}
            _write_record(run.output_dir / TRAIN_RECORD, trained)
            did.append("trained")
        identity = run_identity(trained["checkpoint"])
        evaluated = _read_record(run.output_dir / EVAL_RECORD)
        if not (evaluated and evaluated.get("evaluation") == self.digest
                and evaluated.get("identity") == identity["identity"]):
            self.progress(f"{who}: evaluating {trained['checkpoint']}")
            start = time.perf_counter()
            result = evaluate_run(self.plan, trained["checkpoint"], run.output_dir, self.cache, self.progress)
            _write_record(run.output_dir / EVAL_RECORD, {"evaluation": self.digest, **identity,
                                                         "seconds": round(time.perf_counter() - start, 1), **result})
            did.append("evaluated")
        return {"state": " and ".join(did) if did else "done earlier", "checkpoint": trained["checkpoint"],
                "step": trained["step"]}

    # ------------------------------------------------------------------------------------
    def _records(self) -> dict[str, dict[str, Any]]:
        """The evaluation records of the runs that have one for the current config and plan."""
        out = {}
        for run in self.runs:
            trained = _read_record(run.output_dir / TRAIN_RECORD)
            evaluated = _read_record(run.output_dir / EVAL_RECORD)
            if trained and evaluated and trained.get("config") == self.configs[run.name].to_dict() \
                    and evaluated.get("evaluation") == self.digest:
                out[run.name] = evaluated
        return out

    def _fused_rows(self, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The linear probe on the concatenated features of each ``fuse`` pair (see study_eval)."""
        from .study_eval import eval_device, fused_features

        rows = []
        by_labels = {tuple(sorted(r.labels().items())): r for r in self.runs}
        for rule in self.plan["fuse"]:
            factor, (a, b) = rule["factor"], rule["values"]
            for first in (r for r in self.runs if r.labels()[factor] == a):
                second = by_labels[tuple(sorted({**first.labels(), factor: b}.items()))]
                if first.name not in records or second.name not in records:
                    continue
                pair = [records[first.name], records[second.name]]
                name = f"{first.name}+{second.name}"
                key = hashlib.sha256(json.dumps([self.digest, *(p["identity"] for p in pair)]).encode()).hexdigest()
                path = self.out / FUSED_DIR / f"{name}.json"
                done = _read_record(path)
                if not (done and done.get("key") == key):
                    self.progress(f"fused {name}: linear probe on the concatenated features")
                    new = []
                    for dataset in self.plan["linear_probe"]["datasets"]:
                        bench, _, _ = open_dataset(self.plan, dataset, ("train", "test"), None)
                        train = fused_features(self.plan, pair, dataset, "train", self.cache)
                        test = fused_features(self.plan, pair, dataset, "test", self.cache)
                        new += probe_rows(self.plan, dataset, bench, train, test, eval_device(self.plan))
                    done = {"key": key, "runs": [first.name, second.name], "rows": new}
                    _write_record(path, done)
                labels = {**first.labels(), factor: f"{a}+{b}"}
                rows += [{"run": name, **labels, **row} for row in done["rows"]]
        return rows

    def report(self, plots: bool = True) -> dict[str, Any]:
        """Collect every evaluated run's rows (and the fused pairs'), write the tables and plots,
        print the summary; returns ``{"rows", "summary", "compare", "missing", "outputs"}``."""
        factors = [f for f in FACTORS if f in self.spec.factors]
        records = self._records()
        missing = [r.name for r in self.runs if r.name not in records]
        rows = [{"run": run.name, **run.labels(), **row} for run in self.runs if run.name in records
                for row in records[run.name]["rows"]]
        rows += self._fused_rows(records)
        if not rows:
            raise UserError(f"{self.out}: no run of the study has been evaluated yet; run `slip study {self.spec.path}`")
        summary = summarize(rows, factors)
        comparison = compare(rows, factors, **self.spec.compare) if self.spec.compare else []
        meta = {"format": STUDY_FORMAT, "name": self.spec.name, "spec": str(self.spec.path), "missing_runs": missing}
        outputs = write_results(self.out, rows, summary, comparison, factors, meta)
        if plots and self.spec.plots:
            orders = {f: [v.label for v in vals] for f, vals in self.spec.factors.items()}
            outputs += write_plots(self.out, summary, factors, orders)
        self.outputs = [str(p) for p in outputs]
        self._manifest("reported" if not missing else f"reported ({len(missing)} runs not done)")
        return {"rows": rows, "summary": summary, "compare": comparison, "missing": missing, "outputs": outputs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slip study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", type=Path, help="the study's YAML spec (see slip.analysis.study_spec)")
    p.add_argument("--out", type=Path, help="output folder (default: the spec's output_dir, else runs/studies/NAME)")
    p.add_argument("--dry-run", action="store_true", help="check the spec and every run's config, list the runs; "
                                                          "train nothing")
    p.add_argument("--report", action="store_true", help="train and evaluate nothing: the table and plots of the runs "
                                                         "already evaluated")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    return p


@command("study")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = load_spec(args.spec, args.out)
    study = Study(spec)
    if args.dry_run:
        print(study.describe())
        return 0
    if spec.plots and not args.no_plots:
        pyplot()  # fail before the work, not after it
    if not args.report:
        study.run()
    result = study.report(plots=not args.no_plots)
    factors = [f for f in FACTORS if f in spec.factors]
    print(f"\n{spec.name}: mean ± sample std over seeds (n seeds)")
    print(format_summary(result["summary"], factors))
    if result["compare"]:
        print(f"\npaired differences against {spec.compare['factor']} = {spec.compare['baseline']} (same seed and "
              "other factors)")
        print(format_comparison(result["compare"], factors))
    if result["missing"]:
        print(f"\nnot done yet ({len(result['missing'])}): {', '.join(result['missing'])}")
    print("\nwrote " + ", ".join(str(p) for p in result["outputs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
