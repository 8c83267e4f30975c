"""Policy over the rendered overlays: probes, resources, security, shutdown timing, wiring, settings."""

from __future__ import annotations

import re

import yaml

from services.common.settings import ENV, ENV_BY_NAME, DecoderSettings, EncoderSettings, TrainerSettings

from .k8s import (
    DEPLOY,
    OVERLAYS,
    Workload,
    container_port,
    effective_env,
    mount_for,
    of_kind,
    quantity,
    samforge_containers,
    workloads,
)

SETTINGS = {"encoder": EncoderSettings, "decoder": DecoderSettings, "trainer": TrainerSettings}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Paths the services read or write, and whether the service writes there.
DIRS = {
    "encoder": {"SAMFORGE_REGISTRY_DIR": False},
    "decoder": {"SAMFORGE_REGISTRY_DIR": False, "SAMFORGE_ONNX_CACHE_DIR": True},
    "trainer": {"SAMFORGE_REGISTRY_DIR": True, "SAMFORGE_DATA_DIR": True, "SAMFORGE_JOBS_DIR": True},
}
FILES = ("SAMFORGE_AUTH_TOKENS_FILE", "SAMFORGE_TLS_CERT", "SAMFORGE_TLS_KEY", "SAMFORGE_CHECKPOINT")


def reads(service: str) -> list[str]:
    return [v.name for v in ENV if service in v.services]


def settings_env(objects, container, service) -> dict[str, str]:
    """Every variable ``service`` reads: set by the manifests, or the settings module's default."""
    env = effective_env(objects, container)
    return {name: env.get(name, ENV_BY_NAME[name].default) for name in reads(service)}


def config_map(objects) -> dict[str, str]:
    """The data of the generated samforge-settings-<hash> ConfigMap."""
    maps = [m for m in of_kind(objects, "ConfigMap") if m["metadata"]["name"].rsplit("-", 1)[0] == "samforge-settings"]
    assert len(maps) == 1
    return maps[0]["data"]


def triton_workload(objects) -> Workload | None:
    found = [w for w in workloads(objects) if w.labels.get("app.kubernetes.io/component") == "triton"]
    assert len(found) <= 1
    return found[0] if found else None


