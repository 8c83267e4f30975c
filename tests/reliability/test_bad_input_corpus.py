"""Every RPC of the three services refuses bad input with the right status code and a message naming the field,
and every service is still SERVING afterwards (the cases are in :mod:`tests.reliability.corpus`)."""

from __future__ import annotations

import pytest

from services._generated.sam.v1 import decoder_pb2, encoder_pb2, trainer_pb2
from tests.reliability.corpus import CASES
from tests.reliability.harness import SERVING, call, health

pytestmark = pytest.mark.integration


def test_the_corpus_covers_every_rpc_of_every_service():
    declared = {method.name for module in (encoder_pb2, decoder_pb2, trainer_pb2)
                for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
    assert declared == {case.rpc for case in CASES}
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_its_code_and_names_the_field(case, clients, owned, reliability_stack):
    request = case.request(owned) if callable(case.request) else case.request
    outcome = call(clients.method(case.rpc), request, metadata=case.metadata, timeout=60)
    assert outcome.code == case.code, (outcome.code, outcome.details)
    assert case.needle in outcome.details, outcome.details
    for name, address in reliability_stack.addresses.items():
        assert health(address) == SERVING, name
