"""Optimizer choice, weight-decay groups, LARS adaptation and the per-step learning-rate schedule."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from timm.optim import Lars
from torch import nn

import slip
from slip.train.config import ConfigError, OptimConfig, load_config
from slip.train.optim import build_optimizer, build_schedule, schedule_steps


def test_no_weight_decay_on_biases_norms_and_other_1d_parameters():
    model = slip.create_model("slip_vit_tiny")
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("logit_scale", "visual.blocks.0.norm1.weight", "visual.blocks.0.attn.qkv.bias",
                 "transformer.resblocks.0.ln_1.bias", "ssl.image_mlp.bn1.weight", "ssl.image_mlp.layer1.bias"):
        assert decay_of[id(named[name])] == 0.0, name
    for name in ("visual.blocks.0.attn.qkv.weight", "visual.pos_embed", "token_embedding.weight",
                 "image_projection", "text_projection", "ssl.image_mlp.layer3.weight"):
        assert decay_of[id(named[name])] == 0.1, name
    assert len(decay_of) == len(named)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    model = slip.create_model("clip_vit_tiny")
    cfg = OptimConfig(lr=1e-3, start_lr=1e-6, min_lr=1e-5, warmup_epochs=1)
    per_epoch, total = schedule_steps(samples_per_epoch=1000, global_batch=100, epochs=5)
    assert (per_epoch, total) == (10, 50)
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, cfg, total, per_epoch)

    def lr_at(step):
        sched.step_update(step)
        return opt.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(5) == pytest.approx(1e-6 + 5 * (1e-3 - 1e-6) / 10)
    assert lr_at(10) == pytest.approx(1e-3)
    assert lr_at(30) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_at(50) == pytest.approx(1e-5)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


def test_an_epoch_smaller_than_one_batch_is_refused():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        schedule_steps(samples_per_epoch=10, global_batch=64, epochs=1)


# --- optim.name: adamw | sgd | lars ---------------------------------------------------------------

OPTIMIZER_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "lars": Lars}


def tiny_model() -> nn.Module:
    """A ResNet-like miniature: conv and linear weights (2-D and up), biases and BatchNorm (1-D)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5), nn.Linear(5, 2))


def set_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def group_of(opt: torch.optim.Optimizer) -> dict:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CLASSES))
def test_each_name_builds_its_optimizer_with_no_decay_on_1d_parameters(name):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.5, weight_decay=0.1))
    assert type(opt) is OPTIMIZER_CLASSES[name]
    groups = group_of(opt)
    assert len(groups) == len(list(model.parameters()))
    for pname, p in model.named_parameters():
        assert groups[id(p)]["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), pname
        assert groups[id(p)]["lr"] == 0.5


def test_adamw_is_built_as_before():
    model = tiny_model()
    cfg = OptimConfig(lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    opt = build_optimizer(model, cfg)
    assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        (0.0, [id(p) for p in model.parameters() if p.ndim < 2]),
        (0.2, [id(p) for p in model.parameters() if p.ndim >= 2])]
    assert all((g["betas"], g["eps"], g["fused"], g["amsgrad"]) == ((0.8, 0.95), 1e-6, None, False)
               for g in opt.param_groups)


def test_sgd_uses_heavy_ball_momentum_without_nesterov():
    opt = build_optimizer(tiny_model(), OptimConfig(name="sgd", lr=0.03, momentum=0.8, weight_decay=1e-4))
    assert all((g["momentum"], g["nesterov"], g["dampening"]) == (0.8, False, 0) for g in opt.param_groups)


@pytest.mark.parametrize("weight_decay", [1e-6, 0.0])
def test_lars_adapts_only_the_decayed_group_even_without_weight_decay(weight_decay):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="lars", lr=4.8, momentum=0.9, weight_decay=weight_decay))
    groups = group_of(opt)
    for pname, p in model.named_parameters():
        g = groups[id(p)]
        assert g["always_adapt"] == (p.ndim >= 2), pname
        assert g["weight_decay"] == (weight_decay if p.ndim >= 2 else 0.0), pname
        assert (g["momentum"], g["nesterov"], g["trust_coeff"], g["trust_clip"]) == (0.9, False, 1e-3, False)


