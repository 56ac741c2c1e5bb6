"""AMDIM and representation extraction: the loss against hand-computed values, which local
features pair with which global feature, two gloo ranks against one process, the tower's feature
maps for a tiny ViT and ResNet (pooled methods unchanged), and training through the trainer
(learning, beside CLIP, gradient accumulation, exact resume)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ssl import (  # noqa: F401  (corpus: the shared fixture)
    _run,
    check_exact_resume,
    check_lowers_its_loss,
    check_trains_beside_clip,
    corpus,
)

import slip
from slip.models import get_architecture
from slip.ssl.amdim import (
    RKHSHead,
    amdim_nce,
    amdim_views,
    local_layers,
    position_generator,
    sample_positions,
)
from slip.ssl.base import MAP
from slip.train.config import ConfigError, load_config


def _model(name: str = "simclr_vit_tiny", method: str = "amdim"):
    torch.manual_seed(0)
    return slip.create_model(get_architecture(name).with_ssl_method(method))


# ------------------------------------------------------------------------------------ the loss
def _by_hand(g, local, c, w):
    """AMDIM's NCE and penalty with plain Python loops, one anchor and position at a time."""
    b, d = g.shape
    n, positions, _ = local.shape
    raw = [[[sum(g[i, k].item() * local[j, p, k].item() for k in range(d)) / math.sqrt(d) for p in range(positions)]
            for j in range(n)] for i in range(b)]
    reg = w * sum(s * s for row in raw for col in row for s in col) / (b * n * positions)
    clipped = [[[c * math.tanh(s / c) for s in col] for col in row] for row in raw]
    total = 0.0
    for i in range(b):
        negatives = [s for j in range(n) if j != i for s in clipped[i][j]]
        for p in range(positions):
            pos = clipped[i][i][p]
            total += -(pos - math.log(math.exp(pos) + sum(math.exp(s) for s in negatives)))
    return total / (b * positions), reg


def test_nce_matches_a_hand_computed_value():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    local = torch.tensor([[[1.0, 0.5], [0.0, -1.0]], [[2.0, 1.0], [0.5, 0.5]], [[-1.0, 3.0], [1.0, 0.0]]])
    out = amdim_nce(g, local, clip=20.0, reg_weight=5e-2)
    nce, reg = _by_hand(g, local, 20.0, 5e-2)
    assert out["nce"].item() == pytest.approx(nce, rel=1e-6)
    assert out["reg"].item() == pytest.approx(reg, rel=1e-6)


def test_tanh_clipping_bounds_the_scores_at_c():
    # Raw scores of 100 and more: clipped at c = 2 every score is within 2, so the NCE of B = 2,
    # L = 1 is near -log(e^2 / (e^2 + e^s)) with s the clipped negative, whatever the raw values.
    g = torch.tensor([[100.0, 0.0], [0.0, 100.0]]) * math.sqrt(2)
    local = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])  # raw score 100 for every pair
    out = amdim_nce(g, local, clip=2.0, reg_weight=1.0)
    s = 2 * math.tanh(50.0)
    assert out["nce"].item() == pytest.approx(math.log(2), rel=1e-6)  # positive and negative tie at ~2
    assert out["reg"].item() == pytest.approx(100.0**2, rel=1e-6)  # the penalty is on the raw scores
    nce, _ = _by_hand(g, local, 2.0, 1.0)
    assert nce == pytest.approx(-(s - math.log(2 * math.exp(s))), rel=1e-6)


def test_positives_are_the_images_own_positions_and_negatives_every_other_images():
    torch.manual_seed(0)
    d, positions = 8, 3
    g = torch.nn.functional.normalize(torch.randn(4, d), dim=1) * 6
    own = g[:, None, :].expand(4, positions, d).clone()  # image i's locals point along its global feature
    matched = amdim_nce(g, own)
    assert matched["acc"].item() == 100.0 and matched["nce"].item() < 1.0
    shifted = amdim_nce(g, own.roll(1, dims=0))  # image i's locals now belong to image i - 1
    assert shifted["acc"].item() == 0.0 and shifted["nce"].item() > matched["nce"].item() + 3
    # Every position of every other image is a negative: the gradient reaches all of them, and
    # changing one other image's local feature at one position changes the loss.
    local = own.clone().requires_grad_()
    amdim_nce(g, local)["nce"].backward()
    assert (local.grad.abs().sum(dim=2) > 0).all()
    other = own.clone()
    other[2, 1] = -other[2, 1]
    assert amdim_nce(g[:1], own)["nce"].item() != pytest.approx(amdim_nce(g[:1], other)["nce"].item())
    # ... while the anchor's own positions are never among its negatives: with one position
    # per image and two images, the loss is -log(e^a / (e^a + e^b)) exactly.
    two = amdim_nce(g[:1], own[:2, :1])
    a, b = (g[0] @ own[0, 0]).item() / math.sqrt(d), (g[0] @ own[1, 0]).item() / math.sqrt(d)
    a, b = 20 * math.tanh(a / 20), 20 * math.tanh(b / 20)
    assert two["nce"].item() == pytest.approx(-(a - math.log(math.exp(a) + math.exp(b))), abs=1e-6)


