"""What only a CUDA GPU can show: mixed-precision training steps of every SSL combination,
the fused optimizer, SyncBatchNorm on NCCL, the batched augmentation on the GPU, GPU
checkpoints on the CPU, and the trainer under torchrun on one GPU.

Skipped without CUDA; run by ``pytest -m cuda`` and by ``benchmarks/gpu_suite.py``. Tiny models
(the *_vit_tiny presets: 32 px images, two blocks) keep the whole file to a few seconds of GPU
time plus two torchrun runs.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slip
from slip.data.augment import BatchAugment
from slip.data.views import MethodViews, clip_view
from slip.losses import slip_objective
from slip.models import get_architecture
from slip.ssl import method_class, method_names, method_views, view_method_names
from slip.ssl.visual_tokenizers import KMeansPatchTokenizer
from slip.train.config import ObjectiveConfig, OptimConfig
from slip.train.optim import build_optimizer
from slip.train.step import plain_step
from slip.transforms import IMAGENET_STD

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda", 0)
BATCH = 8  # >= 2 for the BatchNorms of the SSL heads

# Every combination the trainer can run: CLIP alone, each registered SSL method alone (the image-only
# simclr_* model with its method swapped) and with CLIP (the slip_* model).
COMBINATIONS = [("clip", "clip_vit_tiny", None)]
COMBINATIONS += [(m, "simclr_vit_tiny", m) for m in method_names()]
COMBINATIONS += [(f"slip+{m}", "slip_vit_tiny", m) for m in method_names()]


def _tokenizer() -> KMeansPatchTokenizer:
    # 64 random codes of 4x4 patches of a 16 px view: a 4x4 grid, the tiny tower's (32 px / 8 px).
    return KMeansPatchTokenizer(torch.rand(64, 48, generator=torch.Generator().manual_seed(0)), 4, 16)


def _model(preset: str, ssl: str | None) -> slip.SLIPModel:
    """The model the trainer builds for this combination, on the GPU, in training mode."""
    arch = get_architecture(preset)
    needs_tokenizer = ssl is not None and method_class(ssl).needs_visual_tokenizer
    if ssl is not None:
        tokenizer = _tokenizer() if needs_tokenizer else None
        arch = arch.with_ssl_method(ssl, tokenizer.vocab_size if tokenizer else None)
    torch.manual_seed(0)
    model = slip.create_model(arch)
    if needs_tokenizer:
        model.ssl.attach_visual_tokenizer(tokenizer.to(DEVICE))
    model = model.to(DEVICE).train()
    if ssl is not None and model.ssl.needs_sample_index:  # PIRL's memory bank, on the GPU
        model.ssl.configure_training(ObjectiveConfig(ssl=ssl, nce_negatives=64), 1, 10, corpus_size=64, seed=0)
    return model


def _batch(model: slip.SLIPModel, ssl: str | None, out_dtype: torch.dtype) -> dict:
    """A batch as the trainer makes it: uint8 views of the declared sizes (random pixels here,
    crops in training), moved to the GPU and augmented there by BatchAugment with the trainer's
    call (a CUDA generator, the global rows), plus captions and the patch mask if any."""
    size = model.arch.vision.image_size
    views = model.ssl.data_views(size) if ssl is not None else MethodViews(clip=None)
    views = dataclasses.replace(views, clip=clip_view(size) if model.has_text else None)
    g = torch.Generator().manual_seed(0)

    def pixels(spec):
        return torch.randint(0, 256, (BATCH, 3, *spec.size), dtype=torch.uint8, generator=g).to(DEVICE)

    batch: dict = {}
    if views.clip is not None:
        batch["image"] = pixels(views.clip)
        batch["text"] = slip.get_tokenizer()([f"a photo of shape number {i}" for i in range(BATCH)]).to(DEVICE)
    if views.ssl:
        batch["views"] = [pixels(spec) for spec in views.ssl]
    if views.mask is not None:
        batch["patch_mask"] = views.mask.sample_masks(BATCH, np.random.default_rng(0)).to(DEVICE)
    if ssl is not None and model.ssl.needs_sample_index:
        batch["index"] = torch.arange(BATCH, device=DEVICE)  # the samples' global indices
    augment = BatchAugment(views, out_dtype=out_dtype).to(DEVICE)
    return augment(batch, generator=torch.Generator(DEVICE).manual_seed(0), rows=(0, BATCH))


def _objective(model: slip.SLIPModel, ssl: str | None):
    return functools.partial(slip_objective, clip=model.has_text, ssl_loss=model.ssl.loss if ssl else None)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name,preset,ssl", COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_mixed_precision_step_has_finite_losses_and_moves_every_parameter_with_a_gradient(name, preset, ssl,
                                                                                          precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = _model(preset, ssl)
    batch = _batch(model, ssl, dtype)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), fused=True)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")  # the trainer's, as for fp16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # The trainer's step. GradScaler skips a step whose scaled gradients overflow and halves its
    # scale (from 2**16): the first steps of a run may be skipped (SimCLR's gradients overflow
    # until about 2**11), so the same step is retried until one is taken.
    for _ in range(16):
        optimizer.zero_grad(set_to_none=True)
        losses = plain_step(model, batch, _objective(model, ssl), lambda: torch.autocast(DEVICE.type, dtype=dtype),
                            scaler.scale)
        for key, value in losses.items():
            assert torch.isfinite(value).all(), f"{key} = {value} in {precision}"
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        if not scaler.is_enabled() or scaler.get_scale() >= scale:  # the step was taken
            break
    else:
        pytest.fail(f"GradScaler skipped 16 steps in a row (scale now {scaler.get_scale()})")
    if ssl is not None:
        model.ssl.on_step_end(1, 10, model.visual)

    with_gradient = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert with_gradient, "no parameter received a gradient"
    assert with_gradient <= moved, f"not updated despite a gradient: {sorted(with_gradient - moved)[:10]}"
    branches = ["visual."] + (["transformer."] if model.has_text else []) + (["ssl."] if ssl else [])
    for branch in branches:
        assert any(n.startswith(branch) for n in moved), f"nothing in {branch} was updated"


def test_fused_adamw_with_gradient_clipping_matches_the_unfused_optimizer():
    fused_model = _model("slip_vit_tiny", "simclr")
    plain_model = copy.deepcopy(fused_model)
    config = OptimConfig(lr=1e-3)
    fused = build_optimizer(fused_model, config, fused=True)
    plain = build_optimizer(plain_model, config, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    batch = _batch(fused_model, "simclr", torch.float32)
    for _ in range(3):
        # Real gradients of one model, given to both, so only the optimizers can differ.
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        plain_step(fused_model, batch, _objective(fused_model, "simclr"),
                   lambda: torch.autocast(DEVICE.type, enabled=False), lambda loss: loss)
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        norm_fused = torch.nn.utils.clip_grad_norm_(fused_model.parameters(), 0.01)
        norm_plain = torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 0.01)
        assert norm_fused > 0.01, "the gradients are too small for clipping to act"
        torch.testing.assert_close(norm_fused, norm_plain)
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


BACKEND = "nccl"


def test_sync_batchnorm_on_nccl_trains_the_online_heads_and_leaves_the_momentum_batchnorms_frozen(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    from slip.models.batchnorm import sync_batchnorm

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group(BACKEND, store=store, rank=0, world_size=1)
    try:
        model = sync_batchnorm(_model("slip_vit_tiny", "mocov3"), DEVICE)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
        params = dict(model.named_parameters())
        frozen = {n: p.detach().clone() for n, p in params.items() if n.startswith("ssl.momentum_projector.bn")}
        online = {n: p.detach().clone() for n, p in params.items() if n.startswith("ssl.projector.bn")}
        assert frozen and online and not any(params[n].requires_grad for n in frozen)
        ddp = DistributedDataParallel(model, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-3), fused=True)
        batch = _batch(model, "mocov3", torch.bfloat16)
        # Two steps: DDP fails at the second if a parameter that needs a gradient got none.
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            losses = plain_step(ddp, batch, _objective(model, "mocov3"),
                                lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16), lambda loss: loss)
            assert torch.isfinite(losses["loss"])
            optimizer.step()
        for n, value in frozen.items():
            assert params[n].grad is None and torch.equal(params[n].detach(), value), n
        assert all(not torch.equal(params[n].detach(), value) for n, value in online.items())
    finally:
        torch.distributed.destroy_process_group()


class _RecordingAugment(BatchAugment):
    """BatchAugment that keeps the draws each view was augmented with (by view name)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws: dict[str, dict] = {}

    def augment(self, x, spec, *, return_params=False, **kwargs):
        out, params = super().augment(x, spec, return_params=True, **kwargs)
        self.draws[spec.name] = params
        return (out, params) if return_params else out


