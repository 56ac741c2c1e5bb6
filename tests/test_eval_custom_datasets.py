"""Your own datasets in every evaluation: a catalog entry whose key is not one of SLIP's
benchmarks declares (or lets slip derive) its class names, templates and metric."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

import slip
from slip.eval.datasets import build_dataset, load_benchmark_dir
from test_train import corpus  # noqa: F401  (fixture)
from zero_shot import DEFAULT_TEMPLATES, CatalogError, benchmarks_with_catalog, load_catalog

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _benchmark_images(benchmark_dir: Path) -> list[tuple[str, bytes, int]]:
    """(key, image bytes, label) of the synthetic benchmark's shards."""
    out = []
    for shard in sorted(benchmark_dir.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[:-4]
                    label = json.loads(tar.extractfile(members[key + ".json"]).read())["cls"]
                    out.append((key, tar.extractfile(members[name]).read(), int(label)))
    return out


def _catalog(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(entries))
    return path


def _zero_shot_of_entry_and_benchmark_dir(catalog: Path, benchmark_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    """``slip zero-shot`` results of a random tiny CLIP on the catalog's ``shapes`` entry and on
    the benchmark directory."""
    from slip.eval.zero_shot_cli import main

    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("clip_vit_tiny"), tmp_path / "m.pt")
    common = ["--checkpoint", str(tmp_path / "m.pt"), "--workers", "0", "--no-cache"]
    assert main([*common, "--catalog", str(catalog), "--benchmarks", "shapes", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--benchmark-dir", str(benchmark_dir), "--out", str(tmp_path / "b.json")]) == 0
    return (json.loads((tmp_path / "a.json").read_text())["results"]["shapes"],
            json.loads((tmp_path / "b.json").read_text())["results"]["synthetic"])


@pytest.fixture
def folder(corpus, tmp_path):
    """The synthetic benchmark's test images as an image folder ``c00 ... c29`` (label order)."""
    root = tmp_path / "shapes"
    for key, data, label in _benchmark_images(corpus / "benchmark"):
        (root / "test" / f"c{label:02d}").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"c{label:02d}" / f"{key}.jpg").write_bytes(data)
    return root


def test_an_image_folder_of_your_own_is_zero_shot_evaluated_like_the_same_images_in_benchmark_format(
        corpus, folder, tmp_path):
    local = load_benchmark_dir(corpus / "benchmark")
    catalog = _catalog(tmp_path, {"shapes": {"type": "imagefolder", "path": str(folder), "test": "test",
                                             "classnames": list(local.benchmark.classnames),
                                             "templates": list(local.benchmark.templates)}})
    mine, theirs = _zero_shot_of_entry_and_benchmark_dir(catalog, corpus / "benchmark", tmp_path)
    assert mine["n"] == theirs["n"] == len(_benchmark_images(corpus / "benchmark"))
    assert mine["value"] == pytest.approx(theirs["value"])


def test_class_names_come_from_folder_names_and_templates_from_the_defaults(tmp_path):
    for split in ("train", "test"):
        for cls in ("golden_retriever", "tabby_cat"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
    catalog = load_catalog(_catalog(tmp_path, {"my_pets": {"type": "imagefolder", "path": str(tmp_path / "pets"),
                                                           "train": "train", "test": "test"}}))
    bench = benchmarks_with_catalog(catalog)["my_pets"]
    assert bench.classnames == ("golden retriever", "tabby cat") and bench.templates == DEFAULT_TEMPLATES
    assert bench.metric == "top1" and bench.name == "my_pets"
    assert "imagenet" in benchmarks_with_catalog(catalog)  # SLIP's benchmarks stay


def test_clip_benchmark_webdataset_layout_gives_labels_class_names_and_templates(tmp_path):
    from PIL import Image

    root = tmp_path / "wds_cars"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("sedan\nconvertible\npickup truck\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} on the road.\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    labels = [2, 0, 1, 2]
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (60 * label, 0, 0)).save(buf, "PNG")
            for name, data in ((f"s{i}.png", buf.getvalue()), (f"s{i}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    catalog = load_catalog(_catalog(tmp_path, {"my_cars": {"type": "wds", "path": str(root), "test": "test"}}))
    bench = benchmarks_with_catalog(catalog)["my_cars"]
    assert bench.classnames == ("sedan", "convertible", "pickup truck")
    assert bench.templates == ("a photo of a {}.", "a {} on the road.")
    dataset = build_dataset("my_cars", catalog["my_cars"], "test", None, benchmark=bench)
    assert [dataset[i][1] for i in range(len(dataset))] == labels


def test_the_metadata_of_slips_benchmarks_cannot_be_overridden(tmp_path):
    with pytest.raises(CatalogError, match=r"entry 'cifar10': unknown field\(s\) \['classnames'\]"):
        load_catalog(_catalog(tmp_path, {"cifar10": {"type": "special", "path": "x", "classnames": ["a", "b"]}}))


@pytest.mark.parametrize("entry,message", [
    ({"type": "filelist", "path": "x", "test": "test"}, "needs its class names"),
    ({"type": "imagefolder", "path": "{tmp}/nowhere", "test": "test"}, "nowhere/test not found"),
    ({"type": "imagefolder", "path": "{tmp}", "test": "test", "classnames": "names.txt"}, "classnames file .*names.txt not found"),
    ({"type": "imagefolder", "path": "{tmp}", "test": "test", "classnames": ["a"], "templates": ["no slot"]},
     r"exactly one \{\}"),
    ({"type": "imagefolder", "path": "{tmp}", "test": "test", "classnames": ["a"], "metric": "f1"}, "metric 'f1'"),
    ({"type": "special", "path": "x"}, "unknown benchmark"),
])
def test_your_own_dataset_errors_name_the_entry(tmp_path, entry, message):
    entry = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in entry.items()}
    with pytest.raises(CatalogError, match=r"entry 'mine'.*" + message):
        benchmarks_with_catalog(load_catalog(_catalog(tmp_path, {"mine": entry})))


def test_a_csv_or_tsv_of_paths_and_labels_by_name_or_by_index(folder, tmp_path):
    images = sorted((folder / "test").glob("*/*.jpg"))
    labels = [int(p.parent.name[1:]) for p in images]
    names = [f"shape {i}" for i in range(30)]
    (folder / "test.csv").write_text("path,label\n" + "".join(f"{p.relative_to(folder)},{names[y]}\n"
                                                            for p, y in zip(images, labels)))
    (folder / "train.tsv").write_text("label\tpath\n" + "".join(f"{y}\t{p}\n" for p, y in zip(images, labels)))
    catalog = load_catalog(_catalog(tmp_path, {"mine": {"type": "table", "path": str(folder), "train": "train",
                                                        "test": "test", "classnames": names}}))
    bench = benchmarks_with_catalog(catalog)["mine"]
    for split in ("train", "test"):
        dataset = build_dataset("mine", catalog["mine"], split, None, benchmark=bench)
        assert [dataset[i][1] for i in range(len(dataset))] == labels and len(labels) > 0


def test_your_own_image_folder_is_linear_probed_and_knn_evaluated(folder, tmp_path, capsys):
    from slip.eval.knn_cli import main as knn_main
    from slip.eval.linear_probe_cli import main as probe_main

    # The synthetic benchmark's images as train and test splits of a dataset of one's own.
    (folder / "train").symlink_to(folder / "test", target_is_directory=True)
    catalog = _catalog(tmp_path, {"shapes": {"type": "imagefolder", "path": str(folder), "train": "train",
                                             "test": "test"}})
    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("simclr_vit_tiny"), tmp_path / "m.pt")
    common = ["--checkpoint", str(tmp_path / "m.pt"), "--catalog", str(catalog), "--benchmarks", "shapes",
              "--workers", "0"]
    assert probe_main([*common, "--no-cache", "--protocol", "sgd", "--epochs", "2", "--out", str(tmp_path / "p.json")]) == 0
    probe = json.loads((tmp_path / "p.json").read_text())["results"]["shapes"]
    assert probe["num_train"] == probe["num_test"] == 60 and probe["metric"] == "top1"
    assert knn_main([*common, "--out", str(tmp_path / "k.json")]) == 0
    (row,) = json.loads((tmp_path / "k.json").read_text())["results"]
    assert row["n_bank"] == row["n_query"] == 60 and row["classes"] == 30


def test_your_own_image_folder_is_fine_tuned(tmp_path):
    import random

    from PIL import Image

    from slip.eval.finetune import FinetuneConfig, finetune

    rng = random.Random(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
            folder = tmp_path / "mine" / split / ("red", "green")[c]
            folder.mkdir(parents=True)
            for i in range(n):
                jitter = tuple(min(255, v + rng.randrange(40)) for v in colour)
                Image.new("RGB", (40, 40), jitter).save(folder / f"{i}.png")
    catalog = _catalog(tmp_path, {"colours": {"type": "imagefolder", "path": str(tmp_path / "mine"), "train": "train",
                                              "test": "test"}})
    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("simclr_vit_tiny"), tmp_path / "m.pt")
    result = finetune(FinetuneConfig(checkpoint=str(tmp_path / "m.pt"), catalog=str(catalog), benchmark="colours",
                                     output_dir=str(tmp_path / "ft"), epochs=1, warmup_epochs=0, batch_size=8,
                                     workers=0, device="cpu", mixup=0.0, cutmix=0.0), log_stream=io.StringIO())
    assert result.benchmark == "colours" and result.n == 8
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["name"] == "colours"


def test_a_benchmark_exported_in_clip_benchmarks_layout_reads_back_with_its_labels_names_and_results(corpus, tmp_path):
    import webdataset as wds

    from slip.eval.export_benchmark import main as export_main

    out = tmp_path / "wds_shapes"
    assert export_main([str(out), "--benchmark-dir", str(corpus / "benchmark")]) == 0
    local = load_benchmark_dir(corpus / "benchmark")
    assert (out / "classnames.txt").read_text().splitlines() == list(local.benchmark.classnames)
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == [
        t.replace("{}", "{c}") for t in local.benchmark.templates]
    assert (out / "test" / "nshards.txt").read_text().strip() == "1"
    # webdataset itself reads the shards back: every image with its label, as in the source.
    samples = list(wds.WebDataset(str(out / "test" / "0.tar"), shardshuffle=False))
    expected = {key: (data, label) for key, data, label in _benchmark_images(corpus / "benchmark")}
    assert len(samples) == len(expected)
    by_image = {data: label for data, label in expected.values()}
    assert all(by_image[s["jpg"]] == int(s["cls"]) for s in samples)
    # ... and slip reads it as a dataset of one's own, with the same zero-shot result.
    catalog = _catalog(tmp_path, {"shapes": {"type": "wds", "path": str(out), "test": "test"}})
    a, b = _zero_shot_of_entry_and_benchmark_dir(catalog, corpus / "benchmark", tmp_path)
    assert a["value"] == pytest.approx(b["value"]) and a["n"] == b["n"]
    assert export_main([str(out), "--benchmark-dir", str(corpus / "benchmark")]) == 2  # never overwrites
    # The folder gets a plain mkdir's mode (not the temporary folder's private 0700).
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_zero_shot_on_an_exported_webdataset_names_it_as_clip_benchmark_does(corpus, tmp_path):
    from slip.eval.export_benchmark import main as export_main
    from slip.eval.zero_shot_cli import main

    out = tmp_path / "shapes"
    assert export_main([str(out), "--benchmark-dir", str(corpus / "benchmark")]) == 0
    catalog = _catalog(tmp_path, {"shapes": {"type": "wds", "path": str(out), "test": "test"}})
    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("clip_vit_tiny"), tmp_path / "m.pt")
    template = str(tmp_path / "cb" / "{dataset}_{pretrained}.json")
    assert main(["--checkpoint", str(tmp_path / "m.pt"), "--workers", "0", "--no-cache", "--catalog", str(catalog),
                 "--benchmarks", "shapes", "--out", str(tmp_path / "zs.json"), "--clip-benchmark-out", template]) == 0
    record = json.loads((tmp_path / "cb" / "wds_shapes_m.json").read_text())
    assert record["dataset"] == "wds/shapes"  # clip_benchmark's --dataset for this folder
