"""The encoder over real gRPC: one failing image fails alone across tenants; deadline-aware admission."""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from services._generated.sam.v1 import encoder_pb2
from tests.integration.conftest import health_status, running
from tests.integration.faulty_encoder import BAD_RESIZE_SIZE, POISON, POISON_SIZE
from tests.integration.test_encoder_service import encoder_env, noise_png, stub_for

pytestmark = pytest.mark.integration


def poison_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((*POISON_SIZE, 3), POISON, np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def faulty_service(tmp_path_factory):
    """tiny, batches of up to 4 gathered for up to 3 s: concurrent requests share one encoder call."""
    workdir = tmp_path_factory.mktemp("encoder-faulty")
    env = encoder_env(workdir, SAMFORGE_MAX_BATCH="4", SAMFORGE_MAX_WAIT_MS="3000")
    with running("encoder", env, workdir, module="tests.integration.faulty_encoder") as service:
        yield service


CASES = {  # B's image -> B's status and the start of its message
    "preprocessing fault": (lambda: noise_png(9, *BAD_RESIZE_SIZE), grpc.StatusCode.INVALID_ARGUMENT, "image:"),
    "encoder fault": (poison_png, grpc.StatusCode.INTERNAL, ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_tenants_failing_image_does_not_fail_another_tenants_batch(case, faulty_service):
    """Tenant a's 3 images and tenant b's failing one arrive together (one batch of 4 before): a's succeed."""
    make_bad, code, prefix = CASES[case]
    seed = 100 * len(case)
    requests = [encoder_pb2.EmbedRequest(image=noise_png(seed + i), tenant="a") for i in range(3)]
    requests.insert(1, encoder_pb2.EmbedRequest(image=make_bad(), tenant="b"))
    barrier = threading.Barrier(4)
    channel, stub = stub_for(faulty_service.address)

    def embed(request: encoder_pb2.EmbedRequest) -> grpc.StatusCode:
        barrier.wait()
        try:
            stub.Embed(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    with channel, ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(embed, requests))
    assert [c for c, _ in outcomes] == [grpc.StatusCode.OK, code, grpc.StatusCode.OK, grpc.StatusCode.OK], outcomes
    assert outcomes[1][1].startswith(prefix)
    assert health_status(faulty_service.address) == health_pb2.HealthCheckResponse.SERVING


def queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return float(re.search(r"^samforge_encoder_queue_depth (\S+)$", text, re.MULTILINE).group(1))


@pytest.mark.slow
def test_a_request_that_cannot_finish_before_its_deadline_is_refused_at_once(tmp_path):
    """LiteMedSAM, one image per encoder call: after one measured encode (t seconds), 3 images are held; a request
    with a 2t deadline (it would finish after ~4t) gets RESOURCE_EXHAUSTED with a retry hint at once, instead of
    waiting for DEADLINE_EXCEEDED."""
    env = encoder_env(tmp_path, "litemedsam", SAMFORGE_MAX_BATCH="1", SAMFORGE_MAX_WAIT_MS="0")
    with running("encoder", env, tmp_path) as service:
        channel, stub = stub_for(service.address)
        with channel, ThreadPoolExecutor(3) as pool:
            seconds = stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(50, 240, 320), tenant="a"),
                                 timeout=300).encode_ms / 1e3
            busy = [pool.submit(stub.Embed, encoder_pb2.EmbedRequest(image=noise_png(51 + i, 240, 320), tenant="a"),
                                timeout=300) for i in range(3)]
            deadline = time.monotonic() + 120
            while queue_depth(service.metrics_port) < 2:  # one being encoded, two waiting
                assert time.monotonic() < deadline, "the encoder never got busy"
                time.sleep(0.02)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(60, 240, 320), tenant="b"), timeout=2 * seconds)
            elapsed = time.monotonic() - start
            assert [f.result().embedding.key != "" for f in busy] == [True] * 3
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert elapsed < seconds, (elapsed, seconds)
    assert re.search(r"estimated wait .* exceeds the request deadline .*; retry after ~\d+ s", info.value.details())
