"""The runtime shared by pre-training, fine-tuning and evaluation: collectives that are legal
under NCCL, device and precision choice, logging per rank, and the trainer's reliability
(no-data stop, resume after memory-setting changes, resume progress)."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch

from slip import distributed as D
from slip import runtime
from slip.train.trainer import Trainer, TrainingStopped, train
from test_eval_finetune import _config as finetune_config
from test_eval_finetune import bench  # noqa: F401  (fixture)
from test_data_pipeline import _jpeg, _write_tar
from test_train import corpus, losses_by_step, tiny  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

# torch.distributed calls that move tensor data between ranks (or start/stop the group).
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "gather_object", "scatter_object_list", "send", "recv", "isend", "irecv", "barrier", "monitored_barrier",
    "init_process_group", "destroy_process_group", "new_group",
}


def _distributed_aliases(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES):
            continue
        owner = ast.unparse(node.func.value)
        if owner in aliases or owner == "torch.distributed":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_module_outside_slip_distributed_calls_a_collective():
    files = [p for d in ("slip", "zero_shot", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    offenders = [call for p in files if p != ROOT / "slip" / "distributed.py" for call in _collective_calls(p)]
    assert offenders == []
    # The scan finds what it looks for: slip/distributed.py itself is full of them.
    assert len(_collective_calls(ROOT / "slip" / "distributed.py")) >= 8


def test_collective_device_is_where_the_backend_takes_tensors():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    # NCCL alone takes CUDA tensors only: a CPU bookkeeping tensor must go to this rank's GPU.
    assert D.backend_device_types("cuda:nccl") == D.backend_device_types("nccl") == {"cuda"}
    assert D.collective_device(cpu, "cuda:nccl", cuda_index=3) == torch.device("cuda", 3)
    assert D.collective_device(gpu, "nccl") == gpu
    # The group slip starts on GPUs: gloo for CPU tensors, NCCL for CUDA tensors, nothing moves.
    assert D.collective_device(cpu, "cpu:gloo,cuda:nccl") == cpu
    assert D.collective_device(gpu, "cpu:gloo,cuda:nccl") == gpu
    assert D.collective_device(gpu, "cpu:gloo") == cpu
    assert D.backend_device_types("gloo") == {"cpu", "cuda"}


def test_process_group_backend_on_gpus_keeps_cpu_bookkeeping_legal(monkeypatch):
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    assert D.default_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert D.default_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")  # two processes sharing one GPU
    assert D.default_backend(torch.device("cuda", 0)) == "gloo"


# --- the NCCL stand-in ----------------------------------------------------------------------
#
# On a CPU machine every tensor is on the CPU and gloo takes it, so NCCL's rule (collectives
# take tensors on the device its backend serves) cannot be broken here by construction. The
# checker enforces it through the one mechanism that applies it: every tensor slip hands to a
# torch.distributed collective must come out of slip.distributed._place, which puts it on
# collective_device() of the running backend (for NCCL, the GPU: tested above). A collective
# issued elsewhere, on a tensor built wherever its author happened to build it (a CPU tensor in
# the trainer's loss logging, say), is exactly the call that stops a multi-GPU run, and the
# checker records it. torch's own internal calls (all_gather_object's byte tensors) are torch's
# business and pass.

_TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
                       "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")
_TORCH_DIR = os.path.dirname(torch.__file__)


def _install_checker(violations: list[str]) -> None:
    import sys

    import torch.distributed as dist

    placed: set[int] = set()
    real_place = getattr(D, "_place", None)
    if real_place is not None:
        def place(t):
            out = real_place(t)
            placed.add(id(out))
            return out

        D._place = place

    def tensors_of(args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                yield from (t for t in a if isinstance(t, torch.Tensor))

    def wrap(name, real):
        def checked(*args, **kwargs):
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(_TORCH_DIR):
                # Recorded, not raised: raising on one rank would leave the other waiting. Output
                # buffers need not come from _place, but must share the placed input's device.
                tensors = list(tensors_of(args, kwargs))
                devices = {t.device for t in tensors if id(t) in placed}
                for t in tensors:
                    if t.device not in devices:
                        violations.append(f"{name} on a {t.device} tensor not placed for the backend, "
                                          f"from {caller.f_code.co_filename}:{caller.f_lineno}")
            return real(*args, **kwargs)
        return checked

    for name in _TENSOR_COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _checked_rank(rank: int, port: int, work: list, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    violations: list[str] = []
    _install_checker(violations)
    try:
        for kind, cfg in work:
            if kind == "train":
                trainer = Trainer(cfg, log_stream=io.StringIO())
                real = trainer.objective

                def objective(outputs, real=real, trainer=trainer):
                    losses = real(outputs)
                    if trainer.step == 1 and rank == 1:  # step 2 fails on one rank: both must skip it
                        losses["loss"] = losses["loss"] * float("nan")
                    return losses

                trainer.objective = objective
                trainer.run()
            else:
                from slip.eval.finetune import finetune

                finetune(cfg, log_stream=io.StringIO())
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(violations))
        D.shutdown()


def _spawn_two(fn, *args) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(fn, args=(port, *args), nprocs=2, join=False, start_method="fork")
    for _ in range(480):  # join() raises if a rank failed; a hung rank fails the test after 4 minutes
        if context.join(timeout=0.5):
            return
    for process in context.processes:
        process.kill()
    pytest.fail("the 2-process run did not finish within 4 minutes")


def test_training_evaluation_and_finetuning_give_collectives_only_placed_tensors(corpus, bench, tmp_path):
    # Logging every step (loss means, skip counts), a non-finite step (the joint skip decision),
    # zero-shot validation (gathered logits) and checkpoints; then fine-tuning with evaluation.
    work = [
        ("train", tiny(corpus, tmp_path / "train", "train.max_steps=3", "train.save_every=2",
                       f"eval.benchmark={corpus / 'benchmark'}", f"eval.knn={corpus / 'benchmark'}", "eval.every=2")),
        ("finetune", finetune_config(bench, tmp_path / "finetune", mixup=0.0, cutmix=0.0, max_steps=2,
                                     eval_every=1)),
    ]
    _spawn_two(_checked_rank, work, str(tmp_path))
    violations = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert violations == {0: [], 1: []}
    steps = losses_by_step(tmp_path / "train")
    assert sorted(steps) == [1, 2, 3] and steps[3]["skipped_updates"] == 1
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval" and "synthetic_knn_top1" in r] == [2, 3]
    assert (tmp_path / "finetune" / "results.json").is_file()


# --- runtime choices ------------------------------------------------------------------------


def test_device_and_precision_errors_name_the_setting():
    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        runtime.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime.pick_device("cuda")
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="'fp8' is not one of auto"):
        runtime.resolve_precision("fp8", torch.device("cpu"))


def test_non_finite_guard_skips_then_stops_naming_the_setting():
    guard = runtime.NonFiniteGuard(2, "runs/x/checkpoints", setting="train.max_nonfinite")
    assert guard.update_allowed(torch.tensor(1.0), 0)
    assert not guard.update_allowed(torch.tensor(float("nan")), 1)
    assert guard.update_allowed(torch.tensor(2.0), 2)  # a finite loss resets the count
    assert not guard.update_allowed(torch.tensor(float("inf")), 3)
    with pytest.raises(runtime.RunStopped, match=r"2 non-finite losses in a row \(train.max_nonfinite=2\).*"
                                                 r"runs/x/checkpoints is intact"):
        guard.update_allowed(torch.tensor(float("nan")), 4)
    assert guard.state_dict() == {"skipped_updates": 3, "nonfinite_in_a_row": 2}


def test_other_ranks_log_warnings_only_and_name_their_rank(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        runtime.configure_logging(rank=1)
        logging.getLogger("slip.test").info("an info line")
        logging.getLogger("slip.test").warning("a warning line")
        runtime.configure_logging(rank=0)
        logging.getLogger("slip.test").info("rank zero info")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "an info line" not in err
    assert "[rank 1] WARNING slip.test: a warning line" in err
    assert "INFO slip.test: rank zero info" in err and "[rank 0]" not in err


# --- trainer reliability --------------------------------------------------------------------


def _shards_with_captions_under_an_unknown_key(root: Path) -> Path:
    root.mkdir(parents=True)
    for shard in range(2):
        _write_tar(root / f"{shard:05d}.tar", [(f"s{shard}_{i}.{ext}", data) for i in range(8)
                                               for ext, data in (("jpg", _jpeg(i)), ("caption_text", b"a square"))])
    return root


def test_an_epoch_without_a_sample_stops_with_the_skip_reasons(tmp_path):
    shards = _shards_with_captions_under_an_unknown_key(tmp_path / "shards")
    cfg = tiny(tmp_path, tmp_path / "run", f"data.train={shards}", "data.samples_per_epoch=16",
               "train.batch_size=8", "train.max_steps=2")
    with pytest.raises(TrainingStopped, match=r"yielded no batch; every sample read was skipped: "
                                              r"missing_caption 16\b"):
        train(cfg)


def test_resume_accepts_memory_settings_and_warns_on_a_precision_change(corpus, tmp_path, caplog):
    full = train(tiny(corpus, tmp_path / "full", "train.max_steps=4"))
    train(tiny(corpus, tmp_path / "part", "train.max_steps=2"))
    # Out of memory at step 2: the same run goes on with checkpointing and two micro-batches.
    resumed = train(tiny(corpus, tmp_path / "part", "train.max_steps=4", "model.grad_checkpointing=true",
                         "train.accum_steps=2"))
    assert resumed.step == 4
    a, b = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "part")
    for step in (3, 4):  # the same numbers as the uninterrupted run
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
    assert full.step == 4
    with caplog.at_level(logging.WARNING, logger="slip.train.trainer"):
        train(tiny(corpus, tmp_path / "part", "train.max_steps=5", "train.precision=bf16"))
    assert "train.precision: 'fp32' -> 'bf16'" in caplog.text


def test_mid_epoch_resume_reports_what_it_re_reads_and_each_checkpoint_path(corpus, tmp_path, caplog):
    stream = io.StringIO()
    train(tiny(corpus, tmp_path / "run", "train.max_steps=3", "train.save_every=100", "data.shuffle_buffer=8"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(tiny(corpus, tmp_path / "run", "train.max_steps=4", "data.shuffle_buffer=8"), log_stream=stream)
    assert "48 samples per rank into epoch 0: each loader worker re-reads its shuffle buffer" in stream.getvalue()
    lines = [r.getMessage() for r in caplog.records if "resumed after sample" in r.getMessage()]
    assert len(lines) == 1 and "rank 0 worker 0: resumed after sample 48 of pass 0: re-read its" in lines[0]
    assert "re-read its 7 buffered samples (" in lines[0] and " MB from " in lines[0]
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint written: ")]
    assert written == [f"checkpoint written: {tmp_path / 'run' / 'checkpoints' / 'step-00000004.pt'}"]


def test_an_fp16_overflow_skips_the_step_and_the_momentum_update_and_is_counted(corpus, tmp_path):
    # fp16 needs a GPU; its loss scaler's logic is device-independent, so a CPU GradScaler with a
    # gradient made infinite at step 2 stands in for an fp16 overflow.
    trainer = Trainer(tiny(corpus, tmp_path / "run", "objective.ssl=mocov3", "train.max_steps=3"),
                      log_stream=io.StringIO())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weight = trainer.model.visual.patch_embed.proj.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step == 1 else g)
    states = []
    real_step = trainer._train_step

    def step(batch):
        out = real_step(batch)
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer._train_step = step
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    assert result.step == 3 and result.skipped_updates == 1
    momentum = [k for k in before if k.startswith("ssl.momentum_encoder.")]
    assert momentum and not torch.equal(states[0][momentum[0]], before[momentum[0]])  # step 1 moved it
    assert all(torch.equal(states[1][k], states[0][k]) for k in before if "num_batches" not in k
               and "running" not in k), "an overflowed step must change no weight, momentum ones included"
    assert trainer.scaler.get_scale() == 2.0**9  # halved once, not yet grown back
    assert [r["skipped_updates"] for r in losses_by_step(tmp_path / "run").values()] == [0, 1, 1]
