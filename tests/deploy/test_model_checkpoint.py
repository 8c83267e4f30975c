"""deploy/components/model-checkpoint: a SAM 2.1 checkpoint on a read-only claim at /models for the three
services, rendered on both overlays, validated strictly, started with the settings it sets, clean for checkov."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from services.common.settings import DecoderSettings, EncoderSettings, TrainerSettings, needs_checkpoint

from .k8s import K8S_VERSIONS, OVERLAYS, effective_env, mount_for, of_kind, samforge_containers
from .test_training import render_with

SETTINGS = {"encoder": EncoderSettings, "decoder": DecoderSettings, "trainer": TrainerSettings}
CLAIM = "samforge-models"


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_model_checkpoint_component(tmp_path, overlay_name):
    from .k8s import validation_errors

    objects = render_with(tmp_path, overlay_name, "model-checkpoint")
    for version in K8S_VERSIONS:
        assert validation_errors(objects, version) == [], version
    claim = [c for c in of_kind(objects, "PersistentVolumeClaim") if c["metadata"]["name"] == CLAIM]
    assert len(claim) == 1 and claim[0]["spec"]["accessModes"] == ["ReadOnlyMany"]
    seen = set()
    for workload, container, service in samforge_containers(objects):
        settings = SETTINGS[service].from_env(effective_env(objects, container))  # starts: the check passes
        assert settings.model.startswith("sam2.1_hiera_") and needs_checkpoint(settings.model), service
        path = PurePosixPath(settings.checkpoint)
        assert path.parent == PurePosixPath("/models"), service
        mount = mount_for(container, str(path))
        assert mount and mount["mountPath"] == "/models" and mount.get("readOnly") is True, service
        volume = workload.volume(mount["name"])["persistentVolumeClaim"]
        assert volume == {"claimName": CLAIM, "readOnly": True}, service
        seen.add(service)
    assert seen == set(SETTINGS)


def test_the_component_is_documented():
    from .k8s import DEPLOY

    text = (DEPLOY / "README.md").read_text()
    assert "## Model and checkpoint" in text and "components: [../../components/model-checkpoint]" in text
