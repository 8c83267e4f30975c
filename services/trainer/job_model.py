"""Jobs as plain data, and their job.json files.

``<jobs_dir>/<tenant>/<job_id>/job.json`` holds everything needed to list a job after a restart and to
rebuild its FinetuneSpec (the request), its state, latest progress, metrics and a tail of its events. It is
replaced atomically (:func:`sam_core.files.atomic_write_text`: temp file, fsync, ``os.replace``, fsync of the
folder), so a crash leaves the old or the new file, never half.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sam_core.adapters.store import tenant_dir
from sam_core.files import atomic_write_text
from sam_core.training.guard import DEFAULT_MIN_IMPROVEMENT

from .job_spec import Hyperparameters, JobRequest, Resources

log = logging.getLogger("samforge.trainer")

JOB_FILE = "job.json"
JOB_FORMAT_VERSION = 1
EVENT_TAIL = 20
JOB_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)


class JobState(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"  # the publish guard kept the candidate out of the registry

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED)


@dataclass
class Job:
    """One job's state (mutated only by the JobManager under the job's lock; watchers get copies)."""

    id: str
    tenant: str
    request: JobRequest
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    adapter_version: int = 0
    step: int = 0
    total_steps: int = 0
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    publishing: bool = False  # set just before publishing: a restart then reuses an identical published version
    resumes: int = 0  # times the job was picked up again after a restart / shutdown
    baseline: str | None = None  # the champion it must beat, fixed at its first start: "name:N", "" = base model
    events: list[dict[str, Any]] = field(default_factory=list)  # tail of recent events (for job.json)
    worker: dict[str, int] = field(default_factory=dict)  # the running worker: pid, start_ticks, events_offset

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def dataset(self) -> str:
        return self.request.dataset

    @property
    def adapter_name(self) -> str:
        return self.request.adapter_name

    def snapshot(self) -> Job:
        """A copy for readers (without the event tail)."""
        return dataclasses.replace(self, metrics=dict(self.metrics), events=[], worker=dict(self.worker))

    def to_json(self) -> dict[str, Any]:
        req = self.request
        return {
            "format_version": JOB_FORMAT_VERSION, "id": self.id, "tenant": self.tenant, "state": self.state.value,
            "created_at": self.created_at, "updated_at": time.time(),
            "request": {"dataset": req.dataset, "method": req.method, "adapter_name": req.adapter_name,
                        "promote_to": req.promote_to, "hyperparameters": req.hyperparameters.to_json(),
                        "resources": req.resources.to_json(),
                        "allow_regression": req.allow_regression, "min_improvement": req.min_improvement},
            "adapter_version": self.adapter_version, "step": self.step, "total_steps": self.total_steps,
            "error": self.error, "metrics": self.metrics, "publishing": self.publishing, "resumes": self.resumes,
            "baseline": self.baseline,
            "events": self.events[-EVENT_TAIL:], "worker": self.worker,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Job:
        req = data["request"]
        request = JobRequest(tenant=data["tenant"], dataset=req["dataset"], method=req["method"],
                             adapter_name=req["adapter_name"], promote_to=req.get("promote_to", ""),
                             hyperparameters=Hyperparameters.from_json(req.get("hyperparameters", {})),
                             resources=Resources.from_json(req.get("resources", {})),
                             allow_regression=bool(req.get("allow_regression", False)),
                             min_improvement=float(req.get("min_improvement", DEFAULT_MIN_IMPROVEMENT)))
        return Job(id=data["id"], tenant=data["tenant"], request=request, state=JobState(data["state"]),
                   created_at=float(data["created_at"]), adapter_version=int(data.get("adapter_version", 0)),
                   step=int(data.get("step", 0)), total_steps=int(data.get("total_steps", 0)),
                   error=str(data.get("error", "")), metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
                   publishing=bool(data.get("publishing", False)), resumes=int(data.get("resumes", 0)),
                   baseline=data.get("baseline"),
                   events=list(data.get("events", []))[-EVENT_TAIL:],
                   worker={str(k): int(v) for k, v in data.get("worker", {}).items()})


@dataclass(frozen=True)
class JobEvent:
    """One progress event (``job`` is a snapshot taken when it happened; ``seq`` orders a job's events)."""

    job: Job
    phase: str  # queued | embedding | training | validating | evaluating | publishing | done
    seq: int = 0
    loss: float | None = None
    val_dice: float | None = None
    best_val_dice: float | None = None
    eta_seconds: float | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """The compact form kept in job.json's event tail."""
        data = {"phase": self.phase, "state": self.job.state.value, "step": self.job.step, "time": time.time(),
                "loss": self.loss, "val_dice": self.val_dice, "message": self.message}
        return {k: v for k, v in data.items() if v is not None}


def numeric_metrics(values: Mapping[str, object]) -> dict[str, float]:
    """Only int / float values (no bools, None or strings) as floats."""
    return {str(k): float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_metrics(summary: Mapping[str, object], adapter_metrics: Mapping[str, object]) -> dict[str, float]:
    """A finished job's metrics from ``FinetuneResult.summary()`` (what a worker's result.json holds) and the
    published adapter's own metrics: zero_shot_* / finetuned_* validation summaries (Dice over all and over
    resolvable instances), adapter_*, and the publishing guard's held-out scores (guard_candidate,
    guard_baseline); a nan aggregate (no resolvable instance) is left out."""
    out = {f"adapter_{k}": v for k, v in numeric_metrics(adapter_metrics).items()}
    out.update(numeric_metrics({"seconds": summary.get("seconds"), "n_parameters": summary.get("n_parameters")}))
    verdict = summary.get("guard")
    if isinstance(verdict, dict):
        out.update(numeric_metrics({"guard_candidate": verdict.get("candidate"),
                                    "guard_baseline": verdict.get("baseline")}))
    reports = summary.get("val")
    for prefix, report in zip(("zero_shot", "finetuned"), reports.values() if isinstance(reports, dict) else (),
                              strict=False):
        values = numeric_metrics(report) if isinstance(report, dict) else {}
        keys = ("dice_mean", "dice_resolvable_mean", "iou_mean", "nsd_mean", "n_instances", "n_resolvable")
        out.update({f"{prefix}_{k}": values[k] for k in keys if k in values and math.isfinite(values[k])})
    return out


def job_dir(jobs_dir: Path, tenant: str, job_id: str) -> Path:
    """``<jobs_dir>/<tenant>/<job_id>`` (the tenant validated; job ids are generated hex)."""
    return tenant_dir(jobs_dir, tenant) / job_id


def write_job(folder: Path, job: Job) -> None:
    """Atomically replace ``folder/job.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / JOB_FILE, json.dumps(job.to_json(), indent=1, sort_keys=True) + "\n")


def load_jobs(jobs_dir: Path) -> list[Job]:
    """Every readable ``<tenant>/<job_id>/job.json`` under ``jobs_dir`` (unreadable ones are logged, skipped)."""
    jobs = []
    for path in sorted(jobs_dir.glob(f"*/*/{JOB_FILE}")):
        try:
            job = Job.from_json(json.loads(path.read_text()))
            if job.id != path.parent.name or job.tenant != path.parent.parent.name or not JOB_ID_RE.fullmatch(job.id):
                raise ValueError("id / tenant do not match the folder")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("skipping unreadable job file %s: %s", path, exc)
            continue
        jobs.append(job)
    return sorted(jobs, key=lambda j: j.created_at)