def test_the_loss_sums_global_to_local_at_both_scales_and_local_to_local():
    # amdim-public's costs.py: 1-7, 1-5 and 5-5 (one drawn position of the deeper scale's locals
    # against the other view's locals of that scale), each averaged over its two directions, the
    # NCEs and penalties summed. With one position at the deeper scale, the 5-5 source is that one.
    model = _model()
    gen = torch.Generator().manual_seed(3)
    g1, g2 = torch.randn(4, 6, generator=gen) * 3, torch.randn(4, 6, generator=gen) * 3
    l1 = [torch.randn(4, 5, 6, generator=gen) * 3, torch.randn(4, 1, 6, generator=gen) * 3]
    l2 = [torch.randn(4, 5, 6, generator=gen) * 3, torch.randn(4, 1, 6, generator=gen) * 3]
    out = model.ssl.loss({"global": [g1, g2], "local": [l1, l2]})
    pairs = [(g1, l2[0], g2, l1[0]), (g1, l2[1], g2, l1[1]), (l1[1][:, 0], l2[1], l2[1][:, 0], l1[1])]
    nce = reg = 0.0
    for a_src, a_trg, b_src, b_trg in pairs:
        a, b = amdim_nce(a_src, a_trg), amdim_nce(b_src, b_trg)
        nce, reg = nce + (a["nce"].item() + b["nce"].item()) / 2, reg + (a["reg"].item() + b["reg"].item()) / 2
    assert out["ssl_nce"].item() == pytest.approx(nce, rel=1e-6)
    assert out["ssl_reg"].item() == pytest.approx(reg, rel=1e-6)
    assert out["loss"].item() == pytest.approx(nce + reg, rel=1e-6)


def test_positions_are_drawn_per_image_from_the_steps_generator():
    local = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6, 1)  # image n, position p: 6 n + p
    drawn = sample_positions(local, position_generator(0, 7))[:, 0]
    assert torch.equal(drawn, sample_positions(local, position_generator(0, 7))[:, 0])  # reproducible
    assert all(6 * n <= v < 6 * n + 6 for n, v in enumerate(drawn.tolist()))  # each image's own position
    draws = {tuple(sample_positions(local, position_generator(0, u))[:, 0].tolist()) for u in range(8)}
    assert len(draws) > 1  # later updates draw again


# ----------------------------------------------------------------------------------- the head
def test_the_head_matches_a_hand_computed_value():
    # amdim-public's FakeRKHSConvNet (--use_bn 0): bn_out(shortcut(x) + layer2(relu(layer1(x)))).
    head = RKHSHead(2, 3).eval()  # BatchNorm at its initial running statistics: x / sqrt(1 + eps)
    with torch.no_grad():
        head.layer1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.layer2.weight.copy_(2 * torch.eye(3))
        head.shortcut.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        head.shortcut.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        out = head(torch.tensor([[1.0, -2.0]]))
    # layer1: (1, -2, -1) -> relu (1, 0, 0) -> layer2 (2, 0, 0); shortcut (1, -2, 1); sum (3, -2, 1)
    assert out[0].tolist() == pytest.approx([v / math.sqrt(1 + 1e-5) for v in (3.0, -2.0, 1.0)], rel=1e-6)
    assert head.layer1.bias is None and head.layer2.bias is None


