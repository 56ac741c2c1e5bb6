"""SwAV and MoCo v2: hand-computed losses, Sinkhorn's marginals, the queues' order, SwAV's frozen
and normalised prototypes, multi-crop views, and MoCo v2's shuffled BatchNorm over two ranks."""
from __future__ import annotations

import io
import math
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import slip
from slip.data import decode as D
from slip.data import views as V
from slip.losses import mocov2_loss, sinkhorn, swav_loss
from slip.models import get_architecture
from slip.models.batchnorm import GlobalBatchNorm2d, sync_batchnorm
from slip.ssl import method_views
from slip.train.config import ConfigError, ObjectiveConfig, load_config


def _model(name: str, method: str, **head):
    torch.manual_seed(0)
    return slip.create_model(get_architecture(name).with_ssl_method(method, **head))


# ------------------------------------------------------------------------------- MoCo v2
def test_mocov2_loss_matches_a_hand_computed_value():
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0]])  # normalised inside: both (1, 0)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    out = mocov2_loss(q, k, queue, temperature=0.5)
    # logits (1, 0, -1) / 0.5 = (2, 0, -2), the positive first
    want = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["ssl_acc"].item() == 100.0


def test_mocov2_queue_is_first_in_first_out_and_wraps():
    ssl = _model("simclr_vit_tiny", "mocov2", queue_size=5).ssl
    assert ssl.queue.shape == (5, 32) and torch.allclose(ssl.queue.norm(dim=1), torch.ones(5))
    keys = torch.arange(1, 9, dtype=torch.float32)[:, None].expand(8, 32)
    ssl.enqueue(keys[:3])  # rows 0-2
    assert int(ssl.queue_ptr) == 3 and ssl.queue[:3, 0].tolist() == [1, 2, 3]
    ssl.enqueue(keys[3:6])  # rows 3, 4, then 0: the oldest key is overwritten first
    assert int(ssl.queue_ptr) == 1 and ssl.queue[:, 0].tolist() == [6, 2, 3, 4, 5]
    ssl.enqueue(keys)  # more keys than the queue holds: the last five
    assert sorted(ssl.queue[:, 0].tolist()) == [4, 5, 6, 7, 8] and int(ssl.queue_ptr) == 4


def test_mocov2_enqueues_the_step_keys_only_when_the_update_is_applied():
    model = _model("simclr_vit_tiny", "mocov2", queue_size=8).train()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    before = model.ssl.queue.clone()
    out = model(views=views)
    model.ssl.loss(out["ssl"])  # a step whose update is skipped never reaches on_step_end
    assert torch.equal(model.ssl.queue, before)
    model.ssl.loss(model(views=views)["ssl"])
    logged = model.ssl.on_step_end(1, 10, model.visual)
    keys = F.normalize(out["ssl"]["key"], dim=1)
    assert torch.allclose(model.ssl.queue[:4], keys, atol=1e-6) and torch.equal(model.ssl.queue[4:], before[4:])
    assert logged["momentum"] == 0.999 and int(model.ssl.num_updates) == 1  # constant momentum
    assert model.ssl.projector.layer1.out_features == 128 and not any(
        isinstance(m, torch.nn.BatchNorm1d) for m in model.ssl.projector.modules())  # MoCo v2's head has no BN


