"""``slip export``: open_clip and timm folders that load by themselves and compute what slip does."""
from __future__ import annotations

import json
import re
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


# ------------------------------------------------------------------- --format slip (SLIP's layout)

import argparse

from original_slip import OriginalCLIP
from test_checkpoint import released_layout_shapes

import slip
from slip.checkpoint import CheckpointError
from slip.errors import UserError
from slip.export import export_slip
from slip.models import create_model as _create


def _strip(sd: dict) -> dict:
    assert all(k.startswith("module.") for k in sd)
    return {k[len("module."):]: v for k, v in sd.items()}


@pytest.mark.parametrize("kind", ["clip", "simclr", "slip"])
def test_slip_format_is_slips_released_layout(tmp_path, kind):
    model = _model(f"{kind}_vit_s16")
    ckpt = tmp_path / "run.pt"
    save_checkpoint(model, ckpt, step=99, epoch=4)
    out = tmp_path / "export" / f"{kind}.pt"
    assert main([str(ckpt), str(out), "--format", "slip"]) == 0
    obj = torch.load(out, weights_only=False)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].model == f"{kind.upper()}_VITS16"
    assert obj["epoch"] == 4
    assert (obj["args"].ssl_mlp_dim, obj["args"].ssl_emb_dim) == (4096, 256)
    sd = _strip(obj["state_dict"])
    assert {k: tuple(v.shape) for k, v in sd.items()} == released_layout_shapes(kind, "s")
    loaded, _ = slip.load_pretrained(out)
    assert loaded.arch == model.arch
    x = _images(224, 2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
        if model.has_text:
            tokens = get_tokenizer()(CAPTIONS)
            assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{kind}.pt"]  # no temporaries


@pytest.mark.parametrize("name", ["clip_vit_s16", "slip_vit_s16"])
def test_slip_format_loads_into_the_original_model(tmp_path, name):
    model = _model(name)
    with torch.no_grad():  # non-trivial BatchNorm statistics, to see them travel
        if model.has_ssl_head:
            model.ssl.image_mlp.bn1.running_mean.normal_()
            model.ssl.image_mlp.bn1.running_var.uniform_(0.5, 2.0)
    out = export_slip(model, tmp_path / "m.pt")
    sd = _strip(torch.load(out, weights_only=False)["state_dict"])
    original = OriginalCLIP("vit_small_patch16_224", vision_heads=12,
                            ssl=(4096, 256) if model.has_ssl_head else None).eval()
    original.load_state_dict(sd, strict=True)
    x = _images(224, 2)
    tokens = get_tokenizer()(CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(original.encode_image(x), model.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(original.encode_text(tokens), model.encode_text(tokens), rtol=1e-4, atol=1e-5)
        if model.has_ssl_head:
            feats = torch.randn(4, 384)
            torch.testing.assert_close(original.image_mlp(feats), model.ssl.image_mlp(feats), rtol=1e-5, atol=1e-5)


def test_slip_format_keeps_a_released_checkpoints_args(tmp_path):
    from test_checkpoint import save_released

    torch.manual_seed(0)
    original = OriginalCLIP("vit_small_patch16_224", vision_heads=12).eval()
    save_released(tmp_path / "clip_small.pt", original.state_dict(), "CLIP_VITS16")
    out = export_slip(str(tmp_path / "clip_small.pt"), tmp_path / "again.pt")
    obj = torch.load(out, weights_only=False)
    assert obj["epoch"] == 25 and obj["args"].model == "CLIP_VITS16" and obj["args"].lr == 3e-3
    want = {f"module.{k}": v for k, v in original.state_dict().items()}
    assert obj["state_dict"].keys() == want.keys()
    assert all(torch.equal(obj["state_dict"][k], v) for k, v in want.items())


def test_slip_format_refuses_what_slips_code_lacks(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(_model("slip_vit_tiny"), ckpt)
    out = tmp_path / "out.pt"
    assert main([str(ckpt), str(out), "--format", "slip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slip export: error: slip_vit_tiny: ")
    assert "SLIP's ViT-S/16, B/16, L/16" in err
    assert not out.exists()
    mocov3 = _create(get_architecture("slip_vit_s16").with_ssl_method("mocov3"))
    with pytest.raises(UserError, match=r"slip_vit_s16: .*SSL method 'mocov3' has no counterpart"):
        export_slip(mocov3, out)
    assert list(tmp_path.iterdir()) == [ckpt]


def test_slip_format_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(_model("clip_vit_s16"), ckpt)
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert main([str(ckpt), str(out), "--format", "slip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    assert main([str(ckpt), str(out), "--format", "slip", "--overwrite"]) == 0
    assert torch.load(out, weights_only=False)["args"].model == "CLIP_VITS16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "out.pt"]


# -------------------------------------------------------------- open_clip folders back into slip


def _same_embeddings(a, b, exact=True):
    size = a.arch.vision.image_size if hasattr(a, "arch") else b.arch.vision.image_size
    x = _images(size, 2)
    tokens = get_tokenizer()(CAPTIONS)
    check = torch.equal if exact else (lambda p, q: torch.allclose(p, q, rtol=1e-5, atol=1e-5))
    with torch.no_grad():
        assert check(a.encode_image(x), b.encode_image(x))
        assert check(a.encode_text(tokens), b.encode_text(tokens))
        assert check(a.logit_scale, b.logit_scale)


@pytest.mark.parametrize("name", ["clip_vit_tiny", "slip_vit_tiny"])
def test_open_clip_folder_round_trip_into_slip(tmp_path, name):
    model = _model(name)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt)
    out = tmp_path / "oc"
    assert main([str(ckpt), str(out), "--format", "open_clip"]) == 0
    loaded, preprocess = slip.load_pretrained(out)
    assert loaded.arch.vision == model.arch.vision and loaded.arch.text == model.arch.text
    assert loaded.arch.ssl_head is None  # the SSL head does not travel through open_clip
    _same_embeddings(loaded, model)
    again, _ = slip.load_pretrained(out / "open_clip_model.safetensors")  # the weights file names its folder
    _same_embeddings(again, model)
    assert preprocess.transforms[1].size == (32, 32)


def test_open_clip_folder_moved_and_registered_tower(tmp_path):
    model = _model("clip_vit_b16")
    out = export_open_clip(model, tmp_path / "oc")  # names vit_base_patch16_224
    loaded, _ = slip.load_pretrained(out)
    _same_embeddings(loaded, model)
    small = export_open_clip(_model("clip_vit_tiny"), tmp_path / "tiny")  # names local-dir:<abs path>
    shutil.move(small, tmp_path / "moved")
    loaded, _ = slip.load_pretrained(tmp_path / "moved")  # the folder's own config.json gives the tower
    _same_embeddings(loaded, _model("clip_vit_tiny"))


def test_folder_written_by_open_clip_loads_with_its_embeddings(tmp_path):
    src = export_open_clip(_model("clip_vit_tiny"), tmp_path / "src")
    oc = open_clip.create_model(f"local-dir:{src}").eval()
    with torch.no_grad():  # weights open_clip's model holds, not slip's
        for p in oc.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path / "by_open_clip"
    out.mkdir()
    shutil.copy(src / "open_clip_config.json", out)
    shutil.copy(src / "config.json", out)
    torch.save(oc.state_dict(), out / "open_clip_pytorch_model.bin")
    loaded, _ = slip.load_pretrained(out)
    _same_embeddings(loaded, oc, exact=False)


def _edit_folder(src, dst, cfg_edit=None, sd_edit=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "open_clip_config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg["model_cfg"])
    (dst / "open_clip_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(dst / "open_clip_model.safetensors"))
    if sd_edit:
        sd_edit(sd)
    save_file(sd, str(dst / "open_clip_model.safetensors"))
    return dst


def test_open_clip_folders_slip_cannot_load_are_refused_naming_why(tmp_path):
    src = export_open_clip(_model("clip_vit_tiny"), tmp_path / "src")
    cases = [
        (lambda c: c["vision_cfg"].update(timm_pool="avg"), None, r"model_cfg\.vision_cfg\.timm_pool='avg'"),
        (lambda c: c["vision_cfg"].pop("timm_pool"), None, r"vision_cfg\.timm_pool is absent"),
        (lambda c: c.update(init_logit_bias=-10.0), None, r"model_cfg\.init_logit_bias=-10\.0 is not something"),
        (None, lambda sd: sd.update(logit_bias=torch.zeros(1)), r"tensor 'logit_bias' has no place"),
        (None, lambda sd: sd.update({"token_embedding.weight": torch.zeros(100, 64)}),
         r"tensor 'token_embedding.weight' has shape \(100, 64\)"),
        (None, lambda sd: sd.pop("visual.trunk.norm.weight"), r"missing tensors \['visual.trunk.norm.weight'\]"),
        (None, lambda sd: sd.update({"visual.head.proj.bias": torch.zeros(32)}), r"'visual.head.proj.bias'"),
    ]
    for i, (cfg_edit, sd_edit, message) in enumerate(cases):
        folder = _edit_folder(src, tmp_path / f"case{i}", cfg_edit, sd_edit)
        with pytest.raises(CheckpointError, match=re.escape(str(folder)) + ": .*" + message) as info:
            slip.load_pretrained(folder)
        assert "\n" not in str(info.value)


def test_open_clips_own_vit_tower_with_what_slip_lacks_is_refused_naming_the_field(tmp_path):
    # open_clip's own ViT loads (tests/test_import_openai_clip.py); its options slip's tower lacks do not.
    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    oc = open_clip.model.CLIP(**cfg)
    from safetensors.torch import save_file

    for i, (option, message) in enumerate([({"ls_init_value": 0.1}, r"vision_cfg\.ls_init_value=0\.1: slip's model has no such option"),
                                           ({"pool_type": "avg"}, r"vision_cfg\.pool_type='avg', slip's model needs 'tok'"),
                                           ({"no_ln_pre": True}, r"vision_cfg\.no_ln_pre=True")]):
        out = tmp_path / f"native{i}"
        out.mkdir()
        (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**cfg, "vision_cfg": {**cfg["vision_cfg"], **option}}}))
        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(out / "open_clip_model.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            slip.load_pretrained(out)


def test_training_starts_from_exported_clip_weights_with_a_fresh_ssl_branch(tmp_path):
    from slip.data.synthetic import generate_synthetic
    from slip.export import export_open_clip
    from slip.train.config import ConfigError, load_config
    from slip.train.trainer import Trainer

    generate_synthetic(tmp_path / "corpus", seed=0, train_samples=32, test_per_class=1, image_size=32,
                       samples_per_shard=8)
    torch.manual_seed(1)
    clip = slip.create_model("clip_vit_tiny")
    export_open_clip(clip, tmp_path / "oc")  # e.g. a released CLIP in open_clip's format

    def cfg(out, *extra):
        return load_config(None, ["model.name=slip_vit_tiny", "objective.ssl=mocov3", f"data.train={tmp_path / 'corpus' / 'train'}",
                                  "data.workers=0", "train.batch_size=8", "train.max_steps=1", "train.precision=fp32",
                                  f"train.output_dir={out}", *extra])

    trainer = Trainer(cfg(tmp_path / "run", f"train.init_from={tmp_path / 'oc'}"))
    trainer._init_from(trainer.model, str(tmp_path / "oc"))
    own, theirs = trainer.model.state_dict(), clip.state_dict()
    assert all(torch.equal(own[k], v) for k, v in theirs.items())  # every tower tensor, as exported
    for name, p in trainer.model.ssl.momentum_encoder.state_dict().items():
        assert torch.equal(p, own[f"visual.{name}"]), name  # the momentum copy starts from the loaded tower
    assert trainer.run().step == 1
    with pytest.raises(ConfigError, match=r"train.init_from: .*s16.pt: \S+ has shape \(.*\), slip_vit_tiny needs"):
        bigger = slip.create_model("clip_vit_s16")
        slip.save_checkpoint(bigger, tmp_path / "s16.pt")
        Trainer(cfg(tmp_path / "run2", f"train.init_from={tmp_path / 's16.pt'}")).run()
