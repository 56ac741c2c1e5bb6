"""Weight-decay groups and the per-step learning-rate schedule."""
from __future__ import annotations

import math

import pytest

import slip
from slip.train.config import OptimConfig
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