@pytest.mark.parametrize("weight_decay, tc", [(0.01, 1e-3), (0.0, 1e-3), (0.01, 0.02)])
def test_lars_two_steps_match_a_hand_computed_update(weight_decay, tc):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    lr, m = 0.7, 0.9
    opt = build_optimizer(model, OptimConfig(name="lars", lr=lr, momentum=m, weight_decay=weight_decay,
                                             lars_trust_coeff=tc))
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    w_buf = b_buf = None
    for seed in (1, 2):
        set_grads(model, seed)
        gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
        opt.step()
        # the weight: decayed, then scaled by trust_coeff * |w| / (|g| + wd |w| + eps)
        ratio = tc * w.norm() / (gw.norm() + weight_decay * w.norm() + 1e-8)
        dw = (gw + weight_decay * w) * ratio
        w_buf = dw if w_buf is None else m * w_buf + dw
        w = w - lr * w_buf
        # the bias: plain momentum SGD
        b_buf = gb if b_buf is None else m * b_buf + gb
        b = b - lr * b_buf
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model.bias.detach(), b, rtol=1e-9, atol=1e-12)


def test_decay_1d_decays_biases_and_norms_but_not_the_logit_scale():
    model = slip.create_model("slip_vit_tiny")
    named = dict(model.named_parameters())
    for name in ("adamw", "sgd", "lars"):
        opt = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-4, decay_1d=True))
        groups = group_of(opt)
        for pname, p in named.items():
            assert groups[id(p)]["weight_decay"] == (0.0 if pname == "logit_scale" else 1e-4), (name, pname)
            if name == "lars":  # SwAV's LARC adapts every parameter it decays
                assert groups[id(p)]["always_adapt"] == (pname != "logit_scale"), pname
        assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_sgd_with_decay_1d_steps_like_moco_v2s_sgd_over_every_parameter():
    # MoCo v2's main_moco.py: torch.optim.SGD(model.parameters(), lr, momentum, weight_decay)
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    theirs = copy.deepcopy(ours)
    opt = build_optimizer(ours, OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, decay_1d=True))
    ref = torch.optim.SGD(theirs.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    for seed in (1, 2):
        for model, o in ((ours, opt), (theirs, ref)):
            set_grads(model, seed)
            o.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_sgd_step_matches_a_hand_computed_update():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4))
    set_grads(model, 1)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w - 0.03 * (model.weight.grad + 1e-4 * w))
    torch.testing.assert_close(model.bias.detach(), b - 0.03 * model.bias.grad)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CLASSES))
def test_optimizer_state_survives_a_checkpoint_round_trip(name):
    """As the trainer does: optimizer.state_dict() into the checkpoint (read back with
    weights_only=True), load_state_dict into a freshly built optimizer; the next step is identical."""
    model = tiny_model()
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    for seed in (1, 2):
        set_grads(model, seed)
        opt.step()
    if name in ("sgd", "lars"):
        assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model = tiny_model()
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(saved["optimizer"])
    assert [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for m_, o_ in ((model, opt), (resumed_model, resumed)):
        set_grads(m_, 3)
        o_.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CLASSES))
