"""The ``process`` executor (the default): every job attempt is its own worker process, ``samforge train``.

- The worker's argv is built from the job's FinetuneSpec (:func:`worker_argv`; ``samforge train`` parses it
  back into the same spec, the publishing guard's ``--baseline <champion folder>`` / ``--allow-regression`` /
  ``--min-improvement`` included) with the trainer's model, checkpoint and device, ``--out <job folder>`` and
  ``--events <job folder>/events.jsonl``. The champion folder is the trainer's adapter store's local copy
  (``path_of``), which the worker, on the same node, reads. A job asking for N processes per node runs
  ``python -m torch.distributed.run --standalone --nproc_per_node N --no-python samforge train ...`` (gloo on
  CPU, nccl on GPUs); rank 0 writes the events and result.json, every rank exits 0 on success. A job asking
  for GPUs gets its own devices (:func:`worker_environment`; each rank its share: :mod:`services.trainer.devices`).
- The worker starts in its own session (process group = its pid): a crash or the OOM killer ends the worker,
  never the trainer; a CancelJob (or a shutdown that stops workers) sends SIGTERM to the whole group and the
  worker checkpoints at its next progress event and exits 4 (:mod:`services.trainer.worker`).
- The trainer tails events.jsonl into the job's progress, and records ``pid``, ``start_ticks`` (the pid's
  start time in /proc, so a recycled pid is not mistaken for the worker) and ``events_offset`` in job.json.
  A restarted trainer re-attaches to a live worker: it tails from that offset and polls /proc (it is not the
  worker's parent, so it learns how the worker ended only from result.json).
- How the attempt ended comes from result.json (published / rejected / invalid_input / stopped / failed);
  no result.json means the worker was killed (a signal, the OOM killer): CRASHED, resumable.
- Trainer shutdown with ``SAMFORGE_DETACH_WORKERS=true`` leaves workers running (DETACHED; the next start
  re-attaches); with false it stops them like a cancel, and the jobs resume at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from sam_core.errors import InvalidInput
from sam_core.training.auto import AUTO_METHOD
from sam_core.training.finetune import FinetuneSpec
from services.common.settings import TrainerSettings

from .. import devices
from ..job_spec import Resources, build_spec
from ..worker import EVENTS_FILE, RESULT_FILE, WORKER_LOG, WorkerStatus, read_events, read_result
from .base import JobControl, JobLaunch, Outcome, RunResult

log = logging.getLogger("samforge.trainer")

POLL_SECONDS = 0.2  # how often the trainer tails events.jsonl and checks the worker
_OUTCOMES = {WorkerStatus.PUBLISHED: Outcome.PUBLISH, WorkerStatus.REJECTED: Outcome.REJECTED,
             WorkerStatus.INVALID_INPUT: Outcome.FAILED, WorkerStatus.STOPPED: Outcome.STOPPED,
             WorkerStatus.FAILED: Outcome.CRASHED}


def samforge_command() -> list[str]:
    """``samforge`` next to this interpreter (the installed console script), else ``python -m services.cli``."""
    script = shutil.which("samforge", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "services.cli"]


def spec_argv(spec: FinetuneSpec) -> list[str]:
    """``samforge train`` options that reproduce ``spec`` (``services.cli_finetune.spec_from_args`` inverts it)."""
    cfg, method = spec.train, spec.train.method
    argv = ["--data", spec.data, "--out", spec.out_dir, "--method", method.method, "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
            "--weight-decay", repr(cfg.weight_decay), "--rank", str(method.rank),
            "--adapter-ratio", repr(method.adapter_ratio), "--prompt", cfg.prompt.kind,
            "--eval-prompt", cfg.eval_prompt.kind, "--box-jitter", repr(cfg.prompt.box_jitter),
            "--val-fraction", repr(spec.split.val_fraction), "--seed", str(cfg.seed), "--patience", str(cfg.patience),
            "--eval-every", str(cfg.eval_every), "--checkpoint-every", str(cfg.checkpoint_every),
            "--crop", str(cfg.crop or 0), "--persam-steps", str(spec.persam_steps)]
    if cfg.max_steps is not None:
        argv += ["--max-steps", str(cfg.max_steps)]
    if spec.time_budget is not None:  # method "auto": train.method is a placeholder
        argv[argv.index("--method") + 1] = AUTO_METHOD
        argv += ["--time-budget", repr(spec.time_budget)]
    if cfg.bf16:
        argv.append("--bf16")
    if spec.adapter_name:
        argv += ["--name", spec.adapter_name]
    guard = spec.guard
    argv += ["--min-improvement", repr(guard.min_improvement), "--heldout-fraction", repr(guard.heldout_fraction)]
    if guard.baseline is not None:
        argv += ["--baseline", guard.baseline]
    if guard.allow_regression:
        argv.append("--allow-regression")
    return argv


def worker_argv(launch: JobLaunch, settings: TrainerSettings) -> list[str]:
    """The full worker command of ``launch`` (torchrun when the job asks for several processes; a GPU job's
    ranks each through :func:`services.trainer.devices.rank_launcher`, on ``cuda:0`` of their own devices)."""
    spec = build_spec(launch.request, launch.data, launch.out_dir, launch.baseline)
    gpus = launch.request.resources.gpus_per_process
    options = ["train", *spec_argv(spec), "--model", settings.model,
               "--device", devices.RANK_DEVICE if gpus else settings.device,
               "--events", str(launch.out_dir / EVENTS_FILE)]
    if settings.checkpoint:
        options += ["--checkpoint", settings.checkpoint]
    ranks = launch.request.resources.world_size
    if ranks == 1:  # worker_environment already narrowed CUDA_VISIBLE_DEVICES to its devices
        return [*samforge_command(), *options]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "--no-python", *devices.rank_launcher(gpus, sys.executable), *samforge_command(), *options]


def worker_environment(resources: Resources, environ: Mapping[str, str],
                       device_count: Callable[[], int]) -> dict[str, str]:
    """The worker's environment: a GPU job's CUDA_VISIBLE_DEVICES is its own devices, the first processes x
    gpus_per_process of the trainer's (``device_count``: how many torch sees, asked only for a GPU job)."""
    if not resources.gpus_per_process:
        return dict(environ)
    visible = devices.visible_devices(environ.get(devices.ENV), device_count())
    mine = devices.job_devices(resources.resolved().processes_per_node, resources.gpus_per_process, visible)
    return {**environ, devices.ENV: ",".join(mine)}


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); None when it is
    gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