def test_mocov2_learns_to_tell_images_apart_against_its_queue():
    # 64 images seen again and again under noise: the queue (64 keys) holds the other images'
    # keys from the momentum encoder, so the loss can only fall by telling the images apart.
    model = _model("simclr_vit_tiny", "mocov2", queue_size=64).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]
    losses = []
    for step in range(64):
        x = images[step % 4]
        views = [x + 0.3 * torch.randn(x.shape, generator=g), x + 0.3 * torch.randn(x.shape, generator=g)]
        loss = model.ssl.loss(model(views=views)["ssl"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.ssl.on_step_end(step + 1, 64, model.visual, base_momentum=0.99)
        losses.append(loss.item())
    # Measured: 3.49 over steps 5-20 (the queue full of real keys) -> 2.72 over the last 16.
    first, last = sum(losses[4:20]) / 16, sum(losses[-16:]) / 16
    assert last < first * 0.9, (first, last)


def test_sync_batchnorm_leaves_the_shuffled_bn_key_encoder_per_rank():
    for device in ("cpu", "cuda"):  # the CUDA conversion only builds modules: it runs on CPU too
        model = sync_batchnorm(_model("simclr_resnet_tiny", "mocov2", queue_size=8), torch.device(device))
        online = [type(m) for m in model.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        keys = [type(m) for m in model.ssl.momentum_encoder.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert online and set(online) == {GlobalBatchNorm2d if device == "cpu" else torch.nn.SyncBatchNorm}
        assert set(keys) == {torch.nn.BatchNorm2d}


B, WORLD = 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key_images():
    return torch.randn(WORLD * B, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _shuffle_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = sync_batchnorm(_model("simclr_resnet_tiny", "mocov2", queue_size=8), torch.device("cpu")).train()
        model.ssl.num_updates.fill_(7)
        x = _key_images()[rank * B:(rank + 1) * B]
        (keys,) = model.ssl.target_features([torch.zeros_like(x), x])
        torch.save(keys, os.path.join(out_dir, f"keys{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mocov2_shuffled_bn_normalises_each_key_with_another_ranks_samples(tmp_path):
    mp.spawn(_shuffle_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.cat([torch.load(tmp_path / f"keys{r}.pt") for r in range(WORLD)])
    # By hand: the global key batch permuted (seeded by the update count, the same on every
    # rank), each rank's slice through the key encoder with its own BatchNorm statistics, then
    # put back in the original order.
    images = _key_images()
    order = torch.randperm(WORLD * B, generator=torch.Generator().manual_seed(7))
    want = torch.empty(WORLD * B, 512)
    for r in range(WORLD):
        encoder = _model("simclr_resnet_tiny", "mocov2", queue_size=8).ssl.momentum_encoder.train()
        with torch.no_grad():
            want[order[r * B:(r + 1) * B]] = encoder(images[order[r * B:(r + 1) * B]])
    assert torch.allclose(got, want, atol=1e-5)
    encoder = _model("simclr_resnet_tiny", "mocov2", queue_size=8).ssl.momentum_encoder.train()
    with torch.no_grad():
        unshuffled = torch.cat([encoder(images[:B]), encoder(images[B:])])
    assert not torch.allclose(got, unshuffled, atol=1e-3), "the shuffle changed which samples share statistics"


# ----------------------------------------------------------------------------------- SwAV
def test_sinkhorn_codes_sum_to_one_per_sample_and_share_the_prototypes_equally():
    scores = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.dtype == torch.float32 and torch.allclose(codes.sum(dim=1), torch.ones(64), atol=1e-5)
    # Three iterations nearly balance the prototypes; many balance them exactly: N/K each.
    assert (codes.sum(dim=0) - 8).abs().max() < 4
    balanced = sinkhorn(scores, epsilon=0.05, iterations=200)
    assert torch.allclose(balanced.sum(dim=0), torch.full((8,), 8.0), atol=1e-3)
    assert torch.allclose(balanced.sum(dim=1), torch.ones(64), atol=1e-5)


def test_sinkhorn_matches_a_hand_computed_case():
    # exp(scores / 1) = [[e, 1], [1, e]] is already balanced: each sample's codes are its row / (e + 1).
    codes = sinkhorn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), epsilon=1.0, iterations=1)
    e = math.e
    assert torch.allclose(codes, torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]), atol=1e-6)


def test_swav_loss_matches_a_hand_computed_value():
    s0, s1, s2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    q0, q1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = swav_loss([s0, s1, s2], [q0, q1], temperature=0.5)
    lse = math.log(math.exp(2) + 1)  # log-sum-exp of (2, 0)
    # crop 0's code (prototype 0) from crops 1 and 2; crop 1's (prototype 1) from crops 0 and 2
    from_0 = ((lse - 2) + lse) / 2
    from_1 = (math.log(2) + (lse - 2)) / 2
    assert out["loss"].item() == pytest.approx((from_0 + from_1) / 2, rel=1e-6)
    assert out["ssl_acc"].item() == 100.0  # crop 1's best prototype is crop 0's code


def test_swav_queue_puts_new_embeddings_first_and_joins_the_codes_once_full():
    ssl = _model("simclr_vit_tiny", "swav", prototypes=4, queue_size=6).ssl
    assert not ssl.queue_in_use
    emb = F.normalize(torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    ssl.enqueue(emb[:, :4])
    assert torch.equal(ssl.queue[:, :4], emb[:, :4]) and not ssl.queue[:, 4:].any() and not ssl.queue_in_use
    ssl.enqueue(emb[:, 4:8])  # newest at the front, the oldest pushed out of the end
    assert torch.equal(ssl.queue, torch.cat([emb[:, 4:8], emb[:, :2]], dim=1)) and ssl.queue_in_use
    scores = torch.randn(3, 4)
    alone = sinkhorn(scores, ssl.epsilon, ssl.iterations)
    with_queue = ssl.codes(scores, 0)
    full = sinkhorn(torch.cat([ssl.queue[0] @ ssl.prototypes.weight.t(), scores]), ssl.epsilon, ssl.iterations)
    assert torch.allclose(with_queue, full[-3:]) and not torch.allclose(with_queue, alone)


def test_swav_prototypes_stay_frozen_then_learn_and_stay_normalised():
    model = _model("simclr_vit_tiny", "swav", prototypes=8).train()
    cfg = ObjectiveConfig(ssl="swav", freeze_prototypes_epochs=0.5)
    model.ssl.configure_training(cfg, steps_per_epoch=4, total_steps=8)
    assert model.ssl.freeze_steps == 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    views = [torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(i))
             for i, s in enumerate([32, 32] + [16] * 6)]
    assert [tuple(v.shape[-2:]) for v in views] == [v.size for v in method_views("swav", 32).ssl]
    for step in range(4):
        before = model.ssl.prototypes.weight.detach().clone()
        optimizer.zero_grad()
        model.ssl.loss(model(views=views)["ssl"])["loss"].backward()
        model.ssl.before_optimizer_step(step)
        optimizer.step()
        model.ssl.on_step_end(step + 1, 8, model.visual)
        moved = (model.ssl.prototypes.weight - before).abs().max() > 1e-4  # renormalising alone moves bits
        assert moved == (step >= 2), step
        assert torch.allclose(model.ssl.prototypes.weight.norm(dim=1), torch.ones(8), atol=1e-6)


def test_swav_multi_crop_views_come_from_one_decode_at_two_sizes(monkeypatch):
    views = method_views("slip-swav", 224)
    assert [v.size[0] for v in views.all] == [224] * 3 + [96] * 6
    assert [v.scale for v in views.ssl] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert V.small_crop_size(32, 16) == (16, 16) and V.small_crop_size(384, 16) == (160, 160)
    calls = []
    original = D._decode_pixels
    monkeypatch.setattr(D, "_decode_pixels", lambda *a, **k: calls.append(1) or original(*a, **k))
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 60)).save(buf, format="JPEG")
    crops = D.decode_views(buf.getvalue(), method_views("slip-swav", 32).all, random.Random(0))
    assert len(calls) == 1 and [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 3 + [(3, 16, 16)] * 6


def test_a_multi_crop_vit_runs_both_sizes_and_is_the_plain_tower_at_its_own():
    swav = _model("slip_vit_tiny", "swav", prototypes=8).eval()
    plain = _model("slip_vit_tiny", "simclr").eval()
    plain.visual.load_state_dict(swav.visual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(swav.visual(x), plain.visual(x))
    assert swav.visual(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    out = swav(views=[x, x] + [torch.randn(2, 3, 16, 16)] * 6)["ssl"]
    assert len(out["scores"]) == 8 and out["scores"][0].shape == (2, 8)
    assert torch.allclose(torch.stack(out["embeds"]).norm(dim=-1), torch.ones(8, 2), atol=1e-5)


def test_ssl_head_settings_are_checked_and_reach_the_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x}\n")
    with pytest.raises(ConfigError, match="model.ssl_head"):
        load_config(path, ["model.name=clip_vit_tiny", "objective.ssl=none", "model.ssl_head.queue_size=8"])
    with pytest.raises(ConfigError, match="queue_size"):
        load_config(path, ["model.name=slip_vit_tiny", "objective.ssl=mocov2", "model.ssl_head.queue_size=-1"])
    with pytest.raises(ConfigError, match="unknown key model.ssl_head.queue"):
        load_config(path, ["model.name=slip_vit_tiny", "model.ssl_head.queue=8"])
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        _model("simclr_vit_tiny", "mocov2", queue_size=0)
    from slip.train.trainer import resolve_architecture

    cfg = load_config(path, ["model.name=slip_vit_tiny", "objective.ssl=swav", "model.ssl_head.prototypes=12"])
    head = resolve_architecture(cfg).ssl_head
    assert (head.method, head.prototypes, head.queue_size, head.mlp_dim) == ("swav", 12, 0, 128)
    head = resolve_architecture(load_config(path, ["model.name=slip_vit_tiny", "objective.ssl=mocov2"])).ssl_head
    assert head.queue_size == 65536  # MoCo v2's own default
