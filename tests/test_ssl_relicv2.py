"""RELICv2: the loss against hand-computed values, its normalisation over crop pairs, the KL term,
the sampled negatives, two gloo ranks against one process, the multi-crop views, and training
through the trainer (alone, beside CLIP, resumed)."""
from __future__ import annotations

import math
import os
import socket
from collections import Counter

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
from slip.ssl import method_views
from slip.ssl.relicv2 import (
    LARGE_SCALE,
    SMALL_SCALE,
    relicv2_loss,
    relicv2_views,
    sample_negatives,
)
from slip.train.config import Config, ConfigError, ObjectiveConfig, load_config


def _model(name: str = "simclr_vit_tiny"):
    torch.manual_seed(0)
    return slip.create_model(get_architecture(name).with_ssl_method("relicv2"))


# ------------------------------------------------------------------------------------ the loss
def test_loss_matches_a_hand_computed_value_with_the_only_possible_negative():
    # Two images: each anchor's one negative is the other image. Targets e1, e2; both online
    # predictions point along e1 (normalised inside). tau = 0.5, beta = 0.5.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    out = relicv2_loss([q], [t], temperature=0.5, beta=0.5, negatives=10)
    # Row 0, candidates (t0, t1): online logits (2, 0), target logits (t0.t0, t0.t1) / tau = (2, 0).
    # Row 1, candidates (t1, t0): online logits (0, 2), target logits (2, 0); the KL of
    # softmax(0, 2) from softmax(2, 0) is 2 (e^2 - 1) / (e^2 + 1) = 2 tanh(1).
    contrastive = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    kl = (0 + 2 * math.tanh(1)) / 2
    assert out["loss"].item() == pytest.approx(contrastive + 0.5 * kl, rel=1e-6)
    assert out["ssl_kl"].item() == pytest.approx(kl, rel=1e-6)
    assert out["ssl_acc"].item() == 50.0  # row 0 ranks its positive first, row 1 does not


