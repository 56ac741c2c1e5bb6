"""``slip submit``: the SLURM job submitit writes (one task per GPU, SIGUSR1 before the time
limit, requeue), the checks made before anything is queued, and the requeue decision of the job
callable, run against submitit's own signal handler and, end to end, its LocalExecutor (which
requeues like SLURM: the task exits 144 and is started again). No cluster is needed: a fake
``sbatch`` records the script submitit wrote."""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from submitit.helpers import DelayedSubmission

from slip.cli import main
from slip.runtime import Preempted
from slip.submit import TrainJob, parse_time
from slip.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "slip_simclr.yaml"
JOB_ID = "4242"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from slip.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("corpus")
    generate_synthetic(out, seed=0, train_samples=64, test_per_class=1, image_size=32, samples_per_shard=8)
    return out / "train"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``srun`` and ``sbatch`` on PATH; sbatch keeps the script it is given and answers like
    SLURM's. Returns where the script is kept (absent when nothing was submitted)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted_script.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{record}"\necho "Submitted batch job {JOB_ID}"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return record


def _submit_argv(corpus: Path, out: Path, *options: str) -> list[str]:
    return ["submit", str(TINY), f"data.train={corpus}", f"train.output_dir={out}", *options]


# --- time limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("0:30", 1), ("90:00", 90), ("01:30:00", 90), ("1:00:01", 61), ("2-00", 2880),
    ("1-12:30", 2190), ("3-00:00:00", 4320), (" 45 ", 45),
])
def test_time_limits_in_slurms_formats_become_whole_minutes(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1h", "-5", "0", "00:00:00", "1:60:00", "1:00:60", "1-24:00:00",
                                  "1:2:3:4", "1-", "UNLIMITED"])
def test_a_time_limit_slurm_would_not_read_is_a_user_error_naming_time(text, corpus, fake_slurm, capsys):
    assert main(_submit_argv(corpus, fake_slurm.parent / "run", "--gpus-per-node", "1", "--time", text)) == 2
    err = capsys.readouterr().err
    assert err.startswith("slip submit: error: --time ") and err.count("\n") == 1 and "Traceback" not in err
    assert not fake_slurm.exists()


# --- the job submitit writes ------------------------------------------------------------------

OPTIONS = ["--nodes", "2", "--gpus-per-node", "4", "--time", "2-00:00:00", "--partition", "gpu", "--mem-per-gpu",
           "64G", "--account", "vision", "--qos", "high", "--constraint", "volta32gb", "--comment", "slip b16",
           "--exclude", "node[01-02]", "--job-name", "b16", "--cpus-per-task", "10", "--signal-grace", "300"]


def _sbatch_options(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_the_job_script_asks_one_task_per_gpu_and_sigusr1_before_the_limit(corpus, fake_slurm, capsys):
    out = fake_slurm.parent / "runs" / "b16"
    assert main(_submit_argv(corpus, out, *OPTIONS)) == 0
    script = fake_slurm.read_text()
    options = _sbatch_options(script)
    for expected in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2880", "--partition=gpu",
                     "--mem-per-gpu=64G", "--account=vision", "--qos=high", "--constraint=volta32gb",
                     "--comment='slip b16'", "--exclude='node[01-02]'", "--job-name=b16", "--cpus-per-task=10",
                     "--requeue", "--signal=USR1@300"]:
        assert f"#SBATCH {expected}" in options, (expected, script)
    assert [o for o in options if "--signal" in o] == ["#SBATCH --signal=USR1@300"]  # submitit's USR2 line replaced
    assert re.search(r"^srun .*-m submitit\.core\._submit", script, re.MULTILINE)  # every task runs the job through srun

    job_dir = out / "submitit"
    submission = DelayedSubmission.load(job_dir / f"{JOB_ID}_submitted.pkl")
    job = submission.function
    assert isinstance(job, TrainJob) and submission.args == () and job.workdir == str(fake_slurm.parent)
    assert job.cfg.train.output_dir == str(out) and job.cfg.data.train == str(corpus)
    assert submission._timeout_min == 2880 and submission._timeout_countdown == 30  # SLIP's 30 time-out requeues

    stdout = capsys.readouterr().out
    assert f"submitted job {JOB_ID}: 2 node(s) x 4 GPU(s) = 8 rank(s), time limit 2-00:00:00" in stdout
    assert f"job dir: {job_dir}" in stdout
    assert f"tail -f {job_dir / (JOB_ID + '_0_log.out')}" in stdout


