"""One stack for the reliability suite: encoder + decoder + trainer on the tiny model with bearer-token auth,
started once per session (``tests.integration.conftest.started``), plus the objects tenant ``acme`` owns that the
bad-input corpus and the isolation tests refer to (an embedding key, published adapters, a job, an upload)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.net import free_port
from tests.integration.conftest import ServiceProcess, started
from tests.reliability.harness import Clients, Owned, own_objects, prepare, stack_specs


@dataclass
class Stack:
    services: dict[str, ServiceProcess]
    root: Path

    @property
    def addresses(self) -> dict[str, str]:
        return {name: service.address for name, service in self.services.items()}


@pytest.fixture(scope="session")
def reliability_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    env = prepare(root)
    with started(stack_specs(root, env, free_port())) as services:
        yield Stack(services, root)


@pytest.fixture(scope="session")
def clients(reliability_stack):
    with Clients(reliability_stack.addresses) as connected:
        yield connected


@pytest.fixture(scope="session")
def owned(reliability_stack, clients, tiny_model, tmp_path_factory) -> Owned:
    return own_objects(reliability_stack.root, clients, tiny_model, tmp_path_factory.mktemp("owned"))
