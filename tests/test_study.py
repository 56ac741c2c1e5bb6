"""``slip study``: nested subsets are nested and stable by key, degradations do what they say
(measured) and touch the pre-training images only, a study resumes without rerunning finished
runs, writes its table and plots, and names the key of every spec mistake."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import slip.analysis.study as study_module
import slip.data.degrade as degrade_module
from slip.analysis.study import Study, main
from slip.analysis.study_eval import Relabelled, load_hierarchy
from slip.analysis.study_report import compare, summarize, write_plots
from slip.analysis.study_spec import load_spec
from slip.data.degrade import (
    DegradeError,
    DegradeImages,
    KeepSubset,
    degrade_image_bytes,
    in_subset,
    parse_degradations,
    subset_position,
)
from slip.data.pipeline import PipelineConfig, build_dataset, build_loader
from slip.data.stages import DecodeSamples, SampleShuffle
from slip.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


# --------------------------------------------------------------------------------------------
# Nested subsets
# --------------------------------------------------------------------------------------------
def test_subset_position_is_the_first_8_bytes_of_sha1_and_the_same_in_another_process():
    keys = ["00000000", "test000017", "a-key_with-dashes", "ünïcode"]
    expected = [int.from_bytes(hashlib.sha1(k.encode("utf-8")).digest()[:8], "big") / 2 ** 64 for k in keys]
    assert [subset_position(k) for k in keys] == expected
    code = ("import json, sys; from slip.data.degrade import subset_position; "
            f"print(json.dumps([subset_position(k) for k in {keys!r}]))")
    # Python's own str hashing is randomised per process (this one's seed is another); ours must not be.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "1"})
    assert json.loads(out.stdout) == expected


def test_subsets_are_nested_and_of_the_stated_size():
    keys = [f"{i:08d}" for i in range(20000)]
    subsets = {f: {k for k in keys if in_subset(k, f)} for f in (0.05, 0.25, 0.5, 1.0)}
    assert subsets[0.05] <= subsets[0.25] <= subsets[0.5] <= subsets[1.0] == set(keys)
    for f in (0.05, 0.25, 0.5):
        sigma = (len(keys) * f * (1 - f)) ** 0.5
        assert abs(len(subsets[f]) - f * len(keys)) < 4 * sigma, f


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from slip.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("corpus")
    generate_synthetic(out, seed=0, train_samples=96, test_per_class=1, image_size=32, samples_per_shard=32)
    return out / "train"


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_the_subset_stage_keeps_the_same_keys_whatever_the_seed_and_skips_nothing(shards):
    everything = _keys(build_loader(shards, PipelineConfig(method="clip", size=32, batch_size=8, workers=0)))
    wanted = sorted(k for k in everything if in_subset(k, 0.3))
    assert 0 < len(wanted) < len(everything)
    for seed in (0, 1):
        loader = build_loader(shards, PipelineConfig(method="clip", size=32, batch_size=8, workers=0, seed=seed,
                                                     subset=0.3))
        assert sorted(_keys(loader)) == wanted
        assert loader.skipped() == {}  # samples outside the subset are not bad data


def test_the_subset_is_dropped_before_the_shuffle_buffer_and_degradation_comes_after_it(shards):
    stages = build_dataset(shards, PipelineConfig(method="clip", size=32, workers=0, subset=0.5,
                                                  degrade="jpeg:10")).pipeline
    kinds = [type(s) for s in stages]
    assert kinds.index(KeepSubset) < kinds.index(SampleShuffle) < kinds.index(DegradeImages) \
        < kinds.index(DecodeSamples)
    plain = [type(s) for s in build_dataset(shards, PipelineConfig(method="clip", size=32, workers=0)).pipeline]
    assert KeepSubset not in plain and DegradeImages not in plain


def test_an_epoch_counted_from_the_index_shrinks_with_the_subset(shards):
    from slip.data.specs import parse_shard_spec
    from slip.train.config import load_config
    from slip.train.trainer import _samples_per_epoch

    sources = parse_shard_spec(shards)
    base = [f"data.train={shards}", "model.name=clip_vit_tiny", "objective.ssl=none"]
    assert _samples_per_epoch(load_config(None, base), sources) == 96
    assert _samples_per_epoch(load_config(None, [*base, "data.subset=0.25"]), sources) == 24
    assert _samples_per_epoch(load_config(None, [*base, "data.subset=0.25", "data.samples_per_epoch=50"]),
                              sources) == 50  # a stated epoch length is kept


# --------------------------------------------------------------------------------------------
# Degradations
# --------------------------------------------------------------------------------------------
def _test_image(size: int = 96) -> Image.Image:
    """A smooth gradient under seeded pixel noise: energy at low and at every high frequency."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base = 70 + 100 * (xx + yy) / (2 * size)
    noise = np.random.default_rng(0).uniform(-50, 50, (size, size, 3))
    rgb = np.stack([base, base, 255 - base], axis=-1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _high_frequency_share(pixels: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of the (mean-removed) spectral energy of the grey image above ``cutoff`` cycles/pixel."""
    grey = pixels.mean(axis=2)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(grey.shape[0]), np.fft.fftfreq(grey.shape[1]), indexing="ij")
    high = np.maximum(np.abs(fy), np.abs(fx)) > cutoff
    return float(spectrum[high].sum() / spectrum.sum())


def test_jpeg_quality_10_makes_smaller_jpeg_files():
    original = _encode(_test_image(), "JPEG", quality=95)
    degraded = degrade_image_bytes(original, parse_degradations("jpeg:10"), seed=0, key="k")
    assert degraded[:2] == b"\xff\xd8" and len(degraded) < 0.5 * len(original)
    assert _pixels(degraded).shape == _pixels(original).shape


def test_downsampling_removes_the_high_frequencies_and_keeps_the_size():
    original = _encode(_test_image())
    share = _high_frequency_share(_pixels(original))
    halved = degrade_image_bytes(original, parse_degradations("downsample:2"), seed=0, key="k")
    quartered = degrade_image_bytes(original, parse_degradations("downsample:4"), seed=0, key="k")
    assert _pixels(halved).shape == _pixels(quartered).shape == (96, 96, 3)
    assert share > 0.2  # the test image has fine detail to lose
    assert _high_frequency_share(_pixels(halved)) < 0.1 * share
    assert _high_frequency_share(_pixels(quartered), cutoff=0.125) < 0.5 * _high_frequency_share(_pixels(halved),
                                                                                                  cutoff=0.125)


def test_salt_and_pepper_sets_about_the_stated_fraction_of_pixels_to_black_or_white_and_nothing_else():
    grey = Image.new("RGB", (128, 128), (128, 100, 90))
    degraded = _pixels(degrade_image_bytes(_encode(grey), parse_degradations("saltpepper:0.05"), seed=3, key="k"))
    black = (degraded == 0).all(axis=2)
    white = (degraded == 255).all(axis=2)
    untouched = (degraded == np.array([128, 100, 90])).all(axis=2)
    n = 128 * 128
    assert (black | white | untouched).all()  # lossless: no other pixel changed
    assert abs((black | white).sum() / n - 0.05) < 4 * (0.05 * 0.95 / n) ** 0.5
    assert 0.35 < black.sum() / (black | white).sum() < 0.65  # salt and pepper in equal measure


def test_degradations_are_deterministic_per_key_and_seed():
    data = _encode(_test_image(64))
    steps = parse_degradations("downsample:2+saltpepper:0.1")
    first = degrade_image_bytes(data, steps, seed=0, key="00000001")
    assert degrade_image_bytes(data, steps, seed=0, key="00000001") == first
    assert degrade_image_bytes(data, steps, seed=0, key="00000002") != first
    assert degrade_image_bytes(data, steps, seed=1, key="00000001") != first
    sample = {"__key__": "00000001", "jpg": data, "txt": b"a caption"}
    out = DegradeImages("downsample:2+saltpepper:0.1", seed=0).degrade(sample)
    assert out["jpg"] == first and out["txt"] == b"a caption" and sample["jpg"] == data
    broken = {"__key__": "x", "jpg": b"not an image"}
    assert DegradeImages("jpeg:10", seed=0).degrade(broken) == broken  # left for the decoder to skip and count


@pytest.mark.parametrize("text,message", [
    ("blur:3", "unknown degradation 'blur:3'"), ("jpeg", "needs a number"), ("jpeg:0", "quality"),
    ("downsample:1.5", "whole number >= 2"), ("saltpepper:2", r"\(0, 1\]"), ("jpeg:10+", "unknown degradation ''"),
])
def test_bad_degradations_name_the_key(text, message):
    with pytest.raises(DegradeError, match=rf"^data\.degrade: .*{message}"):
        parse_degradations(text)
    assert parse_degradations("none") == parse_degradations(None) == ()


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    rows = []
    for method, base in (("clip", 20.0), ("slip", 22.0)):
        for seed, noise in ((0, 0.0), (1, 1.0), (2, -2.0)):
            rows.append({"run": f"{method}-{seed}", "method": method, "train.seed": seed, "eval": "linear_probe",
                         "dataset": "d", "level": "fine", "shots": "all", "metric": "top1",
                         "value": base + noise + (seed == 2 and method == "slip") * 3.0})
    return rows


def test_summary_and_paired_comparison_over_seeds():
    summary = {s["method"]: s for s in summarize(_rows(), ["method", "train.seed"])}
    assert summary["clip"]["mean"] == pytest.approx(19.666667) and summary["clip"]["n"] == 3
    assert summary["clip"]["std"] == pytest.approx(np.std([20, 21, 18], ddof=1))
    (diff,) = compare(_rows(), ["method", "train.seed"], "method", "clip")
    assert diff["differences"] == [2.0, 2.0, 5.0] and diff["higher"] == 3 and diff["n"] == 3
    assert diff["mean_difference"] == pytest.approx(3.0) and diff["std"] == pytest.approx(np.std([2, 2, 5], ddof=1))
    assert diff["t"] == pytest.approx(3.0 / (np.std([2, 2, 5], ddof=1) / 3 ** 0.5))


def test_the_domain_heat_map_is_drawn_when_domain_and_evaluation_dataset_vary(tmp_path):
    summary = [{"method": "slip", "data.train": domain, "eval": "linear_probe", "dataset": dataset, "level": "fine",
                "shots": "all", "metric": "top1", "mean": value, "std": None}
               for domain, dataset, value in (("a", "x", 50.0), ("a", "y", 20.0), ("b", "x", 30.0), ("b", "y", 40.0),
                                              ("a+b", "x", 52.0), ("a+b", "y", 41.0))]
    (path,) = write_plots(tmp_path, summary, ["method", "data.train"], {"data.train": ["a", "b"]})
    assert path.name == "domain.png"
    with Image.open(path) as im:
        assert im.size[0] > 200 and np.asarray(im.convert("L")).std() > 10


def test_a_label_hierarchy_must_map_every_class(tmp_path):
    from zero_shot import Benchmark

    bench = Benchmark(key="b", name="b", classnames=("red circle", "blue circle", "red star"), templates=("{}.",),
                      metric="top1")
    (tmp_path / "ok.json").write_text(json.dumps({"red circle": "circle", "blue circle": "circle", "red star": "star"}))
    coarse, mapping = load_hierarchy(tmp_path / "ok.json", bench)
    assert coarse == ("circle", "star") and mapping.tolist() == [0, 0, 1]
    relabelled = Relabelled([("img", 2), None], mapping)
    assert relabelled[0] == ("img", 1) and relabelled[1] is None and len(relabelled) == 2
    (tmp_path / "short.json").write_text(json.dumps({"red circle": "circle"}))
    with pytest.raises(UserError, match=r"short\.json: must map every class of b .*missing \['blue circle'"):
        load_hierarchy(tmp_path / "short.json", bench)


# --------------------------------------------------------------------------------------------
# A whole study
# --------------------------------------------------------------------------------------------
def _spec(tmp_path: Path, out: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "output_dir": str(out),
        "synthetic": {"train_samples": 96, "test_per_class": 2, "probe_train_per_class": 3, "image_size": 32,
                      "samples_per_shard": 48},
        "recipe": str(TINY / "clip.yaml"),
        "factors": {"data.subset": [0.5, 1.0], "data.degrade": ["none", "saltpepper:0.3"]},
        "config": {"data.train": "${study}/data/train/", "data.workers": 0, "data.shuffle_buffer": 16,
                   "train": {"batch_size": 16, "epochs": 1, "save_every": 2, "keep_last": 2, "log_every": 100}},
        "evaluate": {"catalog": "${study}/data/catalog.json", "workers": 0, "batch_size": 64,
                     "zero_shot": ["shapes"],
                     "linear_probe": {"datasets": ["shapes"], "max_iter": 30, "shots": ["all", 2], "shot_seeds": 1},
                     "levels": {"shapes": {"shape": "${study}/data/shapes/hierarchy_shape.json"}},
                     "fuse": [{"factor": "data.degrade", "values": ["none", "saltpepper:0.3"]}],
                     "finetune": {"datasets": ["shapes"], "epochs": 1, "warmup_epochs": 0, "batch_size": 30,
                                  "workers": 0, "eval_every": 0, "device": "cpu"}},
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_a_study_trains_evaluates_resumes_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "study"
    calls: list[str] = []
    real_train = study_module.train_run
    monkeypatch.setattr(study_module, "train_run", lambda cfg, log: calls.append(cfg.train.output_dir)
                        or real_train(cfg, log))
    degraded_keys: list[str] = []
    real_degrade = degrade_module.degrade_image_bytes

    def spy(data, steps, seed, key, *args):
        degraded_keys.append(key)
        return real_degrade(data, steps, seed, key, *args)

    monkeypatch.setattr(degrade_module, "degrade_image_bytes", spy)
    study = Study(load_spec(_spec(tmp_path, out)), progress=lambda line: None)
    study.run()
    report = study.report()
    assert len(calls) == 4 and {Path(c).name for c in calls} == {r.name for r in study.runs}

    # Only the pre-training images are degraded: every degraded key is one of the training
    # corpus's (00000012 ...), never one of the evaluation images (test000012 ...).
    assert degraded_keys and all(k.isdigit() for k in degraded_keys)
    rows = report["rows"]
    assert {r["data.degrade"] for r in rows} == {"none", "saltpepper:0.3", "none+saltpepper:0.3"}
    assert {(r["eval"], r["level"], r["shots"]) for r in rows if r["data.degrade"] == "none"} == {
        ("zero_shot", "fine", ""), ("zero_shot", "shape", ""), ("linear_probe", "fine", "all"),
        ("linear_probe", "fine", "2"), ("linear_probe", "shape", "all"), ("linear_probe", "shape", "2"),
        ("finetune", "fine", "all")}
    assert {(r["eval"], r["level"]) for r in rows if r["data.degrade"] == "none+saltpepper:0.3"} == {
        ("linear_probe", "fine"), ("linear_probe", "shape")}  # fused representations: the probe only
    probe = [r for r in rows if r["eval"] == "linear_probe" and r["shots"] == "all" and r["level"] == "fine"]
    assert all(r["n_train"] == 90 and r["n_test"] == 60 and r["classes"] == 30 for r in probe)  # 3 and 2 per class
    assert all((out / "runs" / r.name / "finetune-shapes" / "finetuned.pt").is_file() for r in study.runs)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "data.subset", "data.degrade"] and "value" in header
    assert json.loads((out / "study.json").read_text())["state"] == "reported"
    for name in ("quantity.png", "degrade.png", "granularity.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 200 and np.asarray(im.convert("L")).std() > 10, name

    # Rerun: nothing is trained or evaluated again.
    evaluations = [(out / "runs" / r.name / "study_eval.json").stat().st_mtime_ns for r in study.runs]
    Study(load_spec(_spec(tmp_path, out)), progress=lambda line: None).run()
    assert len(calls) == 4
    assert [(out / "runs" / r.name / "study_eval.json").stat().st_mtime_ns for r in study.runs] == evaluations

    # A missing evaluation is redone without training; an interrupted run resumes from its last checkpoint.
    first, second = (out / "runs" / r.name for r in study.runs[:2])
    (first / "study_eval.json").unlink()
    (second / "study_train.json").unlink()
    final = max((second / "checkpoints").glob("step-*.pt"))
    final.unlink()
    Study(load_spec(_spec(tmp_path, out)), progress=lambda line: None).run()
    assert len(calls) == 5 and Path(calls[-1]).name == second.name
    assert (first / "study_eval.json").is_file() and final.is_file()
    assert "resumed from" in (second / "train.log").read_text()


@pytest.mark.parametrize("changes,message", [
    ({"factors": {"model.name": ["a"]}}, r"factors\.model\.name: unknown factor; the factors are method, "),
    ({"factors": {"data.subset": [0.5, 1.5]}}, r"factors\.data\.subset\[1\]: 1\.5 is not a fraction in \(0, 1\]"),
    ({"factors": {"data.degrade": ["jpeg:10", "blur:2"]}}, r"factors\.data\.degrade\[1\]: unknown degradation"),
    ({"factors": {"train.seed": [0, 0]}}, r"factors\.train\.seed: value\(s\) \['0'\] listed twice"),
    ({"factors": {"method": {"clip": "missing.yaml"}}}, r"factors\.method\.clip: recipe .*missing\.yaml not found"),
    ({"epochs": 3}, r"unknown key 'epochs'; a study spec holds"),
    ({"config": {"data.subset": 0.5}}, r"config\.data\.subset: data\.subset is a factor of this study"),
    ({"config": {"train.epoch": 2}}, r"run subset-0\.5_degrade-none: .*unknown key train\.epoch"),
    ({"evaluate": {"zero_shot": ["shapes"], "probe": ["shapes"]}}, r"evaluate\.probe: unknown setting"),
    ({"evaluate": {"linear_probe": {"datasets": ["x"], "shots": [0]}}}, r"evaluate\.linear_probe\.shots: "),
    ({"compare": {"factor": "method", "baseline": "clip"}}, r"compare\.factor: 'method' is not a factor"),
])
def test_spec_mistakes_name_the_key(tmp_path, changes, message):
    path = _spec(tmp_path, tmp_path / "out", **changes)
    with pytest.raises(UserError, match=message):
        Study(load_spec(path))


def test_the_command_reports_a_spec_mistake_in_one_line(tmp_path, capsys):
    path = _spec(tmp_path, tmp_path / "out", factors={"data.quality": ["jpeg:10"]})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slip study: error: ") and "factors.data.quality: unknown factor" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,runs", [
    ("synthetic_slip_vs_clip", 16), ("cole2022_imagenet_subsets", 5), ("yfcc15m_clip_vs_slip", 8),
])
def test_the_shipped_specs_parse_and_expand(name, runs, capsys):
    path = ROOT / "configs" / "studies" / f"{name}.yaml"
    study = Study(load_spec(path))
    assert len(study.runs) == runs and len({r.name for r in study.runs}) == runs
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"study {name}: {runs} runs" in out and out.count("\n       slip train ") == runs


@pytest.mark.parametrize(("override", "message"), [("data.subset=1.5", r"^data\.subset: 1\.5 is not a fraction"),
                                                   ("data.degrade=blur:2", r"^data\.degrade: .*unknown degradation")])
def test_a_training_config_with_a_bad_subset_or_degradation_fails_before_anything_is_built(override, message):
    from slip.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=x", override])
