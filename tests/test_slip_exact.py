"""SLIP's own behaviour, as options: CLIP gather without gradient, SLIP's caption truncation,
and float32 contrastive logits under autocast."""
from __future__ import annotations

import io
import os
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from original_slip import slip_clip_loss
from PIL import Image

from slip.losses import byol_loss, clip_loss, mocov3_loss, simclr_loss, slip_objective
from slip.tokenizer import EOT_TOKEN, SOT_TOKEN, get_tokenizer, trim_padding

B, D, WORLD, SCALE = 4, 8, 2, 10.0


# ----------------------------------------------------------------- CLIP gather, two gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embeddings():
    g = torch.Generator().manual_seed(2112)
    return torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _grads(loss_fn, rows: slice):
    img, txt = (t[rows].clone().requires_grad_(True) for t in _embeddings())
    loss = loss_fn(img, txt)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * B, (rank + 1) * B)
        scale = torch.tensor(SCALE)
        runs = {
            gather: _grads(lambda i, t, g=gather: clip_loss(i, t, scale, gather=g)["loss"], rows)
            for gather in ("with_grad", "slip")
        }
        runs["reference"] = _grads(lambda i, t: slip_clip_loss(i, t, scale), rows)
        runs["objective"] = _grads(lambda i, t: slip_objective(
            {"image_embed": i, "text_embed": t, "logit_scale": scale}, gather="slip")["loss"], rows)
        torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _ddp_average(ranks, run: str, key: str) -> torch.Tensor:
    # A rank's embedding rows feed only its own parameters' gradient; DDP then divides by W.
    return torch.cat([r[run][key] for r in ranks]) / WORLD


def _slip_gradients_in_one_process():
    """SLIP's gradient, stated without any collective: rank r's loss scores its rows (with
    gradient) against the detached global batch; each rank's rows get only its own loss's
    gradient, and DDP averages over ranks."""
    img, txt = (t.clone().requires_grad_(True) for t in _embeddings())
    total = 0.0
    for r in range(WORLD):
        rows = slice(r * B, (r + 1) * B)
        i, t = F.normalize(img[rows], dim=-1), F.normalize(txt[rows], dim=-1)
        keys_t, keys_i = F.normalize(txt, dim=-1).detach(), F.normalize(img, dim=-1).detach()
        labels = torch.arange(r * B, (r + 1) * B)
        total = total + (F.cross_entropy(SCALE * i @ keys_t.t(), labels)
                         + F.cross_entropy(SCALE * t @ keys_i.t(), labels)) / 2
    (total / WORLD).backward()
    return img.grad, txt.grad


def test_slip_gather_gives_the_gradients_of_slips_own_clip_loss(ranks):
    one_process = dict(zip(("img", "txt"), _slip_gradients_in_one_process()))
    for key in ("img", "txt"):
        ours = _ddp_average(ranks, "slip", key)
        assert torch.allclose(ours, _ddp_average(ranks, "reference", key), atol=1e-6), key
        assert torch.allclose(ours, one_process[key], atol=1e-6), key
        # slip_objective passes gather on to clip_loss.
        assert torch.allclose(ours, _ddp_average(ranks, "objective", key), atol=1e-7), key
    for r in ranks:
        assert r["slip"]["loss"].item() == pytest.approx(r["reference"]["loss"].item(), rel=1e-6)


def test_slip_gather_changes_gradients_not_losses_and_with_grad_is_one_big_batch(ranks):
    img, txt = (t.clone().requires_grad_(True) for t in _embeddings())
    single = clip_loss(img, txt, torch.tensor(SCALE))["loss"]
    single.backward()
    full = {"img": img.grad, "txt": txt.grad}
    for r in ranks:  # the forward pass is the same: only the backward differs
        assert r["slip"]["loss"].item() == pytest.approx(r["with_grad"]["loss"].item(), rel=1e-6)
    for key in ("img", "txt"):
        with_grad, slip = _ddp_average(ranks, "with_grad", key), _ddp_average(ranks, "slip", key)
        assert torch.allclose(with_grad, full[key], atol=1e-6), key
        # SLIP drops the gradient every embedding gets as a key (column) of the logits.
        assert (slip - with_grad).abs().max() > 0.2 * full[key].abs().max(), key


