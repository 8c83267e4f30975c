"""Kubernetes executor: one training job = one ``batch/v1`` Indexed Job + one headless Service.

Rendering (pure functions, no cluster needed):

- :func:`render_job`: ``completions = parallelism = nodes``, one pod per node. Each pod runs torchrun
  (through :mod:`services.trainer.pod_entry`, which exits with the failed rank's own status, not torchrun's 1)
  ``--nnodes N --nproc-per-node P --node-rank $(JOB_COMPLETION_INDEX) --master-addr <pod 0>
  --master-port 29500 --no-python samforge train --data D --out <jobs dir>/<tenant>/<job> ...``;
  ``$(JOB_COMPLETION_INDEX)`` is expanded by the kubelet from the variable the Job controller sets on
  every pod of an Indexed Job. Pod 0 is reached as ``<name>-0.<name>`` through the Service. Rank 0
  evaluates and writes ``<out>/adapter`` (and ``<out>/result.json``); the other ranks only train. GPUs:
  ``processes_per_node x gpus_per_process`` ``nvidia.com/gpu`` requested = limited: the limit isolates the
  pod's devices from the node's other GPUs, and each rank runs on its own ``gpus_per_process`` of them
  (:mod:`services.trainer.devices` narrows CUDA_VISIBLE_DEVICES per LOCAL_RANK); CPU and memory per
  process from settings. The pods mount the jobs claim at ``SAMFORGE_JOBS_DIR`` (the trainer reads the
  same folder) and the data claim read-only at ``SAMFORGE_DATA_DIR``, run as uid 10001 with a read-only
  root file system and no capabilities, get no API token, and match the NetworkPolicy
  ``samforge-training`` (pods of training jobs reach each other on the rendezvous and ephemeral ports).
- :func:`render_service`: ``clusterIP: None`` + ``publishNotReadyAddresses`` (the pods have no readiness
  probe; rendezvous starts before anything is "ready").

Both carry the labels ``app.kubernetes.io/component: training`` and ``samforge.io/job-id`` and the
annotation ``samforge.io/tenant`` (a tenant name need not be a valid label value).

Failure handling: exit status 2 (bad input) and 3 (candidate rejected) fail the Job at once (retrying
cannot change them); a pod evicted or preempted (condition ``DisruptionTarget``) does not count against
``backoffLimit``; any other failure is retried up to ``RETRIES`` times per node, resuming from the
checkpoints in ``<out>``. Finished Jobs are garbage-collected after ``TTL_SECONDS``.

:class:`KubernetesExecutor` is a thin layer over the official client (``BatchV1Api``, ``CoreV1Api``, given
to it): ``start`` creates the Service then the Job (deleting the Service again if the Job is refused),
``poll`` reads the Job and its pods and turns them into a :class:`ClusterJobStatus` (:func:`job_status`),
``cancel`` deletes the Job (foreground propagation: pods first) and the Service. The API calls themselves
are not exercised in this repository's tests (no API server runs here); everything around them is.

``python -m services.trainer.k8s_job --job-id ID --tenant T --data PATH [--nodes N ...] -- TRAIN ARGS``
prints the Service and Job for the settings in the environment (deploy/examples/ddp-training-job.yaml is
its output).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

from sam_core.errors import InvalidInput, Unavailable
from services.common.settings import TrainerSettings

from . import devices
from .job_model import job_dir
from .job_spec import Resources
from .worker import EVENTS_FILE, EXIT_CODES, RESULT_FILE, WorkerStatus, read_result

RENDEZVOUS_PORT = 29500  # torchrun's default master port
RETRIES = 2  # pod failures tolerated per node (each retry resumes from the last checkpoint)
TTL_SECONDS = 86400  # finished Jobs (and their pods) are deleted a day later
# `samforge train` exit statuses that a retry cannot change (the pod exits with them: services.trainer.pod_entry)
EXIT_BAD_INPUT, EXIT_REJECTED = EXIT_CODES[WorkerStatus.INVALID_INPUT], EXIT_CODES[WorkerStatus.REJECTED]
POD_ENTRY = ("python", "-m", "services.trainer.pod_entry")  # torchrun exiting with the failed rank's status
COMPONENT = "training"
JOB_ID_LABEL = "samforge.io/job-id"
TENANT_ANNOTATION = "samforge.io/tenant"
CONTAINER = "train"
UID = 10001
TMP_MOUNT = "/tmp"  # nosec B108  # mount path of the pod's own emptyDir (read-only root file system)
SHM_MOUNT = "/dev/shm"  # nosec B108  # the pod's memory-backed emptyDir (torch DataLoader workers share tensors)
_JOB_ID = re.compile(r"[a-z0-9]{1,40}", re.ASCII)
_QUANTITY = re.compile(r"([0-9.]+)([a-zA-Z]*)", re.ASCII)


@dataclass(frozen=True)
class TrainingJob:
    """One job to run: ``data`` is the resolved data set path (under SAMFORGE_DATA_DIR), ``train_args`` the
    rest of the ``samforge train`` command line (method, hyper-parameters, name) except --data and --out.

    ``events``: pass ``--events <out>/events.jsonl``; needs a ``samforge train`` that has the flag.
    ``resources`` is kept :meth:`~services.trainer.job_spec.Resources.resolved` (0 = the default filled in).
    """

    job_id: str
    tenant: str
    data: str
    train_args: tuple[str, ...] = ()
    resources: Resources = Resources()
    events: bool = False

    def __post_init__(self) -> None:
        if not _JOB_ID.fullmatch(self.job_id):
            raise InvalidInput(f"{self.job_id!r} is not a job id (1-40 of a-z 0-9)", field="job_id")
        object.__setattr__(self, "resources", self.resources.resolved())  # frozen: set once, here


def object_name(job_id: str) -> str:
    """Name of the Job and of its Service (a DNS label: pods are ``<name>-<index>.<name>``)."""
    return f"samforge-train-{job_id}"


def out_dir(settings: TrainerSettings, tenant: str, job_id: str) -> Path:
    """The job's folder on the shared jobs volume (same path in the trainer and in the training pods)."""
    return job_dir(Path(settings.jobs_dir), tenant, job_id)


