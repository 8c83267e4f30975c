"""The decoder service as a real process next to a real encoder process on loopback.

Three encoder + decoder pairs start once for the module, all at the same time (imports dominate start-up):
LiteMedSAM (masks compared with sam_core's decode), tiny (API behaviour: adapters, bad inputs, encoder outage)
and tiny with bearer-token auth. The decoders run the default runtime (PyTorch, re-associated decoder).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.data.prompt_sim import box_from_mask
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.io.images import decode_image
from sam_core.io.masks import decode_png, decode_rle, polygons_to_mask
from sam_core.modeling.registry import build_tiny
from services._generated.sam.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from services.common.embedding_codec import embedding_from_chunks
from services.common.net import free_port
from services.common.settings import DecoderSettings
from services.decoder.engine import memory_budget
from tests.conftest import noise_png, png_bytes, save_perturbed_adapter, synthetic_scene
from tests.integration.conftest import ServiceProcess, health_status, start_service, started
from tests.sam_core.test_parity import LOGIT_TOL, SCORE_TOL, assert_masks_match

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
ORT_LOGIT_RTOL = 5e-6  # tests/sam_core/test_onnx_decoder.py: LiteMedSAM logits reach |50|, ~20 float32 ulps
Code = grpc.StatusCode


SCENE, TRUTH = synthetic_scene()
SCENE_PNG = png_bytes(SCENE)
OTHER_SCENE_PNG = png_bytes(synthetic_scene(seed=7)[0])
H, W = SCENE.shape[:2]


def scene_boxes(n: int, seed: int = 0) -> np.ndarray:
    """The ellipses' boxes first, then random boxes inside the scene: n x 4 (x0, y0, x1, y1).

    Rounded to float32, the precision of ``sam.v1.Box``, so local references decode exactly the served prompts.
    """
    boxes = [box_from_mask(m).astype(np.float64) for m in TRUTH]
    rng = np.random.default_rng(seed)
    while len(boxes) < n:
        x0, y0 = rng.uniform(0, 0.8 * W), rng.uniform(0, 0.8 * H)
        boxes.append(np.array([x0, y0, min(W, x0 + rng.uniform(8, 0.4 * W)), min(H, y0 + rng.uniform(8, 0.4 * H))]))
    return np.array(boxes[:n]).astype(np.float32).astype(np.float64)


def box_prompts(boxes: np.ndarray) -> list[decoder_pb2.Prompt]:
    return [decoder_pb2.Prompt(box=decoder_pb2.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])) for b in boxes]


def rle_mask(mask: decoder_pb2.Mask, size) -> np.ndarray:
    return decode_rle({"size": list(size), "counts": mask.rle_counts})


def low_res(result: decoder_pb2.PromptResult) -> np.ndarray:
    t = result.low_res_logits
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


# ------------------------------------------------------------------------------------------ servers


def _env(registry: Path, onnx: Path, model: str, **extra: str) -> dict[str, str]:
    return {"SAMFORGE_MODEL": model, "SAMFORGE_REGISTRY_DIR": str(registry), "SAMFORGE_ONNX_CACHE_DIR": str(onnx),
            "SAMFORGE_GRACE_SECONDS": "5", "SAMFORGE_LOG_LEVEL": "INFO", **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder-stack")
    registry, onnx = root / "registry", root / "onnx"
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"token-a": "a", "token-b": "b"}))
    auth = {"SAMFORGE_AUTH_TOKENS_FILE": str(tokens)}
    ports = {pair: free_port() for pair in ("lite", "tiny", "auth")}
    specs = {}
    for pair, model, extra in (("lite", "litemedsam", {}), ("tiny", "tiny", {}), ("auth", "tiny", auth)):
        specs[f"{pair}-encoder"] = ("encoder", _env(registry, onnx, model, **extra), root / pair, ports[pair])
        decoder_env = _env(registry, onnx, model, SAMFORGE_ENCODER_ADDRESS=f"127.0.0.1:{ports[pair]}",
                           SAMFORGE_ENCODER_TIMEOUT_SECONDS="20", **extra)
        specs[f"{pair}-decoder"] = ("decoder", decoder_env, root / pair, None)
    with started(specs) as services:
        services["registry"] = registry  # the store the tests publish into (shared by every service)
        services["root"] = root
        yield services


@contextmanager
def stubs(decoder: ServiceProcess, encoder: ServiceProcess | None = None):
    options = [("grpc.max_receive_message_length", 64 << 20)]  # 64 prompts' low-res logits: 16 MB
    channels = [grpc.insecure_channel(decoder.address, options=options)]
    if encoder is not None:
        channels.append(grpc.insecure_channel(encoder.address))
    try:
        dec = decoder_pb2_grpc.DecoderServiceStub(channels[0])
        yield (dec, encoder_pb2_grpc.EncoderServiceStub(channels[1])) if encoder is not None else dec
    finally:
        for channel in channels:
            channel.close()


def failure(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60, **kwargs)
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def lite_reference(litemedsam_model):
    """sam_core's own encode of the scene on one thread (the encoder runs with SAMFORGE_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = Predictor(litemedsam_model)
        yield predictor, predictor.encode_one(decode_image(SCENE_PNG))
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------- LiteMedSAM: real masks


