"""The trainer on CPU: every objective runs, accumulation is exact, resume is exact, bad
losses are handled, and torchrun with 2 processes matches one process."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slip
from slip.data.synthetic import generate_synthetic
from slip.ssl.visual_tokenizers import KMeansPatchTokenizer
from slip.train.config import load_config
from slip.train.trainer import Trainer, TrainingStopped, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 256 samples in shards of 8: with shuffling off, a rank's batch of 8 is one shard, which
    # lets a 2-rank run see exactly the global batches of a 1-rank run (see the torchrun test).
    out = tmp_path_factory.mktemp("corpus")
    generate_synthetic(out, seed=0, train_samples=256, test_per_class=2, image_size=32, samples_per_shard=8)
    return out


def tiny(corpus: Path, out: Path, *overrides: str):
    return load_config(None, [
        "model.name=slip_vit_tiny", f"data.train={corpus / 'train'}", "data.workers=0", "data.shuffle_buffer=0",
        "train.batch_size=16", "train.epochs=2", "train.precision=fp32", f"train.output_dir={out}",
        "train.log_every=1", "train.save_every=4", "optim.lr=1e-3", "optim.warmup_epochs=0.25", *overrides])


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec
    return out


@pytest.mark.parametrize("name,objective", [
    ("clip_vit_tiny", ["objective.ssl=none"]),
    ("simclr_vit_tiny", ["objective.clip=false"]),
    ("slip_vit_tiny", []),
])
def test_a_few_steps_of_each_objective(corpus, tmp_path, name, objective):
    cfg = tiny(corpus, tmp_path / "run", f"model.name={name}", "train.max_steps=3", *objective)
    result = train(cfg)
    assert result.step == 3 and result.checkpoint.name == "step-00000003.pt"
    steps = losses_by_step(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    for rec in steps.values():
        assert torch.isfinite(torch.tensor(rec["loss"]))
        assert ("clip_loss" in rec) == (name != "simclr_vit_tiny") and ("ssl_loss" in rec) == (name != "clip_vit_tiny")
        assert rec["samples_per_s"] > 0 and 0 <= rec["data_wait"] <= 1
    model, _ = slip.load_pretrained(result.checkpoint)
    assert model.arch == slip.create_model(name).arch
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 3 and "optimizer" in state and state["ranks"][0]["data"]["handed_out"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_accumulation_in_the_trainer_matches_the_plain_run(corpus, tmp_path):
    plain = train(tiny(corpus, tmp_path / "plain", "train.max_steps=3"))
    accum = train(tiny(corpus, tmp_path / "accum", "train.max_steps=3", "train.accum_steps=2"))
    a, b = losses_by_step(tmp_path / "plain"), losses_by_step(tmp_path / "accum")
    for step in (1, 2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
    assert plain.step == accum.step == 3


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(corpus, tmp_path):
    full = tmp_path / "full"
    train(tiny(corpus, full, "train.max_steps=10"))
    part = tmp_path / "part"
    train(tiny(corpus, part, "train.max_steps=5"))  # stops (and saves) at step 5
    result = train(tiny(corpus, part, "train.max_steps=10"))  # resumes at 5
    assert result.step == 10
    a, b = losses_by_step(full), losses_by_step(part)
    for step in range(6, 11):
        for key in ("loss", "clip_loss", "ssl_loss", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    w_full = torch.load(full / "checkpoints" / "step-00000010.pt", weights_only=True)["state_dict"]
    w_part = torch.load(part / "checkpoints" / "step-00000010.pt", weights_only=True)["state_dict"]
    for k in w_full:
        assert torch.allclose(w_full[k].float(), w_part[k].float(), atol=1e-5), k


def test_l2_adam_with_a_step_decay_drops_the_rate_once_and_resumes_exactly(corpus, tmp_path):
    # AMDIM's optimiser: Adam with L2 decay on every parameter, the rate divided by 5 after half
    # an epoch here (16 steps an epoch: the 9th update is the first decayed one).
    amdim = ("optim.name=adam", "optim.weight_decay=1e-5", "optim.decay_1d=true", "optim.warmup_epochs=0",
             "optim.schedule=multistep", "optim.decay_epochs=[0.5]", "optim.decay_rate=0.2")
    train(tiny(corpus, tmp_path / "full", "train.max_steps=12", *amdim))
    train(tiny(corpus, tmp_path / "part", "train.max_steps=6", *amdim))
    train(tiny(corpus, tmp_path / "part", "train.max_steps=12", *amdim))
    a, b = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "part")
    assert [a[step]["lr"] for step in range(1, 13)] == pytest.approx([1e-3] * 8 + [2e-4] * 4)
    for step in range(7, 13):
        for key in ("loss", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_resume_refuses_a_different_run_in_the_same_directory(corpus, tmp_path):
    from slip.train.config import ConfigError

    train(tiny(corpus, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(ConfigError, match=r"different configuration \(optim\.lr: 0\.001 -> 0\.002\)"):
        train(tiny(corpus, tmp_path / "run", "train.max_steps=2", "optim.lr=2e-3"))


def test_non_finite_losses_skip_updates_then_stop_with_the_last_checkpoint_intact(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", "train.max_nonfinite=3", "train.save_every=2")
    trainer = Trainer(cfg)
    real = trainer.objective
    poisoned = {3} | set(range(5, 100))

    def objective(outputs):
        losses = real(outputs)
        if trainer.step + 1 in poisoned:  # the step being computed
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    trainer.objective = objective
    before = {}

    with pytest.raises(TrainingStopped, match=r"3 non-finite losses in a row.*last checkpoint"):
        original_step = trainer._train_step

        def spy(batch):
            if trainer.step + 1 == 3:
                before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            out = original_step(batch)
            if trainer.step + 1 == 3:
                after = trainer.model.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before if "num_batches" not in k
                           and "running" not in k), "a skipped update must not change the weights"
            return out

        trainer._train_step = spy
        trainer.run()
    assert trainer.nonfinite.skipped == 4  # step 3, then 5, 6, 7
    last = trainer.checkpoints.paths()[-1]
    assert last.name == "step-00000006.pt"
    model, _ = slip.load_pretrained(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    # A failing or timed-out test must not leave trainers (or torchrun's workers) running.
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_cli(args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)
    _STARTED.append(proc)
    return proc


# What a log record holds besides timings and the machine's figures (memory, speed, ETA).
_NOT_REPRODUCIBLE = {"kind", "time", "samples_per_s", "data_wait", "peak_mem_gib", "eta"}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("objective", [
    pytest.param([], id="clip+simclr"),
    pytest.param(["objective.ssl=mocov2", "model.ssl_head.queue_size=48"], id="clip+mocov2"),
    pytest.param(["objective.ssl=swav", "model.ssl_head.prototypes=16", "model.ssl_head.queue_size=32",
                  "objective.freeze_prototypes_epochs=0.25"], id="clip+swav"),
    pytest.param(["objective.ssl=pirl", "objective.nce_negatives=64"], id="clip+pirl")])
def test_sigkill_at_any_moment_then_rerun_reproduces_the_uninterrupted_run(corpus, tmp_path, objective):
    # Loader workers with shuffle buffers (rebuilt from the re-read samples on resume); with MoCo
    # v2, the momentum branch and its queue of keys; with SwAV, multi-crop views, the prototypes
    # (frozen for 2 steps) and the queue (in use from step 3); with PIRL, the jigsaw tiles, the
    # memory bank (in the checkpoint's ssl_state), Z and the negatives' seed: all restored so that
    # every logged step and the final weights (and PIRL's bank) equal those of a run that was never killed.
    cfg_args = ["model.name=slip_vit_tiny", *objective, f"data.train={corpus / 'train'}", "data.workers=2",
                "data.shuffle_buffer=16", "data.samples_per_epoch=128", "train.batch_size=16", "train.epochs=1",
                "train.precision=fp32", "train.log_every=1", "train.save_every=1", "train.keep_last=2"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("data: {train: x}\n")
    run = [f"train.output_dir={tmp_path / 'run'}"]
    proc = _run_cli(["-m", "slip.train", str(cfg_file), *cfg_args, *run])
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-00000003.pt").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # trainer and loader workers; saves every step: likely mid-save or mid-step
    proc.wait()
    killed_at = max(int(p.stem.split("-")[1]) for p in ckpts.glob("step-*.pt"))
    (ckpts / ".step-00000099.pt.leftover.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    rerun = _run_cli(["-m", "slip.train", str(cfg_file), *cfg_args, *run])
    train(load_config(cfg_file, [*cfg_args, f"train.output_dir={tmp_path / 'full'}"]))  # meanwhile, never killed
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resumed from {ckpts / f'step-{killed_at:08d}.pt'}" in out
    assert "finished at step 8" in out  # 1 epoch of 128 samples at batch 16
    assert not list(ckpts.glob(".*.tmp"))
    assert [p.name for p in sorted(ckpts.glob("step-*.pt"))] == ["step-00000007.pt", "step-00000008.pt"]
    full = losses_by_step(tmp_path / "full")
    assert sorted(full) == list(range(1, 9))
    # Every record: the killed run's (steps after its last checkpoint included) and the rerun's.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    assert {r["step"] for r in records} == set(full) and records[-1]["step"] == 8
    for rec in records:
        want = full[rec["step"]]
        assert rec.keys() == want.keys()
        for key in want.keys() - _NOT_REPRODUCIBLE:
            assert rec[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (rec["step"], key)
    full_ckpt = torch.load(tmp_path / "full" / "checkpoints" / "step-00000008.pt", weights_only=True)
    run_ckpt = torch.load(ckpts / "step-00000008.pt", weights_only=True)
    w_full, w_run = full_ckpt["state_dict"], run_ckpt["state_dict"]
    assert w_full.keys() == w_run.keys()
    for k in w_full:
        assert torch.allclose(w_run[k].float(), w_full[k].float(), rtol=1e-6, atol=1e-7), k
    assert full_ckpt.get("ssl_state", {}).keys() == run_ckpt.get("ssl_state", {}).keys()
    for k, v in full_ckpt.get("ssl_state", {}).items():  # PIRL's memory bank
        assert torch.allclose(run_ckpt["ssl_state"][k], v, rtol=1e-6, atol=1e-7), k


# SLIP with SimCLR; MoCo v3 alone: its keys come from every rank's momentum branch, whose
# projector BatchNorm (like every BatchNorm here) uses global-batch statistics.
# Last: weights with an exactly zero gradient besides those of _removed_by_batchnorm. Without the
# CLIP branch the tower's features only reach the projector's first BatchNorm, which removes the
# shift the final LayerNorm's bias adds (and the momentum tower's copy follows it).
TORCHRUN_CASES = {
    "slip": (["model.name=slip_vit_tiny"], ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"), ()),
    "mocov3": (["model.name=simclr_vit_tiny", "objective.clip=false", "objective.ssl=mocov3", "objective.momentum=0.9",
                "model.freeze_patch_embed=true"], ("loss", "ssl_loss", "ssl_acc", "momentum"),
               ("visual.norm.bias", "ssl.momentum_encoder.norm.bias")),
    # BEiT's loss is the mean over the masked patches of the global batch on any number of ranks.
    "slip_beit": (["model.name=slip_vit_tiny", "objective.ssl=beit", "objective.tokenizer={tokenizer}"],
                  ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"), ()),
    # A ResNet tower: its BatchNorm statistics cover the global batch of both ranks.
    "slip_resnet": (["model.name=slip_resnet_tiny"], ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"), ()),
    # JPEGs decoded and cut on the training device (the CPU here, as nvJPEG would on a GPU).
    "slip_device_decode": (["model.name=slip_vit_tiny", "data.decode=device"],
                           ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"), ()),
}


@pytest.mark.parametrize("case", sorted(TORCHRUN_CASES))
def test_torchrun_two_processes_match_one_process(corpus, tmp_path, case):
    objective, logged, zero_gradient = TORCHRUN_CASES[case]
    tokenizer = tmp_path / "tokenizer.safetensors"
    KMeansPatchTokenizer(torch.rand(64, 48, generator=torch.Generator().manual_seed(0)), 4, 16).save(tokenizer)
    overrides = [*(o.format(tokenizer=tokenizer) for o in objective), f"data.train={corpus / 'train'}", "data.workers=0",
                 "data.shuffle_buffer=0", "train.batch_size=16", "train.epochs=1", "train.max_steps=4",
                 "train.precision=fp32", "train.log_every=1", "train.save_every=100"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("data: {train: x}\n")
    single = _run_cli(["-m", "slip.train", str(cfg_file), *overrides, f"train.output_dir={tmp_path / 'one'}"])
    out1, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out1
    multi = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "slip.train", str(cfg_file), *overrides, f"train.output_dir={tmp_path / 'two'}"])
    out2, _ = multi.communicate(timeout=300)
    assert multi.returncode == 0, out2
    assert "on 2 x cpu" in out2
    a, b = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    for step in (1, 2, 3, 4):
        for key in logged:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    w1 = torch.load(tmp_path / "one" / "checkpoints" / "step-00000004.pt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "two" / "checkpoints" / "step-00000004.pt", weights_only=True)["state_dict"]
    for k in w1:
        a, b = w1[k].float(), w2[k].float()
        # Some parameters have an exactly zero gradient, so only rounding noise reaches them and
        # Adam scales noise into full-size steps: they cannot agree between runs and are left out.
        if k.endswith(("attn.qkv.bias", "attn.in_proj_bias")):
            # The key bias: softmax ignores a shift shared by all keys.
            width = a.shape[0] // 3
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        if _removed_by_batchnorm(k, w1) or k in zero_gradient:
            continue
        if case == "slip_resnet" and k.startswith("visual.") and a.dim() == 4:
            # A convolution before BatchNorm is scale-invariant: the gradient along its weight is
            # rounding noise for a few elements, which Adam turns into full-size steps. A few in a
            # thousand may differ by a few steps; the rest must agree.
            off = (a - b).abs() > 1e-4
            assert off.float().mean() < 1e-3 and (a - b).abs().max() < 1e-3, (k, off.sum().item())
            continue
        assert torch.allclose(a, b, atol=1e-4), k


def _removed_by_batchnorm(key: str, keys) -> bool:
    """A linear layer's bias that the BatchNorm right after it removes (and that BatchNorm's
    running mean, which tracks it): in the SSL heads' ``layerN`` -> ``bnN`` pairs."""
    m = re.fullmatch(r"(.*)\.(layer|bn)(\d+)\.(bias|running_mean)", key)
    return bool(m) and (m[2], m[4]) in (("layer", "bias"), ("bn", "running_mean")) \
        and f"{m[1]}.bn{m[3]}.running_mean" in keys