def labels(job_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "samforge", "app.kubernetes.io/part-of": "samforge",
            "app.kubernetes.io/component": COMPONENT, JOB_ID_LABEL: job_id}


def _metadata(settings: TrainerSettings, job: TrainingJob) -> dict[str, Any]:
    return {"name": object_name(job.job_id), "namespace": settings.k8s_namespace, "labels": labels(job.job_id),
            "annotations": {TENANT_ANNOTATION: job.tenant}}


def pod_command(settings: TrainerSettings, job: TrainingJob) -> list[str]:
    """The container's command: torchrun (static rendezvous at pod 0) running ``samforge train``, through
    :mod:`services.trainer.pod_entry` so that the pod exits with the failed rank's own status."""
    name, out = object_name(job.job_id), out_dir(settings, job.tenant, job.job_id)
    data = Path(job.data)
    if ".." in data.parts or not data.is_relative_to(settings.data_dir):
        raise InvalidInput(f"{job.data!r} is not under SAMFORGE_DATA_DIR ({settings.data_dir})", field="dataset")
    train = ["samforge", "train", "--data", str(data), "--out", str(out), *job.train_args]
    if job.events:
        train += ["--events", str(out / EVENTS_FILE)]
    if job.resources.gpus_per_process:  # each rank sees only its own devices (rank_launcher): the first is its
        train += ["--device", devices.RANK_DEVICE]
    return [*POD_ENTRY, f"--nnodes={job.resources.nodes}",
            f"--nproc-per-node={job.resources.processes_per_node}",
            "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={name}-0.{name}",
            f"--master-port={RENDEZVOUS_PORT}", "--no-python",
            *devices.rank_launcher(job.resources.gpus_per_process), *train]