def test_slip_gather_in_one_process_is_the_plain_loss(one_torch_thread):
    # SLIP's all_gather_batch returns its input in a single process, gradient included.
    img, txt = _embeddings()
    a = [t.clone().requires_grad_(True) for t in (img, txt)]
    b = [t.clone().requires_grad_(True) for t in (img, txt)]
    clip_loss(*a, torch.tensor(SCALE), gather="slip")["loss"].backward()
    clip_loss(*b, torch.tensor(SCALE))["loss"].backward()
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))


def test_unknown_gather_is_refused():
    img, txt = _embeddings()
    with pytest.raises(ValueError, match="gather must be one of with_grad, slip"):
        clip_loss(img, txt, torch.tensor(1.0), gather="no_grad")
    with pytest.raises(ValueError, match="gather must be one of"):
        slip_objective({"image_embed": img, "text_embed": txt, "logit_scale": torch.tensor(1.0)}, gather="all")


# ------------------------------------------------------------------- fp32 logits under autocast
def _unit_pairs(n=16, d=64, seed=0, spread=0.3, noise=0.3):
    # Pairs around one common direction: every cosine is 0.85-1, so logits at scale 100 sit
    # where bf16's spacing is 0.5 (a trained CLIP's are 20-40, spacing 0.125-0.25).
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, generator=g) + spread * torch.randn(n, d, generator=g)
    return a, a + noise * torch.randn(n, d, generator=g)


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_clip_logits_are_fp32_under_bf16_autocast(one_torch_thread):
    img, txt = _unit_pairs()
    scale = torch.tensor(100.0)
    a = [t.clone().requires_grad_(True) for t in (img, txt)]
    b = [t.clone().requires_grad_(True) for t in (img, txt)]
    ref = clip_loss(*a, scale)["loss"]
    with _bf16_autocast():
        ours = clip_loss(*b, scale)["loss"]
        # What the matmul gives when autocast is left on: logits off by up to ~0.3 at scale 100.
        bf16_logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    fp32_logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    assert bf16_logits.dtype == torch.bfloat16 and (bf16_logits.float() - fp32_logits).abs().max() > 0.05
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) < 1e-5
    ref.backward()
    ours.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_bf16_embeddings_are_scored_in_fp32(one_torch_thread):
    # Under autocast the towers hand over bf16 embeddings: the loss is that of their fp32 values.
    img, txt = (t.bfloat16() for t in _unit_pairs(seed=1))
    scale = torch.tensor(100.0)
    ref = clip_loss(img.float(), txt.float(), scale)["loss"]
    with _bf16_autocast():
        ours = clip_loss(img, txt, scale)["loss"]
    assert abs(ours.item() - ref.item()) < 1e-5


SSL_LOSSES = {
    "simclr": lambda a, b, c, d: simclr_loss(a, b, temperature=0.1),
    "mocov3": lambda a, b, c, d: mocov3_loss(a, b, c, d, temperature=0.2),
    "byol": lambda a, b, c, d: byol_loss(a, b, c, d),
}


@pytest.mark.parametrize("method", SSL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_inputs", "bf16_inputs"])
def test_ssl_similarities_are_fp32_under_bf16_autocast(one_torch_thread, method, dtype):
    z1, z2 = _unit_pairs(seed=2)
    k1, k2 = _unit_pairs(seed=12)
    inputs = tuple(t.to(dtype) for t in (z1, z2, k1, k2))
    ref = SSL_LOSSES[method](*(t.float() for t in inputs))["loss"]
    with _bf16_autocast():
        ours = SSL_LOSSES[method](*inputs)["loss"]
    assert ours.dtype == torch.float32
    # The same float32 operations: equal to rounding (bf16 logits move these losses by 1e-4 to 1e-2).
    assert abs(ours.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))