def test_training_validation_matches_the_zero_shot_command(corpus, tmp_path, capsys):
    from slip.eval.zero_shot_cli import main as zero_shot_main

    result = train(tiny(corpus, tmp_path / "run", "train.max_steps=2", f"eval.benchmark={corpus / 'benchmark'}"))
    assert set(result.validation) == {"synthetic_top1", "synthetic_held_out", "synthetic_seen"}
    out = tmp_path / "zs.json"
    assert zero_shot_main(["--checkpoint", str(result.checkpoint), "--benchmark-dir", str(corpus / "benchmark"),
                           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]) == 0
    synthetic = json.loads(out.read_text())["results"]["synthetic"]
    assert synthetic["value"] == result.validation["synthetic_top1"]
    assert synthetic["groups"]["held_out"]["value"] == result.validation["synthetic_held_out"]
    assert synthetic["groups"]["seen"]["value"] == result.validation["synthetic_seen"]


def test_too_few_shards_for_the_data_readers_is_a_config_error(corpus, tmp_path):
    from slip.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.train: .* has 32 shards, fewer than 1 ranks x 40 workers"):
        Trainer(tiny(corpus, tmp_path / "run", "data.workers=40"))


def test_logit_scale_is_clamped_to_the_configured_maximum(corpus, tmp_path):
    trainer = Trainer(tiny(corpus, tmp_path / "run", "train.max_steps=1", "train.logit_scale_max=50"))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(6.0)  # exp(6) = 403
    trainer.run()
    assert trainer.model.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_model_trains_like_the_eager_one(corpus, tmp_path):
    # model.compile=true wraps the forward in torch.compile (inductor); about a minute of
    # compilation on 2 CPU cores. Varying caption lengths (the text tower is cut after the last
    # EOT) must not break it.
    # With accumulation the towers are compiled in place (the step calls them directly).
    eager = train(tiny(corpus, tmp_path / "eager", "train.max_steps=3"))
    a = losses_by_step(tmp_path / "eager")
    for accum in (1, 2):
        out = tmp_path / f"compiled{accum}"
        compiled = train(tiny(corpus, out, "train.max_steps=3", "model.compile=true", f"train.accum_steps={accum}"))
        b = losses_by_step(out)
        for step in (1, 2, 3):
            for key in ("loss", "clip_loss", "ssl_loss"):
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (accum, step, key)
        assert eager.step == compiled.step == 3
    model = slip.create_model("slip_vit_tiny")
    assert set(torch.load(out / "checkpoints" / "step-00000003.pt", weights_only=True)["state_dict"]) == set(
        model.state_dict())  # in-place compilation leaves the checkpoint's names alone


