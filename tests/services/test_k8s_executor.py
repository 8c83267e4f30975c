"""KubernetesExecutor around the API boundary, and the Job/pod states it reads.

The official client's API objects are replaced by :class:`RecordingApi`, a fake of the client boundary only:
it keeps the created objects by name, answers 409/404 like the API server and returns the client's own model
classes (V1Job, V1PodList) built from JSON, as the real client does. Rendering, the rollback on a refused
Job, idempotence and the state mapping are the executor's own code and run for real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from sam_core.errors import InvalidInput, Unavailable
from services.common.settings import TrainerSettings
from services.trainer.job_spec import Resources
from services.trainer.k8s_job import (
    ClusterJobState,
    KubernetesExecutor,
    TrainingJob,
    job_status,
    object_name,
    out_dir,
    pod_command,
    scaled,
    threads,
)

IMAGE = "registry.example.com/samforge:0.1.0-gpu@sha256:" + "1" * 64
JOB_ID = "0123456789abcdef0123456789abcdef"


def as_model(data: dict, kind: str) -> Any:
    """What the client returns: its model class deserialized from the API's JSON."""
    return ApiClient().deserialize(json.dumps(data), kind, "application/json")


class RecordingApi:
    """BatchV1Api + CoreV1Api stand-in: records every call, stores objects, fails where told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> body
        self.refuse: dict[str, int] = {}  # method name -> HTTP status to answer with
        self.job_status: dict = {}
        self.pods: list[dict] = []

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        if method in self.refuse:
            raise ApiException(status=self.refuse[method], reason="Forbidden")

    def _create(self, kind: str, method: str, namespace: str, body: dict) -> dict:
        self._call(method, namespace, body)
        key = (kind, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[key] = body
        return body

    def _delete(self, kind: str, method: str, name: str, namespace: str, **kwargs: Any) -> None:
        self._call(method, name, namespace, **kwargs)
        if self.objects.pop((kind, namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")

    def create_namespaced_service(self, namespace: str, body: dict) -> dict:
        return self._create("Service", "create_namespaced_service", namespace, body)

    def create_namespaced_job(self, namespace: str, body: dict) -> dict:
        return self._create("Job", "create_namespaced_job", namespace, body)

    def delete_namespaced_service(self, name: str, namespace: str, **kwargs: Any) -> None:
        self._delete("Service", "delete_namespaced_service", name, namespace, **kwargs)

    def delete_namespaced_job(self, name: str, namespace: str, **kwargs: Any) -> None:
        self._delete("Job", "delete_namespaced_job", name, namespace, **kwargs)

    def read_namespaced_job(self, name: str, namespace: str) -> Any:
        self._call("read_namespaced_job", name, namespace)
        body = self.objects.get(("Job", namespace, name))
        if body is None:
            raise ApiException(status=404, reason="NotFound")
        return as_model({**body, "status": self.job_status}, "V1Job")

    def list_namespaced_pod(self, namespace: str, label_selector: str = "") -> Any:
        self._call("list_namespaced_pod", namespace, label_selector=label_selector)
        return as_model({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self.pods}, "V1PodList")


@pytest.fixture
def settings(tmp_path) -> TrainerSettings:
    (tmp_path / "data" / "acme" / "ships").mkdir(parents=True)
    return TrainerSettings.from_env({"SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"),
                                     "SAMFORGE_DATA_DIR": str(tmp_path / "data"),
                                     "SAMFORGE_K8S_NAMESPACE": "training", "SAMFORGE_K8S_IMAGE": IMAGE})


@pytest.fixture
def api() -> RecordingApi:
    return RecordingApi()


def a_job(settings: TrainerSettings, **changes: Any) -> TrainingJob:
    fields: dict[str, Any] = {"job_id": JOB_ID, "tenant": "acme", "data": f"{settings.data_dir}/acme/ships",
                              "train_args": ("--method", "lora"), "resources": Resources(2, 2, 1)}
    return TrainingJob(**{**fields, **changes})


def test_start_creates_the_service_then_the_job(settings, api):
    KubernetesExecutor(settings, api, api).start(a_job(settings))
    assert [c[0] for c in api.calls] == ["create_namespaced_service", "create_namespaced_job"]
    name = object_name(JOB_ID)
    assert set(api.objects) == {("Service", "training", name), ("Job", "training", name)}
    job = api.objects[("Job", "training", name)]
    assert job["spec"]["completions"] == 2 and job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


def test_a_refused_job_leaves_nothing_behind(settings, api):
    api.refuse["create_namespaced_job"] = 403
    with pytest.raises(Unavailable) as info:
        KubernetesExecutor(settings, api, api).start(a_job(settings))
    assert info.value.field == "kubernetes" and "403" in str(info.value) and object_name(JOB_ID) in str(info.value)
    assert api.objects == {}
    assert [c[0] for c in api.calls][-1] == "delete_namespaced_service"


def test_starting_again_after_a_restart_keeps_the_running_job(settings, api):
    executor = KubernetesExecutor(settings, api, api)
    executor.start(a_job(settings))
    before = dict(api.objects)
    executor.start(a_job(settings))
    assert api.objects == before
    assert "delete_namespaced_service" not in [c[0] for c in api.calls]


def test_a_bad_job_reaches_no_api(settings, api):
    with pytest.raises(InvalidInput) as info:
        KubernetesExecutor(settings, api, api).start(a_job(settings, data="/etc"))
    assert info.value.field == "dataset"
    with pytest.raises(InvalidInput) as info:
        KubernetesExecutor(settings, api, api).start(a_job(settings, data=f"{settings.data_dir}/acme/../../x"))
    assert info.value.field == "dataset"
    no_image = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": settings.data_dir})
    with pytest.raises(InvalidInput) as info:
        KubernetesExecutor(no_image, api, api).start(a_job(no_image))
    assert info.value.field == "SAMFORGE_K8S_IMAGE"
    with pytest.raises(InvalidInput) as info:
        a_job(settings, job_id="../x")
    assert info.value.field == "job_id"
    with pytest.raises(InvalidInput) as info:
        a_job(settings, resources=Resources(nodes=-1))
    assert info.value.field == "resources.nodes"
    assert api.calls == []


def test_cancel_deletes_job_in_the_foreground_and_service_and_is_repeatable(settings, api):
    executor = KubernetesExecutor(settings, api, api)
    executor.start(a_job(settings))
    executor.cancel(JOB_ID)
    assert api.objects == {}
    deletes = [c for c in api.calls if c[0].startswith("delete")]
    assert deletes[0] == ("delete_namespaced_job", (object_name(JOB_ID), "training"),
                          {"propagation_policy": "Foreground"})
    executor.cancel(JOB_ID)  # already gone: fine
    api.refuse["delete_namespaced_job"] = 500
    with pytest.raises(Unavailable):
        executor.cancel(JOB_ID)


def pod(index: int, phase: str, *, created: str = "2026-01-01T00:00:00Z", terminated: dict | None = None,
        waiting: dict | None = None, conditions: list | None = None) -> dict:
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    return {"metadata": {"name": f"{object_name(JOB_ID)}-{index}-x{created[-3:-1]}", "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": phase, "conditions": conditions or [],
                       "containerStatuses": [{"name": "train", "state": state, "ready": phase == "Running",
                                              "restartCount": 0, "image": IMAGE, "imageID": ""}]}}


def done(code: int, reason: str) -> dict:
    return {"exitCode": code, "reason": reason}


def test_poll_follows_the_job_and_reads_rank_0s_result(settings, api):
    executor = KubernetesExecutor(settings, api, api)
    job = a_job(settings)
    executor.start(job)
    api.pods = [pod(0, "Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                               "message": "0/3 nodes have nvidia.com/gpu"}])]
    pending = executor.poll("acme", JOB_ID)
    assert pending.state is ClusterJobState.PENDING and "nvidia.com/gpu" in pending.reason
    assert ("list_namespaced_pod", ("training",), {"label_selector": f"samforge.io/job-id={JOB_ID}"}) in api.calls
    api.pods = [pod(0, "Running"), pod(1, "Running")]
    api.job_status = {"active": 2}
    assert executor.poll("acme", JOB_ID).state is ClusterJobState.RUNNING
    api.pods = [pod(i, "Succeeded", terminated=done(0, "Completed")) for i in (0, 1)]
    api.job_status = {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}
    missing = executor.poll("acme", JOB_ID)
    assert missing.state is ClusterJobState.FAILED and "result.json" in missing.reason
    folder = out_dir(settings, "acme", JOB_ID)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "published", "adapter_dir": str(folder / "adapter"),
                                                    "steps": 2}))
    finished = executor.poll("acme", JOB_ID)
    assert finished.state is ClusterJobState.SUCCEEDED and finished.result["steps"] == 2 and finished.exit_code == 0


def test_a_failed_job_names_its_pods_reasons_and_rank_0s_exit_status(settings, api):
    executor = KubernetesExecutor(settings, api, api)
    executor.start(a_job(settings))
    api.pods = [pod(0, "Failed", created="2026-01-01T00:00:01Z", terminated=done(1, "Error")),
                pod(1, "Failed", terminated=done(137, "OOMKilled")),
                pod(0, "Failed", created="2026-01-01T00:05:00Z", terminated=done(3, "Error"))]
    api.job_status = {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
         "message": "Container train for pod x failed with exit code 3 matching FailJob rule at index 0"}]}
    status = executor.poll("acme", JOB_ID)
    assert status.state is ClusterJobState.FAILED
    assert status.reason.startswith("PodFailurePolicy: Container train")
    assert "OOMKilled (exit 137)" in status.reason and f"{object_name(JOB_ID)}-1" in status.reason
    assert status.exit_code == 3  # the newest rank-0 pod: the candidate was rejected
    assert status.result is None


def test_a_job_deleted_outside_samforge_is_failed(settings, api):
    status = KubernetesExecutor(settings, api, api).poll("acme", JOB_ID)
    assert status.state is ClusterJobState.FAILED and "no longer exists" in status.reason
    api.refuse["read_namespaced_job"] = 503
    with pytest.raises(Unavailable):
        KubernetesExecutor(settings, api, api).poll("acme", JOB_ID)


def test_job_status_waits_on_a_pod_pulling_its_image():
    pods = [pod(0, "Pending", waiting={"reason": "ImagePullBackOff", "message": "not found"})]
    status = job_status({"status": {}}, pods, lambda: None)
    assert status.state is ClusterJobState.PENDING and "ImagePullBackOff" in status.reason


def test_request_resources_default_to_one_node_of_one_process(settings):
    """One Resources type: the request keeps its 0s, the Job runs the resolved form."""
    assert Resources(0, 0, 0).resolved() == Resources(1, 1, 0) == TrainingJob(JOB_ID, "acme", "x").resources
    assert Resources(2, 4, 1).resolved() == Resources(2, 4, 1)
    assert a_job(settings, resources=Resources(nodes=2)).resources == Resources(2, 1, 0)
    with pytest.raises(InvalidInput) as info:
        Resources(1, 1, -1).resolved()
    assert info.value.field == "resources.gpus_per_process"
    import services.trainer.k8s_job as k8s_job

    assert k8s_job.Resources is Resources  # the request type itself, not a second one


def test_quantities_scale_per_process():
    assert [scaled("4", 2), scaled("500m", 3), scaled("16Gi", 2), scaled("1.5", 2)] == ["8", "1500m", "32Gi", "3.0"]
    assert [threads("4"), threads("500m"), threads("2500m")] == [4, 1, 2]


def test_each_rank_of_a_gpu_pod_runs_on_its_own_devices(settings):
    """The pod's nvidia.com/gpu limit isolates its devices; within the pod each rank narrows to its own."""
    gpu = pod_command(settings, a_job(settings, resources=Resources(2, 2, 2)))
    ranks = gpu[gpu.index("--no-python") + 1:]
    assert ranks[:7] == ["python", "-m", "services.trainer.devices", "--gpus-per-process=2", "--", "samforge", "train"]
    assert gpu[-2:] == ["--device", "cuda:0"]
    cpu = pod_command(settings, a_job(settings, resources=Resources(2, 2, 0)))
    assert cpu[cpu.index("--no-python") + 1:][:2] == ["samforge", "train"] and "--device" not in cpu
