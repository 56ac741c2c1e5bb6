"""ResNet towers through evaluation and export: the linear probe and k-NN read the pooled feature
in eval mode (BatchNorm's running statistics), ``slip finetune`` fine-tunes timm's resnetN with a
new classifier, and ``slip export`` writes timm and open_clip folders that compute what slip does;
SLIP's own layout is refused. Tiny ResNet-18 towers at 32 px; the ViT paths are in test_export.py,
test_eval_finetune.py and test_eval_linear_probe.py, whose helpers are reused here."""
from __future__ import annotations

import copy
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from test_eval_finetune import (  # noqa: F401  (bench: fixture)
    KEY,
    N_TEST,
    _config,
    _train_losses,
    bench,
    finetune_on_two_gloo_processes,
)
from test_export import _check_open_clip, _edit_folder, _images, _pil, _same_embeddings
from test_train import tiny

import slip
from slip.checkpoint import CheckpointError, save_checkpoint
from slip.errors import UserError
from slip.eval.finetune import (
    FinetuneConfig,
    build_optimizer,
    classifier_from_checkpoint,
    finetune,
    load_finetuned,
)
from slip.export import (
    export_open_clip,
    export_slip,
    main,
    open_clip_config,
    resnet_timm_name,
    timm_config,
)
from slip.models import create_model, get_architecture
from slip.transforms import eval_transform

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def _moved_statistics(model):
    """``model`` in eval mode after two training-mode passes, so that its BatchNorm running
    statistics are not the initial zeros and ones (eval-mode features then differ from batch ones)."""
    model.train()
    gen = torch.Generator().manual_seed(2)
    size = model.arch.vision.image_size
    with torch.no_grad():
        for _ in range(2):
            model.visual(torch.randn(8, 3, size, size, generator=gen) * 2 + 0.5)
    return model.eval()


def _resnet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        if model.has_text:
            model.logit_scale.fill_(3.0)
    return _moved_statistics(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread_module):
    """A checkpoint of 2 SimCLR steps of the tiny ResNet tower (``slip train``'s own file)."""
    from slip.data.synthetic import generate_synthetic
    from slip.train.trainer import train

    root = tmp_path_factory.mktemp("resnet_run")
    generate_synthetic(root / "corpus", seed=0, train_samples=32, test_per_class=1, image_size=32,
                       samples_per_shard=8)
    result = train(tiny(root / "corpus", root / "run", "model.name=simclr_resnet_tiny", "objective.clip=false",
                        "train.max_steps=2"))
    assert result.step == 2
    return result.checkpoint