def _corpus_with_bad_samples(root: Path) -> Path:
    """``root/train``: 2 shards of 16 samples of 32 px; every 5th image is not an image."""
    import io
    import tarfile

    from PIL import Image

    (root / "train").mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    for shard in range(2):
        with tarfile.open(root / "train" / f"{shard:05d}.tar", "w") as tar:
            for i in range(16):
                key = f"s{shard}_{i:02d}"
                if (shard * 16 + i) % 5 == 4:
                    image = b"these bytes are no image"
                else:
                    buf = io.BytesIO()
                    pixels = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
                    Image.fromarray(pixels).save(buf, "JPEG")
                    image = buf.getvalue()
                for ext, data in (("jpg", image), ("txt", f"a picture number {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_skipped_samples_are_logged_and_carried_over_a_resume(tmp_path):
    shards = _corpus_with_bad_samples(tmp_path / "shards")
    args = ["data.samples_per_epoch=16", "train.batch_size=8", "train.epochs=4", "train.log_every=1"]
    train(tiny(shards, tmp_path / "full", *args, "train.max_steps=6"))
    train(tiny(shards, tmp_path / "part", *args, "train.max_steps=3"))
    resumed = train(tiny(shards, tmp_path / "part", *args, "train.max_steps=6"))
    full, part = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "part")
    assert [full[s]["skipped_samples"] for s in range(1, 7)] == [part[s]["skipped_samples"] for s in range(1, 7)]
    assert full[6]["skipped_samples"] > full[3]["skipped_samples"] > 0  # counted, never dropped silently
    assert resumed.skipped_samples == {"not_an_image": full[6]["skipped_samples"]}


def test_decoding_on_the_training_device_trains_like_decoding_in_the_workers(corpus, tmp_path):
    runs = {}
    for mode in ("workers", "device"):
        out = tmp_path / mode
        train(tiny(corpus, out, "train.max_steps=3", f"data.decode={mode}", "data.workers=0"))
        runs[mode] = losses_by_step(out)
    # The same samples, crop boxes and decoder; the resize runs through float on the device side
    # (pixels within one grey level, tested in test_data_decode_device), so the runs agree closely
    # at the first step and drift apart only slowly.
    assert runs["device"][1]["loss"] == pytest.approx(runs["workers"][1]["loss"], rel=1e-3)
    for step in (2, 3):
        assert runs["device"][step]["loss"] == pytest.approx(runs["workers"][step]["loss"], rel=1e-2), step