def _split(quantity: str) -> tuple[Decimal, str]:
    match = _QUANTITY.fullmatch(quantity)
    if not match:
        raise InvalidInput(f"not a quantity: {quantity!r}", field="quantity")
    return Decimal(match.group(1)), match.group(2)


def scaled(quantity: str, factor: int) -> str:
    """``quantity`` (``4``, ``500m``, ``16Gi``) times ``factor``, in the same unit."""
    number, unit = _split(quantity)
    return f"{number * factor}{unit}"


def threads(cpu: str) -> int:
    """OpenMP threads of one process given its CPU quantity (at least 1)."""
    number, unit = _split(cpu)
    return max(1, int(number / 1000 if unit == "m" else number))


def _resources(settings: TrainerSettings, resources: Resources) -> dict[str, Any]:
    per_pod = {"cpu": scaled(settings.k8s_cpu_per_process, resources.processes_per_node),
               "memory": scaled(settings.k8s_memory_per_process, resources.processes_per_node)}
    gpus = resources.processes_per_node * resources.gpus_per_process
    if gpus:
        per_pod["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(per_pod), "limits": dict(per_pod)}


def _container(settings: TrainerSettings, job: TrainingJob) -> dict[str, Any]:
    return {
        "name": CONTAINER, "image": settings.k8s_image, "imagePullPolicy": "IfNotPresent",
        "command": pod_command(settings, job),
        "env": [{"name": "OMP_NUM_THREADS", "value": str(threads(settings.k8s_cpu_per_process))}],
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        "resources": _resources(settings, job.resources),
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "jobs", "mountPath": settings.jobs_dir},
                         {"name": "data", "mountPath": settings.data_dir, "readOnly": True},
                         {"name": "tmp", "mountPath": TMP_MOUNT},
                         {"name": "dshm", "mountPath": SHM_MOUNT}],
    }


def _models_volume(settings: TrainerSettings) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The read-only claim holding ``SAMFORGE_CHECKPOINT`` and its mount at the checkpoint's folder (None: no
    checkpoint, the model's weights are bundled)."""
    if not settings.checkpoint:
        return None
    if not settings.k8s_models_pvc:
        raise InvalidInput(f"the training pods cannot read SAMFORGE_CHECKPOINT={settings.checkpoint} without the "
                           "claim that holds it", field="SAMFORGE_K8S_MODELS_PVC")
    volume = {"name": "models", "persistentVolumeClaim": {"claimName": settings.k8s_models_pvc, "readOnly": True}}
    mount = {"name": "models", "mountPath": str(Path(settings.checkpoint).parent), "readOnly": True}
    return volume, mount


def _pod_spec(settings: TrainerSettings, job: TrainingJob) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "subdomain": object_name(job.job_id), "restartPolicy": "Never",
        "serviceAccountName": settings.k8s_service_account, "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(settings, job)],
        "volumes": [
            {"name": "jobs", "persistentVolumeClaim": {"claimName": settings.k8s_jobs_pvc}},
            {"name": "data", "persistentVolumeClaim": {"claimName": settings.k8s_data_pvc, "readOnly": True}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    models = _models_volume(settings)
    if models is not None:
        spec["volumes"].append(models[0])
        spec["containers"][0]["volumeMounts"].append(models[1])
    if settings.k8s_node_selector:
        spec["nodeSelector"] = dict(settings.k8s_node_selector)
    if settings.k8s_tolerations:
        spec["tolerations"] = [dict(t) for t in settings.k8s_tolerations]
    return spec


def render_job(settings: TrainerSettings, job: TrainingJob) -> dict[str, Any]:
    """The ``batch/v1`` Indexed Job of ``job`` (see the module docstring)."""
    if not settings.k8s_image:
        raise InvalidInput("the kubernetes executor needs the training image", field="SAMFORGE_K8S_IMAGE")
    nodes = job.resources.nodes
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(settings, job),
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
            "backoffLimit": RETRIES * nodes, "ttlSecondsAfterFinished": TTL_SECONDS,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [EXIT_BAD_INPUT, EXIT_REJECTED]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": labels(job.job_id),
                                      "annotations": {TENANT_ANNOTATION: job.tenant}},
                         "spec": _pod_spec(settings, job)},
        },
    }


