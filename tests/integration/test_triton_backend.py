"""The encoder service on a real Triton Inference Server (SAMFORGE_ENCODER_BACKEND=triton).

tritonserver comes from ``nvidia-pytriton`` in its own environment (``make triton-env`` builds
``.venv-triton``; ``make test`` passes its interpreter as ``SAMFORGE_TEST_TRITON_PYTHON``). It serves
samforge's exported LiteMedSAM encoder (``services/encoder/pytriton_encoder.py``) with dynamic batching.
A LiteMedSAM encoder + decoder pair runs against it; the reference is sam_core in this process (PyTorch).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.data.prompt_sim import box_from_mask
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.io.images import decode_image
from services._generated.sam.v1 import common_pb2, decoder_pb2, encoder_pb2
from services.common.embedding_codec import embedding_from_chunks
from services.common.net import free_port
from services.encoder.pytriton_encoder import MODEL_NAME, PyTritonServer
from tests.conftest import save_perturbed_adapter, synthetic_scene
from tests.integration.conftest import health_status
from tests.integration.test_decoder_service import (
    _env,
    box_prompts,
    png_bytes,
    rle_mask,
    started,
    stubs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
Code = grpc.StatusCode
SCENES = [synthetic_scene(seed=seed) for seed in (0, 3, 5)]


@pytest.fixture(scope="module")
def triton_python() -> str:
    python = os.environ.get("SAMFORGE_TEST_TRITON_PYTHON", "")
    if not python:
        pytest.skip("SAMFORGE_TEST_TRITON_PYTHON is not set: `make test` builds .venv-triton and sets it")
    if not os.access(python, os.X_OK):
        pytest.fail(f"SAMFORGE_TEST_TRITON_PYTHON={python} is not an executable (run `make triton-env`)")
    return python


@pytest.fixture(scope="module")
def triton(triton_python, litemedsam_encoder_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    onnx_path = litemedsam_encoder_onnx
    # 100 ms queue delay: on 2 shared cores the encoder replicas' requests arrive spread out
    server = PyTritonServer(triton_python, onnx_path, root, max_batch=8, max_queue_delay_us=100_000, threads=1)
    with server:
        yield server


@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory):
    """A LiteMedSAM encoder on the triton backend (no batching of its own, 8 batches in flight) + decoder."""
    root = tmp_path_factory.mktemp("triton-stack")
    registry, onnx = root / "registry", root / "onnx"
    port = free_port()
    encoder_env = _env(registry, onnx, "litemedsam", SAMFORGE_ENCODER_BACKEND="triton", SAMFORGE_TRITON_URL=triton.url,
                       SAMFORGE_MAX_BATCH="1", SAMFORGE_ENCODER_CONCURRENCY="8", SAMFORGE_TRITON_TIMEOUT_SECONDS="60",
                       SAMFORGE_TRITON_RETRIES="3")
    decoder_env = _env(registry, onnx, "litemedsam", SAMFORGE_ENCODER_ADDRESS=f"127.0.0.1:{port}",
                       SAMFORGE_ENCODER_TIMEOUT_SECONDS="120")
    with started({"encoder": ("encoder", encoder_env, root, port), "decoder": ("decoder", decoder_env, root, None)}) \
            as services:
        services["registry"] = registry
        yield services


@pytest.fixture(scope="module")
def reference(litemedsam_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Predictor(litemedsam_model)
    finally:
        torch.set_num_threads(threads)


def triton_counts(server: PyTritonServer) -> tuple[int, int]:
    """(inference_count, execution_count) of the model, from Triton's statistics API."""
    client = triton_grpc.InferenceServerClient(server.url)
    try:
        (stats,) = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"]
    finally:
        client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def embed(stub, image: bytes, timeout: float = 120) -> encoder_pb2.EmbedResponse:
    return stub.Embed(encoder_pb2.EmbedRequest(image=image, tenant="t"), timeout=timeout)


def noise_image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ tests


