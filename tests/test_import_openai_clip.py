"""OpenAI CLIP's layout (open_clip's own ViT): open_clip folders and plain state dicts load into
slip's timm ViT with ``pre_norm``, QuickGELU and LayerNorm eps 1e-5, compute what open_clip
computes, start training runs, and export back."""
from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import slip
from slip.checkpoint import CheckpointError, read_checkpoint, tower_differences
from slip.models import Architecture, TextConfig, VisionConfig, get_architecture
from slip.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

CAPTIONS = ["a photo of a dog", "a red square on a blue background", "x"]
# OpenAI's conventions where a file names no head count: 64-wide heads in both towers.
OPENAI_TINY = {"embed_dim": 32,
               "vision_cfg": {"width": 128, "layers": 2, "head_width": 64, "patch_size": 16, "image_size": 64},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
# The sizes of slip's clip_vit_tiny_openai preset.
PRESET_TINY = {"embed_dim": 32,
               "vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8, "image_size": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _open_clip_model(cfg: dict, quick_gelu: bool = True, seed: int = 0):
    """A random open_clip CLIP with every parameter moved off its initial value (LayerNorms too)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _folder(tmp_path, name: str, cfg: dict, state_dict: dict, quick_gelu: bool = True, preprocess: dict | None = None):
    out = tmp_path / name
    out.mkdir()
    config = {"model_cfg": {**cfg, "quick_gelu": quick_gelu}}
    if preprocess is not None:
        config["preprocess_cfg"] = preprocess
    (out / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out / "open_clip_model.safetensors"))
    return out


def _inputs(size: int):
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, slip.get_tokenizer()(CAPTIONS)


def _same_embeddings(model, oc) -> None:
    images, tokens = _inputs(model.arch.vision.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oc.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), oc.encode_text(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.logit_scale.exp(), oc.logit_scale.exp())


def _pil() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_folder_of_its_own_vit_loads_with_open_clips_embeddings(tmp_path, quick_gelu):
    oc = _open_clip_model(OPENAI_TINY, quick_gelu)
    out = _folder(tmp_path, "oc", OPENAI_TINY, oc.state_dict(), quick_gelu)
    model, transform = slip.load_pretrained(out)
    act = "quick_gelu" if quick_gelu else "gelu"  # open_clip's quick_gelu sets both towers
    assert model.arch.vision == VisionConfig(width=128, depth=2, heads=2, patch_size=16, image_size=64,
                                             pre_norm=True, act=act, norm_eps=1e-5)
    assert model.arch.text == TextConfig(width=64, heads=1, layers=2, act=act)
    _same_embeddings(model, oc)
    # no preprocess_cfg: open_clip's defaults (OpenAI's statistics, bicubic), as open_clip itself
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    torch.testing.assert_close(transform(_pil()), preprocess(_pil()), rtol=0, atol=1e-6)


def test_open_clip_folders_preprocess_cfg_is_the_transform(tmp_path):
    oc = _open_clip_model(OPENAI_TINY)
    pp = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
          "resize_mode": "shortest"}
    out = _folder(tmp_path, "oc", OPENAI_TINY, oc.state_dict(), preprocess=pp)
    _, transform = slip.load_pretrained(out)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    torch.testing.assert_close(transform(_pil()), preprocess(_pil()), rtol=0, atol=1e-6)
    bad = _folder(tmp_path, "bad", OPENAI_TINY, oc.state_dict(), preprocess={**pp, "resize_mode": "squash"})
    with pytest.raises(CheckpointError, match=r"preprocess_cfg\.resize_mode='squash', slip's model needs 'shortest'"):
        slip.load_pretrained(bad)


@pytest.mark.parametrize("kind", ["bare.pt", "nested.pt", "bare.safetensors"])
def test_openai_state_dict_files_load_with_open_clips_embeddings(tmp_path, kind):
    oc = _open_clip_model(OPENAI_TINY)
    sd = oc.state_dict()
    path = tmp_path / kind
    if kind == "bare.pt":  # OpenAI's files also record these numbers
        torch.save({**sd, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                    "vocab_size": torch.tensor(49408)}, path)
    elif kind == "nested.pt":  # open_clip's training checkpoints: DDP's prefix, under state_dict
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.source == "openai" and ckpt.arch.embed_dim == 32
    assert ckpt.arch.vision == VisionConfig(width=128, depth=2, heads=2, patch_size=16, image_size=64,
                                            pre_norm=True, act="quick_gelu", norm_eps=1e-5)
    assert ckpt.arch.text == TextConfig(width=64, heads=1, layers=2)
    model, transform = slip.load_pretrained(path)
    _same_embeddings(model, oc)
    want = eval_transform(64, OPENAI_MEAN, OPENAI_STD, "bicubic")  # OpenAI's preprocessing
    torch.testing.assert_close(transform(_pil()), want(_pil()), rtol=0, atol=0)
    assert "patch_embed.proj.bias" not in dict(model.visual.named_parameters())  # conv1 has no bias


def _expect_refusal(path, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": .*" + message) as info:
        slip.load_pretrained(path)
    assert "\n" not in str(info.value)


def test_folders_whose_tensors_do_not_fit_the_config_are_refused_naming_the_tensor(tmp_path):
    sd = _open_clip_model(OPENAI_TINY).state_dict()

    def cfg(vision=None, text=None):
        return {"embed_dim": 32, "vision_cfg": {**OPENAI_TINY["vision_cfg"], **(vision or {})},
                "text_cfg": {**OPENAI_TINY["text_cfg"], **(text or {})}}

    cases = [
        (cfg(vision={"width": 64, "head_width": 32}), (r"tensor 'visual\.conv1\.weight' has shape \(128, 3, 16, 16\), "
                                                       r"the config says \(64, 3, 16, 16\)")),
        (cfg(vision={"patch_size": 8}), (r"tensor 'visual\.conv1\.weight' has shape \(128, 3, 16, 16\), "
                                         r"the config says \(128, 3, 8, 8\).*'visual\.positional_embedding' has shape "
                                         r"\(17, 128\), the config says \(65, 128\)")),
        (cfg(text={"context_length": 64}), r"tensor 'positional_embedding' has shape \(77, 64\), the config says \(64, 64\)"),
        (cfg(text={"vocab_size": 1000}), r"tensor 'token_embedding\.weight' has shape \(49408, 64\), the config says"),
        (cfg(vision={"layers": 3}), r"missing tensors \['visual\.transformer\.resblocks\.2\.ln_1\.weight'"),
        (cfg(vision={"attentional_pool": True}), r"vision_cfg\.attentional_pool=True, slip's model needs False"),
        (cfg(vision={"layers": [1, 1, 1, 1]}), r"vision_cfg\.layers=\[1, 1, 1, 1\]: a ResNet image tower"),
        (cfg(vision={"image_size": [64, 32]}), r"vision_cfg\.image_size=\[64, 32\]: slip's ViT needs one square size"),
    ]
    for i, (config, message) in enumerate(cases):
        _expect_refusal(_folder(tmp_path, f"case{i}", config, sd), message)
    extra = _folder(tmp_path, "extra", OPENAI_TINY, {**sd, "visual.attn_pool.query": torch.zeros(4, 128)})
    _expect_refusal(extra, r"tensor 'visual\.attn_pool\.query' has no place")


def test_openai_files_that_do_not_fit_together_are_refused_naming_the_tensor(tmp_path):
    sd = _open_clip_model(OPENAI_TINY).state_dict()
    cases = [
        ({"visual.class_embedding": torch.zeros(64)},
         (r"tensor 'visual\.class_embedding' has shape \(64,\), the architecture the other tensors give "
          r"\(128 wide, patch 16\) needs \(128,\)")),
        ({"visual.positional_embedding": torch.zeros(20, 128)},
         r"tensor 'visual\.positional_embedding' has 20 rows, not a class token and a square grid"),
        ({"visual.conv1.weight": torch.zeros(96, 3, 16, 16)}, r"'visual\.conv1\.weight' gives a width of 96, not a multiple of"),
        ({"context_length": torch.tensor(64)}, r"entry 'context_length' is 64, the tensors give 77"),
    ]
    for i, (change, message) in enumerate(cases):
        torch.save({**sd, **change}, tmp_path / f"case{i}.pt")
        _expect_refusal(tmp_path / f"case{i}.pt", message)
    torch.save({k: v for k, v in sd.items() if k != "ln_final.weight"}, tmp_path / "missing.pt")
    _expect_refusal(tmp_path / "missing.pt", r"an incomplete OpenAI CLIP state dict: missing tensor 'ln_final\.weight'")
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_post.bias"}, tmp_path / "missing2.pt")
    _expect_refusal(tmp_path / "missing2.pt", r"missing tensors \['visual\.ln_post\.bias'\]")


def test_torchscript_archives_are_refused_with_a_way_out(tmp_path):
    with pytest.warns(FutureWarning):
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-16.pt"))
    _expect_refusal(tmp_path / "ViT-B-16.pt", r"a TorchScript archive .*open_clip\.load_openai_model")


def test_the_openai_presets_are_timms_and_open_clips_clip_towers():
    with torch.device("meta"):
        ours = slip.create_model("clip_vit_b16_openai")
        ref = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=0)
        oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, device="meta")
    assert repr(ours.visual) == repr(ref)
    assert {k: v.shape for k, v in ours.visual.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    from slip.checkpoint import openai_layout

    theirs = {openai_layout(k, v, True)[0]: openai_layout(k, v, True)[1].shape for k, v in oc.state_dict().items()}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}


def test_old_architecture_records_keep_timms_defaults():
    arch = get_architecture("clip_vit_tiny").to_dict()
    for key in ("pre_norm", "act", "norm_eps"):
        del arch["vision"][key]
    del arch["text"]["act"]
    assert Architecture.from_dict(arch) == get_architecture("clip_vit_tiny")
    with pytest.raises(ValueError, match=r"vision\.act='relu' is not one of"):
        VisionConfig(width=64, depth=2, heads=2, act="relu")


def test_tower_differences_name_what_shapes_cannot_show():
    tiny, openai = get_architecture("clip_vit_tiny"), get_architecture("clip_vit_tiny_openai")
    assert tower_differences(openai, openai) == []
    assert tower_differences(openai, tiny) == [
        "vision.pre_norm: True in the checkpoint, False in the model",
        "vision.act: 'quick_gelu' in the checkpoint, 'gelu' in the model",
        "vision.norm_eps: 1e-05 in the checkpoint, 1e-06 in the model"]
    gelu_text = Architecture(openai.vision, TextConfig(width=64, heads=2, layers=2, act="gelu"), 32)
    assert tower_differences(gelu_text, openai) == ["text.act: 'gelu' in the checkpoint, 'quick_gelu' in the model"]


def test_training_starts_from_open_clips_own_vit(tmp_path):
    from slip.data.synthetic import generate_synthetic
    from slip.train.config import ConfigError, load_config
    from slip.train.trainer import Trainer

    generate_synthetic(tmp_path / "corpus", seed=0, train_samples=16, test_per_class=1, image_size=32,
                       samples_per_shard=8)
    oc = _open_clip_model(PRESET_TINY)
    folder = _folder(tmp_path, "oc", PRESET_TINY, oc.state_dict())

    def cfg(out, init_from):
        return load_config(None, ["model.name=slip_vit_tiny_openai", "objective.ssl=mocov3",
                                  f"data.train={tmp_path / 'corpus' / 'train'}", "data.workers=0",
                                  "train.batch_size=8", "train.max_steps=1", "train.precision=fp32",
                                  f"train.output_dir={out}", f"train.init_from={init_from}"])

    trainer = Trainer(cfg(tmp_path / "run", folder))
    trainer._init_from(trainer.model, str(folder))
    model = trainer.model.eval()
    _same_embeddings(model, oc)
    own = model.state_dict()
    for name, p in model.ssl.momentum_encoder.state_dict().items():
        assert torch.equal(p, own[f"visual.{name}"]), name  # the momentum copy starts from the loaded tower
    assert trainer.run().step == 1
    wide = tmp_path / "wide.pt"  # a 128-wide OpenAI file into the 64-wide preset
    torch.save(_open_clip_model(OPENAI_TINY).state_dict(), wide)
    with pytest.raises(ConfigError, match=r"train.init_from: .*wide.pt: visual\.cls_token has shape \(1, 1, 128\), "
                                          r"slip_vit_tiny_openai needs \(1, 1, 64\)"):
        Trainer(cfg(tmp_path / "run2", wide)).run()


def test_exports_of_an_imported_openai_model_load_back(tmp_path):
    from slip.eval.finetune import classifier_from_checkpoint, timm_kwargs
    from slip.export import export_open_clip, export_slip, export_timm

    oc = _open_clip_model(OPENAI_TINY)
    path = tmp_path / "openai.pt"
    torch.save(oc.state_dict(), path)
    model, transform = slip.load_pretrained(path)

    # open_clip: its own ViT in OpenAI's names, no timm config; the same embeddings and preprocessing
    out = export_open_clip(path, tmp_path / "oc")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert "timm_model_name" not in cfg["model_cfg"]["vision_cfg"] and cfg["model_cfg"]["quick_gelu"] is True
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _same_embeddings(model, loaded.eval())
    torch.testing.assert_close(preprocess(_pil()), transform(_pil()), rtol=0, atol=1e-6)
    assert slip.load_pretrained(out)[0].arch == model.arch
    assert "OpenAI CLIP's mean/std" in (out / "README.md").read_text()

    # timm: the CLIP entrypoint (LayerNorm eps 1e-5) with pre_norm and QuickGELU
    out = export_timm(path, tmp_path / "tm")
    tcfg = json.loads((out / "config.json").read_text())
    assert tcfg["architecture"] == "vit_base_patch16_clip_224"
    assert tcfg["model_args"]["pre_norm"] is True and tcfg["model_args"]["act_layer"] == "quick_gelu"
    images, _ = _inputs(64)
    with torch.no_grad():
        tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(tm(images), model.visual(images), rtol=1e-5, atol=1e-5)

    # SLIP's own format has no such tower
    with pytest.raises(slip.errors.UserError, match=r"what SLIP's code lacks: a LayerNorm before the image blocks "
                                                    r"\(pre_norm\), quick_gelu in the image tower, image LayerNorm eps 1e-05"):
        export_slip(path, tmp_path / "slip.pt")

    # fine-tuning keeps the layout
    classifier, vision = classifier_from_checkpoint(path, num_classes=5)
    assert vision == model.arch.vision
    assert timm_kwargs(vision, 5)["pre_norm"] is True and classifier.norm.eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(classifier.forward_head(classifier.forward_features(images), pre_logits=True),
                                   model.visual(images), rtol=1e-5, atol=1e-5)


def test_a_clip_tower_beside_a_gelu_text_tower_exports_as_a_timm_tower(tmp_path):
    from slip.export import export_open_clip

    openai = get_architecture("clip_vit_tiny_openai")
    torch.manual_seed(0)
    model = slip.create_model(Architecture(openai.vision, TextConfig(width=64, heads=2, layers=2, act="gelu"), 32)).eval()
    out = export_open_clip(model, tmp_path / "oc")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is False  # the text tower's GELU; the image tower's QuickGELU is timm's
    assert json.loads((out / "config.json").read_text())["model_args"]["act_layer"] == "quick_gelu"
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _same_embeddings(model, loaded.eval())
    assert slip.load_pretrained(out)[0].arch == model.arch


def test_released_style_args_do_not_hide_an_openai_layout(tmp_path):
    # An open_clip-trained file with an argparse record: its layout decides, not SLIP's args.model.
    sd = _open_clip_model(OPENAI_TINY).state_dict()
    torch.save({"epoch": 1, "args": argparse.Namespace(lr=0.1), "state_dict": sd}, tmp_path / "run.pt")
    ckpt = read_checkpoint(tmp_path / "run.pt")
    assert ckpt.source == "openai" and ckpt.meta["epoch"] == 1 and ckpt.meta["args"] == {"lr": 0.1}
