"""What the JobManager asks of an executor, and what an executor reports back (no protobuf, no gRPC).

The JobManager owns a job's state, its events, publishing and the registry; an executor only runs the
training part of one attempt of a job and says how it ended (:class:`Outcome`):

- ``run(launch, control)`` blocks on the manager's job thread until the attempt ends. It forwards the worker's
  progress through ``control.progress``, stops the worker when ``control.stop_requested()`` (a CancelJob or a
  shutdown that stops workers), records what identifies its worker (``control.record_worker``: job.json keeps
  it, so a restarted trainer can re-attach) and returns a :class:`RunResult`.
- ``check(resources)`` refuses what this executor cannot run (InvalidInput naming ``resources.<field>``),
  at CreateJob, after the generic limits of :func:`services.trainer.job_spec.check_resources`.

Publishing stays in the trainer process for every executor: a PUBLISH result names ``<job>/adapter``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sam_core.training.config import ProgressEvent

from ..job_spec import JobRequest, Resources

GENERIC_ERROR = "internal error while running the job (logged on the server)"


class Outcome(str, enum.Enum):
    PUBLISH = "publish"  # trained and evaluated: the manager publishes <job>/adapter
    REJECTED = "rejected"  # the publishing guard refused the candidate (worker exit 3)
    FAILED = "failed"  # a bad request or data the worker refused (exit 2): retrying cannot help
    STOPPED = "stopped"  # the worker stopped on request and checkpointed (cancel, shutdown or an outside SIGTERM)
    CRASHED = "crashed"  # the worker died or failed unexpectedly: resumable from its checkpoints
    DETACHED = "detached"  # the trainer is shutting down and left the worker running (re-attached at next start)


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    summary: dict[str, Any] = field(default_factory=dict)  # FinetuneResult.summary() for PUBLISH / REJECTED
    error: str = ""  # what went wrong (FAILED: the worker's message; CRASHED: the exit or signal)


@dataclass(frozen=True)
class JobLaunch:
    """One attempt of a job: its folder (the worker's ``--out``), its request and data set, the worker a
    previous trainer process started (``attach``: pid, start_ticks, events_offset; empty = start one) and the
    champion's adapter folder the publishing guard judges the run against (``baseline``; None: the base model;
    the worker must be able to read it)."""

    job_id: str
    tenant: str
    out_dir: Path
    data: Path
    request: JobRequest
    attach: dict[str, int] = field(default_factory=dict)
    baseline: Path | None = None


class JobControl(Protocol):
    """The manager's side of a running attempt."""

    def progress(self, event: ProgressEvent) -> None: ...

    def stop_requested(self) -> bool: ...

    def detach_requested(self) -> bool: ...

    def record_worker(self, worker: dict[str, int]) -> None: ...

    def wait(self, seconds: float) -> None: ...


class Executor(Protocol):
    def check(self, resources: Resources) -> None: ...

    def run(self, launch: JobLaunch, control: JobControl) -> RunResult: ...
