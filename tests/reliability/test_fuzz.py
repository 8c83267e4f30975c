"""Property: whatever a client sends to Embed, Segment, SegmentEverything, CreateJob or UploadDataset, the status
is never INTERNAL or UNKNOWN and the service stays SERVING (strategies: :mod:`tests.reliability.strategies`).

Bounded for CI: :data:`EXAMPLES` requests per RPC, derandomized (the same requests every run). ``bench/fuzz.py``
runs the same strategies for thousands of requests.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.harness import SERVING, call, health
from tests.reliability.strategies import TARGETS

pytestmark = pytest.mark.integration
EXAMPLES = 40
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.mark.parametrize("rpc", list(TARGETS))
def test_no_request_gets_internal_or_unknown(rpc, clients, owned, reliability_stack):
    strategy, service = TARGETS[rpc]
    address = reliability_stack.addresses[service]
    method = clients.method(rpc)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=strategy)
    def check(request):
        outcome = call(method, request, timeout=60)
        assert outcome.code not in BROKEN, (outcome.code, outcome.details)
        assert health(address) == SERVING

    check()