def arg_value(argv: list[str], flag: str) -> str | None:
    """``--flag=value`` (or ``--flag value``) from an argument list."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


# ------------------------------------------------------------------------------------------- containers
# containers (init containers included) per overlay: 4 samforge + redis; gpu adds Triton and its init container
CONTAINERS = {"cpu": 4, "gpu": 6}


def test_every_container_has_probes_resources_and_a_locked_down_security_context(overlay):
    name, objects = overlay
    checked = 0
    for workload in workloads(objects):
        pod = workload.pod_spec
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload.name
        init = {c["name"] for c in pod.get("initContainers", []) if c.get("restartPolicy") != "Always"}
        for container in workload.containers():
            where = f"{name}: {workload.name}/{container['name']}"
            for probe in PROBES:
                # the API server rejects probes on init containers (they run to completion before the pod starts)
                assert (probe not in container) if container["name"] in init else (probe in container), \
                    f"{where}: {probe} {'on an init container' if container['name'] in init else 'missing'}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
            for resource, request in resources["requests"].items():
                limit = resources["limits"].get(resource)
                assert limit is not None and quantity(request) <= quantity(limit), f"{where}: {resource}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            # >= 10000: no collision with a host account's uid (checkov CKV_K8S_40)
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) >= 10000, f"{where}: runs as a low uid"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts or workload.name == "samforge-redis", f"{where}: /tmp not writable"
            checked += 1
    assert checked == CONTAINERS[name]


# Images whose digest the release pipeline sets (deploy/README.md, "Release"): in the repository their overlay
# carries the all-zero placeholder, which no registry serves. Every other image has its real digest here.
RELEASE_PINNED = ("registry.example.com/samforge", "nvcr.io/nvidia/tritonserver")
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
IMAGE = re.compile(r"(?P<repository>[a-z0-9][a-z0-9./_-]*):(?P<tag>\w[\w.-]*)@(?P<digest>sha256:[0-9a-f]{64})")


def test_every_image_is_pinned_by_tag_and_digest_and_never_repulled(overlay):
    name, objects = overlay
    for workload in workloads(objects):
        for container in workload.containers():
            where = f"{name}: {workload.name}/{container['name']}"
            image = IMAGE.fullmatch(container["image"])
            assert image, f"{where}: {container['image']} is not <repository>:<tag>@sha256:<digest>"
            assert image["tag"] != "latest", where
            if image["digest"] == PLACEHOLDER_DIGEST:
                assert image["repository"] in RELEASE_PINNED, \
                    f"{where}: {image['repository']} has the release placeholder digest but no release step pins it"
            if image["repository"] == "nvcr.io/nvidia/tritonserver":
                assert re.fullmatch(r"\d\d\.\d\d-py3", image["tag"]), f"{where}: pin a monthly release (<yy.mm>-py3)"
            # a digest never changes, so the node's copy is the image: no registry round trip per pod start
            assert container.get("imagePullPolicy") == "IfNotPresent", f"{where}: imagePullPolicy"


def test_release_placeholders_are_only_in_the_overlays_images():
    """The release pipeline edits one place per image: the overlay's ``images:`` entry."""
    for overlay_name in OVERLAYS:
        entries = yaml.safe_load((DEPLOY / "overlays" / overlay_name / "kustomization.yaml").read_text())["images"]
        assert {e["digest"] for e in entries} == {PLACEHOLDER_DIGEST}, overlay_name
    for path in [*DEPLOY.glob("base/*.yaml"), *DEPLOY.glob("triton/*.yaml")]:
        assert "@sha256:" + "0" * 64 not in path.read_text(), path


def test_samforge_containers_probe_grpc_health_on_the_settings_port(overlay):
    name, objects = overlay
    seen = set()
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        port = int(env[f"SAMFORGE_{service.upper()}_PORT"])
        metrics_port = int(env[f"SAMFORGE_{service.upper()}_METRICS_PORT"])
        assert container_port(container, "grpc") == port, (name, service)
        assert container_port(container, "metrics") == metrics_port, (name, service)
        for probe in PROBES:
            assert container[probe].get("grpc", {}).get("port") == port, (name, service, probe)
            assert container[probe].get("grpc", {}).get("service", "") == "", "overall server health"
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
        annotations = workload.annotations
        assert annotations.get("prometheus.io/scrape") == "true", (name, service)
        assert annotations.get("prometheus.io/port") == str(metrics_port), (name, service)
        assert annotations.get("prometheus.io/path") == "/metrics", (name, service)
        seen.add(service)
    assert seen == {"encoder", "decoder", "trainer"}


def test_termination_grace_outlasts_the_drain(overlay):
    """terminationGracePeriodSeconds > preStop sleep + SAMFORGE_GRACE_SECONDS (from the rendered ConfigMap)."""
    name, objects = overlay
    grace_from_config = float(config_map(objects)["SAMFORGE_GRACE_SECONDS"])
    for workload, container, service in samforge_containers(objects):
        grace = float(settings_env(objects, container, service)["SAMFORGE_GRACE_SECONDS"])
        assert grace == grace_from_config
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        sleep = pre_stop.get("sleep", {}).get("seconds", 0)
        period = workload.pod_spec.get("terminationGracePeriodSeconds", 30)
        assert period > sleep + grace, f"{name}: {workload.name}: {period} <= {sleep} + {grace}"


