"""The kubernetes executor's deploy side.

- The Job + Service it renders for a 2-node x 2-GPU job, with the settings the gpu overlay gives the trainer,
  validate strictly and pass checkov next to the overlay's NetworkPolicies.
- The pod command itself trains: two ranks (gloo, 2 nodes x 1 process) on 127.0.0.1, run as the kubelet would
  (``$(JOB_COMPLETION_INDEX)`` expanded), both exit 0 and rank 0 writes the adapter.
- Both overlays render the trainer's ServiceAccount, a Role granting exactly the calls KubernetesExecutor makes,
  the RoleBinding, the training pods' NetworkPolicy and the trainer's pinned image as the training image.
- deploy/components/kubernetes-executor and deploy/components/s3-registry render and validate on both overlays.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sam_core.errors import InvalidInput
from services.common.net import free_port
from services.common.settings import TrainerSettings
from services.trainer.k8s_job import (
    RENDEZVOUS_PORT,
    KubernetesExecutor,
    Resources,
    TrainingJob,
    object_name,
    out_dir,
    render_job,
    render_service,
)
from tests.conftest import write_blob_dataset
from tests.services.test_k8s_executor import RecordingApi

from .k8s import (
    DEPLOY,
    K8S_VERSIONS,
    OVERLAYS,
    ROOT,
    Endpoint,
    Workload,
    allowed,
    effective_env,
    endpoint_of,
    kustomize,
    mount_for,
    named,
    of_kind,
    quantity,
    samforge_containers,
    selector_matches,
    validation_errors,
    workloads,
)

JOB_ID = "6f1c0d2e9a8b4c7d8e9f0a1b2c3d4e5f"
NAMESPACE = "samforge"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def trainer(objects: list[dict]) -> tuple[Workload, dict]:
    for workload, container, service in samforge_containers(objects):
        if service == "trainer":
            return workload, container
    raise AssertionError("no trainer")


def trainer_settings(objects: list[dict]) -> TrainerSettings:
    """What the trainer of these manifests reads at start-up."""
    return TrainerSettings.from_env(effective_env(objects, trainer(objects)[1]))


def two_by_two(settings: TrainerSettings) -> TrainingJob:
    return TrainingJob(JOB_ID, "default", f"{settings.data_dir}/default/ships",
                       ("--method", "lora", "--epochs", "20", "--batch-size", "8", "--name", "ships"),
                       Resources(nodes=2, processes_per_node=2, gpus_per_process=1), events=True)


# ------------------------------------------------------------------------------------------- the Job
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_job_and_service_for_two_nodes_of_two_gpus_validate(rendered, tmp_path, version):
    objects = rendered["gpu"]
    settings = trainer_settings(objects)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([render_service(settings, two_by_two(settings)),
                                        render_job(settings, two_by_two(settings))]))
    service, job = yaml.safe_load_all(path.read_text())
    assert validation_errors([service, job], version) == []
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    (container,) = pod["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"] == [GPU_TOLERATION]
    assert container["image"] == trainer(objects)[1]["image"] and job["metadata"]["namespace"] == NAMESPACE
    command = container["command"]
    name = object_name(JOB_ID)
    assert command[:8] == ["python", "-m", "services.trainer.pod_entry", "--nnodes=2", "--nproc-per-node=2",
                           "--node-rank=$(JOB_COMPLETION_INDEX)",
                           f"--master-addr={name}-0.{name}", f"--master-port={RENDEZVOUS_PORT}"]
    out = str(out_dir(settings, "default", JOB_ID))
    assert command[command.index("--out") + 1] == out
    assert command[command.index("--events") + 1] == f"{out}/events.jsonl"
    # headless, resolvable before readiness, selecting exactly this job's pods
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"] == name
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    assert service["metadata"]["labels"]["samforge.io/job-id"] == labels["samforge.io/job-id"] == JOB_ID
    assert job["metadata"]["annotations"]["samforge.io/tenant"] == "default"


def test_training_pods_mount_the_claims_where_the_trainer_reads_them(overlay):
    """The trainer reads result.json and the adapter where rank 0 wrote them: same claim, same path."""
    _, objects = overlay
    settings = trainer_settings(objects)
    job = render_job(settings, two_by_two(settings))
    train_pod = Workload(job)
    trainer_workload, trainer_container = trainer(objects)
    claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    for path, writes in ((settings.jobs_dir, True), (settings.data_dir, False)):
        ours = mount_for(train_pod.pod_spec["containers"][0], path)
        theirs = mount_for(trainer_container, path)
        claim = train_pod.volume(ours["name"])["persistentVolumeClaim"]["claimName"]
        assert claim in claims
        assert claim == trainer_workload.volume(theirs["name"])["persistentVolumeClaim"]["claimName"]
        assert ours["mountPath"] == theirs["mountPath"] and bool(ours.get("readOnly")) is not writes


@pytest.mark.slow
def test_the_rendered_job_passes_checkov_next_to_the_overlay(rendered, tmp_path):
    from .test_scans import checkov

    objects = rendered["gpu"]
    settings = trainer_settings(objects)
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump_all([render_service(settings, two_by_two(settings)),
                                        render_job(settings, two_by_two(settings)),
                                        *of_kind(objects, "NetworkPolicy")]))
    report = checkov("kubernetes", [path])
    assert f"Job.{NAMESPACE}.{object_name(JOB_ID)}" in report.resources()
    assert not report.problems(), "\n".join(report.problems())


# --------------------------------------------------------------------------------- the pod command, run
def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """``$(VAR)`` replaced by the container's variable, as the kubelet does (unknown ones stay as they are)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def local_pod(job: dict, index: int, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of pod ``index`` of a rendered Job as the kubelet would start it, with the rendezvous
    at 127.0.0.1:``port`` instead of pod 0's DNS name and ``samforge`` from this interpreter's environment."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    name = job["metadata"]["name"]
    local = {f"--master-addr={name}-0.{name}": "--master-addr=127.0.0.1",
             f"--master-port={RENDEZVOUS_PORT}": f"--master-port={port}"}
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "JOB_COMPLETION_INDEX": str(index),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), "PYTHONPATH": str(ROOT)}
    return [local.get(arg, arg) for arg in (kubelet_expand(a, env) for a in container["command"])], env