def test_segment_masks_equal_sam_core_decode_for_1_16_and_64_boxes(stack, lite_reference):
    predictor, embedding = lite_reference
    with stubs(stack["lite-decoder"], stack["lite-encoder"]) as (decoder, encoder):
        embedded = encoder.Embed(encoder_pb2.EmbedRequest(image=SCENE_PNG, tenant="a"), timeout=120)
        again = encoder.Embed(encoder_pb2.EmbedRequest(image=SCENE_PNG, tenant="a"), timeout=60)
        assert not embedded.cached and again.cached and again.embedding.key == embedded.embedding.key
        key = embedded.embedding.key
        replies, latency = {}, {}
        for n in (1, 16, 64):
            request = decoder_pb2.SegmentRequest(embedding_key=key, tenant="a", prompts=box_prompts(scene_boxes(n)),
                                                 return_low_res_logits=True)
            if n == 1:
                decoder.Segment(request, timeout=120)  # the first call fetches the embedding and warms ORT up
            start = time.perf_counter()
            replies[n] = decoder.Segment(request, timeout=120)
            latency[n] = (1e3 * (time.perf_counter() - start), replies[n].decode_ms)
        image_only = decoder.Segment(decoder_pb2.SegmentRequest(image=SCENE_PNG, tenant="a",
                                                                prompts=box_prompts(scene_boxes(3))), timeout=120)
        chunks = encoder.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=key, tenant="a"), timeout=60)
        served = embedding_from_chunks(chunks)  # what the decoder decoded against
    feature_difference = (served.image_embedding - embedding.image_embedding).abs().max().item()
    assert feature_difference <= 1e-5, feature_difference
    for n in (1, 64):
        reply = replies[n]
        assert list(reply.image_size) == [H, W] and reply.embedding_key == key and not reply.re_embedded
        assert reply.model_id == predictor.model_id and reply.adapter == "" and len(reply.results) == n
        prompts = [Prompt.from_box(b) for b in scene_boxes(n)]
        reference = predictor.decode(embedding, prompts)  # sam_core end to end on the same image
        same_embedding = reference if feature_difference == 0 else predictor.decode(served, prompts)
        # ORT in the service vs PyTorch here on identical features: the ORT tolerance
        served_low = np.stack([low_res(r) for r in reply.results])
        np.testing.assert_allclose(served_low, same_embedding.low_res_logits, atol=LOGIT_TOL, rtol=ORT_LOGIT_RTOL)
        np.testing.assert_allclose([[m.iou_score for m in r.masks] for r in reply.results],
                                   same_embedding.iou_scores, atol=SCORE_TOL)
        masks = np.array([[rle_mask(m, reply.image_size) for m in r.masks] for r in reply.results])
        logits = predictor.upscale(torch.from_numpy(reference.low_res_logits), embedding).numpy()
        assert_masks_match(masks, reference.masks, logits)
        np.testing.assert_allclose([[m.iou_score for m in r.masks] for r in reply.results], reference.iou_scores,
                                   atol=SCORE_TOL)
        assert [m.area for r in reply.results for m in r.masks] == masks.sum(axis=(2, 3)).ravel().tolist()
    for i, truth in enumerate(TRUTH):  # the real model finds the synthetic ellipses from their boxes
        mask = rle_mask(replies[64].results[i].masks[0], (H, W))
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.8
    assert image_only.embedding_key == key and not image_only.re_embedded
    assert [r.masks[0].rle_counts for r in image_only.results] == \
           [r.masks[0].rle_counts for r in replies[64].results[:3]]
    print("\nLiteMedSAM Segment (ORT) client ms / decode_ms: " +
          ", ".join(f"{n} boxes {c:.0f} / {d:.0f}" for n, (c, d) in latency.items()) +
          f"; served vs encode_one features max |diff| {feature_difference:g}")


