"""Wiring over the rendered overlays: who reaches whom (Services, selectors, network policies), what scales
on what, and which ports the kubelet probes."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from .k8s import (
    Endpoint,
    allowed,
    container_port,
    endpoint_of,
    named,
    of_kind,
    samforge_containers,
    selector_matches,
    workloads,
)
from .test_policy import PROBES, settings_env, triton_workload


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


def test_encoder_reaches_triton_through_a_headless_service(overlay):
    """gpu: the encoder's triton backend points at the headless samforge-triton Service, whose gRPC port
    reaches Triton's gRPC port; cpu: the in-process torch backend and no Triton at all."""
    name, objects = overlay
    workload, encoder = [(w, c) for w, c, service in samforge_containers(objects) if service == "encoder"][0]
    env = settings_env(objects, encoder, "encoder")
    triton = triton_workload(objects)
    if name == "cpu":
        assert env["SAMFORGE_ENCODER_BACKEND"] == "torch" and triton is None
        return
    assert env["SAMFORGE_ENCODER_BACKEND"] == "triton" and triton is not None
    target = env["SAMFORGE_TRITON_URL"]
    assert target.startswith("dns:///"), f"{target}: resolve every Triton pod (dns:/// + headless Service)"
    service, port = _service_target(objects, target.removeprefix("dns:///"), workload.namespace)
    assert service["spec"].get("clusterIP") == "None", "a ClusterIP pins each encoder's connection to one pod"
    assert port["name"] == "grpc" and port.get("appProtocol") == "grpc"
    grpc_port = container_port(triton.pod_spec["containers"][0], "grpc")
    assert _pods_behind(objects, service, port) == [grpc_port] == [8001]


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
    if "triton" in pods:
        # Triton: the encoder on gRPC and Prometheus on metrics, nobody else on any of its ports
        triton = {"http": 8000, "grpc": 8001, "metrics": 8002}
        assert {(n, p) for n, p, _ in pods["triton"].ports} == set(triton.items())
        for source in [client, stranger, prometheus, *(pods[c] for c in pods if c != "triton")]:
            for port in triton.values():
                expected[(source, "triton", port)] = (source is pods["encoder"] and port == triton["grpc"]) or \
                    (source is prometheus and port == triton["metrics"])
        for component, port in {**grpc, "redis": 6379}.items():
            expected[(pods["triton"], component, port)] = False  # Triton opens no connections
    else:
        assert name == "cpu", f"{name}: no Triton pod"
    wrong = [f"{src.namespace}/{src.labels} -> {dst}:{port} should be {'allowed' if want else 'denied'}"
             for (src, dst, port), want in expected.items() if ok(src, dst, port) is not want]
    assert not wrong, f"{name}:\n" + "\n".join(wrong)

    dns = Endpoint("kube-system", {"k8s-app": "kube-dns"}, ports=(("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")))
    for component, pod in pods.items():
        assert allowed(policies, pod, dns, 53, "UDP", managed), f"{name}: {component} cannot resolve names"
        assert allowed(policies, pod, dns, 53, "TCP", managed), f"{name}: {component} cannot resolve names"
        outside = Endpoint("elsewhere", {"app": "x"}, ports=(("https", 443, "TCP"),))
        assert not allowed(policies, pod, outside, 443, "TCP", managed), f"{name}: {component} egress is open"


@pytest.mark.parametrize("component", ["encoder", "decoder", "trainer", "redis", "triton"])
def test_kubelet_probes_hit_ports_the_pods_listen_on(rendered, component):
    """gRPC probes use numbers (they cannot name ports), HTTP and TCP probes a number or a port name; either
    way each must be a declared container port. Exec probes (redis readiness) open no port."""
    checked = 0
    for objects in rendered.values():
        found = [w for w in workloads(objects) if w.labels.get("app.kubernetes.io/component") == component]
        if not found:
            assert component == "triton", f"no {component} pod"  # Triton is in the gpu overlay only
            continue
        container = found[0].pod_spec["containers"][0]
        for probe in PROBES:
            handler = container[probe]
            kinds = [k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in handler]
            assert len(kinds) == 1, f"{component} {probe}: {kinds}"
            if kinds[0] == "exec":
                continue
            port = handler[kinds[0]]["port"]
            if kinds[0] == "grpc":
                assert isinstance(port, int), f"{component} {probe}: gRPC probes take port numbers"
            assert container_port(container, port) is not None, f"{component} {probe}: port {port}"
            checked += 1
    assert checked