@pytest.mark.slow
@pytest.mark.integration
def test_the_pod_command_trains_on_two_local_ranks(tmp_path):
    data = write_blob_dataset(tmp_path / "data" / "default" / "blobs")
    settings = TrainerSettings.from_env({"SAMFORGE_JOBS_DIR": str(tmp_path / "jobs"),
                                         "SAMFORGE_DATA_DIR": str(tmp_path / "data"),
                                         "SAMFORGE_K8S_IMAGE": "samforge:test", "SAMFORGE_K8S_CPU_PER_PROCESS": "1"})
    job = TrainingJob(JOB_ID, "default", str(data),
                      ("--model", "tiny", "--method", "decoder", "--max-steps", "2", "--batch-size", "2",
                       "--checkpoint-every", "1", "--val-fraction", "0.34", "--name", "blobs",
                       "--allow-regression"),  # the random tiny model never beats zero-shot: mechanics only
                      Resources(nodes=2, processes_per_node=1))
    body = render_job(settings, job)
    port = free_port()
    ranks = []
    for index in range(body["spec"]["completions"]):
        argv, env = local_pod(body, index, port)
        assert f"--node-rank={index}" in argv
        stdout, stderr = (tmp_path / f"rank{index}.out").open("w"), (tmp_path / f"rank{index}.err").open("w")
        ranks.append(subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, cwd=tmp_path))
    try:
        codes = [rank.wait(timeout=600) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    errors = [(tmp_path / f"rank{i}.err").read_text()[-3000:] for i in range(len(ranks))]
    assert codes == [0, 0], errors
    printed = (tmp_path / "rank0.out").read_text()
    summary = json.loads(printed[printed.index("{"):])
    adapter = out_dir(settings, "default", JOB_ID) / "adapter"
    assert (summary["adapter_dir"], summary["method"]) == (str(adapter), "decoder")
    assert (tmp_path / "rank1.out").read_text().strip() == ""  # only rank 0 evaluates and reports
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------ RBAC and network
# (API group, resource, verb) of each client call KubernetesExecutor makes
CALLS = {
    "create_namespaced_job": ("batch", "jobs", "create"), "read_namespaced_job": ("batch", "jobs", "get"),
    "delete_namespaced_job": ("batch", "jobs", "delete"), "list_namespaced_pod": ("", "pods", "list"),
    "create_namespaced_service": ("", "services", "create"), "delete_namespaced_service": ("", "services", "delete"),
}


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_role_grants_exactly_what_the_executor_calls(overlay, tmp_path):
    _, objects = overlay
    settings = TrainerSettings.from_env({"SAMFORGE_DATA_DIR": str(tmp_path), "SAMFORGE_K8S_IMAGE": "samforge:x"})
    api = RecordingApi()
    executor = KubernetesExecutor(settings, api, api)
    executor.start(TrainingJob(JOB_ID, "default", str(tmp_path / "default" / "ships")))
    executor.poll("default", JOB_ID)
    executor.cancel(JOB_ID)
    assert {CALLS[method] for method, _, _ in api.calls} == granted(named(objects, "Role", "samforge-trainer-executor"))
    binding = named(objects, "RoleBinding", "samforge-trainer-executor")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "samforge-trainer-executor"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "samforge-trainer", "namespace": NAMESPACE}]
    assert trainer(objects)[0].pod_spec["serviceAccountName"] == "samforge-trainer"
    for account in of_kind(objects, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]
    # the training pods' identity has no binding at all
    subjects = {s["name"] for b in of_kind(objects, "RoleBinding") for s in b["subjects"]}
    assert trainer_settings(objects).k8s_service_account not in subjects
    assert trainer_settings(objects).k8s_service_account in {a["metadata"]["name"] for a in
                                                              of_kind(objects, "ServiceAccount")}


