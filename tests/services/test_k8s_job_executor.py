"""The ``kubernetes`` executor's run loop (services/trainer/executors/kubernetes.py) over the Job API boundary.

The API objects are the :class:`RecordingApi` fake of tests/services/test_k8s_executor.py (the client boundary
only: no API server can run here). What a training pod would do — append events, write result.json, end the
Job — is simulated by the test's control when the executor waits; everything else is the executor's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sam_core.errors import InvalidInput
from sam_core.training.config import Phase, ProgressEvent
from services.common.settings import TrainerSettings
from services.trainer.executors import EXECUTORS, JobLaunch, Outcome
from services.trainer.executors.kubernetes import KubernetesJobExecutor, training_job
from services.trainer.job_spec import JobRequest, Resources
from services.trainer.k8s_job import KubernetesExecutor, object_name, out_dir
from services.trainer.worker import EVENTS_FILE, EventsFile, WorkerStatus, read_result, write_result
from tests.services.test_k8s_executor import IMAGE, JOB_ID, RecordingApi

COMPLETE = {"conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}


@pytest.fixture
def settings(tmp_path) -> TrainerSettings:
    (tmp_path / "data" / "acme" / "ships").mkdir(parents=True)
    return TrainerSettings.from_env({"SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"),
                                     "SAMFORGE_DATA_DIR": str(tmp_path / "data"), "SAMFORGE_MAX_NODES": "4",
                                     "SAMFORGE_K8S_NAMESPACE": "training", "SAMFORGE_K8S_IMAGE": IMAGE})


def launch_of(settings: TrainerSettings, **attach: int) -> JobLaunch:
    request = JobRequest(tenant="acme", dataset="ships", method="decoder", adapter_name="ships",
                         resources=Resources(nodes=2, processes_per_node=1))
    return JobLaunch(JOB_ID, "acme", out_dir(settings, "acme", JOB_ID), Path(settings.data_dir) / "acme" / "ships",
                     request, dict(attach))


class Pod:
    """The control the executor reports to; on each wait, the next step of what the training pods do."""

    def __init__(self, api: RecordingApi, out: Path, steps: list) -> None:
        self.api, self.out, self.steps = api, out, list(steps)
        self.events: list[ProgressEvent] = []
        self.worker: dict[str, int] = {}
        self.stop = self.detach = False

    def progress(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def stop_requested(self) -> bool:
        return self.stop

    def detach_requested(self) -> bool:
        return self.detach

    def record_worker(self, worker: dict[str, int]) -> None:
        self.worker = worker

    def wait(self, seconds: float) -> None:
        assert self.steps, "the executor kept polling after the job ended"
        self.steps.pop(0)(self)


def train(pod: Pod) -> None:
    EventsFile(pod.out / EVENTS_FILE)(ProgressEvent(Phase.TRAINING, 1, 2, 0, loss=0.5))


def finish(status: WorkerStatus, job_status: dict):
    def step(pod: Pod) -> None:
        write_result(pod.out, status, summary={"val": {}})
        pod.api.job_status = job_status
    return step


def executor(settings: TrainerSettings, api: RecordingApi) -> KubernetesJobExecutor:
    return KubernetesJobExecutor(settings, KubernetesExecutor(settings, api, api))


def test_a_completed_job_publishes_with_the_pods_events(settings):
    api, launch = RecordingApi(), launch_of(settings)
    pod = Pod(api, launch.out_dir, [train, train, finish(WorkerStatus.PUBLISHED, COMPLETE)] + [lambda p: None] * 5)
    result = executor(settings, api).run(launch, pod)
    assert result.outcome is Outcome.PUBLISH and result.summary["status"] == "published"
    assert [e.step for e in pod.events] == [1, 1] and pod.worker["events_offset"] > 0
    job = api.objects["Job", "training", object_name(JOB_ID)]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--events" in command and "--model" in command and job["spec"]["completions"] == 2
    assert command.count("--data") == 1 and command.count("--out") == 1


def test_a_cancel_deletes_the_job_and_its_service(settings):
    api, launch = RecordingApi(), launch_of(settings)

    def cancel(pod: Pod) -> None:
        pod.stop = True

    result = executor(settings, api).run(launch, Pod(api, launch.out_dir, [cancel]))
    assert result.outcome is Outcome.STOPPED and not api.objects


def test_a_failed_job_without_a_result_fails_with_the_pods_reason(settings):
    api, launch = RecordingApi(), launch_of(settings)

    def oom(pod: Pod) -> None:
        pod.api.job_status = FAILED
        pod.api.pods = [{"metadata": {"name": "p-0", "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                         "status": {"containerStatuses": [{
                             "name": "train", "image": IMAGE, "imageID": "", "ready": False, "restartCount": 0,
                             "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}]

    result = executor(settings, api).run(launch, Pod(api, launch.out_dir, [oom] + [lambda p: None] * 5))
    assert result.outcome is Outcome.FAILED and "OOMKilled (exit 137)" in result.error


def test_a_new_job_drops_a_previous_attempts_result_and_a_running_one_keeps_it(settings):
    api, launch = RecordingApi(), launch_of(settings)
    write_result(launch.out_dir, WorkerStatus.STOPPED)  # the attempt a shutdown stopped
    first = Pod(api, launch.out_dir, [lambda p: None])
    first.stop = True
    executor(settings, api).run(launch, first)
    assert read_result(launch.out_dir) is None  # removed before the new Job was created
    api.objects.clear()

    def detach(pod: Pod) -> None:  # a trainer shutdown that leaves the Job running
        pod.detach = True

    assert executor(settings, api).run(launch, Pod(api, launch.out_dir, [detach])).outcome is Outcome.DETACHED
    write_result(launch.out_dir, WorkerStatus.REJECTED)
    api.job_status = FAILED
    again = executor(settings, api).run(launch_of(settings, events_offset=0), Pod(api, launch.out_dir, []))
    assert again.outcome is Outcome.REJECTED  # re-attached: rank 0's result counts


def test_the_worker_options_are_the_process_executors_without_the_volumes(settings):
    job = training_job(launch_of(settings), settings)
    assert "--data" not in job.train_args and "--out" not in job.train_args and job.events
    assert job.resources.nodes == 2 and job.resources.processes_per_node == 1
    assert "kubernetes" in EXECUTORS


def test_check_refuses_at_create_job_what_the_trainer_cannot_create(settings):
    """No training image: CreateJob is refused naming the setting, and no API is called."""
    api = RecordingApi()
    executor(settings, api).check(Resources(nodes=2, processes_per_node=2, gpus_per_process=1))
    no_image = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": settings.data_dir, "SAMFORGE_MAX_NODES": "4"})
    with pytest.raises(InvalidInput) as info:
        executor(no_image, api).check(Resources(nodes=2))
    assert info.value.field == "SAMFORGE_K8S_IMAGE" and api.calls == []


def test_a_checkpoint_model_trains_from_its_claim_or_is_refused_at_create_job(settings, tmp_path):
    """The pods load the trainer's model and checkpoint; a checkpoint without its claim is refused up front."""
    env = {"SAMFORGE_JOBS_DIR": settings.jobs_dir, "SAMFORGE_DATA_DIR": settings.data_dir, "SAMFORGE_MAX_NODES": "4",
           "SAMFORGE_K8S_IMAGE": IMAGE, "SAMFORGE_MODEL": "tiny", "SAMFORGE_CHECKPOINT": "/models/tiny.pt"}
    mounted = TrainerSettings.from_env({**env, "SAMFORGE_K8S_MODELS_PVC": "samforge-models"})
    args = training_job(launch_of(mounted), mounted).train_args
    assert args[args.index("--model") + 1] == "tiny" and args[args.index("--checkpoint") + 1] == "/models/tiny.pt"
    executor(mounted, RecordingApi()).check(Resources(nodes=2))
    with pytest.raises(InvalidInput) as info:
        executor(TrainerSettings.from_env(env), RecordingApi()).check(Resources(nodes=2))
    assert info.value.field == "SAMFORGE_K8S_MODELS_PVC"
