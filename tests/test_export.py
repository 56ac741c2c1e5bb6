"""``slip export``: open_clip and timm folders that load by themselves and compute what slip does."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from slip.checkpoint import save_checkpoint
from slip.export import (
    export_open_clip,
    export_timm,
    main,
    open_clip_config,
    registered_timm_name,
)
from slip.models import create_model, get_architecture
from slip.tokenizer import get_tokenizer
from slip.transforms import eval_transform

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

CAPTIONS = ["a photo of a dog", "a red square on a blue background", "x", "two cats " * 50]


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():  # a logit scale that is not the initial one, to see it travel
        if model.has_text:
            model.logit_scale.fill_(3.0)
    return model


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _pil(w: int = 61, h: int = 45) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _check_open_clip(model, out, n_images: int = 3) -> None:
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    size = model.arch.vision.image_size
    x = _images(size, n_images)
    tokens = get_tokenizer()(CAPTIONS)
    oc_tokens = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    assert torch.equal(oc_tokens, tokens)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x), model.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oc.encode_text(oc_tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oc.logit_scale.exp(), model.logit_scale.exp())
    img = _pil()
    torch.testing.assert_close(preprocess(img), eval_transform(size)(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clip_vit_tiny", "slip_vit_tiny"])
def test_open_clip_round_trip_from_checkpoint(tmp_path, name, capsys):
    model = _model(name)
    ckpt = tmp_path / "step.pt"
    save_checkpoint(model, ckpt, step=123, config={"model": {"name": name}, "train": {"lr": 0.003}})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": [{"benchmark": "synthetic", "top1": 42.5}]}))
    out = tmp_path / "oc"
    assert main([str(ckpt), str(out), "--format", "open_clip", "--results", str(results)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".oc.")]  # no temporary left
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True
    assert cfg["model_cfg"]["vision_cfg"]["timm_pool"] == "token"
    _check_open_clip(model, out)
    card = (out / "README.md").read_text()
    assert name in card and "123" in card and '"lr": 0.003' in card and "42.5" in card


@pytest.mark.parametrize("name", ["clip_vit_s16", "slip_vit_s16"])
def test_open_clip_vit_s16_keeps_its_12_heads(tmp_path, name):
    # timm's vit_small has 6 heads and the same weight shapes: only the exported config keeps 12.
    model = _model(name)
    out = export_open_clip(model, tmp_path / "oc")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == f"local-dir:{out.resolve()}"
    assert json.loads((out / "config.json").read_text())["model_args"]["num_heads"] == 12
    _check_open_clip(model, out, n_images=2)


@pytest.mark.parametrize("name, timm_name", [("clip_vit_b16", "vit_base_patch16_224"),
                                             ("slip_vit_l16", "vit_large_patch16_224"),
                                             ("clip_vit_s16", None), ("clip_vit_tiny", None)])
def test_registered_timm_names_only_for_exact_towers(name, timm_name):
    arch = get_architecture(name)
    assert registered_timm_name(arch.vision) == timm_name
    if timm_name:  # B/16 and L/16: a portable config, open_clip builds the same tower shapes
        cfg = open_clip_config(arch, timm_name)
        assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == timm_name
        with torch.device("meta"):
            oc = open_clip.model.CLIP(**cfg["model_cfg"])
            ours = create_model(name)
        trunk = {k: v.shape for k, v in oc.visual.trunk.state_dict().items()}
        assert trunk == {k[len("visual."):]: v.shape for k, v in ours.state_dict().items() if k.startswith("visual.")}
        assert oc.visual.trunk.blocks[0].attn.num_heads == arch.vision.heads
        assert oc.visual.trunk.global_pool == "token"


def test_moved_open_clip_folder_fails_loudly_and_hub_id(tmp_path):
    model = _model("clip_vit_tiny")
    out = export_open_clip(model, tmp_path / "oc")
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        open_clip.create_model_and_transforms(f"local-dir:{moved}")
    card = (moved / "README.md").read_text()
    assert "absolute path" in card
    hub = export_open_clip(model, tmp_path / "hub", hub_id="me/slip-tiny")
    cfg = json.loads((hub / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == "hf-hub:me/slip-tiny"
    assert (hub / "config.json").is_file()


def test_relative_out_loads_from_another_directory(tmp_path, monkeypatch):
    model = _model("clip_vit_tiny")
    monkeypatch.chdir(tmp_path)
    export_open_clip(model, "rel")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _check_open_clip(model, tmp_path / "rel", n_images=2)


@pytest.mark.parametrize("name", ["simclr_vit_tiny", "slip_vit_tiny"])
def test_timm_round_trip(tmp_path, name):
    model = _model(name)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt, step=7)
    out = tmp_path / "tm"
    assert main([str(ckpt), str(out), "--format", "timm"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = _images(32)
    with torch.no_grad():
        want = model.visual.forward_head(model.visual.forward_features(x), pre_logits=True)
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
        cfg = json.loads((out / "config.json").read_text())
        by_file = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg["model_args"],
                                    pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
        torch.testing.assert_close(by_file(x), want, rtol=1e-5, atol=1e-5)
        tuned = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5)  # fine-tuning head
        assert tuned(x).shape == (3, 5)
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    img = _pil()
    torch.testing.assert_close(timm.data.create_transform(**data_cfg)(img), eval_transform(32)(img), rtol=0, atol=1e-6)


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    model = _model("clip_vit_tiny")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    for fmt in ("open_clip", "timm"):
        assert main([str(ckpt), str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert main([str(ckpt), str(out), "--format", "timm", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "out"]  # no temporaries left
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    export_timm(model, tmp_path / "empty")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import slip.export as ex

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex._Folder, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        export_open_clip(_model("clip_vit_tiny"), tmp_path / "oc")
    assert list(tmp_path.iterdir()) == []


def test_image_only_model_is_refused_for_open_clip(tmp_path, capsys):
    ckpt = tmp_path / "simclr.pt"
    save_checkpoint(_model("simclr_vit_tiny"), ckpt)
    assert main([str(ckpt), str(tmp_path / "oc"), "--format", "open_clip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slip export: error: simclr_vit_tiny: an image-only model") and err.count("\n") == 1
    assert "--format timm" in err
    assert not (tmp_path / "oc").exists()


def test_cli_lists_export():
    from slip.cli import COMMANDS

    assert COMMANDS["export"][0] == "slip.export"
