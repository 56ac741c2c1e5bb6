"""``slip submit CONFIG [key=value ...] --nodes N --gpus-per-node G --time T ...``: one SLURM job
of N nodes x G GPUs, one task per GPU, submitted with submitit, that requeues itself when its
time limit comes and resumes from the checkpoint it wrote (SLIP's ``run_with_submitit.py``).

Everything the job needs is checked here first (the config, its shards, the batch split over
the ranks, the time limit), so a mistake ends in one line before anything is queued. Each task
runs :class:`TrainJob`, which trains the loaded config; slip reads its rank, world size and
rendezvous from SLURM's variables itself (:mod:`slip.distributed`), so no torchrun is involved.

Signals and requeue -- how slip and submitit share them
-------------------------------------------------------
What submitit does (submitit 1.5, read from its source):

* ``slurm/slurm.py``, ``_make_sbatch_string``: the sbatch script gets ``#SBATCH
  --signal=USR2@<signal_delay_s>`` (``JobEnvironment.USR_SIG``, USR2 unless
  ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; its comment: "NCCL may catch USR1"), then
  ``additional_parameters`` are applied over the generated ones.
* ``core/submission.py``, ``process_job``: before calling the job, each task runs
  ``JobEnvironment._handle_signals`` (``core/job_environment.py``), which *ignores* SIGTERM and
  SIGCONT (``SignalHandler.bypass``, a log line) and binds USR2 to
  ``SignalHandler.checkpoint_and_try_requeue``. That handler runs at once, wherever the task
  is: on ranks other than 0 it only logs; on rank 0 it decides "timed out" or "preempted" from
  the wall time (``has_timed_out``), calls the callable's ``checkpoint()`` (through
  ``DelayedSubmission._checkpoint_function``), dumps the ``DelayedSubmission`` it returns over
  the job's pickle, requeues (``SlurmJobEnvironment._requeue``: ``scontrol requeue JOBID``;
  ``LocalJobEnvironment._requeue``: exit code 144, which makes the local controller restart the
  tasks) and exits. Time-outs are requeued at most ``max_num_timeout`` times (a countdown kept
  in the pickle); preemptions without limit.

Left alone, the two would fight: USR2 would make rank 0 requeue and exit mid-step, without the
collective checkpoint every rank must join, losing the steps since the last one while the
other ranks wait in a collective until SLURM kills them. slip's trainer instead stops at a step
boundary on SIGUSR1 or SIGTERM, every rank writes/joins a checkpoint, and it raises
:class:`slip.runtime.Preempted`. So:

1. SLURM's notice goes to slip: the script asks for ``--signal=USR1@GRACE``
   (``slurm_additional_parameters`` replaces submitit's ``signal`` line; SIGUSR1 to every
   process of the job step, not the batch shell), and ``--requeue`` so that ``scontrol
   requeue`` is allowed whatever the cluster's default. SIGUSR1 is slip's own stop signal, so
   the same trainer handles ``srun python -m slip.train`` with ``#SBATCH --signal=USR1@120``.
   (Loader workers ignore SIGUSR1: :mod:`slip.data.pipeline`.)
2. submitit's own signal cannot cut a step short: while the job runs, :class:`TrainJob` binds
   submitit's signal (USR2: ``scancel --signal=USR2``, ``Job._interrupt``) to slip's stop, as if
   it were SIGUSR1, and keeps submitit's handler aside. Outside the training loop (model and
   data set-up, before the trainer binds SIGUSR1, or after it unbinds it) nothing has been
   trained since the last checkpoint, so a notice there raises ``Preempted`` at once instead of
   killing the process (SIGUSR1's default action).
3. After the checkpoint, submitit requeues: when training ends in ``Preempted`` and the stop was
   SLURM's notice (SIGUSR1 or submitit's signal reached this process), :class:`TrainJob` calls
   the submitit handler it kept aside, so the requeue is submitit's own (its time-out
   countdown, its ``checkpoint()`` call, its logs). ``checkpoint()`` returns a
   ``DelayedSubmission`` of a fresh :class:`TrainJob` with the same config: the rerun resumes
   from the checkpoint in ``train.output_dir``, nothing else needs carrying. Rank 0 requeues
   and exits; the other ranks leave with exit code 0 and no result file (a non-zero exit
   could make srun kill rank 0 before it requeues, under ``--kill-on-bad-exit``).
4. A stop on SIGTERM alone is saved but not requeued: SIGTERM is what ``scancel`` sends, and
   ``scontrol requeue`` revives even a cancelled job. Preemption by a higher-priority job also
   sends SIGTERM; with ``PreemptMode=REQUEUE`` SLURM requeues the job itself, with
   ``PreemptParameters=send_user_signal`` the SIGUSR1 notice comes too (and is requeued here);
   otherwise rerun the same ``slip submit`` (it resumes). Which signals reached the process is
   read from a wakeup fd (:func:`signal.set_wakeup_fd`: the C-level handler writes each
   signal's number there, whichever Python handler then runs), so this works without knowing
   the trainer's handlers.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .errors import MissingExtra, UserError, command, one_line

logger = logging.getLogger(__name__)

DEFAULT_SIGNAL_GRACE_S = 120  # SLIP's slurm_signal_delay_s
DEFAULT_MAX_TIMEOUTS = 30  # SLIP's slurm_max_num_timeout: requeues after reaching the time limit
SLURM_SIGNAL_MAX_S = 65535  # sbatch --signal's largest sig_time
NOTICE = "USR1"  # the signal SLURM sends GRACE seconds before the time limit


# --- the job each task runs -----------------------------------------------------------------


def _signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name))


class _StopRouting:
    """While a submitit task trains: route SLURM's notice and submitit's signal to slip's stop,
    remember which signals reached this process, and keep submitit's handler for the requeue.
    Does nothing outside the main thread (signal handlers can only be set there)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.active = False
        self.pid = os.getpid()
        self.submitit_signal: int | None = None
        self.submitit_handler: Any = None
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._seen: set[int] = set()

    def __enter__(self) -> _StopRouting:
        if threading.current_thread() is not threading.main_thread():
            return self
        import submitit

        self.active = True
        self.submitit_signal = _signal_number(submitit.JobEnvironment.USR_SIG)
        self.submitit_handler = signal.getsignal(self.submitit_signal)
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        usr1 = signal.SIGUSR1
        self._previous[usr1] = signal.signal(usr1, self._outside_loop)
        if self.submitit_signal not in (usr1, signal.SIGTERM):
            self._previous[self.submitit_signal] = signal.signal(self.submitit_signal, self._to_slip)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._old_wakeup)
        for fd in self._pipe or ():
            os.close(fd)
        self._pipe = None
        self.active = False

    def _outside_loop(self, signum: int, frame: object) -> None:
        """SIGUSR1 while the trainer has not bound it (set-up, or just after the loop)."""
        if os.getpid() != self.pid:  # a forked loader worker: the trainer stops it
            return
        from .runtime import Preempted

        raise Preempted(f"stopped on {signal.Signals(signum).name} outside the training loop: no step was "
                        f"trained since the last checkpoint in {self.output_dir}; rerun to resume from it")

    def _to_slip(self, signum: int, frame: object) -> None:
        """submitit's signal: do what SIGUSR1 does now (the trainer's stop, or ``_outside_loop``)."""
        if os.getpid() != self.pid:
            return
        stop = signal.getsignal(signal.SIGUSR1)
        if callable(stop):
            stop(signal.SIGUSR1, frame)

    def signals_seen(self) -> set[int] | None:
        """The signals that reached this process so far; None when that cannot be known (the
        wakeup fd was replaced by someone else, or routing is inactive)."""
        if not self.active or self._pipe is None:
            return None
        read, write = self._pipe
        current = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if current != write:  # someone else took the wakeup fd meanwhile: signals may be missing
            signal.set_wakeup_fd(current)
            return None
        while True:
            try:
                data = os.read(read, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            self._seen.update(data)
        return set(self._seen)

    def requeue_wanted(self) -> bool:
        """Whether the stop was SLURM's notice (SIGUSR1) or submitit's signal, not SIGTERM alone."""
        if not self.active:
            return False  # no submitit handler was taken over: nothing to hand the job to
        seen = self.signals_seen()
        if seen is None:
            logger.warning("cannot tell which signal stopped the run; requeueing")
            return True
        if seen & {signal.SIGUSR1, self.submitit_signal}:
            return True
        logger.warning("stopped on SIGTERM (scancel or a preemption): the checkpoint is written; the job is not "
                       "requeued (SLURM requeues it under PreemptMode=REQUEUE; else rerun slip submit to resume)")
        return False

    def hand_over(self) -> None:
        """Let submitit requeue the job (its handler, kept aside): on rank 0 it calls
        :meth:`TrainJob.checkpoint`, requeues and exits; elsewhere it returns and this rank
        leaves with exit code 0 and no result file. Returns only when no submitit handler was
        there (not a submitit task)."""
        handler = self.submitit_handler
        if not callable(handler) or self.submitit_signal is None:
            return
        for number in {signal.SIGUSR1, self.submitit_signal}:  # a late notice must not cut the requeue short
            signal.signal(number, signal.SIG_IGN)
        logger.info("checkpoint written; submitit requeues the job")
        handler(self.submitit_signal, None)
        raise SystemExit(0)


class TrainJob:
    """The callable every task of the job runs (pickled by submitit): train ``cfg`` from
    ``workdir`` (where ``slip submit`` ran: relative paths in the config mean the same there);
    requeue through submitit when SLURM's notice stopped it (see the module doc)."""

    def __init__(self, cfg: Any, workdir: str | os.PathLike) -> None:
        self.cfg = cfg
        self.workdir = os.fspath(workdir)

    def __call__(self) -> dict:
        from .runtime import Preempted, configure_logging

        before = os.getcwd()
        os.chdir(self.workdir)
        try:
            configure_logging()
            with _StopRouting(str(self.cfg.train.output_dir)) as routing:
                try:
                    result = self.train()
                except Preempted:
                    if routing.requeue_wanted():
                        routing.hand_over()
                    raise
        finally:
            os.chdir(before)
        return {"step": int(result.step), "checkpoint": None if result.checkpoint is None else str(result.checkpoint)}

    def train(self):
        from .train.trainer import train

        return train(self.cfg)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: the same job again; the trainer resumes from ``train.output_dir``."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.cfg, self.workdir))


# --- the command ------------------------------------------------------------------------------


_TIME_FORMATS = (  # SLURM's --time formats -> (days, hours, minutes, seconds) group names
    re.compile(r"(?P<m>\d+)"),
    re.compile(r"(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"),
)


def parse_time(text: str) -> int:
    """A SLURM time limit (``MINUTES``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, seconds rounded up. Raises UserError naming ``--time``."""
    value = text.strip()
    for pattern in _TIME_FORMATS:
        found = pattern.fullmatch(value)
        if found is None:
            continue
        parts = {k: int(v) for k, v in found.groupdict().items() if v is not None}
        for key, bounded, limit, what in (("s", "s" in parts, 60, "seconds"), ("m", "h" in parts, 60, "minutes"),
                                          ("h", "d" in parts, 24, "hours")):
            if bounded and parts.get(key, 0) >= limit:
                raise UserError(f"--time {text!r}: {parts[key]} {what} is out of range (0-{limit - 1})")
        seconds = (((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0))
        if seconds <= 0:
            raise UserError(f"--time {text!r}: the time limit must be positive")
        return math.ceil(seconds / 60)
    raise UserError(f"--time {text!r}: not a SLURM time limit (MINUTES, HH:MM:SS or D-HH:MM:SS, e.g. 2-00:00:00)")


def format_minutes(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


_SIZE = re.compile(r"\d+(\.\d+)?[KMGT]?B?", re.IGNORECASE)


def _positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{option} {value}: must be at least 1")


def executor_parameters(args: argparse.Namespace, cfg: Any, minutes: int) -> dict[str, Any]:
    """What the job asks SLURM for, as submitit's AutoExecutor.update_parameters takes it."""
    slurm: dict[str, Any] = {
        "partition": args.partition, "account": args.account, "qos": args.qos, "constraint": args.constraint,
        "comment": args.comment, "exclude": args.exclude, "mem": args.mem, "mem_per_gpu": args.mem_per_gpu,
    }
    params: dict[str, Any] = {
        "name": args.job_name or f"slip-{Path(cfg.train.output_dir).name}",
        "nodes": args.nodes,
        "tasks_per_node": args.gpus_per_node,  # one task per GPU
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task or cfg.data.workers + 1,
        "timeout_min": minutes,
        "slurm_signal_delay_s": args.signal_grace,
        # over submitit's "--signal=USR2@delay": SLURM's notice goes to slip's stop (module doc)
        "slurm_additional_parameters": {"signal": f"{NOTICE}@{args.signal_grace}", "requeue": True},
    }
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return params


# generic AutoExecutor names -> sbatch options (submitit's SlurmExecutor maps them the same way)
_SBATCH_NAMES = {"name": "job-name", "nodes": "nodes", "tasks_per_node": "ntasks-per-node",
                 "gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task", "timeout_min": "time"}


def sbatch_lines(params: dict[str, Any]) -> list[str]:
    """The ``#SBATCH`` lines ``params`` amount to (besides submitit's own log-file options)."""
    flags: dict[str, Any] = {}
    for key, value in params.items():
        if key in _SBATCH_NAMES:
            flags[_SBATCH_NAMES[key]] = value
        elif key == "slurm_additional_parameters":
            flags.update(value)
        elif key.startswith("slurm_") and key != "slurm_signal_delay_s":
            flags[key[len("slurm_"):].replace("_", "-")] = value
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in sorted(flags.items())]


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise MissingExtra("slip submit", "submitit", "cluster") from None
    return submitit


def _check_config(cfg: Any, args: argparse.Namespace) -> None:
    t = cfg.train
    ranks = args.nodes * args.gpus_per_node
    if t.batch_size % (ranks * t.accum_steps):
        raise UserError(
            f"train.batch_size {t.batch_size} is not divisible by --nodes x --gpus-per-node x train.accum_steps = "
            f"{args.nodes} x {args.gpus_per_node} x {t.accum_steps} = {ranks * t.accum_steps} (every rank takes an "
            "equal share of each micro-batch); change train.batch_size, train.accum_steps or the GPUs")
    from .data.specs import parse_shard_spec

    parse_shard_spec(cfg.data.train)  # shards that are not there fail now, not after the queue


@command("submit")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slip submit", description="Submit a training run to SLURM with submitit: one job of N nodes x G "
        "GPUs, one task per GPU. SLURM sends SIGUSR1 --signal-grace seconds before the time limit; the run "
        "writes a checkpoint and the job requeues itself and resumes from it. Needs 'slip[cluster]'.")
    parser.add_argument("config", help="a YAML recipe, e.g. configs/yfcc15m/slip_vit_b16.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.output_dir=runs/b16")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; one task per GPU")
    parser.add_argument("--time", required=True, help="time limit of each run of the job: MINUTES, HH:MM:SS or "
                        "D-HH:MM:SS; the job requeues itself when it is reached")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per task (default: data.workers + 1)")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 64G")
    memory.add_argument("--mem", help="memory per node, e.g. 500G")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--constraint", help="node features, e.g. volta32gb")
    parser.add_argument("--comment", help="a comment for the scheduler")
    parser.add_argument("--exclude", help="nodes not to use, e.g. node[01-03]")
    parser.add_argument("--job-name", help="job name (default: slip-<train.output_dir's name>)")
    parser.add_argument("--signal-grace", type=int, default=DEFAULT_SIGNAL_GRACE_S, metavar="SECONDS",
                        help="send SIGUSR1 this long before the time limit: time to finish a step and write a "
                        f"checkpoint (default {DEFAULT_SIGNAL_GRACE_S})")
    parser.add_argument("--max-timeouts", type=int, default=DEFAULT_MAX_TIMEOUTS,
                        help=f"requeues after reaching the time limit (default {DEFAULT_MAX_TIMEOUTS}); "
                        "preemptions are requeued without limit")
    parser.add_argument("--job-dir", help="submitit's folder: job script, pickles, logs (default: "
                        "train.output_dir/submitit)")
    parser.add_argument("--dry-run", action="store_true", help="print the job's sbatch options and exit")
    args = parser.parse_intermixed_args(argv)

    submitit = _import_submitit()
    _positive("--nodes", args.nodes)
    _positive("--gpus-per-node", args.gpus_per_node)
    _positive("--cpus-per-task", args.cpus_per_task)
    for option, value in (("--mem", args.mem), ("--mem-per-gpu", args.mem_per_gpu)):
        if value is not None and not _SIZE.fullmatch(value):
            raise UserError(f"{option} {value!r}: not a memory size (e.g. 64G, 500000M)")
    if args.max_timeouts < 0:
        raise UserError(f"--max-timeouts {args.max_timeouts}: must be 0 or more")
    minutes = parse_time(args.time)
    if not 0 < args.signal_grace < min(minutes * 60, SLURM_SIGNAL_MAX_S + 1):
        raise UserError(f"--signal-grace {args.signal_grace}: must be positive and shorter than the time limit "
                        f"({minutes * 60} s from --time {args.time}) and at most {SLURM_SIGNAL_MAX_S} s")
    if submitit.JobEnvironment.USR_SIG in ("USR1", "TERM"):
        raise UserError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG}: slip stops on SIGUSR1 and "
                        "SIGTERM itself; unset it (submitit's default, USR2, is routed to slip's stop)")

    from .train.config import load_config

    cfg = load_config(args.config, args.overrides)
    _check_config(cfg, args)
    job_dir = Path(args.job_dir or Path(cfg.train.output_dir) / "submitit").absolute()
    params = executor_parameters(args, cfg, minutes)
    ranks = args.nodes * args.gpus_per_node
    summary = (f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {ranks} rank(s), time limit "
               f"{format_minutes(minutes)} per run, SIGUSR1 {args.signal_grace} s before it")
    if args.dry_run:
        print(f"slip submit --dry-run: nothing submitted. {summary}")
        print(f"job dir: {job_dir}")
        print("\n".join(sbatch_lines(params)))
        return 0

    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"no SLURM here: {' and '.join(missing)} not found on PATH; run slip submit on the "
                        "cluster's login node (--dry-run shows the job without submitting it)")
    from submitit.core.utils import FailedJobError

    executor = submitit.AutoExecutor(folder=job_dir, cluster="slurm", slurm_max_num_timeout=args.max_timeouts)
    executor.update_parameters(**params)
    try:
        job = executor.submit(TrainJob(cfg, Path.cwd()))
    except FailedJobError as e:
        raise UserError(f"sbatch refused the job: {one_line(e)}") from None
    print(f"submitted job {job.job_id}: {summary}")
    print(f"job dir: {job_dir}")
    print(f"logs:    tail -f {job.paths.stdout}  (rank 0; {job.job_id}_<rank>_log.err: errors)")
    print(f"stop:    scancel {job.job_id} (SIGTERM: the run writes a checkpoint if SLURM's KillWait allows, and is "
          "not requeued)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