def test_png_polygon_and_none_encodings_describe_the_same_masks(stack):
    with stubs(stack["lite-decoder"]) as decoder:
        base = decoder_pb2.SegmentRequest(image=SCENE_PNG, tenant="a", prompts=box_prompts(scene_boxes(3)),
                                          multimask=True)
        replies = {}
        for name, encoding in (("rle", decoder_pb2.MASK_ENCODING_UNSPECIFIED), ("png", decoder_pb2.MASK_ENCODING_PNG),
                               ("polygons", decoder_pb2.MASK_ENCODING_POLYGONS),
                               ("none", decoder_pb2.MASK_ENCODING_NONE)):
            request = decoder_pb2.SegmentRequest()
            request.CopyFrom(base)
            request.encoding = encoding
            replies[name] = decoder.Segment(request, timeout=120)
    for i in range(3):
        assert len(replies["rle"].results[i].masks) == 3
        for j in range(3):
            rle, png = replies["rle"].results[i].masks[j], replies["png"].results[i].masks[j]
            polygons, none = replies["polygons"].results[i].masks[j], replies["none"].results[i].masks[j]
            mask = rle_mask(rle, (H, W))
            assert np.array_equal(decode_png(png.png), mask)
            filled = polygons_to_mask([list(p.xy) for p in polygons.polygons], H, W)
            assert (filled & mask).sum() / max(1, (filled | mask).sum()) > 0.9
            assert not none.rle_counts and not none.png and not none.polygons
            assert none.area == rle.area == png.area == mask.sum() and list(none.bbox) == list(rle.bbox)


def test_segment_everything_on_the_synthetic_scene(stack):
    """Every kept mask passes the filters, masks come best first and do not duplicate each other.

    LiteMedSAM was trained with box prompts only: its single-point masks have stability 0 (no logit above +1)
    and predicted IoU ~0.17 on this scene, so SAM's point-grid generator keeps none of them; the filters, NMS,
    sorting and limits are covered with crafted logits in tests/services/test_decoder_engine.py.
    """
    with stubs(stack["lite-decoder"]) as decoder:
        request = decoder_pb2.SegmentEverythingRequest(image=SCENE_PNG, tenant="a", points_per_side=4)
        reply = decoder.SegmentEverything(request, timeout=180)
    assert list(reply.image_size) == [H, W] and len(reply.embedding_key) == 64
    scores = [m.iou_score for m in reply.masks]
    assert scores == sorted(scores, reverse=True) and len(scores) <= 100
    masks = [rle_mask(m, (H, W)) for m in reply.masks]
    for m, mask in zip(reply.masks, masks, strict=True):
        assert m.iou_score > 0.7 and m.stability_score >= 0.85 and m.area == mask.sum() > 0
    for a in range(len(masks)):  # non-overlapping-ish: box NMS at 0.7 leaves no near-duplicates
        for b in range(a):
            assert (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum() < 0.8
    print(f"\nLiteMedSAM SegmentEverything 4x4 points: {len(masks)} masks, decode {reply.decode_ms:.0f} ms")


# ------------------------------------------------------------------------------------ tiny: adapters


def publish(store: FileSystemAdapterStore, model, tenant: str, name: str, method: str, seed: int, folder: Path):
    """A perturbed artifact of ``method`` on the tiny model, published as the next version of ``name``."""
    return store.publish(tenant, name, save_perturbed_adapter(model, method, folder, seed=seed, name=name))


def segment_tiny(decoder, adapter: str = "", **fields) -> decoder_pb2.SegmentResponse:
    request = decoder_pb2.SegmentRequest(image=SCENE_PNG, tenant="a", prompts=box_prompts(scene_boxes(4)),
                                         adapter=common_pb2.AdapterRef(ref=adapter), return_low_res_logits=True,
                                         **fields)
    return decoder.Segment(request, timeout=60)


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.1)  # poll interval, not a wait for a fixed duration