def test_training_pods_reach_each_other_on_rendezvous_and_ephemeral_ports_only(overlay):
    _, objects = overlay
    settings = trainer_settings(objects)
    policies = of_kind(objects, "NetworkPolicy")
    train = endpoint_of(Workload(render_job(settings, two_by_two(settings))))
    other_job = Endpoint(NAMESPACE, {**train.labels, "samforge.io/job-id": "ffff"})
    by_component = {w.labels.get("app.kubernetes.io/component"): endpoint_of(w) for w in workloads(objects)}
    ns = (NAMESPACE,)
    for port in (RENDEZVOUS_PORT, 32768, 45000, 60999):  # rendezvous, gloo / NCCL sockets
        assert allowed(policies, train, train, port, managed_namespaces=ns), port
    for port in (22, 8080, 61000):
        assert not allowed(policies, train, train, port, managed_namespaces=ns), port
    assert allowed(policies, train, other_job, RENDEZVOUS_PORT, managed_namespaces=ns)  # labels, not job ids
    for component in ("encoder", "decoder", "trainer", "redis"):
        service = by_component[component]
        for port in [p[1] for p in service.ports] + [RENDEZVOUS_PORT]:
            assert not allowed(policies, train, service, port, managed_namespaces=ns), (component, port)
            assert not allowed(policies, service, train, RENDEZVOUS_PORT, managed_namespaces=ns), component


def test_a_one_process_training_pod_is_sized_like_the_trainer(overlay):
    """Where the trainer runs jobs itself today, a 1-node x 1-process Job fits the same room."""
    _, objects = overlay
    settings = trainer_settings(objects)
    job = render_job(settings, TrainingJob(JOB_ID, "default", f"{settings.data_dir}/default/ships"))
    ours = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    theirs = trainer(objects)[1]["resources"]
    for resource in ("cpu", "memory"):
        assert quantity(ours["requests"][resource]) <= quantity(theirs["limits"][resource]), resource
        assert ours["requests"][resource] == ours["limits"][resource], resource


def test_the_training_image_is_the_trainers_pinned_image(overlay):
    name, objects = overlay
    _, container = trainer(objects)
    assert effective_env(objects, container)["SAMFORGE_K8S_IMAGE"] == container["image"]
    assert container["image"].endswith("@sha256:" + "0" * 64) and f"-{name}@" in container["image"]


# ------------------------------------------------------------------------------------------- components
def render_with(tmp_path: Path, overlay_name: str, *components: str) -> list[dict]:
    """An overlay plus components, through a throwaway kustomization (paths must be relative)."""
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/overlays/{overlay_name}"], "components": [f"{rel}/components/{c}" for c in components]}))
    objects = kustomize(tmp_path)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {NAMESPACE}
    return objects


