"""Typed configuration: recipes, overrides and the errors users see."""
from __future__ import annotations

from pathlib import Path

import pytest

from slip.train.config import Config, ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*/*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


PRETRAINING = [p for p in RECIPES if p.parent.name in ("yfcc15m", "cc3m", "cc12m")]
EXPECTED = {  # recipe prefix -> (lr, weight decay, clip, ssl method, model kind)
    "clip": (5e-4, 0.5, True, "none", "clip"), "simclr": (3.2e-3, 0.1, False, "simclr", "simclr"),
    "slip": (3e-3, 0.1, True, "simclr", "slip"), "mocov3": (2.4e-3, 0.1, False, "mocov3", "simclr"),
    "byol": (2.4e-3, 0.1, False, "byol", "simclr"), "slip_mocov3": (3e-3, 0.1, True, "mocov3", "slip"),
    "slip_byol": (3e-3, 0.1, True, "byol", "slip"), "beit": (3e-3, 0.05, False, "beit", "simclr"),
    "slip_beit": (3e-3, 0.1, True, "beit", "slip"), "mocov2": (2.4e-3, 0.1, False, "mocov2", "simclr"),
    "slip_mocov2": (3e-3, 0.1, True, "mocov2", "slip"), "swav": (2.4e-3, 0.1, False, "swav", "simclr"),
    "slip_swav": (3e-3, 0.1, True, "swav", "slip"), "relicv2": (2.4e-3, 0.1, False, "relicv2", "simclr"),
    "slip_relicv2": (3e-3, 0.1, True, "relicv2", "slip"), "pirl": (2.4e-3, 0.1, False, "pirl", "simclr"),
    "slip_pirl": (3e-3, 0.1, True, "pirl", "slip"), "amdim": (2.4e-3, 0.1, False, "amdim", "simclr"),
    "slip_amdim": (3e-3, 0.1, True, "amdim", "slip"), "cpc": (2.4e-3, 0.1, False, "cpc", "simclr"),
    "slip_cpc": (3e-3, 0.1, True, "cpc", "slip"), "yadim": (2.4e-3, 0.1, False, "yadim", "simclr"),
    "slip_yadim": (3e-3, 0.1, True, "yadim", "slip"),
}


@pytest.mark.parametrize("recipe", PRETRAINING, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    prefix, size = recipe.stem.rsplit("_vit_", 1)
    betas = (0.9, 0.999) if prefix == "beit" else (0.9, 0.98)  # BEiT's own AdamW setting
    assert cfg.train.batch_size == 4096 and cfg.optim.betas == betas and cfg.optim.eps == 1e-8
    assert cfg.optim.min_lr == 1e-5 and cfg.optim.start_lr == 1e-6 and cfg.optim.warmup_epochs == 1
    lr, wd, clip, ssl, kind = EXPECTED[prefix]
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.objective.clip, cfg.objective.ssl) == (lr, wd, clip, ssl)
    assert cfg.train.epochs == {"yfcc15m": 25, "cc3m": 40, "cc12m": 35}[recipe.parent.name]
    assert cfg.model.name == f"{kind}_vit_{size}"
    if ssl in ("simclr", "mocov2", "mocov3", "swav", "relicv2", "pirl"):
        assert cfg.objective.ssl_temperature == {"simclr": 0.1, "mocov2": 0.2, "mocov3": 0.2, "swav": 0.1,
                                                 "relicv2": 0.2, "pirl": 0.07}[ssl]
    if ssl in ("mocov2", "swav"):  # the papers' 2048 -> 128 head; MoCo v2's 0.999, SwAV's 3000 prototypes
        assert (cfg.model.ssl_head.mlp_dim, cfg.model.ssl_head.out_dim) == (2048, 128)
        assert cfg.objective.momentum == 0.999 if ssl == "mocov2" else cfg.model.ssl_head.prototypes == 3000
    if ssl == "beit":
        assert cfg.objective.tokenizer and cfg.objective.mask_ratio == 0.4
    if ssl == "relicv2":  # BYOL's head and target momentum; beta and n_e of the loss
        assert (cfg.model.ssl_head.mlp_dim, cfg.model.ssl_head.out_dim, cfg.objective.momentum) == (4096, 256, 0.996)
        assert (cfg.objective.relic_beta, cfg.objective.relic_negatives) == (1.0, 10)
    if ssl == "pirl":  # PIRL's 128-d heads, 32,000 negatives, lambda 0.5, bank weight 0.5
        assert cfg.model.ssl_head.out_dim == 128
        assert (cfg.objective.nce_negatives, cfg.objective.pirl_lambda, cfg.objective.bank_momentum) == (32000, 0.5, 0.5)
    if ssl == "amdim":  # 1024-d heads (its n_rkhs), tanh clipping at 20, penalty 5e-2
        assert cfg.model.ssl_head.out_dim == 1024
        assert (cfg.objective.amdim_clip, cfg.objective.amdim_reg_weight) == (20.0, 5e-2)
    if ssl == "cpc":  # the paper's 7 x 7 patch grid; plain dot products (temperature 1)
        assert (cfg.model.ssl_head.patch_grid, cfg.objective.ssl_temperature) == (7, 1.0)
    if ssl == "yadim":  # no head; AMDIM's NCE on dot products / sqrt(C) at temperature 1
        assert cfg.objective.ssl_temperature == 1.0


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "tiny").glob("*.yaml")), ids=lambda p: p.stem)
def test_tiny_recipes_load(recipe):
    if recipe.stem == "common":
        return
    cfg = load_config(recipe)
    assert cfg.model.name.endswith("_vit_tiny") and cfg.train.batch_size == 16


def test_recipes_cover_every_method_size_and_corpus():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for corpus in ("yfcc15m", "cc3m", "cc12m"):
        for method in ("clip", "simclr", "slip"):
            for size in ("s16", "b16", "l16"):
                assert (corpus, f"{method}_vit_{size}") in names
    for combo in ("mocov2", "mocov3", "byol", "swav", "beit", "relicv2", "pirl", "amdim", "cpc", "slip_mocov2",
                  "slip_mocov3", "slip_byol", "slip_swav", "slip_beit", "slip_relicv2", "slip_pirl", "slip_amdim",
                  "slip_cpc", "yadim", "slip_yadim"):  # every SSL method, alone and in SLIP
        assert ("yfcc15m", f"{combo}_vit_b16") in names
        assert ("tiny", combo) in names


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "imagenet").glob("*.yaml")), ids=lambda p: p.stem)
def test_imagenet_resnet50_recipes_are_their_papers(recipe):
    cfg = load_config(recipe)
    assert cfg.model.name == "simclr_resnet50" and not cfg.objective.clip and cfg.optim.momentum == 0.9
    head = cfg.model.ssl_head
    if recipe.stem == "relicv2_resnet50":  # batch 4096, 1000 epochs; BYOL's LARS 0.2 x 4096/256, wd 1.5e-6
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs) == (4096, 1000, 10)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == ("lars", 3.2, 0.0, 1.5e-6)
        assert (head.mlp_dim, head.out_dim, cfg.objective.momentum, cfg.objective.ssl) == (4096, 256, 0.996, "relicv2")
        assert (cfg.objective.ssl_temperature, cfg.objective.relic_beta, cfg.objective.relic_negatives) == (0.2, 1.0, 10)
        return
    if recipe.stem == "pirl_resnet50":  # VISSL's reproduction (not verified against the paper's text)
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs) == (1024, 800, 0)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == ("sgd", 0.12, 1.2e-4, 1e-4)
        assert (cfg.objective.ssl, cfg.objective.ssl_temperature, head.out_dim) == ("pirl", 0.07, 128)
        assert (cfg.objective.nce_negatives, cfg.objective.pirl_lambda, cfg.objective.bank_momentum) == (32000, 0.5, 0.5)
        return
    if recipe.stem == "amdim_resnet50":  # amdim-public's: Adam 2e-4 (0.8, 0.999), L2 1e-5 on every parameter,
        # 500 warm-up updates, MultiStepLR [30, 45] x 0.2 stepped as step(epoch) (decays from epochs 31, 46), 50 epochs
        assert (cfg.train.batch_size, cfg.train.epochs, round(cfg.optim.warmup_epochs * (1281167 // 480))) == (
            480, 50, 500)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.decay_1d) == ("adam", 2e-4, 1e-5, True)
        assert (cfg.optim.schedule, cfg.optim.decay_epochs, cfg.optim.decay_rate) == ("multistep", (31.0, 46.0), 0.2)
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.start_lr) == ((0.8, 0.999), 1e-8, pytest.approx(2e-4 / 500))
        assert (cfg.objective.ssl, head.out_dim, cfg.objective.amdim_clip, cfg.objective.amdim_reg_weight) == (
            "amdim", 1536, 20.0, 5e-2)
        return
    if recipe.stem == "cpc_resnet50":  # bolts' Adam 4e-4 constant, L2 1e-6; batch 512, 200 epochs not verified
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs) == (512, 200, 0)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == ("adam", 4e-4, 4e-4, 1e-6)
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.decay_1d, cfg.optim.schedule) == ((0.9, 0.999), 1e-8, True, "cosine")
        assert (cfg.objective.ssl, head.patch_grid, cfg.objective.ssl_temperature) == ("cpc", 7, 1.0)
        return
    if recipe.stem == "yadim_resnet50":  # bolts' AMDIM module: Adam 2e-4 constant, L2 1e-5, batch 200; 150 epochs not verified
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.warmup_epochs) == (200, 150, 0)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == ("adam", 2e-4, 2e-4, 1e-5)
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.decay_1d, cfg.optim.schedule) == ((0.8, 0.999), 1e-7, True, "cosine")
        assert (cfg.objective.ssl, cfg.objective.ssl_temperature) == ("yadim", 1.0)
        return
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 200 and cfg.optim.warmup_epochs == 0
    if recipe.stem == "mocov2_resnet50":  # SGD 0.03, wd 1e-4, T 0.2, m 0.999, K 65536
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.03, 1e-4)
        assert (cfg.objective.ssl_temperature, cfg.objective.momentum, head.queue_size) == (0.2, 0.999, 65536)
    else:  # SwAV at batch 256: LARS 0.6 -> 0.0006, wd 1e-6, queue 3840 from epoch 15
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == ("lars", 0.6, 6e-4, 1e-6)
        assert (head.prototypes, head.queue_size, cfg.objective.queue_start_epoch) == (3000, 3840, 15)
        assert (cfg.objective.sinkhorn_epsilon, cfg.objective.sinkhorn_iterations) == (0.05, 3)


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "data: {train: shards/}\noptim: {lr: 1e-3}\n")
    cfg = load_config(path, ["optim.lr=2e-4", "train.batch_size=64", "optim.betas=[0.8, 0.9]", "eval.benchmark=x"])
    assert cfg.optim.lr == 2e-4 and cfg.train.batch_size == 64 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.eval.benchmark == "x"
    assert load_config(path).optim.lr == 1e-3  # "1e-3" is a number, not YAML 1.1's string


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], r"unknown key optim\.lrr \(known keys in optim: .*\blr\b"),
    (["trian.epochs=1"], r"unknown key trian"),
    (["optim.lr=fast"], r"optim\.lr: expected a number, got 'fast'"),
    (["train.batch_size=1.5"], r"train\.batch_size: expected an integer"),
    (["train.batch_size=true"], r"train\.batch_size: expected an integer"),
    (["model.grad_checkpointing=1"], r"model\.grad_checkpointing: expected true or false"),
    (["optim.betas=[0.9]"], r"optim\.betas: expected 2 values"),
    (["model.name=resnet50"], r"model\.name: unknown model 'resnet50'; known models: .*slip_vit_b16"),
    (["model.name=clip_vit_b16"], r"objective\.ssl: model 'clip_vit_b16' has no SSL head"),
    (["model.name=simclr_vit_b16"], r"objective\.clip: model 'simclr_vit_b16' has no text tower"),
    (["objective.clip=false", "objective.ssl=none"], r"nothing to train"),
    (["objective.ssl=none"], r"objective\.ssl is none but model 'slip_vit_b16' has an SSL head"),
    (["objective.clip=false"], r"objective\.clip is false but model 'slip_vit_b16' has a text tower"),
    (["objective.ssl=dino"], r"objective\.ssl: 'dino' is not one of amdim, beit, byol, cpc, mocov2, mocov3, pirl, relicv2, simclr, swav, yadim, none"),
    (["objective.ssl=beit"], r"objective\.tokenizer: beit needs a visual tokenizer"),
    (["objective.mask_ratio=1.2"], r"objective\.mask_ratio: must be in \(0, 1\)"),
    (["objective.nce_negatives=0"], r"objective\.nce_negatives: must be at least 1"),
    (["objective.pirl_lambda=1.5"], r"objective\.pirl_lambda: must be in \[0, 1\]"),
    (["objective.bank_momentum=1"], r"objective\.bank_momentum: must be in \[0, 1\)"),
    (["train.batch_size=100", "train.accum_steps=3"], r"not divisible by train\.accum_steps"),
    (["train.precision=fp8"], r"train\.precision: 'fp8'"),
    (["objective.gather=no_grad"], r"objective\.gather: 'no_grad' is not one of with_grad, slip"),
    (["model.text_truncation=drop"], r"model\.text_truncation: 'drop' is not one of keep_eot, slip"),
    (["data.train="], r"data\.train: no training shards"),
    (["eval.every=10"], r"eval\.every is set but neither eval\.benchmark nor eval\.knn is"),
    (["optim"], r"not of the form key=value"),
])
def test_bad_configs_fail_naming_the_key(tmp_path, overrides, message):
    path = write(tmp_path, "data: {train: shards/}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_slip_exact_options_default_off_and_accept_slip(tmp_path):
    path = write(tmp_path, "data: {train: shards/}\n")
    cfg = load_config(path)
    assert (cfg.objective.gather, cfg.model.text_truncation) == ("with_grad", "keep_eot")
    cfg = load_config(path, ["objective.gather=slip", "model.text_truncation=slip"])
    assert (cfg.objective.gather, cfg.model.text_truncation) == ("slip", "slip")


def test_errors_in_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "data: {train: shards/}\noptim: {lr: [1]}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr: expected a number"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_base_files_merge_under_the_recipe_and_cycles_are_caught(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {train: a/, workers: 2}\noptim: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.data.train, cfg.data.workers, cfg.optim.lr) == ("a/", 2, 0.2)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "b.yaml")


def test_override_parsing():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("x=hello world") == {"x": "hello world"}
    assert parse_override("x=null") == {"x": None}


def test_config_round_trips_through_a_saved_yaml(tmp_path):
    from slip.train.config import save_config

    cfg = load_config(write(tmp_path, "data: {train: s/}\n"), ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg and isinstance(again, Config)