def test_dry_run_prints_the_scripts_options_and_submits_nothing(corpus, fake_slurm, capsys):
    out = fake_slurm.parent / "runs" / "b16"
    assert main(_submit_argv(corpus, out, *OPTIONS, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert not fake_slurm.exists() and not out.exists()
    assert main(_submit_argv(corpus, out, *OPTIONS)) == 0
    written = _sbatch_options(fake_slurm.read_text())
    # submitit adds its log files, open mode and wckey; every other option is the dry run's
    own = [o for o in written if not re.match(r"#SBATCH --(output|error|open-mode|wckey)=", o)]
    assert sorted(_sbatch_options(printed)) == sorted(own)
    assert "nothing submitted" in printed and f"job dir: {out / 'submitit'}" in printed


def test_the_default_job_dir_cpus_and_job_name_follow_the_config(corpus, fake_slurm, capsys):
    out = fake_slurm.parent / "runs" / "mine"
    argv = _submit_argv(corpus, out, "--gpus-per-node", "2", "--time", "60", "data.workers=6", "--dry-run")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for expected in ["--cpus-per-task=7", "--job-name=slip-mine", "--nodes=1", "--ntasks-per-node=2", "--time=60",
                     "--signal=USR1@120"]:
        assert f"#SBATCH {expected}" in printed, (expected, printed)
    assert f"job dir: {out / 'submitit'}" in printed


# --- mistakes end before anything is queued ---------------------------------------------------

MISTAKES = [  # (id, argv after CONFIG and the shard/output overrides, text the error line contains)
    ("batch-over-ranks", ["--nodes", "1", "--gpus-per-node", "3", "--time", "60"],
     "train.batch_size 16 is not divisible by --nodes x --gpus-per-node x train.accum_steps = 1 x 3 x 1 = 3"),
    ("batch-over-ranks-and-accumulation", ["train.batch_size=12", "train.accum_steps=2", "--gpus-per-node", "4",
                                           "--time", "60"], "train.accum_steps = 1 x 4 x 2 = 8"),
    ("unknown-key", ["train.batchsize=8", "--gpus-per-node", "1", "--time", "60"], "train.batchsize"),
    ("bad-value", ["train.precision=fp8", "--gpus-per-node", "1", "--time", "60"], "train.precision"),
    ("missing-shards", ["data.train={tmp}/nowhere/", "--gpus-per-node", "1", "--time", "60"], "{tmp}/nowhere/"),
    ("grace-longer-than-limit", ["--gpus-per-node", "1", "--time", "2", "--signal-grace", "120"], "--signal-grace 120"),
    ("no-gpus", ["--gpus-per-node", "0", "--time", "60"], "--gpus-per-node 0"),
    ("no-nodes", ["--nodes", "0", "--gpus-per-node", "1", "--time", "60"], "--nodes 0"),
    ("memory-size", ["--gpus-per-node", "1", "--time", "60", "--mem", "lots"], "--mem 'lots'"),
]


@pytest.mark.parametrize("case", MISTAKES, ids=[c[0] for c in MISTAKES])
def test_a_mistake_ends_in_one_error_line_before_anything_is_submitted(case, corpus, fake_slurm, capsys,
                                                                       monkeypatch):
    monkeypatch.delenv("SLIP_DEBUG", raising=False)
    _, extra, named = case
    tmp = str(fake_slurm.parent)
    argv = _submit_argv(corpus, fake_slurm.parent / "run") + [a.format(tmp=tmp) for a in extra]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.startswith("slip submit: error: ") and err.count("\n") == 1, err
    assert named.format(tmp=tmp) in err
    assert not fake_slurm.exists()


def test_a_missing_config_file_is_one_error_line(fake_slurm, capsys):
    missing = fake_slurm.parent / "nowhere.yaml"
    assert main(["submit", str(missing), "--gpus-per-node", "1", "--time", "60"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slip submit: error: ") and str(missing) in err and "Traceback" not in err


def test_without_slurm_on_path_the_error_names_sbatch_and_srun(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither tool there
    assert main(_submit_argv(corpus, tmp_path / "run", "--gpus-per-node", "1", "--time", "60")) == 2
    err = capsys.readouterr().err
    assert err.startswith("slip submit: error: no SLURM here: sbatch and srun not found on PATH")
    assert not (tmp_path / "run").exists()


def test_without_submitit_the_command_names_the_cluster_extra(corpus, fake_slurm, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now raises ImportError
    assert main(_submit_argv(corpus, fake_slurm.parent / "run", "--gpus-per-node", "1", "--time", "60")) == 2
    err = capsys.readouterr().err
    assert err == ("slip submit: error: slip submit needs the 'submitit' package, which is not installed: "
                   "pip install 'slip[cluster]'\n")
    assert not fake_slurm.exists()


# --- the requeue decision, against submitit's own signal handler -------------------------------


def _stop_like_the_trainer(signum: int):
    """What slip's trainer does on a stop signal: its own handler (bound to SIGUSR1 and SIGTERM
    while the loop runs) records it, the step ends, a checkpoint is written, Preempted."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda n, f: received.append(n)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        signal.raise_signal(signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert received, "the trainer's handler never saw the stop"
    raise Preempted(f"stopped on {signal.Signals(received[0]).name}; rerun the same command to resume")


class _Scripted(TrainJob):
    """A TrainJob whose training is one of the scripted endings below."""

    def __init__(self, cfg, workdir, ending: str = "finish") -> None:
        super().__init__(cfg, workdir)
        self.ending = ending
        self.events: list[str] = []

    def train(self):
        from types import SimpleNamespace

        if self.ending == "notice":
            _stop_like_the_trainer(signal.SIGUSR1)
        if self.ending == "sigterm":
            _stop_like_the_trainer(signal.SIGTERM)
        if self.ending == "notice-before-loop":  # no handler of the trainer's yet
            signal.raise_signal(signal.SIGUSR1)
        if self.ending == "submitit-signal-in-loop":
            received: list[int] = []
            previous = signal.signal(signal.SIGUSR1, lambda n, f: received.append(n))
            try:
                signal.raise_signal(signal.SIGUSR2)  # scancel --signal=USR2 / submitit's Job._interrupt
            finally:
                signal.signal(signal.SIGUSR1, previous)
            self.events.append(f"trainer's stop saw {[signal.Signals(n).name for n in received]}")
            raise Preempted("stopped on SIGUSR1")
        if self.ending == "fork-a-loader-worker":
            pid = os.fork()
            if pid == 0:  # a worker forked before the loop: the notice must not stop it
                code = 1
                try:
                    signal.raise_signal(signal.SIGUSR1)
                    code = 0
                finally:
                    os._exit(code)
            self.events.append(f"worker exit code {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
        return SimpleNamespace(step=2, checkpoint=Path(self.cfg.train.output_dir) / "checkpoints" / "step-2.pt")


@pytest.fixture
def signals_restored():
    """Handlers and the wakeup fd as they were, whatever a test (or submitit) bound."""
    numbers = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)
    saved = {n: signal.getsignal(n) for n in numbers}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for n, handler in saved.items():
        signal.signal(n, handler)
    signal.set_wakeup_fd(wakeup)


@pytest.fixture
def in_a_submitit_task(tmp_path, monkeypatch, signals_restored):
    """Run a job as task ``rank`` of a submitit job would: its pickle on disk and submitit's
    handlers bound by submitit's own JobEnvironment (as ``process_job`` does). The local job
    environment requeues like SLURM's, by exiting with code 144."""
    cfg = load_config(TINY, ["data.train=unused", f"train.output_dir={tmp_path / 'run'}"])
    folder = tmp_path / "job"
    folder.mkdir()

    def prepare(ending: str, rank: int = 0):
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
        monkeypatch.setenv("SUBMITIT_FOLDER", str(folder))
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
        monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(rank))
        job = _Scripted(cfg, tmp_path, ending)
        env = submitit.JobEnvironment()
        delayed = DelayedSubmission(job)
        delayed.set_timeout(60, 5)
        delayed.dump(env.paths.submitted_pickle)
        env._handle_signals(env.paths, delayed)
        return job, env.paths.submitted_pickle

    return prepare


def _pickle_state(pickle_path: Path) -> bytes:
    return pickle_path.read_bytes()


def test_a_run_stopped_by_slurms_notice_is_requeued_by_submitit(in_a_submitit_task, tmp_path):
    job, pickle_path = in_a_submitit_task("notice")
    submitted = _pickle_state(pickle_path)
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 144  # submitit's local requeue (scontrol requeue on SLURM)
    assert _pickle_state(pickle_path) != submitted  # submitit dumped what checkpoint() returned
    again = DelayedSubmission.load(pickle_path)
    assert type(again.function) is _Scripted and again.function is not job
    assert again.function.cfg == job.cfg and again.function.workdir == str(tmp_path)
    assert (again._timeout_min, again._timeout_countdown) == (60, 5)  # a preemption, not a time-out: no countdown


def test_a_run_stopped_by_sigterm_alone_is_saved_but_not_requeued(in_a_submitit_task):
    job, pickle_path = in_a_submitit_task("sigterm")
    submitted = _pickle_state(pickle_path)
    with pytest.raises(Preempted, match="SIGTERM"):
        job()
    assert _pickle_state(pickle_path) == submitted


def test_a_finished_run_returns_its_result_and_is_not_requeued(in_a_submitit_task, tmp_path):
    job, pickle_path = in_a_submitit_task("finish")
    submitted = _pickle_state(pickle_path)
    assert job() == {"step": 2, "checkpoint": str(tmp_path / "run" / "checkpoints" / "step-2.pt")}
    assert _pickle_state(pickle_path) == submitted


def test_ranks_other_than_0_leave_quietly_while_rank_0_requeues(in_a_submitit_task):
    job, pickle_path = in_a_submitit_task("notice", rank=1)
    submitted = _pickle_state(pickle_path)
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 0  # no result file, and no non-zero exit for srun to act on
    assert _pickle_state(pickle_path) == submitted  # submitit checkpoints and requeues from rank 0 only


def test_submitits_signal_during_training_goes_to_slips_stop_not_straight_to_a_requeue(in_a_submitit_task):
    job, _ = in_a_submitit_task("submitit-signal-in-loop")
    with pytest.raises(SystemExit) as exit_:
        job()
    # the trainer's stop saw it as SIGUSR1 and the run ended with a checkpoint before submitit requeued
    assert job.events == ["trainer's stop saw ['SIGUSR1']"]
    assert exit_.value.code == 144


def test_a_notice_before_the_training_loop_stops_the_run_for_a_requeue(in_a_submitit_task):
    job, _ = in_a_submitit_task("notice-before-loop")
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 144


def test_a_loader_worker_forked_before_the_loop_is_not_stopped_by_the_notice(in_a_submitit_task):
    job, _ = in_a_submitit_task("fork-a-loader-worker")
    assert job()["step"] == 2
    assert job.events == ["worker exit code 0"]


def test_a_second_notice_during_the_requeue_does_not_cut_it_short(tmp_path, signals_restored):
    requeues: list[str] = []

    def submitits_handler(signum, frame):  # stands in for submitit's: a late notice arrives while it requeues
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR2)
        requeues.append(signal.Signals(signum).name)
        raise SystemExit(144)

    signal.signal(signal.SIGUSR2, submitits_handler)
    cfg = load_config(TINY, ["data.train=unused", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        _Scripted(cfg, tmp_path, "notice")()
    assert exit_.value.code == 144 and requeues == ["SIGUSR2"]


def test_outside_a_submitit_task_a_stopped_run_raises_preempted(tmp_path, signals_restored, monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(TINY, ["data.train=unused", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(Preempted, match="SIGUSR1"):
        _Scripted(cfg, tmp_path, "notice")()


# --- end to end: submitit's LocalExecutor trains, is preempted, requeues and resumes ------------


class _PreemptedOnce(TrainJob):
    """The first run is stopped by SLURM's notice (as the trainer does); the requeued run trains."""

    def train(self):
        marker = Path(self.cfg.train.output_dir) / "preempted-once"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("")
            _stop_like_the_trainer(signal.SIGUSR1)
        return super().train()


@pytest.mark.slow
def test_a_submitted_job_is_requeued_by_submitit_and_then_trains_and_writes_its_checkpoint(corpus, tmp_path,
                                                                                         monkeypatch):
    import cloudpickle

    for name in [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_"))] + ["WORLD_SIZE", "RANK"]:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    cfg = load_config(TINY, [f"data.train={corpus}", f"train.output_dir={out}", "train.max_steps=2",
                             "data.workers=0"])
    executor = submitit.LocalExecutor(folder=tmp_path / "job")
    executor.update_parameters(timeout_min=5, tasks_per_node=1, gpus_per_node=0)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the job runs in another process, without tests/ importable
    try:
        job = executor.submit(_PreemptedOnce(cfg, tmp_path))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    result = job.result()
    assert result == {"step": 2, "checkpoint": str(out / "checkpoints" / "step-00000002.pt")}
    assert (out / "checkpoints" / "step-00000002.pt").is_file()
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2  # two runs of one job