def test_embeddings_and_masks_equal_the_in_process_backend(stack, reference):
    """3 scenes through decoder -> encoder -> Triton: the embeddings (GetEmbedding) and the served masks
    equal sam_core's PyTorch encode + decode (ONNX Runtime vs PyTorch float32: ~1e-6 in the embedding)."""
    worst = 0.0
    with stubs(stack["decoder"], stack["encoder"]) as (decoder, encoder):
        for image, truth in SCENES:
            image_bytes = png_bytes(image)
            reply = embed(encoder, image_bytes)
            assert not reply.cached and reply.encode_ms > 0
            served = embedding_from_chunks(list(encoder.GetEmbedding(
                encoder_pb2.GetEmbeddingRequest(key=reply.embedding.key, tenant="t"), timeout=60)))
            local = reference.encode_one(decode_image(image_bytes))
            assert served.model_id == local.model_id and served.input_size == local.input_size
            difference = (served.image_embedding - local.image_embedding).abs().max().item()
            worst = max(worst, difference)
            assert difference < 1e-4, difference
            boxes = np.array([box_from_mask(m) for m in truth]).astype(np.float32).astype(np.float64)
            segment = decoder.Segment(decoder_pb2.SegmentRequest(
                embedding_key=reply.embedding.key, tenant="t", prompts=box_prompts(boxes),
                encoding=decoder_pb2.MASK_ENCODING_RLE), timeout=120)
            expected = reference.decode(local, [Prompt(box=b) for b in boxes])
            for result, mask, iou in zip(segment.results, expected.masks, expected.iou_scores, strict=True):
                served_mask = rle_mask(result.masks[0], image.shape[:2])
                differing = int((served_mask != mask[0]).sum())
                assert differing <= max(2, mask[0].sum() // 1000), differing  # float32 ties at the threshold
                assert abs(result.masks[0].iou_score - iou[0]) < 1e-3
    print(f"\nTriton vs in-process PyTorch: embedding max |diff| {worst:.2g} over {len(SCENES)} images")


def test_triton_batches_concurrent_requests_dynamically(stack, triton):
    """8 concurrent Embeds of different images: the encoder service sends one image per call (its own batch
    size is 1) with 8 calls in flight, and Triton's dynamic batcher executes them in fewer, larger batches."""
    images = [noise_image(100 + i) for i in range(8)]
    inferences, executions = triton_counts(triton)
    seen = len(triton.batch_sizes())
    barrier = threading.Barrier(len(images))
    with stubs(stack["decoder"], stack["encoder"]) as (_, encoder):
        def call(image: bytes) -> encoder_pb2.EmbedResponse:
            barrier.wait()
            return embed(encoder, image)

        with ThreadPoolExecutor(len(images)) as pool:
            replies = list(pool.map(call, images))
    assert all(not r.cached for r in replies) and len({r.embedding.key for r in replies}) == len(images)
    after_inferences, after_executions = triton_counts(triton)
    batches = triton.batch_sizes()[seen:]
    assert after_inferences - inferences == len(images) == sum(batches)
    assert after_executions - executions == len(batches) < len(images), batches
    assert max(batches) > 1, batches
    print(f"\nTriton executed 8 concurrent requests as batches {batches}")


def test_encoder_side_adapters_are_refused_and_decoder_adapters_work(stack, litemedsam_model, tmp_path):
    store = FileSystemAdapterStore(stack["registry"])
    store.publish("t", "lora", save_perturbed_adapter(litemedsam_model, "lora", tmp_path / "lora", seed=1))
    store.publish("t", "dec", save_perturbed_adapter(litemedsam_model, "decoder", tmp_path / "dec", seed=2))
    image = png_bytes(SCENES[0][0])
    with stubs(stack["decoder"], stack["encoder"]) as (decoder, encoder):
        with pytest.raises(grpc.RpcError) as info:
            encoder.Embed(encoder_pb2.EmbedRequest(image=image, tenant="t", adapter=common_pb2.AdapterRef(ref="lora")),
                          timeout=60)
        assert info.value.code() == Code.FAILED_PRECONDITION
        assert "adapter" in info.value.details() and "triton" in info.value.details()
        request = decoder_pb2.SegmentRequest(image=image, tenant="t", adapter=common_pb2.AdapterRef(ref="dec"),
                                             prompts=box_prompts(np.array([[40.0, 40.0, 140.0, 120.0]])))
        deadline = time.monotonic() + 30  # the decoder's registry watch picks the new adapter up
        while True:
            try:
                reply = decoder.Segment(request, timeout=120)
                break
            except grpc.RpcError as exc:
                if exc.code() != Code.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert len(reply.results) == 1 and reply.adapter == "dec:1"


def test_killing_tritonserver_mid_load_gives_unavailable_promptly_then_recovers(stack, triton):
    """SIGKILL tritonserver while 4 encodes are in flight: every call ends UNAVAILABLE within seconds (no
    hang until the 60 s deadline), the encoder stays SERVING, and once Triton is back encodes succeed again."""
    encoder_address = stack["encoder"].address
    seen = len(triton.batch_sizes())
    with stubs(stack["decoder"], stack["encoder"]) as (_, encoder):
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(embed, encoder, noise_image(200 + i), 60) for i in range(4)]
            deadline = time.monotonic() + 60
            while len(triton.batch_sizes()) == seen:  # Triton has started executing this load
                assert time.monotonic() < deadline, "Triton never received the load"
                time.sleep(0.02)
            killed_at = time.monotonic()
            triton.kill()
            outcomes = []
            for future in futures:
                try:
                    future.result()
                    outcomes.append(Code.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())
            in_flight_s = time.monotonic() - killed_at
        assert Code.UNAVAILABLE in outcomes and set(outcomes) <= {Code.OK, Code.UNAVAILABLE}, outcomes
        assert in_flight_s < 15, in_flight_s
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            embed(encoder, noise_image(300), 60)
        assert info.value.code() == Code.UNAVAILABLE and "Triton" in info.value.details()
        assert time.monotonic() - start < 5
        assert health_status(encoder_address) == health_pb2.HealthCheckResponse.SERVING

        triton.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = embed(encoder, noise_image(300), 60)
                break
            except grpc.RpcError as exc:
                assert exc.code() == Code.UNAVAILABLE and time.monotonic() < deadline, exc
                time.sleep(0.2)
        assert not reply.cached and list(reply.embedding.feature_shape) == [1, 256, 64, 64]
        recovered_s = time.monotonic() - start
    print(f"\nkill -9 tritonserver: in-flight calls ended in {in_flight_s:.1f} s ({outcomes}); "
          f"served again {recovered_s:.1f} s after the outage began to be probed")