def render_service(settings: TrainerSettings, job: TrainingJob) -> dict[str, Any]:
    """The headless Service giving pod 0 (the rendezvous) a DNS name before any pod is ready."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(settings, job),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {JOB_ID_LABEL: job.job_id, "app.kubernetes.io/component": COMPONENT},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                            "protocol": "TCP"}]},
    }


# ------------------------------------------------------------------------------------------------- state
class ClusterJobState(Enum):
    PENDING = "pending"  # created, no pod running yet (scheduling, pulling the image)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class ClusterJobStatus:
    """Where a Job stands. Once it finished: ``exit_code`` of rank 0's pod (index 0; 3 = rejected, 2 = bad
    input) when it failed, ``result`` the job's ``result.json`` when rank 0 wrote one."""

    state: ClusterJobState
    reason: str = ""
    exit_code: int | None = None
    result: Mapping[str, Any] | None = None


def _true_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    conditions: list[Mapping[str, Any]] = (job.get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            return state.get("terminated") or (status.get("lastState") or {}).get("terminated")
    return None


def _index(pod: Mapping[str, Any]) -> str:
    return str(((pod.get("metadata") or {}).get("annotations") or {}).get("batch.kubernetes.io/job-completion-index"))


def _by_age(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))


def pod_failures(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """``<pod>: <reason> (exit <code>)`` of every pod whose training container ended with an error."""
    found = []
    for pod in _by_age(pods):
        terminated = _terminated(pod)
        if terminated and terminated.get("exitCode", 0) != 0:
            found.append(f"{pod['metadata']['name']}: {terminated.get('reason') or 'Error'} "
                         f"(exit {terminated.get('exitCode')})")
    return found


def _rank0_exit_code(pods: Sequence[Mapping[str, Any]]) -> int | None:
    code = None
    for pod in _by_age(pods):
        terminated = _terminated(pod)
        if _index(pod) == "0" and terminated is not None:
            code = int(terminated.get("exitCode", 0))
    return code


def _waiting(pods: Sequence[Mapping[str, Any]]) -> str:
    """Why no pod runs yet: an unschedulable pod's message or a container's waiting reason."""
    for pod in _by_age(pods):
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return f"{pod['metadata']['name']}: {condition.get('reason')}: {condition.get('message', '')}"
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
                return f"{pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', '')}"
    return ""


def job_status(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
               read_result: Callable[[], Mapping[str, Any] | None]) -> ClusterJobStatus:
    """The state of a Job (as the API returns it, camelCase keys) and of its pods."""
    if _true_condition(job, "Complete", "SuccessCriteriaMet"):
        result = read_result()
        if result is None:
            return ClusterJobStatus(ClusterJobState.FAILED, f"the Job completed but rank 0 wrote no {RESULT_FILE}", 0)
        return ClusterJobStatus(ClusterJobState.SUCCEEDED, "", 0, result)
    failed = _true_condition(job, "Failed", "FailureTarget")
    if failed:
        head = str(failed.get("reason") or "Failed")
        if failed.get("message"):
            head += f": {failed['message']}"
        reason = "; ".join([head, *pod_failures(pods)])
        return ClusterJobStatus(ClusterJobState.FAILED, reason, _rank0_exit_code(pods), read_result())
    running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    if running:
        return ClusterJobStatus(ClusterJobState.RUNNING)
    return ClusterJobStatus(ClusterJobState.PENDING, _waiting(pods))


# ---------------------------------------------------------------------------------------------- executor
NOT_FOUND, CONFLICT = 404, 409


class KubernetesExecutor:
    """Runs training jobs as Kubernetes Jobs through ``batch`` (BatchV1Api) and ``core`` (CoreV1Api)."""

    def __init__(self, settings: TrainerSettings, batch: Any, core: Any) -> None:
        self.settings = settings
        self.batch = batch
        self.core = core
        self.namespace = settings.k8s_namespace

    @classmethod
    def in_cluster(cls, settings: TrainerSettings) -> KubernetesExecutor:
        """With the pod's service account token (deploy/components/kubernetes-executor mounts it)."""
        from kubernetes import client, config

        config.load_incluster_config()
        return cls(settings, client.BatchV1Api(), client.CoreV1Api())

    def start(self, job: TrainingJob) -> None:
        """Create the Service, then the Job; both rendered first, so a bad job creates nothing. A Job that
        already exists (a trainer restarted after creating it) is kept as it is."""
        service, body = render_service(self.settings, job), render_job(self.settings, job)
        created = self._create(self.core.create_namespaced_service, service)
        try:
            self._create(self.batch.create_namespaced_job, body)
        except Exception:
            if created:
                self._delete(self.core.delete_namespaced_service, object_name(job.job_id))
            raise

    def exists(self, job_id: str) -> bool:
        """True if the job's Job object exists (running or finished, not yet garbage-collected)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.read_namespaced_job(object_name(job_id), self.namespace)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return False
            raise _unavailable("read", object_name(job_id), exc) from exc
        return True

    def poll(self, tenant: str, job_id: str) -> ClusterJobStatus:
        from kubernetes.client import ApiClient
        from kubernetes.client.exceptions import ApiException

        name = object_name(job_id)
        try:
            job = self.batch.read_namespaced_job(name, self.namespace)
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_ID_LABEL}={job_id}")
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return ClusterJobStatus(ClusterJobState.FAILED, f"Job {name} no longer exists")
            raise _unavailable("read", name, exc) from exc
        plain = ApiClient().sanitize_for_serialization
        folder = out_dir(self.settings, tenant, job_id)
        return job_status(plain(job), [plain(p) for p in pods.items], lambda: read_result(folder))

    def cancel(self, job_id: str) -> None:
        """Delete the Job (foreground: its pods go first) and the Service; already gone is fine."""
        self._delete(self.batch.delete_namespaced_job, object_name(job_id), propagation_policy="Foreground")
        self._delete(self.core.delete_namespaced_service, object_name(job_id))

    def _create(self, call: Callable[..., Any], body: Mapping[str, Any]) -> bool:
        """True if created, False if it existed already."""
        from kubernetes.client.exceptions import ApiException

        try:
            call(self.namespace, body)
        except ApiException as exc:
            if exc.status == CONFLICT:
                return False
            raise _unavailable("create", body["metadata"]["name"], exc) from exc
        return True

    def _delete(self, call: Callable[..., Any], name: str, **options: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            call(name, self.namespace, **options)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise _unavailable("delete", name, exc) from exc


def _unavailable(action: str, name: str, exc: Any) -> Unavailable:
    """An API error as the typed error the services map (RBAC, quota, admission, API server down)."""
    return Unavailable(f"Kubernetes API: cannot {action} {name}: {exc.status} {exc.reason}", field="kubernetes")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the Service and the Job the executor would create (YAML), for the settings in the environment."""
    import yaml

    parser = argparse.ArgumentParser(prog="python -m services.trainer.k8s_job", description=main.__doc__)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--data", required=True, help="data set folder under SAMFORGE_DATA_DIR")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--processes-per-node", type=int, default=1)
    parser.add_argument("--gpus-per-process", type=int, default=0)
    parser.add_argument("--events", action="store_true", help="pass --events to samforge train")
    parser.add_argument("train_args", nargs="*", help="after --: the rest of the samforge train command line")
    args = parser.parse_args(argv)
    settings = TrainerSettings.from_env()
    job = TrainingJob(args.job_id, args.tenant, args.data, tuple(args.train_args),
                      Resources(args.nodes, args.processes_per_node, args.gpus_per_process), args.events)
    print(yaml.safe_dump_all([render_service(settings, job), render_job(settings, job)], sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