# --------------------------------------------------------------------- SLIP's caption truncation
LONG = ["a very long caption " * 30, "another rambling description of a photo " * 20]


def test_slip_truncation_pools_every_long_caption_at_the_start_token(one_torch_thread):
    from slip import create_model

    slip_tokens = get_tokenizer(truncation="slip")(LONG)
    kept_tokens = get_tokenizer(truncation="keep_eot")(LONG)
    # The text tower pools at the highest id: EOT (76) when kept; otherwise SOT, position 0.
    assert slip_tokens.argmax(dim=-1).tolist() == [0, 0] and (slip_tokens[:, 0] == SOT_TOKEN).all()
    assert kept_tokens.argmax(dim=-1).tolist() == [76, 76] and (kept_tokens[:, 76] == EOT_TOKEN).all()
    torch.manual_seed(0)
    model = create_model("clip_vit_tiny").eval()
    with torch.no_grad():
        slip_feats, kept_feats = model.encode_text(slip_tokens), model.encode_text(kept_tokens)
    # Causal attention: position 0 sees only SOT, so both captions get the same embedding.
    assert torch.allclose(slip_feats[0], slip_feats[1], atol=1e-6)
    assert (kept_feats[0] - kept_feats[1]).abs().max() > 1e-3


def _jpeg(seed: int) -> bytes:
    pixels = (np.random.RandomState(seed).rand(24, 24, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, captions: dict[str, str]):
    with tarfile.open(path, "w") as tf:
        for i, (key, caption) in enumerate(captions.items()):
            for name, data in ((f"{key}.jpg", _jpeg(i)), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("truncation", ["keep_eot", "slip"])
def test_pipeline_batches_carry_the_chosen_truncation(tmp_path, one_torch_thread, truncation):
    from slip.data.pipeline import PipelineConfig, build_loader

    captions = {"long0": LONG[0], "long1": LONG[1], "short": "a red circle"}
    shard = _shard(tmp_path / "s-000000.tar", captions)
    config = PipelineConfig(method="clip", size=16, batch_size=3, workers=0, shuffle_buffer=0, rank=0,
                            world_size=1, text_truncation=truncation)
    (batch,) = list(build_loader(str(shard), config))
    # The loader cuts padding after each batch's last pooled position (the highest id per row).
    expected = trim_padding(get_tokenizer(truncation=truncation)([captions[k] for k in batch["key"]]))
    assert torch.equal(batch["text"], expected)
    has_eot = {k: bool((row == EOT_TOKEN).any()) for k, row in zip(batch["key"], batch["text"])}
    assert has_eot == {"long0": truncation == "keep_eot", "long1": truncation == "keep_eot", "short": True}


def test_pipeline_refuses_an_unknown_truncation(tmp_path):
    from slip.data.pipeline import PipelineConfig, build_dataset

    with pytest.raises(ValueError, match="text_truncation must be one of keep_eot, slip"):
        build_dataset(str(tmp_path / "x.tar"), PipelineConfig(method="clip", text_truncation="cut"))


def test_trainer_passes_the_slip_options_to_the_loss_and_the_captions(tmp_path):
    from test_train import tiny

    from slip.data.synthetic import generate_synthetic
    from slip.train.trainer import Trainer

    generate_synthetic(tmp_path / "corpus", seed=0, train_samples=32, test_per_class=1, image_size=32,
                       samples_per_shard=8)
    trainer = Trainer(tiny(tmp_path / "corpus", tmp_path / "run", "objective.gather=slip",
                           "model.text_truncation=slip"))
    assert trainer.objective.keywords["gather"] == "slip"
    assert trainer.loader.config.text_truncation == "slip"
    default = Trainer(tiny(tmp_path / "corpus", tmp_path / "run2"))
    assert default.objective.keywords["gather"] == "with_grad"
    assert default.loader.config.text_truncation == "keep_eot"