def test_loss_matches_a_hand_computed_value_with_given_negatives():
    # Three images, one negative each, fixed by hand: row 0 -> 2, row 1 -> 0, row 2 -> 1. tau = beta = 1.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    index = torch.tensor([[[2], [0], [1]]])  # (pairs, N, n_e)
    out = relicv2_loss([q], [t], temperature=1.0, beta=1.0, negative_index=index)
    # Row 0, candidates (t0, t2): online (1, -1) = target (1, -1): KL 0.
    # Rows 1 and 2, candidates (t1, t0) and (t2, t1): online (0, 1), target (1, 0): the KL of
    # softmax(0, 1) from softmax(1, 0) is (e - 1) / (e + 1) = tanh(1/2).
    contrastive = (math.log(1 + math.exp(-2)) + 2 * math.log(1 + math.e)) / 3
    kl = 2 * math.tanh(0.5) / 3
    assert out["loss"].item() == pytest.approx(contrastive + kl, rel=1e-6)
    # Another negative for row 0 (image 1) changes its online logits to (1, 0).
    other = relicv2_loss([q], [t], temperature=1.0, beta=1.0, negative_index=torch.tensor([[[1], [0], [1]]]))
    assert other["loss"].item() != pytest.approx(out["loss"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="no row holding its own index"):
        relicv2_loss([q], [t], negative_index=torch.tensor([[[0], [0], [1]]]))


def test_loss_is_the_mean_over_every_large_pair_and_every_small_large_pair():
    g = torch.Generator().manual_seed(0)
    online = [torch.randn(6, 8, generator=g) for _ in range(3)]  # 2 large crops, then 1 small
    targets = [torch.randn(6, 8, generator=g) for _ in range(2)]
    index = sample_negatives(6, 3, torch.Generator().manual_seed(1), tables=6)
    full = relicv2_loss(online, targets, temperature=0.3, beta=0.7, negative_index=index)
    pairs = [(i, j) for i in range(3) for j in range(2)]  # the pseudocode's order: pair p = i * 2 + j
    terms = [relicv2_loss([online[i]], [targets[j]], temperature=0.3, beta=0.7, negative_index=index[p:p + 1])
             for p, (i, j) in enumerate(pairs)]
    # (num_large + num_small) x num_large = 6 pairs, the two i == j pairs of large crops included
    assert full["loss"].item() == pytest.approx(sum(t["loss"].item() for t in terms) / 6, rel=1e-6)
    assert full["ssl_kl"].item() == pytest.approx(sum(t["ssl_kl"].item() for t in terms) / 6, rel=1e-6)
    without_same = sum(t["loss"].item() for t, (i, j) in zip(terms, pairs) if i != j) / 4
    assert full["loss"].item() != pytest.approx(without_same, rel=1e-3)
    # The accuracy is crop 0's predictions against crop 1's targets: pair 1.
    assert full["ssl_acc"].item() == terms[1]["ssl_acc"].item()


def test_kl_term_is_zero_when_the_online_and_target_distributions_agree():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(8, 16, generator=g)
    targets = [t, t]
    online = [(2.5 * t).requires_grad_() for _ in range(3)]  # every crop's prediction is the target's direction
    out = relicv2_loss(online, targets, temperature=0.2, beta=1.0, negatives=4)
    assert abs(out["ssl_kl"].item()) < 1e-6
    out["loss"].backward()
    with_kl = [o.grad.clone() for o in online]
    for o in online:
        o.grad = None
    alone = relicv2_loss(online, targets, temperature=0.2, beta=0.0, negatives=4)
    assert alone["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)
    alone["loss"].backward()
    # KL's minimum: it adds neither loss nor gradient there
    assert all(torch.allclose(a, o.grad, atol=1e-6) for a, o in zip(with_kl, online))
    apart = relicv2_loss([torch.randn(8, 16, generator=g)], [t], negatives=4)
    assert apart["ssl_kl"].item() > 1e-3


@pytest.mark.parametrize("n,num", [(2, 10), (5, 4), (16, 10), (100, 10)])
def test_sampled_negatives_are_distinct_other_images_and_never_the_positive(n, num):
    tables = sample_negatives(n, num, torch.Generator().manual_seed(n), tables=50)
    assert tables.shape == (50, n, min(num, n - 1)) and tables.dtype == torch.long
    assert ((tables >= 0) & (tables < n)).all()
    assert not (tables == torch.arange(n)[:, None]).any(), "a negative is the anchor's own image"
    ordered = tables.sort(dim=-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all(), "a negative is drawn twice"
    again = sample_negatives(n, num, torch.Generator().manual_seed(n), tables=50)
    assert torch.equal(tables, again)
    if num < n - 1:  # with fewer negatives than other images, another seed draws other ones
        assert not torch.equal(tables, sample_negatives(n, num, torch.Generator().manual_seed(n + 1), tables=50))


def test_sampled_negatives_are_uniform_over_the_other_images():
    # 2 negatives among the 4 other images of a batch of 5: each of the 6 subsets about 1/6 of the time.
    tables = sample_negatives(5, 2, torch.Generator().manual_seed(0), tables=6000)
    counts = Counter(tuple(sorted(row)) for row in tables[:, 0].tolist())
    assert set(counts) == {(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)}
    assert all(abs(c - 1000) < 120 for c in counts.values()), counts


# ------------------------------------------------------------------------------- two ranks
B, WORLD = 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(3)
    online = [torch.randn(WORLD * B, 8, generator=g) for _ in range(3)]  # 2 large + 1 small crops
    targets = [torch.randn(WORLD * B, 8, generator=g) for _ in range(2)]
    return online, targets


def _loss_and_grads(rows: slice = slice(None)):
    online, targets = _global_batch()
    online = [o[rows].clone().requires_grad_() for o in online]
    # the same seed on every rank, as the method seeds it from its update count
    out = relicv2_loss(online, [t[rows] for t in targets], temperature=0.3, beta=0.5, negatives=3,
                       generator=torch.Generator().manual_seed(11))
    out["loss"].backward()
    return out["loss"].detach(), torch.stack([o.grad for o in online])


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss, grads = _loss_and_grads(slice(rank * B, (rank + 1) * B))
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_the_loss_and_gradients_of_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    loss, grads = _loss_and_grads()
    # Each rank averages over its own anchors, against negatives drawn from the whole global batch;
    # DDP averages the ranks' losses and gradients.
    assert torch.stack([p["loss"] for p in parts]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    got = torch.cat([p["grads"] for p in parts], dim=1) / WORLD
    assert torch.allclose(got, grads, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------- the method
def test_multi_crop_views_are_four_large_and_two_small_crops():
    views = method_views("relicv2", 224)
    assert views.clip is None and [v.size for v in views.ssl] == [(224, 224)] * 4 + [(96, 96)] * 2
    assert [v.scale for v in views.ssl] == [LARGE_SCALE] * 4 + [SMALL_SCALE] * 2
    assert [(v.blur_p, v.solarize_p) for v in views.ssl] == [(1.0, 0.0), (0.1, 0.2)] * 3  # BYOL's two, alternated
    both = method_views("slip-relicv2", 32)
    assert both.clip is not None and [v.size[0] for v in both.all] == [32] * 5 + [16] * 2
    assert relicv2_views(224, patch_size=14)[-1].size == (98, 98)  # small crops in whole ViT-L/14 patches
    model = _model("slip_vit_tiny").train()
    # the tiny tower's 8 px patches; large crops saliency-masked with p_m (default 0.1)
    assert model.ssl.data_views(32).ssl == relicv2_views(32, patch_size=8, saliency_p=0.1)
    objective = Config().objective
    objective.relic_saliency_p = 0.3
    assert [v.saliency_p for v in model.ssl.data_views(32, objective=objective).ssl] == [0.3] * 4 + [0.0] * 2
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 3, s, s, generator=g) for s in [32] * 4 + [16] * 2]
    out = model(views=crops)["ssl"]
    assert [tuple(p.shape) for p in out["predictions"]] == [(4, 32)] * 6
    assert [tuple(t.shape) for t in out["targets"]] == [(4, 32)] * 4  # the target network sees the large crops only
    assert len(model.ssl.target_features(crops)) == 4


def test_negatives_follow_the_update_count_and_settings_come_from_the_objective():
    model = _model().train()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(16, 3, s, s, generator=g) for s in [32] * 4 + [16] * 2]
    model.ssl.configure_training(ObjectiveConfig(ssl="relicv2", relic_beta=0.5, relic_negatives=3), 10, 20)
    assert (model.ssl.beta, model.ssl.negatives) == (0.5, 3)
    with torch.no_grad():
        out = model(views=crops)["ssl"]
    first, same = model.ssl.loss(out)["loss"].item(), model.ssl.loss(out)["loss"].item()
    assert first == same  # the same step draws the same negatives
    logged = model.ssl.on_step_end(1, 20, model.visual)
    assert int(model.ssl.num_updates) == 1 and logged["momentum"] == pytest.approx(0.996, abs=1e-4)
    assert model.ssl.loss(out)["loss"].item() != pytest.approx(first, rel=1e-6)  # a new step, new negatives
    assert "ssl.num_updates" in model.state_dict()  # in checkpoints, so a resumed run draws the same


def test_relicv2_settings_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x}\n")
    base = ["model.name=simclr_vit_tiny", "objective.clip=false", "objective.ssl=relicv2"]
    assert load_config(path, base).objective.relic_negatives == 10
    with pytest.raises(ConfigError, match="objective.relic_negatives"):
        load_config(path, [*base, "objective.relic_negatives=0"])
    with pytest.raises(ConfigError, match="objective.relic_beta"):
        load_config(path, [*base, "objective.relic_beta=-1"])


# ---------------------------------------------------------------------- through the trainer
@pytest.mark.usefixtures("one_torch_thread")
def test_relicv2_lowers_its_loss_on_the_synthetic_corpus(corpus, tmp_path):  # noqa: F811
    # Without saliency masking: on these 32 px synthetic images the spectral residual blacks out
    # 57-90% of a masked crop, and at p_m 0.1 the loss barely moves in 96 steps (3.39 -> 3.36;
    # seed 1: 3.40 -> 3.32). Masking is tested in tests/test_data_saliency.py.
    # First and last 16 steps, measured on the build machine (one thread): 3.31 -> 2.86 (KL part
    # 0.97 -> 0.74, crop-0-vs-1 accuracy among 11 candidates 13% -> 18%); with train.seed=1,
    # 3.29 -> 3.17.
    records = check_lowers_its_loss(corpus, tmp_path, "relicv2", 0.93, "objective.relic_saliency_p=0")
    assert records[0]["momentum"] < records[-1]["momentum"] <= 1.0


def test_relicv2_beside_clip_trains_and_accumulates_like_the_plain_step(corpus, tmp_path):  # noqa: F811
    check_trains_beside_clip(corpus, tmp_path, "slip_relicv2", ("clip_loss", "ssl_loss", "ssl_kl", "ssl_acc"))


@pytest.mark.usefixtures("one_torch_thread")
def test_relicv2_resumes_exactly_with_the_same_negatives(corpus, tmp_path):  # noqa: F811
    result = check_exact_resume(corpus, tmp_path, "relicv2", ("loss", "ssl_kl", "ssl_acc"))
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert int(state["ssl.num_updates"]) == 6
