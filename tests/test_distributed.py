"""Two gloo processes with local batch B must behave like one process with batch 2B."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slip import create_model
from slip.distributed import all_gather_with_grad, all_reduce_mean_
from slip.losses import mocov3_loss, simclr_loss, slip_objective
from slip.models.batchnorm import GlobalBatchNorm1d, GlobalBatchNorm2d

B, D, WORLD = 3, 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embeddings():
    g = torch.Generator().manual_seed(123)
    return {k: torch.randn(WORLD * B, D, generator=g) for k in ("img", "txt", "z1", "z2")}


def _batch():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(WORLD * B, 3, 32, 32, generator=g)
    text = torch.randint(1, 49000, (WORLD * B, 77), generator=g)
    ends = torch.randint(3, 20, (WORLD * B,), generator=g)
    for i, end in enumerate(ends):
        text[i, end] = 49407
        text[i, end + 1:] = 0
    return images, text


def _bn_input():
    return torch.randn(WORLD * B, 5, generator=torch.Generator().manual_seed(3)) * 2 + 1


def _bn2d_input():
    return torch.randn(WORLD * B, 3, 4, 5, generator=torch.Generator().manual_seed(4)) * 2 + 1


def _losses(emb: dict, ssl_scale: float = 0.7) -> dict:
    outputs = {"image_embed": emb["img"], "text_embed": emb["txt"], "logit_scale": torch.tensor(12.0),
               "ssl": {"embeds": [emb["z1"], emb["z2"]]}}
    return slip_objective(outputs, ssl_loss=_simclr, ssl_scale=ssl_scale)


def _simclr(out: dict) -> dict:
    return simclr_loss(*out["embeds"], temperature=0.1)


MASKED_ROWS = (5, 2)  # masked patches held by each rank: BEiT's ranks hold different counts


def _beit():
    from slip.models import get_architecture

    return create_model(get_architecture("simclr_vit_tiny").with_ssl_method("beit", vocab_size=5)).ssl


def _beit_inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(sum(MASKED_ROWS), 5, generator=g), torch.randint(5, (sum(MASKED_ROWS),), generator=g)


def _mean_inputs(rank: int) -> list[torch.Tensor]:
    """Rank-dependent tensors of several shapes (a scalar, an empty one, a transposed view)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn((), generator=g), torch.randn(5, generator=g), torch.randn(0, generator=g),
            torch.randn(2, 3, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(4, 6, generator=g).t()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * B, (rank + 1) * B)
        local = {k: v[rows].clone().requires_grad_(True) for k, v in _embeddings().items()}
        out = _losses(local)
        out["loss"].backward()

        gathered = all_gather_with_grad(torch.full((2, 1), float(rank)))

        mean_in = _mean_inputs(rank)
        storage = [(t.data_ptr(), t.stride()) for t in mean_in]
        all_reduce_mean_(mean_in)
        mean_in_place = [(t.data_ptr(), t.stride()) for t in mean_in] == storage

        moco_in = {k: v[rows].clone().requires_grad_(True) for k, v in _embeddings().items()}
        moco = mocov3_loss(moco_in["img"], moco_in["txt"], moco_in["z1"], moco_in["z2"], temperature=0.2)
        moco["loss"].backward()

        bn = GlobalBatchNorm1d(5)
        bn_in = _bn_input()[rows].clone().requires_grad_(True)
        bn_out = bn(bn_in)
        (bn_out * torch.arange(5.0)).square().sum().backward()
        bn2 = GlobalBatchNorm2d(3)
        bn2_in = _bn2d_input()[rows].clone().requires_grad_(True)
        bn2_out = bn2(bn2_in)
        (bn2_out * torch.arange(3.0).view(1, 3, 1, 1)).square().sum().backward()

        logits, labels = _beit_inputs()
        start = sum(MASKED_ROWS[:rank])
        rows_beit = slice(start, start + MASKED_ROWS[rank])
        beit_in = logits[rows_beit].clone().requires_grad_(True)
        beit = _beit().loss({"logits": beit_in, "labels": labels[rows_beit]})
        beit["loss"].backward()

        torch.manual_seed(0)
        model = DistributedDataParallel(create_model("clip_vit_tiny"))
        images, text = _batch()
        model_out = model(image=images[rows], text=text[rows])
        model_loss = slip_objective(model_out)["loss"]
        model_loss.backward()  # DDP averages the gradients over ranks
        torch.save({
            "losses": {k: v.detach() for k, v in out.items()},
            "grads": {k: v.grad for k, v in local.items()},
            "gathered": gathered,
            "mean": {"values": mean_in, "in_place": mean_in_place},
            "moco": {"loss": moco["loss"].detach(), "acc": moco["ssl_acc"],
                     "grads": {k: moco_in[k].grad for k in ("img", "txt")}},
            "bn": {"out": bn_out.detach(), "grad": bn_in.grad, "state": bn.state_dict()},
            "bn2d": {"out": bn2_out.detach(), "grad": bn2_in.grad, "state": bn2.state_dict()},
            "beit": {"loss": beit["loss"].detach(), "acc": beit["ssl_acc"].detach(), "grad": beit_in.grad},
            "model_loss": model_loss.detach(),
            "model_grads": {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None},
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_gather_concatenates_in_rank_order(ranks):
    for r in ranks:
        assert r["gathered"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_all_reduce_mean_averages_tensors_of_any_shape_in_place(ranks):
    want = [(a + b) / 2 for a, b in zip(_mean_inputs(0), _mean_inputs(1))]
    for r in ranks:
        assert r["mean"]["in_place"], "the caller's tensors (the gradients) hold the result"
        got = r["mean"]["values"]
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    alone = _mean_inputs(0)
    all_reduce_mean_(alone)  # no process group: nothing to average with
    assert all(torch.equal(a, b) for a, b in zip(alone, _mean_inputs(0)))


def test_mean_of_rank_losses_equals_the_single_process_loss(ranks):
    single = _losses(_embeddings())
    for key in ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"):
        mean = sum(r["losses"][key] for r in ranks) / WORLD
        assert mean.item() == pytest.approx(single[key].item(), rel=1e-5, abs=1e-6), key


def test_embedding_gradients_reach_their_owner_rank(ranks):
    full = {k: v.clone().requires_grad_(True) for k, v in _embeddings().items()}
    _losses(full)["loss"].backward()
    for key in full:
        # Each rank's loss is a mean over its B rows: the sum over ranks is WORLD x the global mean,
        # which DDP's averaging of parameter gradients divides back out.
        dist_grad = torch.cat([r["grads"][key] for r in ranks]) / WORLD
        assert torch.allclose(dist_grad, full[key].grad, atol=1e-6), key


def _buffer_worker(rank: int, port: int, out_dir: str) -> None:
    from slip.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        model.register_buffer("count", torch.tensor(10.0 * rank + 1))
        wrapped = Runtime(rank=rank, world=WORLD, local_rank=rank, device=torch.device("cpu"), precision="fp32").ddp(model)
        at_wrap = model.count.item()
        model.count.fill_(100.0 + rank)  # e.g. rank-local BatchNorm statistics
        wrapped(torch.ones(1, 3)).sum().backward()
        torch.save({"at_wrap": at_wrap, "after_forward": model.count.item()}, os.path.join(out_dir, f"b{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("forward_sync_buffers" not in __import__("inspect").signature(DistributedDataParallel.__init__).parameters,
                    reason="torch < 2.13 broadcasts buffers before every forward")
def test_ddp_broadcasts_buffers_when_wrapping_and_not_before_every_forward(tmp_path):
    mp.spawn(_buffer_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"b{r}.pt") for r in range(WORLD)]
    assert [p["at_wrap"] for p in parts] == [1.0, 1.0]  # rank 0's, sent once
    assert [p["after_forward"] for p in parts] == [100.0, 101.0]  # each rank's own: no broadcast per forward


def test_ddp_clip_model_matches_single_process_double_batch(ranks):
    torch.manual_seed(0)
    model = create_model("clip_vit_tiny")
    images, text = _batch()
    loss = slip_objective(model(image=images, text=text))["loss"]
    loss.backward()
    assert (sum(r["model_loss"] for r in ranks) / WORLD).item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        for r in ranks:
            # float32 summation order differs between the runs: compare at the tensor's scale.
            diff = (r["model_grads"][name] - p.grad).abs().max().item()
            assert diff <= 1e-5 * max(1.0, p.grad.abs().max().item()), (name, diff)


@pytest.mark.parametrize(("name", "make", "inputs", "weights"), [
    ("bn", lambda: torch.nn.BatchNorm1d(5), _bn_input, torch.arange(5.0)),
    # A ResNet tower's BatchNorm: statistics per channel over the batch and every position.
    ("bn2d", lambda: torch.nn.BatchNorm2d(3), _bn2d_input, torch.arange(3.0).view(1, 3, 1, 1)),
])
def test_global_batchnorm_matches_batchnorm_over_the_whole_batch(ranks, name, make, inputs, weights):
    bn = make()
    x = inputs().requires_grad_(True)
    out = bn(x)
    (out * weights).square().sum().backward()
    assert torch.allclose(torch.cat([r[name]["out"] for r in ranks]), out.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([r[name]["grad"] for r in ranks]), x.grad, atol=1e-4)
    for key, value in bn.state_dict().items():
        for r in ranks:
            assert torch.allclose(r[name]["state"][key].float(), value.float(), atol=1e-5), key


def test_mocov3_loss_over_two_ranks_matches_one_process(ranks):
    full = {k: v.clone().requires_grad_(True) for k, v in _embeddings().items()}
    single = mocov3_loss(full["img"], full["txt"], full["z1"], full["z2"], temperature=0.2)
    single["loss"].backward()
    assert (sum(r["moco"]["loss"] for r in ranks) / WORLD).item() == pytest.approx(single["loss"].item(), rel=1e-5)
    assert (sum(r["moco"]["acc"] for r in ranks) / WORLD).item() == pytest.approx(single["ssl_acc"].item())
    for key in ("img", "txt"):  # queries; keys get no gradient
        dist_grad = torch.cat([r["moco"]["grads"][key] for r in ranks]) / WORLD
        assert torch.allclose(dist_grad, full[key].grad, atol=1e-6), key


def test_converting_batchnorms_keeps_their_parameters_and_a_frozen_one_frozen():
    # A momentum branch's BatchNorm is frozen; a converted copy that required grad again would
    # never get one, and DDP would stop at the second step waiting for it.
    from slip.models.batchnorm import sync_batchnorm

    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    frozen = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    frozen.requires_grad_(False)
    weight = online[1].weight
    model = sync_batchnorm(nn.ModuleDict({"online": online, "frozen": frozen}), torch.device("cpu"))
    assert isinstance(model["online"][1], GlobalBatchNorm1d) and isinstance(model["frozen"][1], GlobalBatchNorm1d)
    assert model["online"][1].weight is weight and weight.requires_grad
    assert not any(p.requires_grad for p in model["frozen"].parameters())


def test_beit_loss_over_ranks_with_unequal_masked_counts_matches_one_process(ranks):
    logits, labels = _beit_inputs()
    full = logits.clone().requires_grad_(True)
    single = _beit().loss({"logits": full, "labels": labels})
    single["loss"].backward()
    assert (sum(r["beit"]["loss"] for r in ranks) / WORLD).item() == pytest.approx(single["loss"].item(), rel=1e-6)
    assert (sum(r["beit"]["acc"] for r in ranks) / WORLD).item() == pytest.approx(single["ssl_acc"].item(), rel=1e-6)
    dist_grad = torch.cat([r["beit"]["grad"] for r in ranks]) / WORLD  # DDP averages over ranks
    assert torch.allclose(dist_grad, full.grad, atol=1e-7)
