"""The ``kubernetes`` executor: each job attempt is a ``batch/v1`` Indexed Job running the worker command.

:mod:`services.trainer.k8s_job` renders the Job + headless Service and makes the API calls; this module is
the :class:`~.base.Executor` around it, so the JobManager treats a cluster job like a worker process:

- ``run`` creates the Service and the Job. A Job that already exists (the trainer restarted while it ran) is
  kept: that is the re-attach, and the events are read again from the recorded offset (from the start when
  the record is gone: WatchJob then replays them). A new Job first removes a previous attempt's
  ``result.json`` and events. Then it polls: it tails ``<job>/events.jsonl`` on the shared jobs volume into the
  job's progress every :data:`POLL_SECONDS` and reads the Job's state every :data:`STATE_EVERY` polls.
- A finished Job ends the attempt as rank 0's ``result.json`` says (published / rejected / invalid input /
  stopped), exactly as for the process executor; a failed Job without a result (its pods retried
  ``k8s_job.RETRIES`` times per node already, each resuming from the checkpoints) is FAILED with the pods'
  reasons (``OOMKilled (exit 137)``).
- CancelJob (or a shutdown that stops workers) deletes the Job (its pods get SIGTERM and checkpoint) and the
  Service: STOPPED. A shutdown that detaches leaves the Job running (DETACHED); the next trainer re-attaches.
- ``check`` renders the Job the request would create (no API call): a trainer without a training image
  refuses the job at CreateJob. The generic limits (nodes, processes, GPUs) are ``job_spec``'s; whether a
  node has room is the scheduler's (the job waits PENDING with its reason).
"""

from __future__ import annotations

import logging

from services.common.settings import TrainerSettings

from .. import k8s_job
from ..job_spec import Resources, build_spec
from ..worker import EVENTS_FILE, RESULT_FILE, WorkerStatus, read_events
from .base import JobControl, JobLaunch, Outcome, RunResult
from .process import spec_argv

log = logging.getLogger("samforge.trainer")

POLL_SECONDS = 1.0  # events tail interval
STATE_EVERY = 5  # API reads of the Job's state: one every STATE_EVERY polls
PROBE_JOB_ID = "0" * 32  # the job id of the Job check() renders (never created)
_OUTCOMES = {WorkerStatus.PUBLISHED: Outcome.PUBLISH, WorkerStatus.REJECTED: Outcome.REJECTED,
             WorkerStatus.INVALID_INPUT: Outcome.FAILED, WorkerStatus.STOPPED: Outcome.STOPPED,
             WorkerStatus.FAILED: Outcome.FAILED}


def training_job(launch: JobLaunch, settings: TrainerSettings) -> k8s_job.TrainingJob:
    """The cluster job of ``launch``: the process executor's ``samforge train`` options without --data/--out
    (the pod command adds them for the shared volumes), the trainer's model, and the request's resources.

    Its ``--baseline`` (the publishing guard's champion) is ``<job>/baseline``, which the trainer copied onto the
    jobs claim the pods mount; ``--checkpoint`` is read from the models claim (``k8s_job``)."""
    argv = spec_argv(build_spec(launch.request, launch.data, launch.out_dir, launch.baseline))
    options = [arg for i, arg in enumerate(argv)
               if arg not in ("--data", "--out") and (i == 0 or argv[i - 1] not in ("--data", "--out"))]
    options += ["--model", settings.model]  # the device: samforge train's auto, or the pod command's (GPU jobs)
    if settings.checkpoint:
        options += ["--checkpoint", settings.checkpoint]
    return k8s_job.TrainingJob(launch.job_id, launch.tenant, str(launch.data), tuple(options),
                               launch.request.resources, events=True)


def outcome_of(status: k8s_job.ClusterJobStatus) -> RunResult | None:
    """How a finished Job ended the attempt (None while it is pending or running)."""
    if status.state in (k8s_job.ClusterJobState.PENDING, k8s_job.ClusterJobState.RUNNING):
        return None
    if status.result is not None:
        result = dict(status.result)
        return RunResult(_OUTCOMES[WorkerStatus(result["status"])], summary=result,
                         error=str(result.get("error") or ""))
    return RunResult(Outcome.FAILED, error=status.reason or "the Job failed")


class KubernetesJobExecutor:
    def __init__(self, settings: TrainerSettings, cluster: k8s_job.KubernetesExecutor) -> None:
        self.settings, self.cluster = settings, cluster

    def check(self, resources: Resources) -> None:
        """Render, without the API server, the Job this request would create: what the trainer itself cannot
        create (no training image, SAMFORGE_K8S_IMAGE) is InvalidInput naming it at CreateJob, not a FAILED job
        later. Room on the nodes (GPUs, CPU, quota) is the scheduler's to judge: a job too large for every node
        stays PENDING with the scheduler's reason in its message."""
        probe = k8s_job.TrainingJob(PROBE_JOB_ID, "probe", self.settings.data_dir, resources=resources)
        k8s_job.render_service(self.settings, probe)
        k8s_job.render_job(self.settings, probe)

    def run(self, launch: JobLaunch, control: JobControl) -> RunResult:
        job = training_job(launch, self.settings)
        offset = launch.attach.get("events_offset", 0)
        if not self.cluster.exists(launch.job_id):  # a new attempt: a previous one's files must not count
            offset = 0
            for stale in (RESULT_FILE, EVENTS_FILE):
                (launch.out_dir / stale).unlink(missing_ok=True)
        self.cluster.start(job)
        polls = 0
        while True:
            events, new_offset = read_events(launch.out_dir / EVENTS_FILE, offset)
            for event in events:
                control.progress(event)
            if new_offset != offset:
                offset = new_offset
                control.record_worker({"events_offset": offset})
            if control.stop_requested():
                self.cluster.cancel(launch.job_id)
                return RunResult(Outcome.STOPPED)
            if control.detach_requested():
                return RunResult(Outcome.DETACHED)
            if polls % STATE_EVERY == 0:
                ended = outcome_of(self.cluster.poll(launch.tenant, launch.job_id))
                if ended is not None:
                    return ended
            polls += 1
            control.wait(POLL_SECONDS)