def test_schedule_sets_lr_on_every_group_of_each_optimizer(name):
    cfg = OptimConfig(name=name, lr=0.3, start_lr=0.0, min_lr=0.0, warmup_epochs=1)
    opt = build_optimizer(tiny_model(), cfg)
    sched = build_schedule(opt, cfg, total_steps=20, steps_per_epoch=10)
    for step, expected in ((0, 0.0), (5, 0.15), (10, 0.3), (20, 0.0)):
        sched.step_update(step)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected] * len(opt.param_groups))


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=rmsprop"], r"optim\.name: 'rmsprop' is not one of adamw, adam, sgd, lars"),
    (["optim.schedule=step"], r"optim\.schedule: 'step' is not one of cosine, multistep"),
    (["optim.schedule=multistep"], r"optim\.decay_epochs: the multistep schedule needs at least one"),
    (["optim.schedule=multistep", "optim.decay_epochs=[45, 30]"], r"optim\.decay_epochs: must be positive and increasing"),
    (["optim.schedule=multistep", "optim.decay_epochs=[30]", "optim.decay_rate=0"], r"optim\.decay_rate: must be in \(0, 1\]"),
    (["optim.decay_epochs=[30]"], r"optim\.decay_epochs: only the multistep schedule uses it"),
    (["optim.name=sgd", "optim.momentum=1.0"], r"optim\.momentum: must be in \[0, 1\)"),
    (["optim.name=lars", "optim.momentum=-0.1"], r"optim\.momentum: must be in \[0, 1\)"),
    (["optim.lr=0"], r"optim\.lr: must be positive"),
    (["optim.weight_decay=-1e-4"], r"optim\.weight_decay: must be 0 or more"),
    (["optim.name=lars", "optim.lars_trust_coeff=0"], r"optim\.lars_trust_coeff: must be positive"),
])
def test_bad_optimizer_settings_fail_naming_the_key(tmp_path, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: shards/}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_moco_v2_and_swav_recipes_decay_every_parameter_as_their_released_code():
    root = Path(__file__).resolve().parents[1] / "configs" / "imagenet"
    for name, optimizer in (("mocov2_resnet50", "sgd"), ("swav_resnet50", "lars")):
        cfg = load_config(root / f"{name}.yaml")
        assert (cfg.optim.name, cfg.optim.decay_1d, cfg.optim.lars_trust_coeff) == (optimizer, True, 1e-3), name
    assert not load_config(root / "pirl_resnet50.yaml").optim.decay_1d  # VISSL's PIRL leaves 1-D parameters undecayed


def test_sgd_and_lars_recipes_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: shards/}\n")
    cfg = load_config(path, ["optim.name=lars", "optim.lr=4.8", "optim.weight_decay=1e-6", "optim.momentum=0.9"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == ("lars", 4.8, 1e-6, 0.9)
    assert load_config(path, ["optim.name=sgd", "optim.momentum=0"]).optim.name == "sgd"


def test_adam_adds_weight_decay_to_the_gradient_where_adamw_decouples_it():
    # One step from a zero gradient on w = 1 with weight decay 0.1: Adam's L2 term is the whole
    # gradient, so its normalised step is the full lr; AdamW shrinks w by lr * wd and its Adam
    # step is 0. With decay_1d the bias is decayed the same way (AMDIM decays every parameter).
    for name, expected in (("adam", 1 - 0.01), ("adamw", 1 - 0.01 * 0.1)):
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.fill_(1.0), model.bias.fill_(1.0)
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.01, weight_decay=0.1, decay_1d=True))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_multistep_schedule_drops_the_rate_after_each_decay_epoch_as_torchs_multisteplr():
    # torch's MultiStepLR stepped once per epoch (as AMDIM's train loop does), 4 updates an epoch,
    # after a 3-update linear warm-up from 0.01 (AMDIM's own warm-up sets the rate by hand).
    cfg = OptimConfig(name="adam", lr=0.5, start_lr=0.01, warmup_epochs=0.75, schedule="multistep",
                      decay_epochs=(2, 3), decay_rate=0.2)
    opt = build_optimizer(tiny_model(), cfg)
    sched = build_schedule(opt, cfg, total_steps=20, steps_per_epoch=4)
    reference_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=[2, 3], gamma=0.2)
    got, expected = [], []
    for step in range(20):
        sched.step_update(step)
        got.append(opt.param_groups[0]["lr"])
        warm = 0.01 + step * (0.5 - 0.01) / 3
        expected.append(warm if step < 3 else reference_opt.param_groups[0]["lr"])
        if step % 4 == 3:
            reference.step()
    assert got == pytest.approx(expected)
    assert got[7] == pytest.approx(0.5) and got[8] == pytest.approx(0.1) and got[12] == pytest.approx(0.02)