class _Worker:
    """A worker process: our child (``proc``) or one a previous trainer started (polled through /proc)."""

    def __init__(self, pid: int, ticks: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid, self.ticks, self.proc = pid, ticks, proc

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return start_ticks(self.pid) == self.ticks

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # the worker leads its own process group (torchrun and its ranks)
        except ProcessLookupError:
            pass

    def how_it_ended(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        if code is None:
            return "the worker ended without writing its result (killed?)"
        if code < 0:
            return f"the worker was killed by {signal.Signals(-code).name}"
        return f"the worker exited with status {code} without writing its result"


class ProcessExecutor:
    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings

    def check(self, resources: Resources) -> None:
        if resources.nodes > 1:
            raise InvalidInput("the process executor runs a job on the trainer's node; more nodes need the "
                               "kubernetes executor", field="resources.nodes")
        if resources.gpus_per_process:
            count = _cuda_devices()  # CUDA_VISIBLE_DEVICES may name devices torch cannot open
            available = min(count, len(devices.visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), count)))
            wanted = resources.gpus_per_process * resources.resolved().processes_per_node
            if available < wanted:
                raise InvalidInput(f"asks for {wanted} GPU(s) ({resources.gpus_per_process} per process); this "
                                   f"node has {available}", field="resources.gpus_per_process")

    def run(self, launch: JobLaunch, control: JobControl) -> RunResult:
        worker, offset = self._attach(launch)
        if worker is None:
            worker, offset = self._start(launch, control), 0
        events_path = launch.out_dir / EVENTS_FILE
        signalled = False
        while True:
            running = worker.alive()  # before the last read: events written before it exited are all read
            events, new_offset = read_events(events_path, offset)
            for event in events:
                control.progress(event)
            if new_offset != offset:
                offset = new_offset
                control.record_worker({"pid": worker.pid, "start_ticks": worker.ticks, "events_offset": offset})
            if not running:
                return self._outcome(worker, launch.out_dir)
            if control.detach_requested():
                log.info("job %s: leaving worker %d running", launch.job_id, worker.pid)
                return RunResult(Outcome.DETACHED)
            if control.stop_requested() and not signalled:
                log.info("job %s: SIGTERM to worker %d", launch.job_id, worker.pid)
                worker.signal(signal.SIGTERM)
                signalled = True
            control.wait(POLL_SECONDS)

    def _attach(self, launch: JobLaunch) -> tuple[_Worker | None, int]:
        pid, ticks = launch.attach.get("pid", 0), launch.attach.get("start_ticks", -1)
        if pid <= 0 or start_ticks(pid) != ticks:
            return None, 0
        log.info("job %s: re-attached to worker %d", launch.job_id, pid)
        return _Worker(pid, ticks), launch.attach.get("events_offset", 0)

    def _start(self, launch: JobLaunch, control: JobControl) -> _Worker:
        out = launch.out_dir
        out.mkdir(parents=True, exist_ok=True)
        for stale in (RESULT_FILE, EVENTS_FILE):  # a previous attempt's
            (out / stale).unlink(missing_ok=True)
        argv = worker_argv(launch, self.settings)
        with open(out / WORKER_LOG, "ab") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=out, start_new_session=True,
                                    env=worker_environment(launch.request.resources, os.environ, _cuda_devices))
        ticks = start_ticks(proc.pid)
        worker = _Worker(proc.pid, -1 if ticks is None else ticks, proc)
        control.record_worker({"pid": worker.pid, "start_ticks": worker.ticks, "events_offset": 0})
        log.info("job %s: worker %d started (%d rank(s))", launch.job_id, proc.pid,
                 launch.request.resources.world_size)
        return worker

    def _outcome(self, worker: _Worker, out: Path) -> RunResult:
        result = read_result(out)
        if result is None:
            return RunResult(Outcome.CRASHED, error=worker.how_it_ended())
        outcome = _OUTCOMES[WorkerStatus(result["status"])]
        if outcome is Outcome.PUBLISH and not (out / "adapter").is_dir():
            return RunResult(Outcome.CRASHED, error="the worker reported success but left no adapter")
        return RunResult(outcome, summary=result, error=str(result.get("error") or ""))
