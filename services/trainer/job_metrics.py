"""What the trainer exports on /metrics. The port is not authenticated: whoever reaches it sees every sample.

By default only aggregates over every tenant's jobs: jobs by state and training steps run. The per-job gauges
(step, loss, validation Dice, labelled ``job=<id>``) are exported only when the operator sets
``SAMFORGE_METRICS_JOB_LABELS=true``: they expose every tenant's job ids and progress to whoever reads /metrics.
No series ever carries a tenant label.
"""

from __future__ import annotations

from collections.abc import Iterable

from sam_core.training.config import ProgressEvent
from services.common.metrics import TRAINING_JOBS, TRAINING_LOSS, TRAINING_STEP, TRAINING_STEPS, TRAINING_VAL_DICE

from .job_model import JobState

_PER_JOB = (TRAINING_STEP, TRAINING_LOSS, TRAINING_VAL_DICE)


class JobMetrics:
    """The trainer's series; ``per_job``: also the job-labelled gauges (see the module docstring)."""

    def __init__(self, per_job: bool) -> None:
        self.per_job = per_job

    def progress(self, job_id: str, advanced: int, event: ProgressEvent) -> None:
        """A training event of ``job_id`` that moved it ``advanced`` steps further."""
        TRAINING_STEPS.inc(advanced)
        if not self.per_job:
            return
        TRAINING_STEP.labels(job=job_id).set(event.step)
        if event.loss is not None:
            TRAINING_LOSS.labels(job=job_id).set(event.loss)
        if event.val_dice is not None:
            TRAINING_VAL_DICE.labels(job=job_id).set(event.val_dice)

    def forget(self, job_id: str) -> None:
        """Drop an ended job's gauges."""
        for gauge in _PER_JOB:
            try:
                gauge.remove(job_id)
            except KeyError:
                pass

    def states(self, states: Iterable[JobState]) -> None:
        """Jobs by state, from the state of every known job."""
        listed = list(states)
        for state in JobState:
            TRAINING_JOBS.labels(state=state.value.lower()).set(listed.count(state))