def test_triton_probes_ports_metrics_and_shutdown(rendered):
    objects = rendered["gpu"]
    workload = triton_workload(objects)
    container = workload.pod_spec["containers"][0]
    assert container["name"] == "triton"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "tritonserver"
    assert arg_value(argv, "--model-control-mode") == "none"
    assert arg_value(argv, "--strict-readiness") == "true", "ready must mean the model is loaded"
    # Triton's default ports are the declared ones: none moved, none of the three endpoints switched off
    assert not any(a.startswith(("--http-port", "--grpc-port", "--metrics-port")) for a in argv)
    for endpoint in ("http", "grpc", "metrics"):
        assert arg_value(argv, f"--allow-{endpoint}") in (None, "true"), endpoint
    paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
             "livenessProbe": "/v2/health/live"}
    for probe, path in paths.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path and container_port(container, http["port"]) == 8000, probe
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
    assert workload.annotations.get("prometheus.io/scrape") == "true"
    assert workload.annotations.get("prometheus.io/port") == str(container_port(container, "metrics"))
    assert workload.annotations.get("prometheus.io/path") == "/metrics"
    # SIGTERM: Triton waits up to --exit-timeout-secs for in-flight inferences; SIGKILL must not come first
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    exit_timeout = int(arg_value(argv, "--exit-timeout-secs") or 30)  # Triton's default: 30 s
    assert workload.pod_spec.get("terminationGracePeriodSeconds", 30) > sleep + exit_timeout
    # the model repository is an emptyDir the init container fills and Triton only reads
    repo = arg_value(argv, "--model-repository")
    mount = mount_for(container, repo)
    assert mount and mount["mountPath"] == repo and mount.get("readOnly") is True
    assert "emptyDir" in workload.volume(mount["name"])
    inits = workload.pod_spec["initContainers"]
    assert len(inits) == 1 and mount_for(inits[0], repo)["name"] == mount["name"]
    assert not mount_for(inits[0], repo).get("readOnly")


# ------------------------------------------------------------------------------------------------ settings
def test_manifests_set_only_known_settings(overlay):
    name, objects = overlay
    for key in config_map(objects):
        assert key in ENV_BY_NAME, f"{name}: ConfigMap sets unknown {key}"
    for _, container, service in samforge_containers(objects):
        for item in container.get("env", []):
            if item["name"].startswith("SAMFORGE_"):
                assert item["name"] in ENV_BY_NAME, f"{name}: {service} sets unknown {item['name']}"
                assert service in ENV_BY_NAME[item["name"]].services, f"{service} does not read {item['name']}"


def test_every_setting_a_service_reads_is_set_or_defaulted_and_valid(overlay):
    """The settings each service builds at start-up from its container environment parse, bind every
    interface (the kubelet probes the pod IP), and point at mounted, appropriately writable paths."""
    name, objects = overlay
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        settings = SETTINGS[service].from_env(env)
        where = f"{name}: {service}"
        assert settings.host in ("0.0.0.0", "::", "[::]"), f"{where}: binds {settings.host}"
        assert settings.threads >= 1, f"{where}: SAMFORGE_THREADS should follow the CPU limit"
        for var, writes in DIRS[service].items():
            path = env[var]
            mount = mount_for(container, path)
            assert path.startswith("/") and mount, f"{where}: {var}={path} is not on a volume"
            assert bool(mount.get("readOnly")) is not writes, f"{where}: {var} readOnly={mount.get('readOnly')}"
        for var in FILES:
            if service in ENV_BY_NAME[var].services and env[var]:
                mount = mount_for(container, env[var])
                assert mount and mount.get("readOnly"), f"{where}: {var}={env[var]} is not on a read-only mount"
                volume = workload.volume(mount["name"])
                assert "secret" in volume or var == "SAMFORGE_CHECKPOINT", f"{where}: {var} not from a Secret"
        if service in ("encoder", "decoder"):
            registry = workload.volume(mount_for(container, env["SAMFORGE_REGISTRY_DIR"])["name"])
            assert registry["persistentVolumeClaim"].get("readOnly") is True, f"{where}: registry claim not read-only"


