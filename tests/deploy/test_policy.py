"""Policy over the rendered overlays: probes, resources, security, shutdown timing, wiring, settings."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from services.common.settings import ENV, ENV_BY_NAME, DecoderSettings, EncoderSettings, TrainerSettings

from .k8s import (
    Endpoint,
    allowed,
    container_port,
    effective_env,
    endpoint_of,
    mount_for,
    named,
    of_kind,
    quantity,
    samforge_containers,
    selector_matches,
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
    maps = of_kind(objects, "ConfigMap")
    assert len(maps) == 1
    return maps[0]["data"]


# ------------------------------------------------------------------------------------------- containers
def test_every_container_has_probes_resources_and_a_locked_down_security_context(overlay):
    name, objects = overlay
    checked = 0
    for workload in workloads(objects):
        pod = workload.pod_spec
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload.name
        for container in workload.containers():
            where = f"{name}: {workload.name}/{container['name']}"
            for probe in PROBES:
                assert probe in container, f"{where}: no {probe}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
            for resource, request in resources["requests"].items():
                limit = resources["limits"].get(resource)
                assert limit is not None and quantity(request) <= quantity(limit), f"{where}: {resource}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{where}: runs as uid 0"
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
    assert checked == 4


def test_image_tags_are_pinned(overlay):
    name, objects = overlay
    for workload in workloads(objects):
        for container in workload.containers():
            image = container["image"]
            if "@sha256:" in image:
                continue
            last = image.rsplit("/", 1)[-1]
            assert ":" in last, f"{name}: {workload.name}: {image} has no tag"
            assert last.split(":", 1)[1] != "latest", f"{name}: {workload.name}: {image}"


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


def _service_target(objects, address: str, namespace: str) -> tuple[dict, int]:
    host, _, port = address.rpartition(":")
    parts = host.split(".")
    service = named(objects, "Service", parts[0])
    assert service["metadata"]["namespace"] == (parts[1] if len(parts) > 1 else namespace)
    ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert ports, f"{address}: the Service has no port {port}"
    return service, ports[0]


def _pods_behind(objects, service: dict, service_port: dict) -> list[int]:
    """Container ports a Service port reaches on the pods it selects."""
    reached = []
    for workload in workloads(objects):
        if workload.namespace == service["metadata"]["namespace"] and \
                selector_matches({"matchLabels": service["spec"]["selector"]}, workload.labels):
            for container in workload.pod_spec["containers"]:
                port = container_port(container, service_port.get("targetPort", service_port["port"]))
                if port:
                    reached.append(port)
    return reached


def test_decoder_reaches_the_encoder_and_the_encoder_reaches_redis(overlay):
    name, objects = overlay
    containers = {service: (w, c) for w, c, service in samforge_containers(objects)}
    workload, decoder = containers["decoder"]
    address = settings_env(objects, decoder, "decoder")["SAMFORGE_ENCODER_ADDRESS"]
    service, port = _service_target(objects, address, workload.namespace)
    encoder_port = int(settings_env(objects, containers["encoder"][1], "encoder")["SAMFORGE_ENCODER_PORT"])
    assert _pods_behind(objects, service, port) == [encoder_port], f"{name}: {address}"
    assert int(settings_env(objects, decoder, "decoder")["SAMFORGE_ENCODER_PORT"]) == encoder_port

    workload, encoder = containers["encoder"]
    url = urlsplit(settings_env(objects, encoder, "encoder")["SAMFORGE_REDIS_URL"])
    assert url.scheme == "redis"
    service, port = _service_target(objects, f"{url.hostname}:{url.port}", workload.namespace)
    assert _pods_behind(objects, service, port) == [6379]


def test_every_service_selects_pods_that_exist(overlay):
    name, objects = overlay
    for service in of_kind(objects, "Service"):
        assert service["spec"].get("selector"), f"{name}: {service['metadata']['name']} selects nothing"
        for port in service["spec"]["ports"]:
            reached = _pods_behind(objects, service, port)
            assert reached, f"{name}: Service {service['metadata']['name']} port {port['port']} reaches no pod"


def test_budgets_autoscalers_claims_and_config_refer_to_what_exists(overlay):
    name, objects = overlay
    labels = [w.labels for w in workloads(objects)]
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert sum(selector_matches(pdb["spec"]["selector"], lab) for lab in labels) == 1, pdb["metadata"]["name"]
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert "replicas" not in deployments[target["name"]]["spec"], f"{target['name']}: the HPA owns replicas"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    maps = {c["metadata"]["name"] for c in of_kind(objects, "ConfigMap")}
    for workload in workloads(objects):
        volumes = {v["name"]: v for v in workload.pod_spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in workload.containers():
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{workload.name}: mount of unknown volume {mount['name']}"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps


def test_autoscaling_signals(overlay):
    from .test_docs import metric_names

    _, objects = overlay
    decoder = named(objects, "HorizontalPodAutoscaler", "samforge-decoder")["spec"]["metrics"]
    assert decoder[0]["type"] == "Resource" and decoder[0]["resource"]["name"] == "cpu"
    encoder = named(objects, "HorizontalPodAutoscaler", "samforge-encoder")["spec"]["metrics"]
    assert encoder[0]["type"] == "Pods"
    assert encoder[0]["pods"]["metric"]["name"] == "samforge_encoder_queue_depth"
    assert "samforge_encoder_queue_depth" in metric_names()


# ------------------------------------------------------------------------------------------------ overlays
def test_gpu_overlay_puts_encoder_and_trainer_on_gpus(rendered):
    objects = rendered["gpu"]
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if service == "decoder":
            assert gpus is None and env["SAMFORGE_DEVICE"] == "cpu"
            assert "nodeSelector" not in workload.pod_spec
        else:
            assert gpus == 1 and container["resources"]["requests"].get("nvidia.com/gpu") == 1
            assert env["SAMFORGE_DEVICE"] == "cuda"
            assert workload.pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                workload.pod_spec["tolerations"]
        assert container["image"].endswith(":0.1.0-gpu")
    assert int(config_map(objects)["SAMFORGE_CACHE_BYTES"]) > int(config_map(rendered["cpu"])["SAMFORGE_CACHE_BYTES"])
    for claim in of_kind(objects, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]


def test_cpu_overlay_is_small_and_cpu_only(rendered):
    objects = rendered["cpu"]
    for workload, container, service in samforge_containers(objects):
        env = settings_env(objects, container, service)
        assert env["SAMFORGE_DEVICE"] == "cpu" and env["SAMFORGE_MODEL"] == "litemedsam"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert quantity(container["resources"]["requests"]["memory"]) <= 2**31, service
        assert container["image"].endswith(":0.1.0-cpu")
        assert "nodeSelector" not in workload.pod_spec


# ----------------------------------------------------------------------------------------- network policy
def _endpoints(objects):
    return {w.labels.get("app.kubernetes.io/component"): endpoint_of(w) for w in workloads(objects)}


def test_network_policies_allow_exactly_the_intended_paths(overlay):
    name, objects = overlay
    policies = of_kind(objects, "NetworkPolicy")
    pods = _endpoints(objects)
    ns = pods["encoder"].namespace
    managed = (ns,)
    deny_all = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
                and not p["spec"].get("egress") and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}]
    assert deny_all, f"{name}: no default-deny policy"

    def ok(src: Endpoint, dst_name: str, port: int, protocol: str = "TCP") -> bool:
        return allowed(policies, src, pods[dst_name], port, protocol, managed)

    client = Endpoint("apps", {"samforge.io/client": "true"})
    stranger = Endpoint("apps", {"app": "other"})
    prometheus = Endpoint("monitoring", {"app.kubernetes.io/name": "prometheus"})
    grpc = {"encoder": 50051, "decoder": 50052, "trainer": 50053}
    metrics = {"encoder": 9101, "decoder": 9102, "trainer": 9103}

    expected = {  # (source, destination, port) -> allowed
        (client, "decoder", grpc["decoder"]): True,
        (client, "trainer", grpc["trainer"]): True,
        (client, "encoder", grpc["encoder"]): False,
        (client, "redis", 6379): False,
        (stranger, "decoder", grpc["decoder"]): False,
        (stranger, "trainer", grpc["trainer"]): False,
        (pods["decoder"], "encoder", grpc["encoder"]): True,
        (pods["decoder"], "redis", 6379): False,
        (pods["decoder"], "trainer", grpc["trainer"]): False,
        (pods["encoder"], "redis", 6379): True,
        (pods["encoder"], "decoder", grpc["decoder"]): False,
        (pods["encoder"], "trainer", grpc["trainer"]): False,
        (pods["trainer"], "encoder", grpc["encoder"]): False,
        (pods["trainer"], "redis", 6379): False,
        (pods["redis"], "encoder", grpc["encoder"]): False,
        (prometheus, "decoder", grpc["decoder"]): False,
        (prometheus, "redis", 6379): False,
    }
    for service, port in metrics.items():
        expected[(prometheus, service, port)] = True
        expected[(client, service, port)] = False
    wrong = [f"{src.namespace}/{src.labels} -> {dst}:{port} should be {'allowed' if want else 'denied'}"
             for (src, dst, port), want in expected.items() if ok(src, dst, port) is not want]
    assert not wrong, f"{name}:\n" + "\n".join(wrong)

    dns = Endpoint("kube-system", {"k8s-app": "kube-dns"}, ports=(("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")))
    for component, pod in pods.items():
        assert allowed(policies, pod, dns, 53, "UDP", managed), f"{name}: {component} cannot resolve names"
        assert allowed(policies, pod, dns, 53, "TCP", managed), f"{name}: {component} cannot resolve names"
        outside = Endpoint("elsewhere", {"app": "x"}, ports=(("https", 443, "TCP"),))
        assert not allowed(policies, pod, outside, 443, "TCP", managed), f"{name}: {component} egress is open"


@pytest.mark.parametrize("component", ["encoder", "decoder", "trainer"])
def test_kubelet_probes_hit_ports_the_pods_listen_on(rendered, component):
    """Probes use numbers (gRPC probes cannot name ports); each must be a declared container port."""
    for objects in rendered.values():
        workload = [w for w in workloads(objects) if w.labels.get("app.kubernetes.io/component") == component][0]
        container = workload.pod_spec["containers"][0]
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in PROBES:
            assert container[probe]["grpc"]["port"] in ports