def test_decoder_only_adapter_versions_aliases_and_a_corrupt_version(stack, tiny_model, tmp_path):
    store = FileSystemAdapterStore(stack["registry"])
    publish(store, tiny_model, "a", "ships", "decoder", 1, tmp_path / "v1")
    with stubs(stack["tiny-decoder"]) as decoder:
        base = segment_tiny(decoder)
        tuned = segment_tiny(decoder, "ships")
        assert tuned.adapter == "ships:1" and base.adapter == ""
        assert tuned.embedding_key == base.embedding_key  # decoder-only: the base embeddings
        difference = max(np.abs(low_res(a) - low_res(b)).max() for a, b in zip(tuned.results, base.results,
                                                                                 strict=True))
        assert difference > 1e-2
        assert [m.iou_score for r in tuned.results for m in r.masks] != \
               [m.iou_score for r in base.results for m in r.masks]
        again = segment_tiny(decoder)  # the base is still served to requests without the adapter
        assert all(np.array_equal(low_res(a), low_res(b)) for a, b in zip(again.results, base.results, strict=True))

        store.promote("a", "ships", "prod", 1)
        prod = wait_until(lambda: _served(decoder, "ships@prod"), what="ships@prod served")
        assert prod.adapter == "ships:1"
        publish(store, tiny_model, "a", "ships", "decoder", 2, tmp_path / "v2")
        store.promote("a", "ships", "prod", 2)
        moved = wait_until(lambda: (r := _served(decoder, "ships@prod")) is not None and r.adapter == "ships:2" and r,
                           what="ships@prod -> ships:2 without restart")
        assert not np.array_equal(low_res(moved.results[0]), low_res(prod.results[0]))

        v3 = publish(store, tiny_model, "a", "ships", "decoder", 3, tmp_path / "v3")
        weights = v3.path / "adapter_model.safetensors"
        weights.chmod(0o644)
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # changed on disk after publishing
        code, details = failure(decoder.Segment, decoder_pb2.SegmentRequest(
            image=SCENE_PNG, tenant="a", prompts=box_prompts(scene_boxes(1)),
            adapter=common_pb2.AdapterRef(ref="ships:3")))
        assert code == Code.FAILED_PRECONDITION and details.startswith("adapter:"), details
        assert segment_tiny(decoder, "ships:2").adapter == "ships:2"  # the previous version keeps serving
        assert segment_tiny(decoder, "ships@prod").adapter == "ships:2"
    assert health_status(stack["tiny-decoder"].address) == SERVING


def _served(decoder, ref: str) -> decoder_pb2.SegmentResponse | None:
    try:
        return segment_tiny(decoder, ref)
    except grpc.RpcError as exc:
        if exc.code() != Code.NOT_FOUND:
            raise
        return None


