"""JobManager: queue, run, watch, cancel and recover fine-tuning jobs (no protobuf types here).

- ``create`` validates the request (tenant, method, names, data set path, hyper-parameters, resources), writes
  job.json and queues the job; ``settings.max_concurrent_jobs`` job threads each hand one attempt at a time to
  the executor (:mod:`.executors`, ``SAMFORGE_TRAINER_EXECUTOR``: a worker process by default) with the job
  folder as its output folder.
- The executor's progress lands in an in-memory event log guarded by a Condition: ``watch`` first yields the
  latest event (the job's current state), then live events until a terminal state.
- ``cancel`` asks the executor to stop the attempt (the worker checkpoints at its next progress event).
- Each run is judged against its champion (:func:`.registry.champion`: ``adapter_name@promote_to``, else the
  name's latest version, else the base model; fixed at the job's first start and kept in job.json) on the name's
  signed held-out split (:mod:`sam_core.training.guard`); the worker gets the champion's folder as
  ``--baseline``. A rejected run (worker exit 3) ends REJECTED with ``guard_candidate`` / ``guard_baseline`` in
  its metrics, publishes nothing and moves no alias.
- How an attempt ended (:class:`~.executors.Outcome`): PUBLISH publishes ``<job>/adapter`` into the registry as
  ``(tenant, adapter_name)`` in this process (and moves ``promote_to`` to it); FAILED fails the job with the
  worker's message (server paths removed); REJECTED goes to :meth:`JobManager.on_rejected`; STOPPED is CANCELLED
  after a cancel, QUEUED on shutdown, else resumed; CRASHED (a killed worker) is resumed from its checkpoints up
  to ``SAMFORGE_MAX_RESUMES`` times, then FAILED; DETACHED leaves the job RUNNING for the next start.
- Start-up re-attaches to the live worker job.json names (pid + start time) and re-queues the other QUEUED or
  RUNNING jobs: ``sam_core.training.loop`` resumes from the checkpoints in the job folder. ``shutdown`` detaches
  from workers or stops them (``SAMFORGE_DETACH_WORKERS``). One process owns a jobs folder (``flock``).
- /metrics gets aggregates only (:mod:`.job_metrics`; job-labelled gauges are an operator's opt-in).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sam_core.adapters.artifact import read_adapter_config
from sam_core.adapters.store import AdapterStore, AdapterVersion, content_sha256
from sam_core.errors import NotFound, SamforgeError, Unavailable
from sam_core.modeling.registry import LoadedModel
from sam_core.training.config import Phase, ProgressEvent
from services.common.interceptors import resolve_tenant
from services.common.settings import TrainerSettings

from .executors import JobLaunch, Outcome, RunResult, make_executor
from .executors.base import GENERIC_ERROR
from .executors.process import start_ticks
from .job_metrics import JobMetrics
from .job_model import Job, JobEvent, JobState, job_dir, load_jobs, summary_metrics, write_job
from .job_spec import (
    JobRequest,
    ResourceLimits,
    build_spec,
    check_request,
    check_resources,
    resolve_dataset,
    tenant_root,
)
from .registry import champion, copy_version

log = logging.getLogger("samforge.trainer")

BASELINE_DIR = "baseline"  # the champion's artifact, copied into the job folder at its first start
EVENT_LOG = 2000  # in-memory events per job (a watcher that falls further behind skips ahead)
KEEP_AFTER_END = 50  # events kept in memory once a job has ended
PERSIST_EVERY = 2.0  # seconds between job.json writes for plain progress events (state changes: always)
_REPORTED_PHASE = {Phase.DONE: Phase.EVALUATING, Phase.STOPPED_EARLY: Phase.EVALUATING}  # then it publishes


@dataclass
class _TrackedJob:
    """A job the manager holds in memory: its record, the event log WatchJob replays, and the lock both share."""

    job: Job
    cond: threading.Condition = field(default_factory=threading.Condition)
    events: deque[JobEvent] = field(default_factory=lambda: deque(maxlen=EVENT_LOG))
    seq: int = 0
    cancel: bool = False
    last_write: float = 0.0
    last_phase: str = ""
    attach: dict[str, int] = field(default_factory=dict)  # a live worker to re-attach to (set at start-up)


class JobManager:
    """Fine-tuning jobs of every tenant, persisted under ``settings.jobs_dir`` (see the module docstring)."""

    def __init__(self, settings: TrainerSettings, model: LoadedModel, store: AdapterStore) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.jobs_dir = Path(settings.jobs_dir).resolve()
        self.data_dir = Path(settings.data_dir).resolve()
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_folder(self.jobs_dir)
        self._lock = threading.Lock()
        self._jobs: dict[str, _TrackedJob] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._closing = threading.Event()
        self.metrics = JobMetrics(settings.metrics_job_labels)
        self.executor = make_executor(settings, model)
        self.limits = ResourceLimits(settings.max_nodes, settings.max_processes_per_node,
                                     settings.max_gpus_per_process)
        self._recover()
        self._workers = [threading.Thread(target=self._work, name=f"trainer-job-{i}", daemon=True)
                         for i in range(settings.max_concurrent_jobs)]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------------ API
    def create(self, request: JobRequest) -> Job:
        """Validate and queue a job; InvalidInput / NotFound name the offending field."""
        tenant = resolve_tenant(request.tenant)
        request = replace(request, tenant=tenant)
        check_request(request)
        check_resources(request.resources, self.limits, request.hyperparameters)
        self.executor.check(request.resources)
        data = resolve_dataset(self.data_dir, tenant, request.dataset)
        job_id = uuid.uuid4().hex
        build_spec(request, data, job_dir(self.jobs_dir, tenant, job_id))  # what the worker builds, checked now
        if self._closing.is_set():
            raise Unavailable("the trainer is shutting down; retry on the next instance")
        live = _TrackedJob(Job(id=job_id, tenant=tenant, request=request))
        with self._lock:
            self._jobs[live.job.id] = live
        self._emit(live, "queued", message="queued", state=JobState.QUEUED)
        created = live.job.snapshot()  # as queued: a worker may pick it up the moment it is on the queue
        self._queue.put(created.id)
        log.info("job %s queued (tenant %s, method %s, adapter %s)", created.id, tenant, request.method,
                 request.adapter_name)
        return created

    def get(self, tenant: str, job_id: str) -> Job:
        live = self._find(resolve_tenant(tenant), job_id)
        with live.cond:
            return live.job.snapshot()

    def list(self, tenant: str) -> list[Job]:
        tenant = resolve_tenant(tenant)
        with self._lock:
            mine = [live for live in self._jobs.values() if live.job.tenant == tenant]
        jobs = []
        for live in mine:
            with live.cond:
                jobs.append(live.job.snapshot())
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def watch(self, tenant: str, job_id: str, *, active: Callable[[], bool] = lambda: True,
              poll: float = 0.5) -> Iterator[JobEvent]:
        """The latest event first, then live events until a terminal state (or ``active()`` turns False,
        or the manager shuts down)."""
        live = self._find(resolve_tenant(tenant), job_id)
        with live.cond:
            first = live.events[-1] if live.events else _state_event(live.job)
        last = first.seq
        yield first
        if first.job.state.terminal:
            return
        while True:
            with live.cond:
                while live.seq == last and not self._closing.is_set() and active():
                    live.cond.wait(poll)
                pending = [e for e in live.events if e.seq > last]
            if not pending:
                return
            for event in pending:
                yield event
                last = event.seq
                if event.job.state.terminal:
                    return

    def cancel(self, tenant: str, job_id: str, *, wait: float | None = None) -> Job:
        """Cancel a queued job at once, a running one at its next event (waits up to ``wait`` s for that,
        default SAMFORGE_GRACE_SECONDS: its worker checkpoints and exits first).

        Cancelling a finished job (or one already publishing its adapter) changes nothing.
        """
        live = self._find(resolve_tenant(tenant), job_id)
        with live.cond:
            job = live.job
            if job.state is JobState.QUEUED:
                self._finish(live, JobState.CANCELLED, message="cancelled before it started")
            elif job.state is JobState.RUNNING and not job.publishing:
                live.cancel = True
                log.info("job %s: cancel requested", job.id)
                timeout = self.settings.grace_seconds if wait is None else wait
                live.cond.wait_for(lambda: live.job.state.terminal, timeout=timeout)
            return live.job.snapshot()

    def wait(self, tenant: str, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is in a terminal state (or ``timeout``); returns its latest state."""
        live = self._find(resolve_tenant(tenant), job_id)
        with live.cond:
            live.cond.wait_for(lambda: live.job.state.terminal, timeout=timeout)
            return live.job.snapshot()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers: running jobs stop at their next event and stay QUEUED on disk (resumed at next start)."""
        self._closing.set()
        with self._lock:
            lives = list(self._jobs.values())
        for live in lives:
            with live.cond:
                live.cond.notify_all()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            log.warning("jobs still running after %.1fs; they resume from their checkpoints at the next start", timeout)
        elif self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: another manager may own the folder now
            self._lock_fd = None

    # ------------------------------------------------------------------ internals
    def _find(self, tenant: str, job_id: str) -> _TrackedJob:
        with self._lock:
            live = self._jobs.get(job_id)
        if live is None or live.job.tenant != tenant:  # another tenant's job looks exactly like a missing one
            raise NotFound(f"job {job_id[:64]!r} not found", field="id")
        return live

    def _recover(self) -> None:
        """Re-attach to live workers first (they hold job slots), then re-queue the other unfinished jobs."""
        pending: list[_TrackedJob] = []
        for job in load_jobs(self.jobs_dir):
            live = _TrackedJob(job)
            self._jobs[job.id] = live
            if job.state.terminal:
                continue
            worker = job.worker
            alive = bool(worker) and start_ticks(worker.get("pid", 0)) == worker.get("start_ticks")
            if job.state is JobState.RUNNING and alive:
                live.attach = dict(worker)
                self._emit(live, "training", message="re-attached to its running worker after a restart")
                self._queue.put(job.id)
                log.info("job %s: re-attaching to worker %d", job.id, worker["pid"])
                continue
            pending.append(live)
        for live in pending:
            live.job.resumes += 1
            live.job.worker = {}
            self._emit(live, "queued", message="resuming after a restart", state=JobState.QUEUED)
            self._queue.put(live.job.id)
            log.info("job %s re-queued after a restart", live.job.id)
        self._update_state_gauge()

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._closing.is_set():
                return
            with self._lock:
                live = self._jobs.get(job_id)
            try:
                if live is not None:
                    self._run(live)
            except Exception:  # e.g. job.json not writable: keep the worker alive for the other jobs
                log.exception("job %s: the worker failed", job_id)

    def _run(self, live: _TrackedJob) -> None:
        with live.cond:
            attach, live.attach = live.attach, {}
            if attach:
                if live.job.state is not JobState.RUNNING:
                    return
            elif live.job.state is not JobState.QUEUED or self._closing.is_set():
                return  # cancelled while queued
            else:
                live.cancel = False
                self._emit(live, "evaluating", message="loading the data set; zero-shot evaluation",
                           state=JobState.RUNNING)
        job = live.job
        try:
            data = resolve_dataset(self.data_dir, job.tenant, job.dataset)
            launch = JobLaunch(job.id, job.tenant, job_dir(self.jobs_dir, job.tenant, job.id), data, job.request,
                               attach, baseline=self._baseline(live))
            self._conclude(live, self.executor.run(launch, _Control(self, live)))
        except SamforgeError as exc:
            log.info("job %s failed: %s", job.id, exc)
            self._finish(live, JobState.FAILED, error=self._redact(str(exc), job))
        except Exception:
            log.exception("job %s failed", job.id)
            self._finish(live, JobState.FAILED, error=GENERIC_ERROR)

    def _baseline(self, live: _TrackedJob) -> Path | None:
        """The champion's folder (None: the base model), copied into ``<job>/baseline`` (on the jobs volume, which
        a kubernetes training pod mounts). Chosen at the first start and kept in job.json: a resumed job is judged
        against the same version, even one it published itself before a crash or one deleted since."""
        job = live.job
        if job.baseline is None:
            best = champion(self.store, job.tenant, job.adapter_name, job.request.promote_to)
            with live.cond:
                job.baseline = "" if best is None else best.ref
                self._write(live)
        if not job.baseline:
            return None
        folder = job_dir(self.jobs_dir, job.tenant, job.id) / BASELINE_DIR
        return copy_version(self.store, job.tenant, job.baseline, folder)

    def _conclude(self, live: _TrackedJob, result: RunResult) -> None:
        """The job's next state after an attempt ended as ``result`` says (see the module docstring)."""
        outcome = result.outcome
        if outcome is Outcome.DETACHED:
            with live.cond:
                self._write(live)  # the worker record and events offset, for the next start
        elif live.cancel and outcome in (Outcome.STOPPED, Outcome.PUBLISH, Outcome.REJECTED):
            self._finish(live, JobState.CANCELLED, message="cancelled")  # a cancel after the last event still wins
        elif outcome is Outcome.PUBLISH:
            self._publish(live, result.summary)
        elif outcome is Outcome.REJECTED:
            self.on_rejected(live, result.summary)
        elif outcome is Outcome.FAILED:
            log.info("job %s failed: %s", live.job.id, result.error)
            self._finish(live, JobState.FAILED, error=self._redact(result.error or GENERIC_ERROR, live.job))
        elif outcome is Outcome.STOPPED and self._closing.is_set():
            with live.cond:
                live.job.worker = {}
                self._emit(live, "queued", message="interrupted by shutdown; resumes at the next start",
                           state=JobState.QUEUED)
        else:  # CRASHED, or STOPPED by someone else's SIGTERM
            self._resume(live, result.error if outcome is Outcome.CRASHED else "the worker was stopped by SIGTERM")

    def _resume(self, live: _TrackedJob, why: str) -> None:
        """Queue the job again (its checkpoints resume it), unless it has been resumed too often."""
        job, limit = live.job, self.settings.max_resumes
        why = self._redact(why, job)
        with live.cond:
            job.worker = {}
            if job.resumes >= limit:
                log.warning("job %s: %s; not resumed again", job.id, why)
                self._finish(live, JobState.FAILED,
                             error=f"{why}; gave up after {job.resumes} resumes (SAMFORGE_MAX_RESUMES={limit})")
                return
            job.resumes += 1
            log.warning("job %s: %s; resuming (%d/%d)", job.id, why, job.resumes, limit)
            self._emit(live, "queued", message=f"{why}; resuming from its last checkpoint ({job.resumes}/{limit})",
                       state=JobState.QUEUED)
        self._queue.put(job.id)

    def on_rejected(self, live: _TrackedJob, summary: Mapping[str, object]) -> None:
        """The publishing guard refused the candidate (worker exit 3; its verdict in ``summary["guard"]``): the job
        ends REJECTED with the run's metrics (``guard_candidate`` / ``guard_baseline`` among them); nothing is
        published and no alias moves."""
        job = live.job
        rejected = job_dir(self.jobs_dir, job.tenant, job.id) / "rejected"
        adapter_metrics = read_adapter_config(rejected).metrics if rejected.is_dir() else {}
        verdict = summary.get("guard")
        reason = verdict.get("reason") if isinstance(verdict, dict) else None
        with live.cond:
            job.metrics.update(summary_metrics(summary, adapter_metrics))
        self._finish(live, JobState.REJECTED, message=str(reason or "rejected by the publishing guard"))

    def _on_progress(self, live: _TrackedJob, event: ProgressEvent) -> None:
        phase = _REPORTED_PHASE.get(event.state, event.state).value
        message = event.message
        if event.state.final:
            message = "stopped early; evaluating" if event.state is Phase.STOPPED_EARLY else "training finished"
        with live.cond:
            job = live.job
            advanced = max(0, event.step - job.step)
            if event.state is Phase.TRAINING or event.state.final:
                job.step = event.step
            job.total_steps = event.total_steps or job.total_steps
            for key, value in (("loss", event.loss), ("val_dice", event.val_dice),
                               ("best_val_dice", event.best_val_dice)):
                if value is not None:
                    job.metrics[key] = float(value)
            self._emit(live, phase, loss=event.loss, val_dice=event.val_dice, best_val_dice=event.best_val_dice,
                       eta_seconds=event.eta_seconds, message=message)
        if event.state is Phase.TRAINING:
            self.metrics.progress(job.id, advanced, event)

    def _publish(self, live: _TrackedJob, summary: Mapping[str, object]) -> None:
        job = live.job
        name, alias = job.adapter_name, job.request.promote_to
        adapter_dir = job_dir(self.jobs_dir, job.tenant, job.id) / "adapter"
        with live.cond:
            retry = job.publishing  # a previous run crashed while publishing
            job.publishing = True
            job.worker = {}
            job.metrics.update(summary_metrics(summary, read_adapter_config(adapter_dir).metrics))
            self._emit(live, "publishing", message=f"publishing {name}")
        version = self._published_copy(job, adapter_dir) if retry else None
        version = version or self.store.publish(job.tenant, name, adapter_dir)
        with live.cond:
            job.adapter_version = version.version
            self._write(live)
        message = f"published {version.ref}"
        if alias:
            self.store.promote(job.tenant, name, alias, version.version)
            message += f" as {name}@{alias}"
        with live.cond:
            job.publishing = False
        self._finish(live, JobState.SUCCEEDED, message=message)

    def _published_copy(self, job: Job, adapter_dir: Path) -> AdapterVersion | None:
        """The version an interrupted earlier publish of this very artifact created, if any."""
        digest = content_sha256(adapter_dir)
        return next((v for v in self.store.list(job.tenant, job.adapter_name) if v.sha256 == digest), None)

    def _finish(self, live: _TrackedJob, state: JobState, *, error: str = "", message: str = "") -> None:
        job = live.job
        if state in (JobState.SUCCEEDED, JobState.CANCELLED, JobState.REJECTED):  # only needed to resume
            out = job_dir(self.jobs_dir, job.tenant, job.id)
            for sub in ("checkpoints", "embeddings"):
                shutil.rmtree(out / sub, ignore_errors=True)
        with live.cond:
            job.error = error
            job.worker = {}
            self._emit(live, "done", message=message or error, state=state)
            live.events = deque(list(live.events)[-KEEP_AFTER_END:], maxlen=EVENT_LOG)  # bounded memory per job
        self.metrics.forget(job.id)
        log.info("job %s %s%s", job.id, state.value, f": {error}" if error else "")

    def _emit(self, live: _TrackedJob, phase: str, *, state: JobState | None = None, message: str = "",
              loss: float | None = None, val_dice: float | None = None, best_val_dice: float | None = None,
              eta_seconds: float | None = None) -> None:
        """Record an event (and a state change), persist job.json when due, wake the watchers."""
        with live.cond:
            if state is not None:
                live.job.state = state
            live.seq += 1
            event = JobEvent(job=live.job.snapshot(), phase=phase, seq=live.seq, loss=loss, val_dice=val_dice,
                             best_val_dice=best_val_dice, eta_seconds=eta_seconds, message=message)
            live.events.append(event)
            live.job.events = [*live.job.events[-19:], event.to_json()]
            due = time.monotonic() - live.last_write > PERSIST_EVERY
            if state is not None or phase != live.last_phase or due:
                self._write(live)
            live.last_phase = phase
            live.cond.notify_all()
        if state is not None:
            self._update_state_gauge()

    def _write(self, live: _TrackedJob) -> None:
        write_job(job_dir(self.jobs_dir, live.job.tenant, live.job.id), live.job)
        live.last_write = time.monotonic()

    def _update_state_gauge(self) -> None:
        with self._lock:
            states = [live.job.state for live in self._jobs.values()]
        self.metrics.states(states)

    def _redact(self, text: str, job: Job) -> str:
        """Server paths out of an error message: the data set relative to the tenant's folder."""
        out = str(job_dir(self.jobs_dir, job.tenant, job.id))
        root = str(tenant_root(self.data_dir, job.tenant))
        text = text.replace(out + os.sep, "").replace(out, "<job folder>")
        return text.replace(root + os.sep, "").replace(root, ".")


