"""The ``inline`` executor: the job trains on the manager's thread inside the trainer process.

Kept for the JobManager's mechanics tests (queue, watch, cancel, tenants, publishing, recovery on the tiny
model): they exercise the manager hundreds of times faster without a worker process and its imports per job.
Not for production: a job that crashes or runs out of memory takes the API down with it, and it has one
process (``resources`` beyond 1 x 1 are refused). Cancel and shutdown stop the run at its next progress event
(train() checkpoints first); the manager decides what the stop means.
"""

from __future__ import annotations

import logging

from sam_core.errors import InvalidInput, SamforgeError
from sam_core.modeling.registry import LoadedModel
from sam_core.training.config import ProgressEvent, StopTraining
from sam_core.training.finetune import run_finetune

from ..job_spec import Resources, build_spec
from .base import GENERIC_ERROR, JobControl, JobLaunch, Outcome, RunResult

log = logging.getLogger("samforge.trainer")


class _Stop(StopTraining):
    """The manager asked the run to stop (cancel or shutdown)."""


class InlineExecutor:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def check(self, resources: Resources) -> None:
        for name in ("nodes", "processes_per_node"):
            if getattr(resources, name) > 1:
                raise InvalidInput("the inline executor runs one process; use SAMFORGE_TRAINER_EXECUTOR=process",
                                   field=f"resources.{name}")
        if resources.gpus_per_process:
            raise InvalidInput("the inline executor uses the trainer's own device", field="resources.gpus_per_process")

    def run(self, launch: JobLaunch, control: JobControl) -> RunResult:
        def callback(event: ProgressEvent) -> None:
            if control.stop_requested() or control.detach_requested():
                raise _Stop()
            control.progress(event)

        try:
            spec = build_spec(launch.request, launch.data, launch.out_dir, launch.baseline)
            result = run_finetune(self.model, spec, callback=callback)
        except _Stop:
            return RunResult(Outcome.STOPPED)
        except SamforgeError as exc:
            return RunResult(Outcome.FAILED, error=str(exc))
        except Exception:
            log.exception("job %s failed", launch.job_id)
            return RunResult(Outcome.FAILED, error=GENERIC_ERROR)
        if result is None:  # only the non-zero ranks of a distributed run get None; this is one process
            return RunResult(Outcome.FAILED, error=GENERIC_ERROR)
        if control.stop_requested():  # a cancel that arrived after the last event still wins
            return RunResult(Outcome.STOPPED)
        return RunResult(Outcome.PUBLISH if result.accepted else Outcome.REJECTED, summary=result.summary())