def test_encoder_side_adapter_gets_its_own_embeddings_end_to_end(stack, tiny_model, tmp_path):
    store = FileSystemAdapterStore(stack["registry"])
    publish(store, tiny_model, "a", "lora-ships", "lora", 4, tmp_path / "lora")
    with stubs(stack["tiny-decoder"]) as decoder:
        base = segment_tiny(decoder)
        tuned = wait_until(lambda: _served(decoder, "lora-ships"), what="lora-ships served")
        assert tuned.adapter == "lora-ships:1" and tuned.embedding_key != base.embedding_key
        by_key = decoder.Segment(decoder_pb2.SegmentRequest(
            embedding_key=tuned.embedding_key, tenant="a", prompts=box_prompts(scene_boxes(4)),
            adapter=common_pb2.AdapterRef(ref="lora-ships:1"), return_low_res_logits=True), timeout=60)
        assert np.array_equal(low_res(by_key.results[0]), low_res(tuned.results[0]))
        code, details = failure(decoder.Segment, decoder_pb2.SegmentRequest(  # base embeddings, LoRA decoder
            embedding_key=base.embedding_key, tenant="a", prompts=box_prompts(scene_boxes(1)),
            adapter=common_pb2.AdapterRef(ref="lora-ships")))
        assert code == Code.INVALID_ARGUMENT and details.startswith("embedding:")


# -------------------------------------------------------------------------------- tiny: bad inputs


def _nan_box() -> decoder_pb2.Prompt:
    return decoder_pb2.Prompt(box=decoder_pb2.Box(x0=1, y0=float("nan"), x1=20, y1=20))


