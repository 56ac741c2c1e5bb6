"""Image-only corpora (issue 13): an ImageNet-style folder written without captions trains the
SSL branch alone; an objective with the image-text loss refuses it, naming the corpus."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slip.data import make_shards
from slip.data.shards import load_index
from slip.train.config import ConfigError, load_config
from slip.train.trainer import train

from test_train import losses_by_step


@pytest.fixture
def imagenet_style(tmp_path: Path) -> Path:
    """class folders of JPEGs, no captions, as an ImageNet train split is laid out."""
    rs = np.random.RandomState(0)
    root = tmp_path / "train"
    for c in range(4):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(12):
            pixels = (rs.rand(6, 6, 3) * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((48, 40), Image.BILINEAR)
            image.save(root / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def test_an_image_folder_without_captions_becomes_image_only_shards(imagenet_style, tmp_path, capsys):
    out = tmp_path / "shards"
    assert make_shards.main([str(imagenet_style), str(out), "--no-captions", "--samples-per-shard", "16",
                             "--workers", "1", "--no-progress"]) == 0
    index = load_index(out)
    assert index["captions"] is False and index["total_samples"] == 48 and index["skipped"] == {}
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert names and not any(n.endswith(".txt") for n in names)
    first = next(n for n in names if n.endswith(".json"))
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        meta = json.load(io.TextIOWrapper(tar.extractfile(first)))
    assert meta["path"].startswith("n0000000")  # the class folder stays in the sample's metadata
    # Without --no-captions the same folder is all missing captions.
    assert make_shards.main([str(imagenet_style), str(tmp_path / "captioned"), "--workers", "1",
                             "--no-progress"]) == 0
    assert load_index(tmp_path / "captioned")["skipped"] == {"missing_caption": 48}


def test_the_ssl_branch_trains_alone_on_image_only_shards_and_clip_refuses_them(imagenet_style, tmp_path):
    out = tmp_path / "shards"
    assert make_shards.main([str(imagenet_style), str(out), "--no-captions", "--samples-per-shard", "8",
                             "--workers", "1", "--no-progress"]) == 0
    common = [f"data.train={out}", "data.workers=0", "data.shuffle_buffer=0", "train.batch_size=8",
              "train.epochs=1", "train.max_steps=2", "train.precision=fp32", "train.log_every=1",
              "train.save_every=100"]
    cfg = load_config(None, ["model.name=simclr_vit_tiny", "objective.clip=false", "objective.ssl=simclr",
                             f"train.output_dir={tmp_path / 'ssl'}", *common])
    train(cfg)
    losses = losses_by_step(tmp_path / "ssl")
    assert set(losses) == {1, 2} and all(np.isfinite(v["ssl_loss"]) for v in losses.values())
    cfg = load_config(None, ["model.name=slip_vit_tiny", f"train.output_dir={tmp_path / 'slip'}", *common])
    with pytest.raises(ConfigError, match=r"holds no captions .*objective.clip=false"):
        train(cfg)
