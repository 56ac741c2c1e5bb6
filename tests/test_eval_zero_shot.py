"""Zero-shot classification: classifier averaging, caching, known accuracies, the CLI, and
exactness under torch.distributed."""
from __future__ import annotations

import csv
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from slip import create_model, get_tokenizer, load_pretrained, save_checkpoint
from slip.eval.datasets import build_dataset
from slip.eval.metrics import voc_11pt_map
from slip.eval.zero_shot import build_classifier, compute_benchmark_metric, zero_shot_eval
from slip.eval.zero_shot_cli import main
from slip.transforms import eval_transform
from zero_shot import Benchmark, load_benchmarks

COLOUR_VECTORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
TOY = Benchmark(key="toy", name="Toy colours", classnames=("red", "green", "blue"),
                templates=("a photo of a {}.", "a {} thing."), metric="top1")


class PromptTokenizer:
    """Stands in for the BPE tokenizer: one id per distinct prompt, so the fake text tower can
    look the prompt up again."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = []
        for t in texts:
            if t not in self.prompts:
                self.prompts.append(t)
            ids.append(self.prompts.index(t))
        return torch.tensor(ids)[:, None]


class FakeModel(nn.Module):
    """A model whose embeddings are known: an image embeds as its mean RGB colour; a prompt as
    the vector ``text_vectors`` gives it (by default the colour word it contains)."""

    has_text = True

    def __init__(self, tokenizer: PromptTokenizer, text_vectors: dict[str, tuple[float, ...]] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_vectors = text_vectors
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.text_calls = 0
        self.encoded_prompts = 0

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = x.mean(dim=(2, 3))
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def _vector(self, prompt: str) -> tuple[float, ...]:
        if self.text_vectors is not None:
            return self.text_vectors[prompt]
        return next(v for word, v in COLOUR_VECTORS.items() if word in prompt)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.text_calls += 1
        self.encoded_prompts += len(tokens)
        z = torch.tensor([self._vector(self.tokenizer.prompts[int(i)]) for i in tokens[:, 0]])
        return nn.functional.normalize(z, dim=-1) if normalize else z


def _write_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# --- the classifier ------------------------------------------------------------------------------


def test_classifier_normalises_prompts_then_averages_then_normalises():
    vectors = {
        "a cat": (3.0, 4.0, 0.0), "the cat": (0.0, 0.0, 2.0),
        "a dog": (1.0, 0.0, 0.0), "the dog": (0.0, 1.0, 0.0),
        "a puppy": (0.0, 0.0, 5.0), "the puppy": (0.0, -1.0, 0.0),
    }
    tok = PromptTokenizer()
    model = FakeModel(tok, vectors)
    # By hand: cat = normalise((0.6, 0.8, 0) + (0, 0, 1)); dog's 4 prompts (with its synonym)
    # = normalise((1,0,0) + (0,1,0) + (0,0,1) + (0,-1,0)) = (1, 0, 1) / sqrt(2).
    s = 0.5 ** 0.5
    expected = torch.tensor([[0.3 / s, 0.4 / s, 0.5 / s], [s, 0.0, s]]).T
    for batch_size in (1, 4, 100):
        got = build_classifier(model, tok, ["cat", ("dog", "puppy")], ["a {}", "the {}"], batch_size=batch_size)
        assert got.shape == (3, 2)
        assert torch.allclose(got, expected, atol=1e-6), batch_size
    assert model.text_calls == 6 + 2 + 1  # ceil(6/1) + ceil(6/4) + 1 batches


def test_classifier_cache_skips_the_text_tower(tmp_path, caplog):
    tok = PromptTokenizer()
    model = FakeModel(tok)
    kwargs = dict(cache_dir=tmp_path, model_id="ckpt-a", benchmark_key="toy")
    first = build_classifier(model, tok, TOY.classnames, TOY.templates, **kwargs)
    assert model.encoded_prompts == 6
    second = build_classifier(model, tok, TOY.classnames, TOY.templates, **kwargs)
    assert model.encoded_prompts == 6 and torch.equal(first, second)
    # Another template set or another checkpoint is another cache entry.
    build_classifier(model, tok, TOY.classnames, TOY.templates[:1], **kwargs)
    assert model.encoded_prompts == 9
    build_classifier(model, tok, TOY.classnames, TOY.templates, **{**kwargs, "model_id": "ckpt-b"})
    assert model.encoded_prompts == 15
    # No model identity (weights changing during training): never cached.
    build_classifier(model, tok, TOY.classnames, TOY.templates, cache_dir=tmp_path)
    build_classifier(model, tok, TOY.classnames, TOY.templates, cache_dir=tmp_path)
    assert model.encoded_prompts == 27
    files = sorted(tmp_path.glob("toy-*.pt"))
    assert len(files) == 3 and not list(tmp_path.glob(".*.tmp"))
    for f in files:
        f.write_bytes(b"corrupt")
    with caplog.at_level("WARNING"):
        again = build_classifier(model, tok, TOY.classnames, TOY.templates, **kwargs)
    assert torch.equal(again, first) and "ignoring unreadable" in caplog.text
    assert model.encoded_prompts == 33


# --- evaluation with a known answer --------------------------------------------------------------


def _toy_folder(root: Path, with_bad: bool = False) -> dict:
    # red: 4 images, one of them green; green: 3 correct; blue: 2 images, one of them red.
    layout = {"0_red": ["red", "red", "red", "green"], "1_green": ["green"] * 3, "2_blue": ["blue", "red"]}
    for folder, colours in layout.items():
        for i, colour in enumerate(colours):
            _write_png(root / "test" / folder / f"{i}.png", RGB[colour])
    if with_bad:
        (root / "test" / "1_green" / "9.png").write_bytes(b"not a png")
    return {"path": str(root), "type": "imagefolder", "test": "test"}


def test_zero_shot_accuracy_is_exactly_the_designed_one(tmp_path):
    tok = PromptTokenizer()
    model = FakeModel(tok).train()
    entry = _toy_folder(tmp_path, with_bad=True)
    dataset = build_dataset("toy", entry, "test", TF.to_tensor, benchmark=TOY)
    result = zero_shot_eval(model, tok, TOY, dataset, batch_size=4, return_outputs=True,
                            groups={"warm": (0,), "cold": (2,)})
    assert model.training  # the caller's mode is restored
    assert result["benchmark"] == "toy" and result["metric"] == "top1"
    assert (result["n"], result["skipped"]) == (9, 1)
    assert result["value"] == pytest.approx(100 * 7 / 9)
    assert result["groups"]["warm"] == {"value": 75.0, "n": 4}
    assert result["groups"]["cold"] == {"value": 50.0, "n": 2}
    # Cosine similarity of pure colours with pure colour prompts: the identity pattern.
    assert torch.equal(result["labels"], torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2]))
    assert torch.allclose(result["logits"][3], torch.tensor([0.0, 1.0, 0.0]))
    recall = compute_benchmark_metric("mean_per_class_recall", result["logits"], result["labels"])
    assert recall == pytest.approx(100 * (0.75 + 1.0 + 0.5) / 3)


def test_voc_difficult_images_are_left_out_of_their_class_ap():
    scores = torch.tensor([[0.9, 0.5], [0.1, 0.4], [0.95, 0.1], [0.2, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [-1, 0], [0, 0]])
    # Class 0 without the difficult image ranks its positive first: AP 100. Class 1's positive
    # comes third: precision 1/3 at every recall level.
    assert compute_benchmark_metric("voc_11pt_map", scores, targets) == pytest.approx((100 + 100 / 3) / 2)
    plain = targets.clamp(min=0)
    assert compute_benchmark_metric("voc_11pt_map", scores, plain) == pytest.approx(voc_11pt_map(scores, plain))


# --- the command, on a real (tiny, untrained) model ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    clip = create_model("clip_vit_tiny")
    save_checkpoint(clip, root / "clip.pt")
    save_checkpoint(create_model("simclr_vit_tiny"), root / "simclr.pt")
    return clip, root


def _catalog(tmp_path: Path) -> Path:
    hm = tmp_path / "hm"
    generator = torch.Generator().manual_seed(1)
    for label in ("0", "1"):
        for i in range(4):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator))
            _write_png(hm / "dev" / label / f"{i}.png", colour)
    coco = tmp_path / "coco"
    _write_png(coco / "val2014" / "a.jpg", RGB["red"])
    _write_png(coco / "val2014" / "b.jpg", RGB["blue"])
    annotations = {"images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "test",
         "sentences": [{"raw": "a red square."}, {"raw": "red."}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "test",
         "sentences": [{"raw": "a blue square."}, {"raw": "blue."}]},
    ]}
    (coco / "dataset_coco.json").write_text(json.dumps(annotations))
    catalog = {
        "hateful_memes": {"path": str(hm), "type": "imagefolder", "train": "train", "test": "dev"},
        "flowers": {"path": str(tmp_path / "nowhere"), "type": "imagefolder", "test": "test"},
        "coco": {"path": str(coco), "type": "retrieval", "annotations": str(coco / "dataset_coco.json"),
                 "test": "test"},
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    return path


def test_cli_end_to_end_matches_training_time_validation(tmp_path, tiny_checkpoints, capsys):
    clip, root = tiny_checkpoints
    catalog = _catalog(tmp_path)
    out = tmp_path / "res" / "results.json"
    argv = ["--checkpoint", str(root / "clip.pt"), "--catalog", str(catalog), "--out", str(out),
            "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Hateful Memes" in printed and "roc_auc" in printed and "flowers" in printed

    report = json.loads(out.read_text())
    assert list(report["results"]) == ["hateful_memes", "coco"]
    assert "not found" in report["missing"]["flowers"] and "nowhere" in report["missing"]["flowers"]
    hm = report["results"]["hateful_memes"]
    assert (hm["metric"], hm["n"], hm["skipped"]) == ("roc_auc", 8, 0)
    assert set(report["results"]["coco"]["recalls"]) >= {"image_to_text_R@1", "text_to_image_R@10"}
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["benchmark"] == "hateful_memes" and float(rows[0]["value"]) == hm["value"]
    assert len(rows) == 1 + 7  # one classification row, six recalls and their mean
    assert len(list((tmp_path / "cache").glob("hateful_memes-*.pt"))) == 1

    # The trainer's call on the in-memory model (in train mode) gives the very same number.
    entry = json.loads(catalog.read_text())["hateful_memes"]
    dataset = build_dataset("hateful_memes", entry, "test", eval_transform(clip.arch.vision.image_size))
    clip.train()
    tokenizer = get_tokenizer()
    live = zero_shot_eval(clip, tokenizer, load_benchmarks()["hateful_memes"], dataset, return_outputs=True)
    assert live["value"] == hm["value"] and live["n"] == hm["n"]
    loaded, _ = load_pretrained(root / "clip.pt")
    again = zero_shot_eval(loaded, tokenizer, load_benchmarks()["hateful_memes"], dataset, return_outputs=True)
    assert torch.equal(again["logits"], live["logits"])

    # Named benchmarks: those without a catalog entry are listed, not fatal.
    assert main(["--checkpoint", str(root / "clip.pt"), "--catalog", str(catalog), "--benchmarks",
                 "hateful_memes,pets", "--no-cache", "--workers", "0", "--device", "cpu"]) == 0
    assert "pets: no entry in the catalog" in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, tiny_checkpoints, capsys):
    _, root = tiny_checkpoints
    catalog = _catalog(tmp_path)
    base = ["--catalog", str(catalog), "--workers", "0", "--device", "cpu", "--no-cache"]
    assert main(["--checkpoint", str(root / "clip.pt"), "--benchmarks", "imagenet,food-101", *base]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) ['food-101']" in err and "food101" in err and "coco" in err
    assert main(["--checkpoint", str(root / "simclr.pt"), *base]) == 2
    assert "no text tower" in capsys.readouterr().err
    assert main(["--checkpoint", str(root / "clip.pt"), "--benchmarks", "flowers", *base]) == 1
    assert "no benchmark could be evaluated" in capsys.readouterr().err


# --- torch.distributed: 2 gloo processes == 1 process --------------------------------------------

WORLD = 2
DIST_COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 10), None, (10, 130, 140), (90, 20, 160)]
DIST_LABELS = [0, 1, 2, 0, 1, 2, 2]


class ColourList(Dataset):
    """Seven in-memory images, one of them unreadable (None), as an odd-sized test set."""

    def __len__(self) -> int:
        return len(DIST_COLOURS)

    def __getitem__(self, i: int):
        if DIST_COLOURS[i] is None:
            return None
        image = torch.tensor(DIST_COLOURS[i], dtype=torch.float32)[:, None, None].expand(3, 4, 4) / 255
        return image, DIST_LABELS[i]


def _dist_eval(distributed: bool | None = None) -> dict:
    tok = PromptTokenizer()
    bench = Benchmark(key="toy", name="Toy", classnames=("red", "green", "blue"),
                      templates=("a {}.",), metric="mean_per_class_recall")
    return zero_shot_eval(FakeModel(tok), tok, bench, ColourList(), batch_size=2, return_outputs=True,
                          distributed=distributed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    # Forked from the test process: one intra-op thread, since an OpenMP pool does not survive fork.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        # Split over the ranks (the default under a process group), and on each rank alone.
        results = {"split": _dist_eval(), "alone": _dist_eval(distributed=False)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_is_exact(tmp_path):
    # fork rather than spawn: the workers need nothing but what this process has imported, and
    # re-importing torch in two fresh interpreters would dominate the test's time.
    ctx = mp.get_context("fork")
    port = _free_port()
    workers = [ctx.Process(target=_dist_worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for w in workers:
        if w.is_alive():  # hung: do not leave it behind
            w.kill()
            w.join()
    assert [w.exitcode for w in workers] == [0] * WORLD
    single = _dist_eval()
    assert (single["n"], single["skipped"]) == (6, 1)
    for rank in range(WORLD):
        for mode, got in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert (got["value"], got["n"], got["skipped"]) == (single["value"], single["n"], single["skipped"]), mode
            assert torch.equal(got["logits"], single["logits"]) and torch.equal(got["labels"], single["labels"]), mode
    assert single["labels"].tolist() == [0, 1, 2, 0, 2, 2]  # dataset order, bad image dropped


def test_results_are_also_written_in_clip_benchmarks_layout(tmp_path):
    import slip
    from slip.data.synthetic import generate_synthetic
    from slip.eval.zero_shot_cli import main

    generate_synthetic(tmp_path / "corpus", seed=0, train_samples=8, test_per_class=2, image_size=32,
                       samples_per_shard=8)
    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("clip_vit_tiny"), tmp_path / "run7.pt")
    template = str(tmp_path / "cb" / "{dataset}_{pretrained}_{model}_{language}_{task}.json")
    assert main(["--checkpoint", str(tmp_path / "run7.pt"), "--benchmark-dir", str(tmp_path / "corpus" / "benchmark"),
                 "--workers", "0", "--no-cache", "--out", str(tmp_path / "zs.json"),
                 "--clip-benchmark-out", template]) == 0
    record = json.loads((tmp_path / "cb" / "wds_synthetic_run7_clip_vit_tiny_en_zeroshot_classification.json").read_text())
    assert {k: record[k] for k in ("dataset", "model", "pretrained", "task", "language")} == {
        "dataset": "wds/synthetic", "model": "clip_vit_tiny", "pretrained": "run7", "task": "zeroshot_classification",
        "language": "en"}
    ours = json.loads((tmp_path / "zs.json").read_text())["results"]["synthetic"]
    assert record["metrics"]["acc1"] == pytest.approx(ours["value"] / 100)
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0 <= record["metrics"]["acc1"] <= record["metrics"]["acc5"] <= 1
    assert "logits" not in ours


def test_clip_benchmark_records_equal_clip_benchmarks_own_arithmetic():
    from sklearn.metrics import balanced_accuracy_score

    from slip.eval.zero_shot_cli import clip_benchmark_record

    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([250, 200, 90, 40, 20, 0, 0])])
    logits = torch.randn(600, 7, generator=generator)
    logits[torch.arange(600), labels] += torch.rand(600, generator=generator) * 2.5
    metrics = clip_benchmark_record("d", "m", "p", logits, labels)["metrics"]
    # CLIP_benchmark: float(hits) / n from the top-5, and scikit-learn's balanced accuracy of the argmax.
    top5 = logits.topk(5, dim=1).indices
    assert metrics["acc1"] == float((top5[:, 0] == labels).sum()) / 600
    assert metrics["acc5"] == float((top5 == labels[:, None]).any(dim=1).sum()) / 600
    assert metrics["mean_per_class_recall"] == balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