@pytest.mark.parametrize("method", view_method_names())
def test_gpu_augmentation_equals_the_cpu_one_for_the_same_draws(method):
    # The trainer draws with a generator of its device, and a CUDA generator (Philox) gives other
    # numbers than a CPU one (Mersenne Twister) for the same seed: CPU and GPU runs augment
    # differently by design. So the GPU's draws are replayed on the CPU, which checks that the
    # two code paths (per-sample jitter loops on the CPU, slot-wise kernels on the GPU) agree.
    views = method_views(method, 64)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (BATCH, 3, 64, 64), dtype=torch.uint8, generator=g)}
    batch["views"] = [torch.randint(0, 256, (BATCH, 3, *s.size), dtype=torch.uint8, generator=g) for s in views.ssl]
    if views.clip is None:
        del batch["image"]
    gpu = _RecordingAugment(views).to(DEVICE)
    on_gpu = gpu({k: ([t.to(DEVICE) for t in v] if k == "views" else v.to(DEVICE)) for k, v in batch.items()},
                 generator=torch.Generator(DEVICE).manual_seed(7), rows=(BATCH, 2 * BATCH))  # rank 1 of 2
    cpu = BatchAugment(views)
    pairs = ([(batch["image"], on_gpu["image"], views.clip)] if views.clip else [])
    pairs += list(zip(batch.get("views", []), on_gpu.get("views", []), views.ssl))
    assert len(pairs) == len(views.all)
    for x, y, spec in pairs:
        params = {k: v.cpu() for k, v in gpu.draws[spec.name].items()}
        expected = cpu.augment(x, spec, params=params)
        # One uint8 level, in the units of the output (normalised views are divided by the std).
        tolerance = (1 / 255) / (min(IMAGENET_STD) if spec.normalize else 1.0)
        torch.testing.assert_close(y.cpu(), expected, rtol=0, atol=tolerance, msg=lambda m: f"{spec.name}: {m}")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_saved_from_the_gpu_loads_on_the_cpu(tmp_path, suffix):
    model = _model("slip_vit_tiny", "mocov3")
    path = tmp_path / f"model{suffix}"
    slip.save_checkpoint(model, path, step=1)
    loaded, transform = slip.load_pretrained(path)
    assert loaded.arch == model.arch
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert value.device.type == "cpu" and torch.equal(value, expected[key].cpu()), key
    with torch.no_grad():
        assert loaded.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, model.arch.embed_dim)


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, killed whole (torchrun's workers too) on timeout."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from slip.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("corpus")
    generate_synthetic(out, seed=0, train_samples=64, test_per_class=1, image_size=32, samples_per_shard=8)
    return out


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_trainer_under_torchrun_with_two_processes_sharing_the_gpu_over_gloo(corpus, tmp_path, accum_steps):
    # NCCL refuses two ranks on one device; SLIP_DIST_BACKEND=gloo runs the trainer's collectives
    # (DDP, SyncBatchNorm, the gathered contrastive loss, accumulation's gradient average) on gloo,
    # with rank r on cuda:(r % device_count).
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slip.train", str(ROOT / "configs" / "tiny" / "slip_simclr.yaml"), f"data.train={corpus / 'train'}",
           f"train.output_dir={out}", "data.workers=0", "train.log_every=1", f"train.accum_steps={accum_steps}",
           "train.max_steps=3", "train.precision=bf16"]
    env = {**os.environ, "SLIP_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    result = _run(cmd, env, timeout=120)  # a few seconds of work; the rest is start-up
    assert result.returncode == 0, result.stdout[-5000:]
    assert f"on 2 x {DEVICE.type}" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == [1, 2, 3]
    for record in train.values():
        for key in ("loss", "clip_loss", "ssl_loss"):
            assert math.isfinite(record[key]), (key, record)
        assert record["peak_mem_gib"] > 0
    model, _ = slip.load_pretrained(out / "checkpoints" / "step-00000003.pt")  # on the CPU
    assert all(torch.isfinite(p).all() for p in model.parameters())