BAD_REQUESTS = {
    "corrupt image": (dict(image=b"\x89PNG\r\n\x1a\nnot really"), Code.INVALID_ARGUMENT, "image:"),
    "NaN coordinates": (dict(image=SCENE_PNG, prompts=[*box_prompts(scene_boxes(2)), _nan_box()]),
                        Code.INVALID_ARGUMENT, "prompts[2].box:"),
    "10,000 prompts": (dict(image=SCENE_PNG, prompts=box_prompts(scene_boxes(1)) * 10_000), Code.INVALID_ARGUMENT,
                       "prompts:"),
    "unknown key, no image": (dict(embedding_key="0" * 64), Code.NOT_FOUND, "embedding_key:"),
    "unknown adapter": (dict(image=SCENE_PNG, adapter=common_pb2.AdapterRef(ref="nope@prod")), Code.NOT_FOUND,
                        "adapter:"),
    "path-traversal adapter": (dict(image=SCENE_PNG, adapter=common_pb2.AdapterRef(ref="../../etc/passwd")),
                               Code.INVALID_ARGUMENT, "adapter:"),
    "bad tenant": (dict(image=SCENE_PNG, tenant="../x"), Code.INVALID_ARGUMENT, "tenant:"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_cleanly_and_the_decoder_keeps_serving(case, stack):
    fields, expected, prefix = BAD_REQUESTS[case]
    request = {"tenant": "a", "prompts": box_prompts(scene_boxes(1)), **fields}
    with stubs(stack["tiny-decoder"]) as decoder:
        start = time.perf_counter()
        code, details = failure(decoder.Segment, decoder_pb2.SegmentRequest(**request))
        elapsed = time.perf_counter() - start
    assert code == expected, details
    assert details.startswith(prefix), details
    if case == "unknown key, no image":
        assert "send the image" in details
    if case == "10,000 prompts":
        assert elapsed < 10, elapsed  # rejected by its length, before any prompt is converted or decoded
    assert health_status(stack["tiny-decoder"].address) == SERVING


def test_metrics_endpoint_exports_prompt_counts_and_the_decoder_cache(stack):
    with stubs(stack["tiny-decoder"]) as decoder:
        segment_tiny(decoder)
        segment_tiny(decoder)
    url = f"http://127.0.0.1:{stack['tiny-decoder'].metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for series in ('samforge_rpc_latency_seconds_count{method="/sam.v1.DecoderService/Segment"}',
                   "samforge_decoder_prompts_per_call_count", 'samforge_cache_hits_total{cache="decoder"}',
                   'samforge_cache_bytes{cache="decoder"}', "samforge_loaded_adapters"):
        assert series in text, series
    budget = memory_budget(DecoderSettings.from_env({"SAMFORGE_MODEL": "tiny"}), build_tiny().spec.low_res_size)
    exported = float(re.search(r"^samforge_memory_budget_bytes (\S+)$", text, re.MULTILINE).group(1))
    assert exported == budget.total, budget.describe()


# ------------------------------------------------------------------------------------- tiny: auth


def test_auth_works_end_to_end_and_scopes_tenants(stack):
    decoder_service = stack["auth-decoder"]
    as_a, as_b = (("authorization", "Bearer token-a"),), (("authorization", "Bearer token-b"),)
    request = decoder_pb2.SegmentRequest(image=SCENE_PNG, prompts=box_prompts(scene_boxes(2)))
    with stubs(decoder_service) as decoder:
        assert failure(decoder.Segment, request)[0] == Code.UNAUTHENTICATED
        assert failure(decoder.Segment, request, metadata=(("authorization", "Bearer wrong"),))[0] == \
            Code.UNAUTHENTICATED
        other = decoder_pb2.SegmentRequest(image=SCENE_PNG, tenant="b", prompts=box_prompts(scene_boxes(2)))
        assert failure(decoder.Segment, other, metadata=as_a)[0] == Code.PERMISSION_DENIED
        reply = decoder.Segment(request, metadata=as_a, timeout=60)  # the encoder checks the forwarded token too
        assert len(reply.results) == 2 and len(reply.embedding_key) == 64
        by_key = decoder_pb2.SegmentRequest(embedding_key=reply.embedding_key, prompts=box_prompts(scene_boxes(2)))
        assert decoder.Segment(by_key, metadata=as_a, timeout=60).embedding_key == reply.embedding_key
        code, _ = failure(decoder.Segment, by_key, metadata=as_b)  # tenant b cannot use tenant a's key
        assert code == Code.NOT_FOUND
    assert health_status(decoder_service.address) == SERVING


# ------------------------------------------------------------------------- tiny: encoder outage (last)


def test_encoder_outage_keeps_cached_keys_fails_fast_and_recovers(stack):
    encoder_service = stack["tiny-encoder"]
    with stubs(stack["tiny-decoder"], encoder_service) as (decoder, encoder):
        cached = segment_tiny(decoder)  # this key is in the decoder's LRU from now on
        lost = encoder.Embed(encoder_pb2.EmbedRequest(image=OTHER_SCENE_PNG, tenant="a"), timeout=60).embedding.key
        encoder_service.kill()
        by_key = decoder.Segment(decoder_pb2.SegmentRequest(embedding_key=cached.embedding_key, tenant="a",
                                                            prompts=box_prompts(scene_boxes(4))), timeout=60)
        assert [r.masks[0].rle_counts for r in by_key.results] == [r.masks[0].rle_counts for r in cached.results]
        start = time.perf_counter()
        code, details = failure(decoder.Segment, decoder_pb2.SegmentRequest(
            image=noise_png(8), tenant="a", prompts=box_prompts(scene_boxes(1))))
        elapsed = time.perf_counter() - start
        assert code == Code.UNAVAILABLE and elapsed < 5, (code, details, elapsed)
        assert health_status(stack["tiny-decoder"].address) == SERVING

        port = int(encoder_service.address.rsplit(":", 1)[1])
        env = _env(stack["registry"], stack["root"] / "onnx", "tiny")
        stack["tiny-encoder"] = start_service("encoder", env, stack["root"] / "tiny", port=port)  # same port
        lost_request = decoder_pb2.SegmentRequest(embedding_key=lost, image=OTHER_SCENE_PNG, tenant="a",
                                                  prompts=box_prompts(scene_boxes(1)))

        def recovered():
            try:
                return decoder.Segment(lost_request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == Code.UNAVAILABLE, exc.details()
                return None

        reply = wait_until(recovered, timeout=30, what="recovery after the encoder restart")
        assert reply.re_embedded and reply.embedding_key == lost  # the new encoder did not know the key
        code, details = failure(decoder.Segment, decoder_pb2.SegmentRequest(
            embedding_key="f" * 64, tenant="a", prompts=box_prompts(scene_boxes(1))))
        assert code == Code.NOT_FOUND and "send the image" in details


def test_sigterm_drains_and_exits_zero(stack):
    service = stack["auth-decoder"]
    start = time.monotonic()
    service.proc.terminate()
    code = service.proc.wait(timeout=5 + 10)
    elapsed = time.monotonic() - start
    assert code == 0 and elapsed < 5, (code, elapsed, service.log()[-2000:])
    assert "stopped after" in service.log()
