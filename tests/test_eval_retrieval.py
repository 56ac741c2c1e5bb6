"""Image-text retrieval: recall@K against hand-computed ranks, Karpathy-split parsing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from slip.eval.datasets import DatasetNotFoundError
from slip.eval.retrieval import RetrievalDataset, build_retrieval_dataset, evaluate_retrieval, recall_at_k

KS = (1, 2, 5)


def test_recall_at_k_hand_computed():
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0, captions 0-1
        [0.5, 0.2, 0.1, 0.3, 0.4, 0.6],  # image 1, captions 2-3
        [0.0, 0.0, 0.0, 0.0, 0.1, 0.0],  # image 2, captions 4-5
    ])
    owner = [0, 0, 1, 1, 2, 2]
    # image -> text, best rank of an own caption in the row: image 0: caption 0 first (0);
    # image 1: order 5, 0, 4, 3 -> caption 3 at rank 3; image 2: caption 4 first (0).
    # text -> image, rank of the own image in the column: 0, 1, 1, 0, 1, and 2 for caption 5,
    # whose image 2 ties with image 0 at 0.0 (lower index first) behind image 1.
    expected = {
        "image_to_text_R@1": 100 * 2 / 3, "image_to_text_R@2": 100 * 2 / 3, "image_to_text_R@5": 100.0,
        "text_to_image_R@1": 100 * 2 / 6, "text_to_image_R@2": 100 * 5 / 6, "text_to_image_R@5": 100.0,
    }
    for chunk in (1, 2, 1024):
        got = recall_at_k(sim, owner, KS, chunk=chunk)
        assert got.keys() == {*expected, "mean_recall"}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (chunk, key)
        assert got["mean_recall"] == pytest.approx(sum(expected.values()) / 6)


def test_recall_at_k_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(torch.zeros(3, 2), [0, 0])
    with pytest.raises(ValueError, match="one entry per caption"):
        recall_at_k(torch.zeros(2, 2), [0, 1, 1])


class ColourWords(nn.Module):
    """Image -> mean RGB; caption -> the unit vector of the colour word it contains."""

    has_text = True
    WORDS = {"red": 0, "green": 1, "blue": 2}

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.captions: list[str] = []

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.captions.extend(texts)
        return torch.arange(len(self.captions) - len(texts), len(self.captions))[:, None]

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = x.mean(dim=(2, 3))
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = torch.zeros(len(tokens), 3)
        for row, i in enumerate(tokens[:, 0].tolist()):
            word = next(w for w in self.WORDS if w in self.captions[i])
            out[row, self.WORDS[word]] = 1.0
        return out


def _flickr(root: Path) -> Path:
    # PNG, not JPEG: the expected ranks rely on exact zeros between pure colours.
    colours = {"r.png": (255, 0, 0), "g.png": (0, 255, 0), "b.png": (0, 0, 255), "t.png": (9, 9, 9)}
    for name, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(root / name)
    images = [
        {"filename": "r.png", "split": "test", "sentences": [{"raw": "a red square."}, {"raw": " red "}]},
        {"filename": "t.png", "split": "train", "sentences": [{"raw": "green"}]},
        {"filename": "g.png", "split": "test", "sentences": [{"raw": "green"}, {"raw": "blue"}]},
        {"filename": "b.png", "split": "test", "sentences": [{"raw": "blue square"}]},
    ]
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def test_karpathy_split_parsing(tmp_path):
    annotations = _flickr(tmp_path)
    ds = RetrievalDataset(tmp_path, annotations, "test", TF.to_tensor)
    assert ds.paths == [str(tmp_path / n) for n in ("r.png", "g.png", "b.png")]
    assert ds.captions == ["a red square.", "red", "green", "blue", "blue square"]
    assert ds.caption_image == [0, 0, 1, 1, 2]
    assert len(RetrievalDataset(tmp_path, annotations, "train")) == 1
    with pytest.raises(ValueError, match="splits present: \\['test', 'train'\\]"):
        RetrievalDataset(tmp_path, annotations, "val")
    with pytest.raises(DatasetNotFoundError, match="'flickr30k'.*dataset_coco.json / dataset_flickr30k.json"):
        build_retrieval_dataset("flickr30k", {"path": str(tmp_path), "annotations": str(tmp_path / "x.json")}, None)


def test_evaluate_retrieval_known_ranks_and_skipped_image(tmp_path):
    annotations = _flickr(tmp_path)
    entry = {"path": str(tmp_path), "type": "retrieval", "annotations": str(annotations), "test": "test"}
    model = ColourWords()
    result = evaluate_retrieval(model, model.tokenize, build_retrieval_dataset("flickr30k", entry, TF.to_tensor),
                                batch_size=2, ks=KS)
    # Captions 0-4 belong to images [0, 0, 1, 1, 2]; caption 3 ("blue") of the green image ranks
    # its image third (blue first, then red, tied with green at 0 and lower). The blue image's
    # own caption 4 ties with caption 3 in its row and comes second.
    assert (result["n_images"], result["n_captions"], result["skipped"]) == (3, 5, 0)
    r = result["recalls"]
    assert r["text_to_image_R@1"] == pytest.approx(80.0) and r["text_to_image_R@2"] == pytest.approx(80.0)
    assert r["text_to_image_R@5"] == 100.0
    assert r["image_to_text_R@1"] == pytest.approx(100 * 2 / 3) and r["image_to_text_R@2"] == 100.0

    # An unreadable image drops out with its captions; "blue" now ties red and green at 0.
    (tmp_path / "b.png").write_bytes(b"broken")
    result = evaluate_retrieval(model, model.tokenize, build_retrieval_dataset("flickr30k", entry, TF.to_tensor),
                                batch_size=2, ks=KS)
    assert (result["n_images"], result["n_captions"], result["skipped"]) == (2, 4, 1)
    assert result["recalls"]["text_to_image_R@1"] == 75.0 and result["recalls"]["text_to_image_R@2"] == 100.0
    assert result["recalls"]["image_to_text_R@1"] == 100.0
