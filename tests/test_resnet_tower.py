"""A ResNet image tower (issue 13): timm's resnet50 / resnet18 presets for every objective, each
view normalised by its own BatchNorm statistics, BatchNorm synchronised over ranks, and clear
refusals where a ResNet cannot go (BEiT, accumulation, SLIP's own checkpoint layout). Export,
fine-tuning and the probes of ResNet towers: tests/test_resnet_eval_export.py."""
from __future__ import annotations

import pytest
import torch
from test_train import corpus, losses_by_step, tiny  # noqa: F401  (fixture)

import slip
from slip.models.presets import VisionConfig, get_architecture
from slip.train.config import ConfigError
from slip.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resnet_presets_name_timm_towers_with_their_pooled_widths():
    assert get_architecture("slip_resnet50").vision == VisionConfig(width=2048, depth=50, heads=0, patch_size=32,
                                                                     image_size=224, kind="resnet")
    for name in ("clip_resnet50", "simclr_resnet50", "slip_resnet50", "clip_resnet_tiny", "slip_resnet_tiny"):
        assert name in slip.list_models()
    with pytest.raises(ValueError, match="2048 channels"):
        VisionConfig(width=512, depth=50, heads=0, kind="resnet")
    with pytest.raises(ValueError, match="names no ResNet"):
        VisionConfig(width=512, depth=20, heads=0, kind="resnet")
    torch.manual_seed(0)
    model = slip.create_model("slip_resnet_tiny")
    import timm

    assert isinstance(model.visual, timm.models.ResNet) and model.visual.num_features == 512
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_each_view_is_normalised_by_its_own_statistics():
    torch.manual_seed(0)
    model = slip.create_model("simclr_resnet_tiny").train()
    a, b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 3 + 1
    together = model.image_features([a, b])
    alone = [model.visual(a), model.visual(b)]
    for x, y in zip(together, alone):
        assert torch.allclose(x, y, atol=1e-6)
    # One call over both views would mix their statistics: a different result.
    mixed = model.visual(torch.cat([a, b])).split(4)
    assert not torch.allclose(mixed[0], alone[0], atol=1e-3)


def test_a_momentum_tower_with_batchnorm_runs_each_view_alone():
    torch.manual_seed(0)
    model = slip.create_model(get_architecture("simclr_resnet_tiny").with_ssl_method("mocov3")).train()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) + 2]
    targets = model.ssl.target_features(views)
    for t, v in zip(targets, views):
        assert torch.allclose(t, model.ssl.momentum_encoder(v), atol=1e-6)


@pytest.mark.parametrize("objective", [["model.name=slip_resnet_tiny"],
                                       ["model.name=simclr_resnet_tiny", "objective.clip=false",
                                        "objective.ssl=byol", "objective.momentum=0.9"]])
def test_a_resnet_tower_trains_beside_clip_and_alone(corpus, tmp_path, objective):  # noqa: F811
    out = tmp_path / "run"
    train(tiny(corpus, out, *objective, "train.max_steps=2"))
    losses = losses_by_step(out)
    assert set(losses) == {1, 2} and all(torch.isfinite(torch.tensor(v["loss"])) for v in losses.values())


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.ssl=beit", "objective.tokenizer=x"], "beit masks patch tokens"),
    (["train.accum_steps=2"], "BatchNorm in its image tower"),
    (["model.freeze_patch_embed=true"], "no patch embedding"),
])
def test_what_a_resnet_tower_cannot_do_is_refused_naming_the_setting(corpus, tmp_path, overrides, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        tiny(corpus, tmp_path / "run", "model.name=slip_resnet_tiny", *overrides)


def test_slips_original_layout_is_refused_clearly_and_evaluation_reads_a_resnet_checkpoint(tmp_path):
    from slip.errors import UserError
    from slip.eval.finetune import _tower_from_file
    from slip.export import export_slip

    torch.manual_seed(0)
    slip.save_checkpoint(slip.create_model("clip_resnet_tiny"), tmp_path / "r.pt")
    with pytest.raises(UserError, match=r"clip_resnet_tiny: .*a ResNet \(timm resnet18\).*ViT models only"):
        export_slip(str(tmp_path / "r.pt"), tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    vision, tower = _tower_from_file(tmp_path / "r.pt")  # fine-tuning reads the tower
    assert vision.kind == "resnet" and "conv1.weight" in tower and not any(k.startswith("fc.") for k in tower)
    model, _ = slip.load_pretrained(tmp_path / "r.pt")  # evaluation reads it as any checkpoint
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)