def _pooled(model, x: torch.Tensor) -> torch.Tensor:
    """slip's tower feature: timm's global average pool, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model.visual(x)


# ------------------------------------------------------------------------- linear probe, k-NN


def test_linear_probe_and_knn_read_the_pooled_feature_with_running_statistics(trained, bench, tmp_path, capsys):  # noqa: F811
    from slip.eval import knn_cli, linear_probe_cli
    from slip.eval.datasets import build_dataset
    from slip.eval.knn import knn_eval, tower_features
    from slip.eval.linear_probe import extract_features
    from zero_shot import load_catalog

    catalog, _ = bench
    model, preprocess = slip.load_pretrained(trained)
    bn = model.visual.bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # trained statistics
    test = build_dataset(KEY, load_catalog(catalog)[KEY], "test", preprocess)
    images = torch.stack([test[i][0] for i in range(16)])
    labels = torch.tensor(test.targets[:16])

    model.visual.train()  # extraction switches to eval mode for the pass and back after it
    feats = extract_features(model.visual, [(images[:8], labels[:8]), (images[8:], labels[8:])])
    assert model.visual.training
    want = _pooled(model, images)
    assert feats.features.shape == (16, 512)
    np.testing.assert_allclose(feats.features, want.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # on a copy: a training-mode pass moves the running statistics
        batch_stats = copy.deepcopy(model.visual).train()(images)
    assert not torch.allclose(batch_stats, want, atol=1e-3)  # what training-mode BatchNorm would give
    knn_feats = tower_features(model, test)
    np.testing.assert_allclose(knn_feats.features[:16], want.numpy(), rtol=1e-5, atol=1e-6)

    out = tmp_path / "probe.json"
    common = ["--checkpoint", str(trained), "--catalog", str(catalog), "--benchmarks", KEY, "--workers", "0",
              "--device", "cpu", "--no-cache"]
    assert linear_probe_cli.main([*common, "--out", str(out), "--max-iter", "50"]) == 0
    row = json.loads(out.read_text())["results"][KEY]
    assert row["num_test"] == 4 * N_TEST and 0 <= row["score"] <= 100
    assert linear_probe_cli.main([*common, "--protocol", "sgd", "--epochs", "2"]) == 0
    assert KEY in capsys.readouterr().out

    knn_out = tmp_path / "knn.json"
    assert knn_cli.main(["--checkpoint", str(trained), "--catalog", str(catalog), "--benchmarks", KEY,
                         "--workers", "0", "--device", "cpu", "--k", "5", "--out", str(knn_out)]) == 0
    (knn_row,) = json.loads(knn_out.read_text())["results"]
    bank = tower_features(model, build_dataset(KEY, load_catalog(catalog)[KEY], "train", preprocess))
    assert knn_row["top1"] == pytest.approx(knn_eval(bank, knn_feats, 4, k=5)["top1"])


# --------------------------------------------------------------------------------- fine-tuning


def test_the_resnet_recipe_has_no_layer_decay_and_an_explicit_one_follows_timms_grouping():
    vision = get_architecture("slip_resnet50").vision
    base = FinetuneConfig(checkpoint="c", catalog="k", benchmark=KEY, output_dir="o")
    cfg = base.resolve(vision)
    assert (cfg.layer_decay, cfg.drop_path, cfg.epochs, cfg.warmup_epochs) == (1.0, 0.05, 100, 5)
    assert base.resolve(vision.width).layer_decay == 0.75  # a bare width is still a ViT's

    from slip.eval.finetune import build_classifier

    torch.manual_seed(0)
    model = build_classifier(get_architecture("slip_resnet_tiny").vision, num_classes=3, drop_path_rate=0.05)
    assert isinstance(model, timm.models.ResNet) and model.fc.out_features == 3
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.05)  # timm's stochastic depth, rising to 0.05
    cfg = FinetuneConfig(checkpoint="c", catalog="k", benchmark=KEY, output_dir="o",
                         layer_decay=0.5).resolve(get_architecture("slip_resnet_tiny").vision)
    optimizer = build_optimizer(model, cfg)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)
    # layer ids: the stem 0, the 8 residual blocks of ResNet-18 1..8 in order, the classifier 9
    for name, layer in [("conv1.weight", 0), ("bn1.weight", 0), ("layer1.0.conv1.weight", 1),
                        ("layer2.1.bn2.bias", 4), ("layer4.1.conv2.weight", 8), ("fc.weight", 9)]:
        assert scale[id(named[name])] == pytest.approx(0.5 ** (9 - layer)), name
    for name, p in named.items():
        assert decay[id(p)] == (0.0 if p.ndim == 1 else cfg.weight_decay), name


def test_classifier_gets_the_resnet_tower_with_its_statistics_and_a_near_zero_fc(tmp_path):
    pretrained = _resnet("slip_resnet_tiny")
    save_checkpoint(pretrained, tmp_path / "r.pt")
    torch.manual_seed(0)
    model, vision = classifier_from_checkpoint(tmp_path / "r.pt", num_classes=4, drop_path_rate=0.05)
    assert vision == pretrained.arch.vision and isinstance(model, timm.models.ResNet)
    tower = pretrained.visual.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, tower[name]), name  # BatchNorm buffers included
    assert model.fc.weight.shape == (4, 512)
    assert model.fc.weight.abs().max() <= 4e-5 and model.fc.weight.std() > 0
    assert torch.equal(model.fc.bias, torch.zeros(4))
    x = _images(32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), _pooled(pretrained, x))


def test_resnet_fine_tuning_resumes_exactly_and_writes_a_timm_classifier(trained, bench, tmp_path, capsys):  # noqa: F811
    from slip.eval import finetune_cli
    from slip.eval.datasets import build_dataset
    from zero_shot import load_catalog

    catalog, _ = bench
    source = (catalog, trained)
    # The ResNet recipe (drop path 0.05) with mixup, cutmix, RandAugment and erasing; 12 steps an epoch.
    kw = {"batch_size": 16, "max_steps": 4, "seed": 1, "epochs": 2, "warmup_epochs": 1}
    full = finetune(_config(source, tmp_path / "full", **kw), log_stream=io.StringIO())
    first = finetune(_config(source, tmp_path / "cut", **{**kw, "max_steps": 2}), log_stream=io.StringIO())
    assert (full.step, first.step) == (4, 2)
    log = io.StringIO()
    second = finetune(_config(source, tmp_path / "cut", **kw), log_stream=log)
    assert "fine-tuning a ResNet-18 (timm resnet18" in log.getvalue() and "resumed from" in log.getvalue()
    assert "layer decay 1.0, drop path 0.05" in log.getvalue()
    a, b = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    wa = torch.load(tmp_path / "full" / "finetuned.pt", weights_only=True)
    wb = torch.load(tmp_path / "cut" / "finetuned.pt", weights_only=True)["state_dict"]
    for k, v in wa["state_dict"].items():
        torch.testing.assert_close(wb[k], v, rtol=1e-5, atol=1e-6)  # running statistics included
    assert second.value == full.value

    # Plain timm rebuilds the classifier from the checkpoint's names; load_finetuned agrees.
    info = wa["model"]
    assert info["architecture"] == "resnet18" and info["global_pool"] == "avg"
    plain = timm.create_model(info["architecture"], **info["timm_kwargs"])
    plain.load_state_dict(wa["state_dict"])
    model, transform = load_finetuned(tmp_path / "full" / "finetuned.pt")
    test = build_dataset(KEY, load_catalog(catalog)[KEY], "test", transform)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(plain.eval()(images), logits)
    accuracy = 100.0 * (logits.argmax(1) == torch.tensor(test.targets)).float().mean().item()
    assert accuracy == pytest.approx(full.value)

    # A fine-tuned ResNet is a starting point too (its fc replaced), and the command runs end to end.
    again, vision = classifier_from_checkpoint(tmp_path / "full" / "finetuned.pt", num_classes=3)
    assert vision.kind == "resnet" and again.fc.out_features == 3
    assert torch.equal(again.layer4[1].bn2.running_var, wa["state_dict"]["layer4.1.bn2.running_var"])
    out = tmp_path / "cli"
    assert finetune_cli.main(["--checkpoint", str(trained), "--catalog", str(catalog), "--benchmark", KEY,
                              "--output-dir", str(out), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
                              "--max-steps", "1", "--workers", "0", "--device", "cpu", "--no-mixup"]) == 0
    assert f"fine-tuned checkpoint: {out / 'finetuned.pt'}" in capsys.readouterr().out


def test_two_gloo_processes_fine_tune_a_resnet_as_one_process_does(trained, bench, tmp_path):  # noqa: F811
    # BatchNorm statistics are synchronised over the ranks: each rank's half of a step is
    # normalised with the whole batch's statistics, as the single process normalises it.
    catalog, _ = bench
    kw = {"mixup": 0.0, "cutmix": 0.0, "drop_path": 0.0, "batch_size": 16, "max_steps": 2, "epochs": 1,
          "warmup_epochs": 0}
    one = finetune(_config((catalog, trained), tmp_path / "one", **kw), log_stream=io.StringIO())
    finetune_on_two_gloo_processes(_config((catalog, trained), tmp_path / "two", **kw))
    a, b = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    wa = torch.load(tmp_path / "one" / "finetuned.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "two" / "finetuned.pt", weights_only=True)["state_dict"]
    for k in ("bn1.running_mean", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["value"] == pytest.approx(one.value)


# -------------------------------------------------------------------------------------- export


def test_timm_export_loads_by_folder_and_by_file_with_slips_pooled_features(trained, tmp_path):
    out = tmp_path / "tm"
    assert main([str(trained), str(out), "--format", "timm"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architecture"], cfg["model_args"], cfg["global_pool"]) == ("resnet18", {}, "avg")
    model, _ = slip.load_pretrained(trained)
    x = _images(32)
    want = _pooled(model, x)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)
        by_file = timm.create_model("resnet18", pretrained=True, num_classes=0,
                                    pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
        torch.testing.assert_close(by_file(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(by_file.bn1.running_var, model.visual.bn1.running_var, rtol=0, atol=0)
        tuned = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5)  # a new classifier
        assert tuned.eval()(x).shape == (3, 5)
        moved = tmp_path / "moved"  # a registered architecture: the folder needs no absolute path
        shutil.move(out, moved)
        torch.testing.assert_close(timm.create_model(f"local-dir:{moved}", pretrained=True).eval()(x), want,
                                   rtol=1e-5, atol=1e-6)
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    img = _pil()
    torch.testing.assert_close(timm.data.create_transform(**data_cfg)(img), eval_transform(32)(img), rtol=0, atol=1e-6)
    card = (moved / "README.md").read_text()
    assert "ResNet-18 (`resnet18`" in card and "512-d" in card and 'num_classes=0,' in card


@pytest.mark.parametrize("name", ["clip_resnet_tiny", "slip_resnet_tiny"])
def test_open_clip_export_pools_by_average_and_gives_slips_embeddings(tmp_path, name):
    model = _resnet(name)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt, step=3)
    out = tmp_path / "oc"
    assert main([str(ckpt), str(out), "--format", "open_clip"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    vision_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert vision_cfg == {"image_size": 32, "timm_model_name": "resnet18", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}
    _check_open_clip(model, out)  # image and text embeddings, logit scale, tokenizer and preprocessing
    shutil.move(out, tmp_path / "moved")  # registered: no absolute path in the config
    _check_open_clip(model, tmp_path / "moved", n_images=2)
    loaded, preprocess = slip.load_pretrained(tmp_path / "moved")  # and back into slip, running statistics too
    assert loaded.arch.vision == model.arch.vision and loaded.arch.text == model.arch.text
    _same_embeddings(loaded.eval(), model)
    assert preprocess.transforms[1].size == (32, 32)


def test_open_clip_resnet_folders_slip_cannot_load_are_refused_naming_why(tmp_path):
    model = _resnet("clip_resnet_tiny")
    src = export_open_clip(model, tmp_path / "src")
    no_pool = _edit_folder(src, tmp_path / "no_pool", lambda c: c["vision_cfg"].pop("timm_pool"))
    _same_embeddings(slip.load_pretrained(no_pool)[0].eval(), model)  # absent: open_clip's default, "avg"
    cases = [
        (lambda c: c["vision_cfg"].update(timm_pool="token"), r"vision_cfg\.timm_pool='token', slip's model needs 'avg'"),
        (lambda c: c["vision_cfg"].update(timm_model_name="resnet26"),
         r"vision_cfg\.timm_model_name='resnet26' builds a ResNet that is none of slip's towers"),
        (lambda c: c["vision_cfg"].update(timm_model_name="efficientnet_b0"),
         r"'efficientnet_b0' is a EfficientNet, neither a ViT nor a ResNet"),
    ]
    for i, (cfg_edit, message) in enumerate(cases):
        folder = _edit_folder(src, tmp_path / f"case{i}", cfg_edit)
        with pytest.raises(CheckpointError, match=re.escape(str(folder)) + ": .*" + message):
            slip.load_pretrained(folder)


def test_resnet50_configs_name_timms_resnet50_and_build_slips_tower():
    arch = get_architecture("slip_resnet50")
    assert resnet_timm_name(arch.vision) == "resnet50"
    assert timm_config(arch.vision)["architecture"] == "resnet50"
    cfg = open_clip_config(arch, resnet_timm_name(arch.vision))
    with torch.device("meta"):
        oc = open_clip.model.CLIP(**cfg["model_cfg"])
        ours = create_model("clip_resnet50")
    trunk = {k: v.shape for k, v in oc.visual.trunk.state_dict().items()}
    assert trunk == {k[len("visual."):]: v.shape for k, v in ours.state_dict().items() if k.startswith("visual.")}
    assert oc.visual.head.proj.weight.shape == ours.image_projection.T.shape == (1024, 2048)


def test_slips_layout_and_open_clip_without_text_are_refused_for_resnets(trained, tmp_path, capsys):
    out = tmp_path / "out.pt"
    assert main([str(trained), str(out), "--format", "slip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slip export: error: simclr_resnet_tiny: ")
    assert "ResNet (timm resnet18)" in err and "ViT models only" in err and "--format timm" in err
    assert main([str(trained), str(tmp_path / "oc"), "--format", "open_clip"]) == 2
    assert "an image-only model" in capsys.readouterr().err
    with pytest.raises(UserError, match="ViT models only"):
        export_slip(_resnet("clip_resnet_tiny"), out)
    assert not out.exists() and not (tmp_path / "oc").exists()
