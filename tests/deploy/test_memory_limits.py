"""Each rendered encoder's memory limit covers its idle base plus the budget its settings allow
(:mod:`services.common.memory`; deploy/README.md, "Memory limits"): the pod is not OOM-killed inside its bounds."""

from __future__ import annotations

import pytest

from services.common.memory import encoder_settings_budget, transfer_bytes
from services.common.settings import EncoderSettings

from .k8s import DEPLOY, OVERLAYS, kustomize, quantity, samforge_containers
from .test_policy import settings_env

IDLE_BASE_BYTES = 1047 * 2**20
"""LiteMedSAM encoder's resident memory once SERVING (bench/results/encoder_rss-2026-12-06.md)."""
ENCODE_BYTES = 220_000_000
"""One LiteMedSAM image's in-process encoder working set, measured at start-up (deploy/README.md)."""
TRITON_ENCODE_BYTES = transfer_bytes(256, [(256, 64, 64)])
"""The triton backend's working set per image: LiteMedSAM's 256 px input and 256 x 64 x 64 features."""


@pytest.mark.parametrize("kustomization", ["base", *(f"overlays/{name}" for name in OVERLAYS)])
def test_encoder_memory_limit_covers_idle_base_plus_budget(kustomization):
    objects = kustomize(DEPLOY / kustomization)
    encoders = [(c, s) for _, c, s in samforge_containers(objects) if s == "encoder"]
    assert encoders, kustomization
    for container, service in encoders:
        settings = EncoderSettings.from_env(settings_env(objects, container, service))
        assert settings.model == "litemedsam", "the idle and encode figures above are LiteMedSAM's"
        in_process = settings.backend != "triton"
        budget = encoder_settings_budget(settings, encode_bytes_per_image=ENCODE_BYTES if in_process
                                         else TRITON_ENCODE_BYTES)
        limit = quantity(container["resources"]["limits"]["memory"])
        need = IDLE_BASE_BYTES + budget.total
        assert limit >= need, (f"{kustomization}: encoder memory limit {limit / 2**20:.0f} MiB < idle "
                               f"{IDLE_BASE_BYTES >> 20} MiB + budget {budget.describe()}")
