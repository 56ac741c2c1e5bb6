"""Launching where the GPUs are: srun (SLURM's variables instead of torchrun's) and stopping on a
scheduler's signal with a checkpoint, then resuming exactly."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import torch

from slip import distributed as D
from slip.train.config import load_config
from slip.train.trainer import train
from test_train import _NOT_REPRODUCIBLE, _run_cli, corpus, losses_by_step  # noqa: F401  (corpus: fixture)

SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu[01-04,07]"}


@pytest.mark.parametrize("nodelist,host", [("gpu[01-04,07]", "gpu01"), ("node7", "node7"),
                                           ("a-b[009-012],c[1]", "a-b009"), ("x1,x2", "x1"),
                                           ("gpu[3,5-6]", "gpu3")])
def test_first_host_of_a_compressed_slurm_node_list(nodelist, host):
    assert D.first_host(nodelist) == host


def test_srun_task_gets_torchrun_variables_from_slurm():
    assert D.launcher_env(SLURM) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01",
                                     "MASTER_PORT": str(D.SLURM_PORT_BASE + 4242)}
    # A job step's own task count and node list come first (srun inside a larger allocation).
    step = {**SLURM, "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert D.launcher_env(step)["WORLD_SIZE"] == "8" and D.launcher_env(step)["MASTER_ADDR"] == "gpu03"
    assert D.launcher_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"
    assert D.launcher_env({**SLURM, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    # torchrun's variables take precedence; a single task needs no process group.
    assert D.launcher_env({**SLURM, "WORLD_SIZE": "4", "RANK": "0"}) == {}
    assert D.launcher_env({**SLURM, "SLURM_NTASKS": "1"}) == {}
    assert D.launcher_env({}) == {}
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        D.launcher_env({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"})


def _free_slurm_job_id() -> str:
    """A job id whose derived port is free here."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if D.SLURM_PORT_BASE <= port < D.SLURM_PORT_BASE + 20000:
            return str(port - D.SLURM_PORT_BASE)
    pytest.skip("no free port in the range slip derives from SLURM job ids")


def _overrides(corpus, out):
    return [f"data.train={corpus / 'train'}", "data.workers=0", "data.shuffle_buffer=0", "train.batch_size=16",
            "train.epochs=1", "train.max_steps=3", "train.precision=fp32", "train.log_every=1",
            "train.save_every=100", f"train.output_dir={out}", "model.name=slip_vit_tiny"]


def test_two_tasks_started_as_srun_starts_them_match_one_process(corpus, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("data: {train: x}\n")
    job = _free_slurm_job_id()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    tasks = [_run_cli(["-m", "slip.train", str(cfg_file), *_overrides(corpus, tmp_path / "two")],
                      env={**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                           "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "localhost"}) for r in range(2)]
    train(load_config(cfg_file, _overrides(corpus, tmp_path / "one")))
    outputs = [t.communicate(timeout=300)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    assert "on 2 x cpu" in outputs[0]
    a, b = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "clip_loss", "ssl_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.usefixtures("one_torch_thread")
# SIGUSR1 to the whole process group (trainer and loader worker), as a scheduler may deliver it;
# SIGTERM to the trainer only, as torchrun forwards it.
@pytest.mark.parametrize("signum,group", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_writes_a_checkpoint_and_the_rerun_finishes_like_an_uninterrupted_run(corpus, tmp_path, signum,
                                                                                          group):
    cfg_args = ["model.name=slip_vit_tiny", f"data.train={corpus / 'train'}", "data.workers=1",
                "data.shuffle_buffer=16", "data.samples_per_epoch=128", "train.batch_size=16", "train.epochs=2",
                "train.precision=fp32", "train.log_every=1", "train.save_every=100"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("data: {train: x}\n")
    run = [f"train.output_dir={tmp_path / 'run'}"]
    proc = _run_cli(["-m", "slip.train", str(cfg_file), *cfg_args, *run])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    (os.killpg if group else os.kill)(proc.pid, signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out  # stopped on purpose, checkpoint written
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1, out
    stopped_at = int(saved[0].stem.split("-")[1])
    assert 2 <= stopped_at < 16
    assert f"stopped on {signal.Signals(signum).name} at step {stopped_at} with checkpoint {saved[0]}" in out
    assert "Traceback" not in out
    rerun = _run_cli(["-m", "slip.train", str(cfg_file), *cfg_args, *run])
    train(load_config(cfg_file, [*cfg_args, f"train.output_dir={tmp_path / 'full'}"]))  # meanwhile, never stopped
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resumed from {saved[0]} at step {stopped_at}" in out and "finished at step 16" in out
    full = losses_by_step(tmp_path / "full")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 17))  # nothing lost, nothing trained twice
    for rec in records:
        for key in full[rec["step"]].keys() - _NOT_REPRODUCIBLE:
            assert rec[key] == pytest.approx(full[rec["step"]][key], rel=1e-6, abs=1e-9), (rec["step"], key)
    w_full = torch.load(tmp_path / "full" / "checkpoints" / "step-00000016.pt", weights_only=True)["state_dict"]
    w_run = torch.load(tmp_path / "run" / "checkpoints" / "step-00000016.pt", weights_only=True)["state_dict"]
    for k in w_full:
        assert torch.allclose(w_run[k], w_full[k], rtol=1e-6, atol=1e-7), k


def test_loader_workers_survive_a_stop_notice_sent_to_every_process(corpus):
    import multiprocessing

    from slip.data.pipeline import PipelineConfig, build_loader

    loader = build_loader(str(corpus / "train"), PipelineConfig(method="slip-simclr", size=32, batch_size=16,
                                                                 workers=1, shuffle_buffer=0, seed=0))
    batches = iter(loader)
    next(batches)
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGUSR1)  # its default action would end the worker
    time.sleep(0.3)
    assert len(list(batches)) == 256 // 16 - 1


def _resume_on_two_ranks(rank: int, port: int, cfg, out: str) -> None:
    from slip.train.config import ConfigError
    from slip.train.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = Trainer(cfg).run()
        outcome = f"finished at step {result.step}"
    except ConfigError as e:
        outcome = str(e)
    finally:
        D.shutdown()
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.parametrize("stop_at,policy,expected", [
    (3, "refuse", "written by 1 ranks at step 3, 3 steps into epoch 0; the data position of 1 ranks cannot be "
                  "carried over to 2"),
    (3, "restart_epoch", "finished at step 20"),
    (16, "refuse", "finished at step 20"),  # at an epoch boundary nothing is lost
])
def test_an_elastic_restart_with_another_world_size_keeps_the_data_position_or_is_refused(corpus, tmp_path, stop_at,
                                                                                          policy, expected):
    from test_runtime import _spawn_two
    from test_train import tiny

    def cfg(*extra):
        return tiny(corpus, tmp_path / "run", "train.epochs=1.25", "train.save_every=100", *extra)

    train(cfg(f"train.max_steps={stop_at}"))  # one rank, 16 steps per epoch, stopped at stop_at
    _spawn_two(_resume_on_two_ranks, cfg(f"train.world_change={policy}"), str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert all(expected in outcome for outcome in outcomes), outcomes
