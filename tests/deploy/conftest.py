"""Rendered overlays, shared by the deploy tests (each overlay is rendered once per session)."""

from __future__ import annotations

import pytest

from .k8s import DEPLOY, OVERLAYS, kustomize


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request, rendered) -> tuple[str, list[dict]]:
    return request.param, rendered[request.param]