def test_the_head_starts_as_the_normalised_shortcut_near_the_identity():
    torch.manual_seed(0)
    head = RKHSHead(4, 6)
    assert torch.equal(head.layer2.weight, torch.zeros(6, 6))  # zero-initialised residual branch
    w = head.shortcut.weight
    assert torch.equal(w.diagonal(), torch.ones(4))  # identity on the first d_in channels ...
    off = w - torch.eye(6, 4)
    assert off.abs().max() <= 0.01 and off.abs().max() > 0  # ... plus uniform noise in [-0.01, 0.01]
    x = torch.randn(32, 5, 4)
    out = head.train()(x).reshape(-1, 6)  # BatchNorm last, over all positions, of the shortcut alone
    s = head.shortcut(x).reshape(-1, 6)
    expected = (s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.equal(RKHSHead(6, 4).shortcut.weight.diagonal().abs(), torch.ones(4))  # narrowing: default init


def test_views_augment_as_amdims_imagenet_transforms():
    # amdim-public's datasets.py TransformsImageNet128 (and bolts' AMDIMTrainTransformsImageNet128).
    for v in amdim_views(224):
        assert (v.size, v.scale, v.ratio, v.jitter, v.jitter_p, v.grayscale_p, v.hflip_p, v.blur_p) == (
            (224, 224), (0.3, 1.0), (0.7, 1.4), (0.4, 0.4, 0.4, 0.1), 0.8, 0.25, 0.5, 0.0)
    # Its flip comes before both crops: one draw per image for the two views.
    assert [v.flip_with for v in amdim_views(224)] == [None, "amdim1"]


WORLD, B = 2, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(rows: slice = slice(None)):
    gen = torch.Generator().manual_seed(5)
    g_all, l_all = torch.randn(WORLD * B, 6, generator=gen) * 3, torch.randn(WORLD * B, 4, 6, generator=gen) * 3
    g, local = g_all[rows].clone().requires_grad_(), l_all[rows].clone().requires_grad_()
    out = amdim_nce(g, local)
    (out["nce"] + out["reg"]).backward()
    return (out["nce"] + out["reg"]).detach(), g.grad, local.grad


def _method_loss(rows: slice = slice(None)) -> torch.Tensor:
    """The method's whole loss (1-7, 1-5 and the 5-5 term's drawn positions) at update 7."""
    model = _model()
    model.ssl.advance_count("num_updates", 7)
    gen = torch.Generator().manual_seed(6)
    feats = [torch.randn(WORLD * B, 6, generator=gen) for _ in range(2)]
    grids = [[torch.randn(WORLD * B, n, 6, generator=gen) for n in (5, 4)] for _ in range(2)]
    out = model.ssl.loss({"global": [f[rows] for f in feats], "local": [[m[rows] for m in v] for v in grids]})
    return out["loss"].detach()


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss, g, local = _loss_and_grads(slice(rank * B, (rank + 1) * B))
        method = _method_loss(slice(rank * B, (rank + 1) * B))
        torch.save({"loss": loss, "g": g, "local": local, "method": method}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_the_loss_and_gradients_of_one_process(tmp_path):
    # The local features are gathered with gradient: every rank's anchors see the whole global
    # batch's locals as negatives, and DDP's average over ranks gives one process's step.
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    loss, g, local = _loss_and_grads()
    assert torch.stack([p["loss"] for p in parts]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(torch.cat([p["g"] for p in parts]) / WORLD, g, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.cat([p["local"] for p in parts]) / WORLD, local, rtol=1e-5, atol=1e-7)
    # the 5-5 term's positions are drawn for the global batch: each rank takes its own images' draws
    assert torch.stack([p["method"] for p in parts]).mean().item() == pytest.approx(_method_loss().item(), rel=1e-6)


# --------------------------------------------------------------- representation extraction
@pytest.mark.parametrize("name, layers, shapes", [
    ("simclr_vit_tiny", (0, 1), [(4, 64), (4, 64, 4, 4), (4, 64, 4, 4)]),
    ("simclr_resnet_tiny", (3, 4), [(4, 512), (4, 256, 2, 2), (4, 512, 1, 1)]),
])
def test_the_tower_returns_the_pooled_feature_and_the_requested_grids_in_one_call(name, layers, shapes):
    model = _model(name).eval()
    assert model.ssl.view_features == layers == local_layers(model.visual)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        feats = model.forward_features(views=views)["views"]
        for view, f in zip(views, feats):
            assert [tuple(t.shape) for t in f] == shapes
            assert torch.allclose(f[0], model.visual(view), atol=1e-5)  # the pooled feature as before
            if name.startswith("simclr_vit"):  # a block's grid: its tokens without the class token
                _, inter = model.visual.forward_intermediates(view, indices=[0])
                assert torch.allclose(f[1], inter[0], atol=1e-5)
            else:  # stage 4's map, which the pooled feature averages
                assert torch.allclose(f[2].mean(dim=(2, 3)), f[0], atol=1e-5)


def test_map_requests_the_last_grid_and_pooled_methods_get_plain_tensors():
    vit, resnet = _model("slip_vit_tiny", "simclr"), _model("simclr_resnet_tiny", "simclr")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, grid = vit.image_features([x], requests=[(MAP,)])[0]
        tokens = vit.visual.forward_features(x)[:, 1:]  # after the final norm, without the class token
        assert grid.shape == (2, 64, 4, 4) and torch.equal(grid.flatten(2).transpose(1, 2), tokens)
        assert torch.equal(pooled, vit.visual(x))
        pooled, last = resnet.image_features([x], requests=[(MAP,)])[0]
        assert last.shape == (2, 512, 1, 1) and torch.allclose(last.flatten(1), pooled)
        # A method that requests nothing (SimCLR) gets pooled tensors, the CLIP view too.
        out = vit.forward_features(image=x, views=[x, x])
        assert torch.is_tensor(out["image"]) and all(torch.is_tensor(v) and v.shape == (2, 64) for v in out["views"])
        assert torch.equal(out["views"][0], vit.visual(x))


def test_beside_clip_the_clip_view_stays_pooled_and_shares_the_tower_call():
    model = _model("slip_vit_tiny").eval()
    x, views = torch.randn(2, 3, 32, 32), [torch.randn(2, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        out = model.forward_features(image=x, views=views)
        assert torch.is_tensor(out["image"]) and torch.allclose(out["image"], model.visual(x), atol=1e-5)
        assert all(isinstance(v, tuple) and len(v) == 3 for v in out["views"])


def test_amdim_settings_are_validated(tmp_path):
    path = "configs/tiny/amdim.yaml"
    with pytest.raises(ConfigError, match=r"objective\.amdim_clip"):
        load_config(path, ["objective.amdim_clip=0"])
    with pytest.raises(ConfigError, match=r"objective\.amdim_reg_weight"):
        load_config(path, ["objective.amdim_reg_weight=-1"])


# ---------------------------------------------------------------------- through the trainer
@pytest.mark.usefixtures("one_torch_thread")
def test_amdim_lowers_its_loss_on_the_synthetic_corpus(corpus, tmp_path):  # noqa: F811
    # Chance is 3 ln(1 + 15 x 16) = 16.45 (batch 16, 4 x 4 positions, three terms), plus the
    # penalty. Measured on the build machine (one thread), first and last 16 steps: loss 17.49 ->
    # 15.76, positives beating every negative 4.1% -> 5.1%.
    acc = [r["ssl_acc"] for r in check_lowers_its_loss(corpus, tmp_path, "amdim", 0.97)]
    assert sum(acc[-16:]) > sum(acc[:16]) * 1.2


@pytest.mark.usefixtures("one_torch_thread")
def test_amdim_beside_clip_trains_and_accumulates_like_the_plain_step(corpus, tmp_path):  # noqa: F811
    # The views' local grids are cached per micro-batch like pooled features.
    check_trains_beside_clip(corpus, tmp_path, "slip_amdim", ("clip_loss", "ssl_loss", "ssl_nce", "ssl_reg", "ssl_acc"),
                             accumulated=("loss", "clip_loss", "ssl_loss", "ssl_reg"))


@pytest.mark.usefixtures("one_torch_thread")
def test_amdim_resumes_exactly(corpus, tmp_path):  # noqa: F811
    check_exact_resume(corpus, tmp_path, "amdim", ("loss", "ssl_nce", "ssl_reg", "ssl_acc"))


@pytest.mark.usefixtures("one_torch_thread")
def test_amdim_trains_a_resnet_tower_on_its_stages(corpus, tmp_path):  # noqa: F811
    result, records = _run(corpus, tmp_path / "run", "amdim", "model.name=simclr_resnet_tiny", "train.max_steps=2")
    assert result.step == 2 and all(math.isfinite(r["loss"]) for r in records)
