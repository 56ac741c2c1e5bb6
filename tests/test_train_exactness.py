"""The README's exactness claims at the gradient level: accumulation equals one big batch for
every method, two ranks (with accumulation, loader workers and a shuffle buffer) compute the
one-process gradient of the same global batch, and a two-rank run resumed mid-epoch or at an
epoch boundary reproduces the uninterrupted one step for step."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import random
import signal

import pytest
import torch
from test_ssl_beit import random_tokenizer
from test_train import _NOT_REPRODUCIBLE, ROOT, corpus, losses_by_step  # noqa: F401  (corpus: the shared fixture)

import slip
from slip.distributed import get_world_size
from slip.losses import slip_objective
from slip.models import get_architecture
from slip.ssl import method_class, method_names
from slip.train.config import load_config
from slip.train.step import accumulated_step, plain_step
from slip.train.trainer import Trainer

_spec = importlib.util.spec_from_file_location("record_training", ROOT / "tests" / "scripts" / "record_training.py")
record_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_training)


def assert_same_gradients(got: dict, want: dict, rel: float, what: str = "") -> None:
    """``got`` equals ``want`` up to ``rel`` of the gradient's size: over all parameters together,
    and per tensor (relative to the tensor, with a floor of 1% of the whole gradient's norm for
    tensors whose exact gradient is zero and only rounding noise reaches them)."""
    assert got.keys() == want.keys(), (what, got.keys() ^ want.keys())
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in want.values())).item()
    assert total > 0, what
    diff = torch.sqrt(sum((got[k].double() - want[k].double()).norm() ** 2 for k in want)).item()
    assert diff <= rel * total, f"{what}: gradients differ by {diff / total:.2e} of their norm"
    for name, g in want.items():
        d = (got[name].double() - g.double()).norm().item()
        bound = rel * (g.double().norm().item() + 0.01 * total)
        assert d <= bound, f"{what} {name}: differs by {d:.3e} (allowed {bound:.3e}, tensor norm {g.norm():.3e})"


# ----------------------------------------------------------------------------------------
# Accumulation: accumulated_step over micro-batches == plain_step over their concatenation
# ----------------------------------------------------------------------------------------
def _objectives():
    """CLIP alone, then every registered SSL method alone and with CLIP."""
    out = [pytest.param("clip_vit_tiny", None, id="clip")]
    for method in method_names():
        out += [pytest.param("simclr_vit_tiny", method, id=method),
                pytest.param("slip_vit_tiny", method, id=f"clip+{method}")]
    return out


def _unequal_masks(n: int, patches: int, generator: torch.Generator) -> torch.Tensor:
    """Random patch masks whose masked counts differ per image, and between the two halves of
    the batch (the micro-batches): 1 or 2 per image in the first, about half in the second."""
    mask = torch.zeros(n, patches, dtype=torch.bool)
    for i in range(n):
        count = 1 + i % 2 if i < n // 2 else patches // 2 + i % 3
        mask[i, torch.randperm(patches, generator=generator)[:count]] = True
    return mask


def _model_and_batch(name: str, method: str | None, n: int = 8):
    arch = get_architecture(name)
    tokenizer = None
    if method is not None:
        if method_class(method).needs_visual_tokenizer:
            tokenizer = random_tokenizer()  # k-means codes of the 4 x 4 patches of a 16 px view
        arch = arch.with_ssl_method(method, tokenizer.vocab_size if tokenizer is not None else None)
    torch.manual_seed(0)
    model = slip.create_model(arch).train()
    if tokenizer is not None:
        model.ssl.attach_visual_tokenizer(tokenizer)
    g = torch.Generator().manual_seed(1)
    if method is not None and model.ssl.needs_sample_index:  # a memory bank of one row per sample (PIRL)
        from slip.train.config import ObjectiveConfig

        model.ssl.configure_training(ObjectiveConfig(ssl=method, nce_negatives=64), 1, 1, corpus_size=32, seed=0)
    size = arch.vision.image_size
    batch: dict = {}
    if model.has_text:
        batch["image"] = torch.randn(n, 3, size, size, generator=g)
        batch["text"] = slip.get_tokenizer()([f"a {'small ' * i}shape number {i}" for i in range(n)])
    if method is not None:
        # The views and mask the method declares to the data pipeline, as the workers cut them.
        views = model.ssl.data_views(size, mask_ratio=0.4)
        batch["views"] = [(torch.randn if v.normalize else torch.rand)(n, 3, *v.size, generator=g) for v in views.ssl]
        if views.mask is not None:
            patches = views.mask(random.Random(0)).reshape(-1).numel()
            batch["patch_mask"] = _unequal_masks(n, patches, g)
            # These masks hold more patches than the generator's target: BEiT gets a slot for every patch.
            model.ssl.mask_slots = patches
        if model.ssl.needs_sample_index:  # the micro-batches must hand their rows' indices on in order
            batch["index"] = torch.randperm(32, generator=g)[:n]
    return model, batch


def _halves(batch: dict) -> list[dict]:
    n = batch["views"][0].shape[0] if "views" in batch else batch["image"].shape[0]
    return [{k: [t[s] for t in v] if isinstance(v, list) else v[s] for k, v in batch.items()}
            for s in (slice(0, n // 2), slice(n // 2, n))]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name,method", _objectives())
def test_accumulated_micro_batches_give_the_losses_gradients_and_batchnorm_state_of_one_batch(name, method):
    model, batch = _model_and_batch(name, method)
    if "patch_mask" in batch:
        counts = [int(mb["patch_mask"].sum()) for mb in _halves(batch)]
        assert counts[0] != counts[1], counts
    ssl_loss = model.ssl.loss if method is not None else None
    objective = functools.partial(slip_objective, clip=model.has_text, ssl_loss=ssl_loss)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step(fn):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        losses = fn()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}

    plain = step(lambda: plain_step(model, batch, objective, contextlib.nullcontext, lambda x: x))
    accum = step(lambda: accumulated_step(model, _halves(batch), objective, contextlib.nullcontext, lambda x: x))
    assert plain[0].keys() == accum[0].keys()
    for key, value in plain[0].items():
        assert accum[0][key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert_same_gradients(accum[1], plain[1], rel=2e-5, what=f"{name} {method}")
    # BatchNorm (the SSL heads', the momentum branch's) saw the whole batch once: the same
    # running statistics and batch count.
    assert all(not torch.equal(start[k], plain[2][k]) for k in start if k.endswith("running_mean"))
    for key in start:
        assert torch.allclose(accum[2][key].float(), plain[2][key].float(), rtol=1e-4, atol=1e-6), key


# ----------------------------------------------------------------------------------------
# Two ranks: one torchrun launch runs every two-rank job (tests/scripts/record_training.py)
# ----------------------------------------------------------------------------------------
# 4 steps per epoch (64 samples, global batch 16 = 8 per rank), 2 epochs on the schedule. Every
# job reads with 2 loader workers per rank and a shuffle buffer.
TWO_RANK_DATA = ["data.workers=2", "data.shuffle_buffer=16", "data.samples_per_epoch=64", "train.batch_size=16",
                 "train.epochs=2", "train.precision=fp32", "train.log_every=1", "train.save_every=100", "train.keep_last=1",
                 "optim.lr=1e-3", "optim.warmup_epochs=0.25"]
SLIP = (None, ["model.name=slip_vit_tiny"])  # CLIP + SimCLR
SLIP_MOCOV3 = (str(ROOT / "configs" / "tiny" / "slip_mocov3.yaml"), [])
SWAV = (str(ROOT / "configs" / "tiny" / "swav.yaml"), [])  # a queue of 64 = 4 global batches, in use from step 5
MOCOV2 = (str(ROOT / "configs" / "tiny" / "slip_mocov2.yaml"), [])
PIRL = (str(ROOT / "configs" / "tiny" / "slip_pirl.yaml"), ["objective.nce_negatives=96"])  # a bank of 256 rows


def _job(tmp, name: str, recipe, *overrides: str, out: bool = True, batches: bool = False) -> dict:
    config, objective = recipe
    return {"config": config, "overrides": [*objective, *TWO_RANK_DATA, *overrides, f"train.output_dir={tmp / name}"],
            "out": str(tmp / f"{name}.rec") if out else None, "batches": batches}


def _finish(proc, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out or interrupted: take torchrun's workers down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):  # noqa: F811
    from test_train import _run_cli

    tmp = tmp_path_factory.mktemp("two_ranks")
    data = f"data.train={corpus / 'train'}"
    jobs = {
        # Uninterrupted: 6 steps, crossing the epoch boundary after step 4.
        "full": _job(tmp, "full", SLIP, data, "train.max_steps=6", batches=True),
        # Stopped mid-epoch (after step 3), then resumed to step 6.
        "mid_part": _job(tmp, "mid", SLIP, data, "train.max_steps=3", out=False),
        "mid": _job(tmp, "mid", SLIP, data, "train.max_steps=6"),
        # Stopped at the last step of epoch 0 (its checkpoint is written there), then resumed.
        "edge_part": _job(tmp, "edge", SLIP, data, "train.max_steps=4", out=False),
        "edge": _job(tmp, "edge", SLIP, data, "train.max_steps=6"),
        # CLIP + MoCo v3, 2 ranks x 2 micro-batches of 4: gradients synchronised by hand.
        "accum": _job(tmp, "accum", SLIP_MOCOV3, data, "train.accum_steps=2", "train.max_steps=3", batches=True),
        # Memory across steps: SwAV's queue and Sinkhorn over both ranks, MoCo v2's queue of gathered keys.
        "swav": _job(tmp, "swav", SWAV, data, "train.max_steps=6", batches=True),
        "mocov2": _job(tmp, "mocov2", MOCOV2, data, "train.max_steps=4", batches=True),
        # PIRL's memory bank, sharded over the ranks: lookups and updates by ownership, Z estimated
        # over both ranks at step 1. Its last checkpoint (step 4) ends epoch 0.
        "pirl": _job(tmp, "pirl", PIRL, data, "train.max_steps=4", batches=True),
    }
    (tmp / "jobs.json").write_text(json.dumps(list(jobs.values())))
    proc = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(ROOT / "tests" / "scripts" / "record_training.py"), str(tmp / "jobs.json")])
    _finish(proc, timeout=400)
    records = {name: [record_training.load(f"{job['out']}/rank{r}.pt") for r in range(2)]
               for name, job in jobs.items() if job["out"]}
    assert all(r["world"] == 2 for ranks in records.values() for r in ranks)
    return {"dir": tmp, "jobs": jobs, "records": records}


def _replay_on_one_process(two_ranks, name: str, tmp_path, *overrides: str) -> list[dict]:
    """The gradients a one-process trainer applies when fed, step by step, the global batches
    (rank 0's rows, then rank 1's) that job ``name`` read on two ranks."""
    job = two_ranks["jobs"][name]
    ranks = two_ranks["records"][name]
    batches = record_training.global_batches([r["batches"] for r in ranks])
    cfg = load_config(job["config"], [*job["overrides"], f"train.output_dir={tmp_path / 'one'}", *overrides])
    trainer = Trainer(cfg)
    assert get_world_size() == 1
    with record_training.replaying(batches), record_training.recording(trainer) as rec:
        trainer.run()
    assert len(rec.grads) == len(ranks[0]["grads"])
    return rec.grads


def test_both_ranks_apply_the_same_gradient_at_every_update(two_ranks):
    for name, (r0, r1) in two_ranks["records"].items():
        assert len(r0["fingerprints"]) == len(r1["fingerprints"]) > 0, name
        for step, (a, b) in enumerate(zip(r0["fingerprints"], r1["fingerprints"]), start=1):
            assert a == b, (name, step)


@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_with_workers_and_a_shuffle_buffer_compute_the_one_process_gradient_of_their_global_batch(
        two_ranks, tmp_path):
    # Which samples form a global batch depends on the ranks (each has its shards, workers and
    # shuffle buffer); given the batch, the crops (keyed by sample), the GPU-side augmentation
    # (keyed by step and global row), the losses over all ranks' rows, BatchNorm and the
    # averaging of gradients over ranks must make the update the one-process one, at every step.
    ranks = two_ranks["records"]["full"]
    for epoch in (slice(0, 4), slice(4, 6)):
        keys = [{k for b in r["batches"][epoch] for k in b["key"]} for r in ranks]
        assert len(keys[0]) == len(keys[1]) == 8 * len(ranks[0]["batches"][epoch]) and not keys[0] & keys[1]
    assert any(b["key"] != sorted(b["key"]) for r in ranks for b in r["batches"]), "the shuffle buffer mixed shards"
    one = _replay_on_one_process(two_ranks, "full", tmp_path)
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], one), start=1):
        assert_same_gradients(got, want, rel=1e-3, what=f"step {step}")


@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_accumulating_two_micro_batches_compute_the_one_process_gradient(two_ranks, tmp_path):
    # CLIP + MoCo v3: contrastive negatives, the SSL heads' BatchNorm and the momentum
    # projector's over both ranks' micro-batches; the hand-written gradient averaging.
    ranks = two_ranks["records"]["accum"]
    one = _replay_on_one_process(two_ranks, "accum", tmp_path, "train.accum_steps=1")
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], one), start=1):
        assert_same_gradients(got, want, rel=1e-3, what=f"step {step}")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["swav", "mocov2"])
def test_two_ranks_with_a_queue_compute_the_one_process_gradient(two_ranks, tmp_path, name):
    # SwAV: codes by Sinkhorn over both ranks' rows and, from step 5, both ranks' shares of the
    # queue; MoCo v2: keys of both ranks appended to every rank's queue in rank order. The
    # queues on rank 0 at the end equal the one-process ones.
    ranks = two_ranks["records"][name]
    one = _replay_on_one_process(two_ranks, name, tmp_path)
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], one), start=1):
        assert_same_gradients(got, want, rel=1e-3, what=f"{name} step {step}")
    last = len(one)
    two = torch.load(two_ranks["dir"] / name / "checkpoints" / f"step-{last:08d}.pt", weights_only=True)["state_dict"]
    single = torch.load(tmp_path / "one" / "checkpoints" / f"step-{last:08d}.pt", weights_only=True)["state_dict"]
    queue = "ssl.queue"
    assert two[queue].abs().sum() > 0 and torch.allclose(two[queue], single[queue], atol=1e-5)
    if name == "swav":
        assert int(two["ssl.queue_filled"]) == 64 and torch.allclose(
            two["ssl.prototypes.weight"].norm(dim=1), torch.ones(16), atol=1e-5)
    else:
        assert int(two["ssl.queue_ptr"]) == int(single["ssl.queue_ptr"]) == (16 * last) % 128


@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_with_a_sharded_memory_bank_compute_the_one_process_gradient_and_bank(two_ranks, tmp_path):
    # PIRL: each rank holds every other row of the bank; the global batch's rows and the step's
    # negatives (drawn alike on both ranks) are looked up over both, Z is estimated over both
    # ranks' rows, and after each update both ranks' embeddings go to the rows' owners. The
    # gradients, the bank gathered into the checkpoint, Z and the update count equal one process's.
    ranks = two_ranks["records"]["pirl"]
    one = _replay_on_one_process(two_ranks, "pirl", tmp_path)
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], one), start=1):
        assert_same_gradients(got, want, rel=1e-3, what=f"pirl step {step}")
    last = len(one)
    two = torch.load(two_ranks["dir"] / "pirl" / "checkpoints" / f"step-{last:08d}.pt", weights_only=True)
    single = torch.load(tmp_path / "one" / "checkpoints" / f"step-{last:08d}.pt", weights_only=True)
    bank = two["ssl_state"]["bank"]
    assert two["world_size"] == 2 and bank.shape == (256, 32)  # every row of the corpus, in global order
    assert torch.allclose(bank, single["ssl_state"]["bank"], atol=1e-5)
    trained = {int(i) for r in ranks for b in r["batches"] for i in b["index"]}
    assert len(trained) == 16 * last  # 64 distinct samples: each row was updated once
    untouched = sorted(set(range(256)) - trained)
    assert torch.allclose(bank.norm(dim=1), torch.ones(256), atol=1e-5)
    fresh = Trainer(load_config(PIRL[0], [*two_ranks["jobs"]["pirl"]["overrides"],
                                          f"train.output_dir={tmp_path / 'fresh'}"])).model.ssl.bank
    assert torch.equal(bank[untouched], fresh[untouched]), "rows outside the batches keep their initial values"
    assert not torch.allclose(bank[sorted(trained)], fresh[sorted(trained)])
    for key in ("ssl.nce_z", "ssl.num_updates"):
        assert torch.allclose(two["state_dict"][key].double(), single["state_dict"][key].double(), rtol=1e-5), key
    assert int(two["state_dict"]["ssl.num_updates"]) == last and (two["state_dict"]["ssl.nce_z"] > 0).all()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_memory_bank_saved_by_two_ranks_resumes_in_one_process(two_ranks, tmp_path):
    # The two-rank PIRL run stopped at the end of epoch 0; one process resumes it (another world
    # size keeps the data position at an epoch boundary): it holds all rows of the gathered bank.
    import shutil

    job = two_ranks["jobs"]["pirl"]
    shutil.copytree(two_ranks["dir"] / "pirl", tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-00000004.pt", weights_only=True)
    trainer = Trainer(load_config(job["config"], [*job["overrides"], f"train.output_dir={tmp_path / 'run'}",
                                                  "train.max_steps=5"]))
    assert trainer.try_resume() and trainer.step == 4
    assert torch.equal(trainer.model.ssl.bank, saved["ssl_state"]["bank"])
    assert torch.equal(trainer.model.ssl.nce_z, saved["state_dict"]["ssl.nce_z"])
    assert torch.equal(trainer.model.ssl.gathered_state()["bank"], saved["ssl_state"]["bank"])


def _assert_resumed_run_matches_the_full_run(two_ranks, name: str, stopped_at: int):
    full_dir, run_dir = two_ranks["dir"] / "full", two_ranks["dir"] / name
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged == [1, 2, 3, 4, 5, 6], "the rerun resumed (no step trained twice)"
    full, resumed = losses_by_step(full_dir), losses_by_step(run_dir)
    for step in range(1, 7):
        assert resumed[step].keys() == full[step].keys()
        for key in full[step].keys() - _NOT_REPRODUCIBLE:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)
    grads = two_ranks["records"][name][0]["grads"]
    assert len(grads) == 6 - stopped_at
    for step, (got, want) in enumerate(zip(grads, two_ranks["records"]["full"][0]["grads"][stopped_at:]),
                                       start=stopped_at + 1):
        assert_same_gradients(got, want, rel=1e-6, what=f"step {step}")
    w_full = torch.load(full_dir / "checkpoints" / "step-00000006.pt", weights_only=True)["state_dict"]
    w_run = torch.load(run_dir / "checkpoints" / "step-00000006.pt", weights_only=True)["state_dict"]
    assert w_full.keys() == w_run.keys()
    for k in w_full:
        assert torch.allclose(w_run[k].float(), w_full[k].float(), rtol=1e-6, atol=1e-7), k


def test_two_rank_run_with_loader_workers_resumed_mid_epoch_reproduces_the_uninterrupted_run(two_ranks):
    _assert_resumed_run_matches_the_full_run(two_ranks, "mid", stopped_at=3)


def test_two_rank_run_resumed_at_an_epoch_boundary_reproduces_the_uninterrupted_run(two_ranks):
    _assert_resumed_run_matches_the_full_run(two_ranks, "edge", stopped_at=4)


@pytest.mark.usefixtures("one_torch_thread")
def test_unshuffled_shards_of_one_rank_batch_give_every_rank_and_worker_count_the_one_process_batches(corpus):  # noqa: F811
    # When the number of ranks leaves the global batches themselves unchanged (and a run then
    # matches one process step for step): no shuffle buffer, shards of exactly batch / ranks
    # samples (8 here), at most one worker in the single process, whatever the workers per rank.
    from slip.data.pipeline import PipelineConfig, SlipLoader
    from slip.ssl import method_views

    def global_batches(ranks: int, workers: int) -> list[dict]:
        loaders = [SlipLoader(str(corpus / "train"), PipelineConfig(
            views=method_views("slip-simclr", 32), batch_size=16 // ranks, workers=workers, rank=rank,
            world_size=ranks, shuffle_buffer=0, partial_batches=False, epoch_samples=64, seed=0))
            for rank in range(ranks)]
        return record_training.global_batches([list(loader) for loader in loaders])

    one = global_batches(1, 0)
    two = global_batches(2, 2)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