class _Control:
    """What an executor sees of its job (:class:`~.executors.JobControl`)."""

    def __init__(self, manager: JobManager, live: _TrackedJob) -> None:
        self.manager, self.live = manager, live

    def progress(self, event: ProgressEvent) -> None:
        self.manager._on_progress(self.live, event)

    def stop_requested(self) -> bool:
        return self.live.cancel or (self.manager._closing.is_set() and not self.manager.settings.detach_workers)

    def detach_requested(self) -> bool:
        return self.manager._closing.is_set() and self.manager.settings.detach_workers

    def record_worker(self, worker: dict[str, int]) -> None:
        live = self.live
        with live.cond:
            new = worker.get("pid") != live.job.worker.get("pid")
            live.job.worker = dict(worker)
            if new:  # a restart must find it: persist now (offsets ride along with the next progress write)
                self.manager._write(live)

    def wait(self, seconds: float) -> None:
        self.manager._closing.wait(seconds)


def _state_event(job: Job) -> JobEvent:
    """An event for a job that has none in memory (loaded from job.json): its last recorded phase."""
    tail = job.events[-1] if job.events else {}
    phase = tail.get("phase") or ("done" if job.state.terminal else "queued")
    return JobEvent(job=job.snapshot(), phase=phase, message=str(tail.get("message", job.error)))


def _lock_folder(folder: Path) -> int:
    """Hold ``folder/.lock`` exclusively for the process lifetime (one trainer per jobs folder)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Unavailable(f"another trainer owns {folder}; run one trainer per jobs folder",
                          field="SAMFORGE_JOBS_DIR") from None
    return fd
