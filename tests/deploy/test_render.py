"""The overlays render with kustomize and every object validates strictly against the Kubernetes API schemas."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from .k8s import DEPLOY, K8S_VERSIONS, OVERLAYS, kustomize, load_yaml_file, named, of_kind, validation_errors

_BASE = {
    "Namespace": {"samforge"},
    "Deployment": {"samforge-encoder", "samforge-decoder", "samforge-trainer", "samforge-redis"},
    "Service": {"samforge-encoder", "samforge-decoder", "samforge-trainer", "samforge-redis"},
    "PersistentVolumeClaim": {"samforge-registry", "samforge-data", "samforge-jobs"},
    "HorizontalPodAutoscaler": {"samforge-encoder", "samforge-decoder"},
    "PodDisruptionBudget": {"samforge-encoder", "samforge-decoder", "samforge-trainer", "samforge-redis"},
    "ConfigMap": {"samforge-settings"},  # generated: names carry a hash suffix, compared without it
    # the kubernetes executor's identities and the trainer's Role (deploy/base/training.yaml)
    "ServiceAccount": {"samforge-trainer", "samforge-training"},
    "Role": {"samforge-trainer-executor"},
    "RoleBinding": {"samforge-trainer-executor"},
}
# the gpu overlay adds Triton (deploy/triton): its Deployment, headless Service, budget and model config
_TRITON = {"Deployment": {"samforge-triton"}, "Service": {"samforge-triton"},
           "PodDisruptionBudget": {"samforge-triton"}, "ConfigMap": {"samforge-triton-model"}}
EXPECTED = {
    "cpu": _BASE,
    "gpu": {kind: names | _TRITON.get(kind, set()) for kind, names in _BASE.items()},
}
GENERATED = ("ConfigMap",)


def _names(objects, kind: str) -> set[str]:
    names = {o["metadata"]["name"] for o in of_kind(objects, kind)}
    if kind in GENERATED:
        assert all(re.fullmatch(r"[a-z0-9-]+-[a-z0-9]{10}", n) for n in names), f"{kind} without hash suffix: {names}"
        return {n.rsplit("-", 1)[0] for n in names}
    return names


def test_overlays_render_the_whole_stack(overlay):
    name, objects = overlay
    assert set(EXPECTED) == set(OVERLAYS)
    for kind, names in EXPECTED[name].items():
        assert _names(objects, kind) == names, (name, kind)
    assert len(of_kind(objects, "ConfigMap")) == len(EXPECTED[name]["ConfigMap"])
    assert of_kind(objects, "NetworkPolicy")
    assert not of_kind(objects, "Secret"), "secrets are referenced, never rendered from the repository"
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"samforge"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_validates_strictly(rendered, name, version):
    errors = validation_errors(rendered[name], version)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_base_alone_renders_and_validates(version):
    objects = kustomize(DEPLOY / "base")
    assert validation_errors(objects, version) == []


def test_the_validator_is_strict_and_knows_no_custom_kinds():
    """Guards the check above: unknown fields fail, and so does a kind without a schema (e.g. a CRD)."""
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert validation_errors([config_map], K8S_VERSIONS[-1]) == []
    assert validation_errors([{**config_map, "bogus": 1}], K8S_VERSIONS[-1])
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
             "spec": {"containers": [{"name": "c", "image": "i:1", "readinessProbe": {"grpc": {"port": "grpc"}}}]}}
    assert validation_errors([probe], K8S_VERSIONS[0]), "a gRPC probe port must be a number"
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}}
    assert any("no schema" in e for e in validation_errors([monitor], K8S_VERSIONS[-1]))


def _render_with_tls(tmp_path) -> list[dict]:
    """The gpu overlay plus components/tls, through a throwaway kustomization (paths must be relative)."""
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/overlays/gpu"], "components": [f"{rel}/components/tls"]}))
    return kustomize(tmp_path)


def test_tls_component(tmp_path):
    objects = _render_with_tls(tmp_path)
    (settings,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].startswith("samforge-settings-")]
    data = settings["data"]
    assert data["SAMFORGE_TLS_CERT"] == "/etc/samforge/tls/tls.crt"
    assert data["SAMFORGE_TLS_KEY"] == "/etc/samforge/tls/tls.key"
    for name in ("samforge-encoder", "samforge-decoder", "samforge-trainer"):
        spec = named(objects, "Deployment", name)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["mode"] == "TLS", (name, probe)
        tls = [v for v in spec["volumes"] if v["name"] == "tls"][0]["secret"]
        assert tls == {"secretName": "samforge-tls", "optional": False}
    # the probe's TLS mode exists from Kubernetes 1.37 on: valid there, rejected by the 1.33 schema
    assert validation_errors(objects, "1.37") == []
    assert any("mode" in e for e in validation_errors(objects, "1.33"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ddp_example_validates(version):
    objects = load_yaml_file(DEPLOY / "examples" / "ddp-training-job.yaml")
    assert {o["kind"] for o in objects} == {"Service", "Job"}
    assert validation_errors(objects, version) == []