OUTSIDE = Endpoint("elsewhere", ports=(("https", 443, "TCP"), ("minio", 9000, "TCP"), ("api", 6443, "TCP")))


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_kubernetes_executor_component(tmp_path, overlay_name):
    objects = render_with(tmp_path, overlay_name, "kubernetes-executor")
    for version in K8S_VERSIONS:
        assert validation_errors(objects, version) == [], version
    workload, container = trainer(objects)
    env = effective_env(objects, container)
    assert env["SAMFORGE_TRAINER_EXECUTOR"] == "kubernetes"
    trainer_settings(objects)  # the trainer starts with these settings (the executor is one it knows)
    mount = mount_for(container, "/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert mount["readOnly"] is True
    sources = workload.volume(mount["name"])["projected"]["sources"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
    assert workload.pod_spec["automountServiceAccountToken"] is False  # the token is this projection only
    others = [w for w in workloads(objects) if w.name != workload.name]
    assert all(not mount_for(c, "/var/run/secrets/kubernetes.io/serviceaccount/token")
               for w in others for c in w.containers())
    policies = of_kind(objects, "NetworkPolicy")
    api_server = endpoint_of(workload)
    for port in (443, 6443):
        assert allowed(policies, api_server, OUTSIDE, port, managed_namespaces=(NAMESPACE,)), port
    encoder = [endpoint_of(w) for w in others if w.labels.get("app.kubernetes.io/component") == "encoder"][0]
    assert not allowed(policies, encoder, OUTSIDE, 443, managed_namespaces=(NAMESPACE,))


def test_training_pods_read_the_checkpoint_from_the_trainers_models_claim(tmp_path):
    """With components/model-checkpoint, a training pod mounts the trainer's models claim read-only where
    SAMFORGE_CHECKPOINT points (rank 0 and the others load the same file); without the claim it is refused."""
    objects = render_with(tmp_path, "cpu", "kubernetes-executor", "model-checkpoint")
    settings = trainer_settings(objects)
    assert settings.checkpoint and settings.k8s_models_pvc
    job = render_job(settings, two_by_two(settings))
    assert validation_errors([job], K8S_VERSIONS[-1]) == []
    train_pod = Workload(job)
    ours = mount_for(train_pod.pod_spec["containers"][0], settings.checkpoint)
    trainer_workload, trainer_container = trainer(objects)
    theirs = mount_for(trainer_container, settings.checkpoint)
    assert ours["readOnly"] is True and ours["mountPath"] == theirs["mountPath"]
    assert train_pod.volume(ours["name"])["persistentVolumeClaim"] == \
        trainer_workload.volume(theirs["name"])["persistentVolumeClaim"]
    unmounted = TrainerSettings.from_env({**effective_env(objects, trainer_container), "SAMFORGE_K8S_MODELS_PVC": ""})
    with pytest.raises(InvalidInput) as refused:
        render_job(unmounted, two_by_two(unmounted))
    assert refused.value.field == "SAMFORGE_K8S_MODELS_PVC" and settings.checkpoint in str(refused.value)


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_s3_registry_component(tmp_path, overlay_name):
    from services.common.settings import DecoderSettings, EncoderSettings

    objects = render_with(tmp_path, overlay_name, "s3-registry")
    for version in K8S_VERSIONS:
        assert validation_errors(objects, version) == [], version
    assert "samforge-registry" not in {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    kinds = {"encoder": EncoderSettings, "decoder": DecoderSettings, "trainer": TrainerSettings}
    policies = of_kind(objects, "NetworkPolicy")
    seen = set()
    for workload, container, service in samforge_containers(objects):
        env = effective_env(objects, container)
        settings = kinds[service].from_env(env)
        assert settings.registry_url.startswith("s3://") and settings.s3_endpoint_url, service
        # credentials as files from the Secret (not as variables), where boto3 reads them
        for variable in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            mount = mount_for(container, env[variable])
            assert mount and mount.get("readOnly") is True, (service, variable)
            secret = workload.volume(mount["name"])["secret"]
            assert secret["secretName"] == "samforge-s3" and secret.get("optional", False) is False, service
            assert Path(env[variable]).name in {item["path"] for item in secret["items"]}, (service, variable)
        cache = mount_for(container, settings.registry_dir)
        assert not cache.get("readOnly") and set(workload.volume(cache["name"])) == {"name", "emptyDir"}, service
        assert allowed(policies, endpoint_of(workload), OUTSIDE, 443, managed_namespaces=(NAMESPACE,)), service
        seen.add(service)
    assert seen == set(kinds)
    claims = [v for w in workloads(objects) for v in w.pod_spec.get("volumes", []) if "persistentVolumeClaim" in v]
    assert "samforge-registry" not in {v["persistentVolumeClaim"]["claimName"] for v in claims}


@pytest.mark.slow
def test_checkov_finds_nothing_in_the_components(tmp_path):
    from .test_scans import checkov

    files = []
    for overlay_name in OVERLAYS:
        folder = tmp_path / overlay_name
        folder.mkdir()
        objects = render_with(folder, overlay_name, "kubernetes-executor", "s3-registry", "model-checkpoint")
        files.append(tmp_path / f"{overlay_name}-components.yaml")
        files[-1].write_text(yaml.safe_dump_all(objects, sort_keys=False))
    report = checkov("kubernetes", files)
    assert len(report.passed) > 300
    assert not report.problems(), "\n".join(report.problems())
