"""kill -9 of each service under load (scenarios in :mod:`tests.reliability.faults`; recovery times are measured by
``bench/fault_recovery.py``). tests/integration/test_decoder_service.py already covers an encoder killed between
calls (cached keys keep serving, a new image is UNAVAILABLE in < 5 s, re-embed after restart) and
test_trainer_service.py a SIGTERM'd trainer resuming a job; here the kills land under concurrent calls and
mid-training, and the results after recovery are compared bit for bit."""

from __future__ import annotations

import grpc
import pytest

from services._generated.sam.v1 import trainer_pb2
from services.common.net import free_port
from tests.conftest import write_blob_dataset
from tests.integration.conftest import started
from tests.reliability.faults import SegmentLoad, kill_and_restart, masks_of, segment_request, train_through_a_kill
from tests.reliability.harness import AS_A, SERVING, Clients, health, prepare, stack_specs

pytestmark = [pytest.mark.integration, pytest.mark.slow]
UNAVAILABLE_WITHIN_S = 5.0  # an answer while the encoder is down, not a hang until the deadline


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = {**prepare(root), "SAMFORGE_DECODER_CACHE_BYTES": "0"}  # every Segment fetches from the encoder
    write_blob_dataset(root / "data" / "acme" / "blobs")
    specs = stack_specs(root, env, free_port())
    with started(specs) as services:
        yield services, specs


def _baseline(services):
    with Clients({name: s.address for name, s in services.items()}) as clients:
        reply = clients.decoder.Segment(segment_request(), metadata=AS_A, timeout=60)
    return segment_request(reply.embedding_key), reply


def test_encoder_killed_under_load_decoder_fails_fast_then_recovers_bit_identical(fault_stack):
    services, specs = fault_stack
    request, before = _baseline(services)
    with SegmentLoad(services["decoder"].address, request) as load:
        load.first_ok_after(0.0)
        times = kill_and_restart(services, "encoder", specs)
        after = load.first_ok_after(times["killed_at"])
    during = [t for t in load.outcomes if t.start > times["killed_at"] and t.end < after.start]
    assert {t.code for t in load.outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    failed = [t for t in during if t.code == grpc.StatusCode.UNAVAILABLE]
    assert failed and max(t.end - t.start for t in failed) < UNAVAILABLE_WITHIN_S
    assert after.masks == masks_of(before)
    assert all(t.masks == masks_of(before) for t in load.outcomes if t.code == grpc.StatusCode.OK)
    assert health(services["decoder"].address) == SERVING


def test_decoder_killed_under_load_comes_back_serving_the_same_masks(fault_stack):
    services, specs = fault_stack
    request, before = _baseline(services)
    with SegmentLoad(services["decoder"].address, request) as load:
        load.first_ok_after(0.0)
        times = kill_and_restart(services, "decoder", specs)
        after = load.first_ok_after(times["killed_at"])
    assert after.end - times["killed_at"] >= times["kill_to_serving_s"] - 1.0  # served by the new process
    assert {t.code for t in load.outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert all(t.masks == masks_of(before) for t in load.outcomes if t.code == grpc.StatusCode.OK)
    assert health(services["decoder"].address) == SERVING


def test_trainer_killed_mid_job_reattaches_its_worker_and_never_lists_a_partial_adapter(fault_stack):
    """The job runs in its own worker process: a SIGKILLed trainer leaves it running (re-attached) or, if it ended
    meanwhile, resumes it; either way one whole version is published (a killed worker resuming from a
    checkpoint: tests/integration/test_trainer_executor.py)."""
    services, specs = fault_stack
    result = train_through_a_kill(services, specs)
    final = result["final"]
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED and final.adapter_version == 1, final.error
    seen = result["registry_seen"]
    assert seen, "the poller never saw the published adapter"
    assert all(code == grpc.StatusCode.OK and sha == got and len(sha) == 64 for _, sha, code, got in seen), seen
    assert {version for version, *_ in seen} == {1}