def test_auth_tokens_come_from_the_secret(overlay):
    _, objects = overlay
    for workload, container, service in samforge_containers(objects):
        path = settings_env(objects, container, service)["SAMFORGE_AUTH_TOKENS_FILE"]
        assert path, "auth is on in the shipped overlays"
        volume = workload.volume(mount_for(container, path)["name"])
        assert volume["secret"]["secretName"] == "samforge-auth-tokens"
        assert volume["secret"].get("optional", False) is False


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _on_one_gpu(workload: Workload, container: dict) -> None:
    assert container["resources"]["limits"].get("nvidia.com/gpu") == 1, workload.name
    assert container["resources"]["requests"].get("nvidia.com/gpu") == 1, workload.name
    assert workload.pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, workload.name
    assert GPU_TOLERATION in workload.pod_spec["tolerations"], workload.name


def test_gpu_overlay_puts_triton_and_trainer_on_gpus_and_the_encoder_on_cpu(rendered):
    """Triton owns the encoder's GPU work: the trainer and Triton get one GPU each on GPU nodes; the encoder
    (triton backend) and the decoder run on CPU nodes with SAMFORGE_DEVICE=cpu and ask for no GPU."""
    objects = rendered["gpu"]
    seen = set()
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        if service == "trainer":
            _on_one_gpu(workload, container)
            assert env["SAMFORGE_DEVICE"] == "cuda"
        else:
            assert "nvidia.com/gpu" not in container["resources"]["limits"], service
            assert "nvidia.com/gpu" not in container["resources"]["requests"], service
            assert env["SAMFORGE_DEVICE"] == "cpu", service
            assert "nodeSelector" not in workload.pod_spec and "tolerations" not in workload.pod_spec, service
        if service == "encoder":
            assert env["SAMFORGE_ENCODER_BACKEND"] == "triton"
        assert container["image"].split("@")[0].endswith(":0.1.0-gpu")
        seen.add(service)
    assert seen == {"encoder", "decoder", "trainer"}
    triton = triton_workload(objects)
    _on_one_gpu(triton, triton.pod_spec["containers"][0])
    # the init container exports on CPU and must not hold a GPU while it runs
    for init in triton.pod_spec["initContainers"]:
        assert "nvidia.com/gpu" not in init["resources"].get("limits", {})
        assert init["image"].split("@")[0].endswith(":0.1.0-gpu")
    # only the trainer and Triton ask for GPUs
    with_gpus = {w.name for w in workloads(objects) for c in w.containers()
                 if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})}
    assert with_gpus == {"samforge-trainer", "samforge-triton"}
    assert int(config_map(objects)["SAMFORGE_CACHE_BYTES"]) > int(config_map(rendered["cpu"])["SAMFORGE_CACHE_BYTES"])
    for claim in of_kind(objects, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]


def test_encoder_memory_holds_its_embedding_cache(overlay):
    """On CPU (every encoder here: in-process on the cpu overlay, triton backend on gpu) the embedding cache
    is host memory: the encoder's memory request must cover SAMFORGE_CACHE_BYTES with room for the process."""
    name, objects = overlay
    for _, container, service in samforge_containers(objects):
        if service != "encoder":
            continue
        env = settings_env(objects, container, service)
        assert env["SAMFORGE_DEVICE"] == "cpu", name
        cache = int(env["SAMFORGE_CACHE_BYTES"])
        request = quantity(container["resources"]["requests"]["memory"])
        assert request >= cache + 2**29, f"{name}: memory request {request:.0f} B for a {cache} B cache"


def test_cpu_overlay_is_small_and_cpu_only(rendered):
    objects = rendered["cpu"]
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        assert env["SAMFORGE_DEVICE"] == "cpu" and env["SAMFORGE_MODEL"] == "litemedsam"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert quantity(container["resources"]["requests"]["memory"]) <= 2**31, service
        assert container["image"].split("@")[0].endswith(":0.1.0-cpu")
        assert "nodeSelector" not in workload.pod_spec


# ----------------------------------------------------------------------------------------- network policy
