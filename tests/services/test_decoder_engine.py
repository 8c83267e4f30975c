"""DecoderEngine in-process with the tiny model (no gRPC): runtimes, conversions, caching rules, adapters.

The encoder side is :class:`~tests.services.fakes.FakeEncoder`, an in-process
:class:`~services.decoder.embeddings.EmbeddingSource` that encodes with sam_core's Predictor; it exists only
to test the decoder's caching / re-embed rules here.
The integration tests (tests/integration/test_decoder_service.py) run against a real encoder process.
"""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.errors import (
    AdapterInvalid,
    InvalidInput,
    InvalidMaskInput,
    InvalidPrompt,
    NotFound,
    TooManyPrompts,
    Unavailable,
)
from sam_core.inference.automatic import EverythingOptions, generate
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.types import Embedding
from sam_core.io.masks import decode_png, decode_rle, polygons_to_mask
from services._generated.sam.v1 import common_pb2, decoder_pb2
from services.common import adapter_models, compute
from services.common.settings import DecoderSettings
from services.common.status import Cancelled, PermissionDenied
from services.common.tiling import TilingRequest
from services.decoder import codec
from services.decoder import engine as engine_module
from services.decoder.embeddings import CallOptions
from services.decoder.encoder_client import EncoderClient, channel_target
from services.decoder.engine import DecoderEngine
from services.decoder.masks import describe
from services.decoder.runtime import select_runtime
from tests.conftest import save_perturbed_adapter, synthetic_scene
from tests.sam_core.test_parity import SCORE_TOL, assert_masks_match
from tests.services.fakes import FakeEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


SCENE = synthetic_scene()[0]
SCENE_PNG = png(SCENE)
H, W = SCENE.shape[:2]


def noise_png(seed: int, height: int = 48, width: int = 64) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture()
def make_engine(tiny_model, tmp_path, onnx_cache):
    engines: list[DecoderEngine] = []

    def make(runtime: str = "torch", store=None, source=None, **env: str) -> tuple[DecoderEngine, FakeEncoder]:
        values = {"SAMFORGE_MODEL": "tiny", "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"),
                  "SAMFORGE_DECODER_RUNTIME": runtime, "SAMFORGE_ONNX_CACHE_DIR": str(onnx_cache), **env}
        settings = DecoderSettings.from_env(values)
        source = source or FakeEncoder(tiny_model, store)
        chosen = select_runtime(settings.runtime, max_prompts=settings.max_prompts,
                                cache_dir=settings.onnx_cache_dir, threads=1)
        engine = DecoderEngine(tiny_model, settings, source, chosen, store=store, watch_interval=0.05)
        engines.append(engine)
        return engine, source

    yield make
    for engine in engines:
        engine.close()


def mixed_prompts() -> list[Prompt]:
    """One prompt per signature (box, points, box + points, mask input) in scene coordinates."""
    rng = np.random.default_rng(0)
    return [
        Prompt.from_box([0.2 * W, 0.2 * H, 0.45 * W, 0.5 * H]),
        Prompt.from_points([[0.3 * W, 0.35 * H]], [1]),
        Prompt.from_points([[0.7 * W, 0.6 * H], [0.1 * W, 0.1 * H]], [1, 0]),
        Prompt(box=np.array([0.55 * W, 0.4 * H, 0.85 * W, 0.8 * H]), point_coords=np.array([[0.7 * W, 0.6 * H]]),
               point_labels=np.array([1])),
        Prompt(box=np.array([0.4 * W, 0.7 * H, 0.6 * W, 0.9 * H]),
               mask_input=rng.normal(0, 3, (1, 32, 32)).astype(np.float32)),
    ]


def rle_masks(result) -> np.ndarray:
    """N x M x H x W bool masks decoded from a SegmentResult's RLE counts."""
    h, w = result.image_size
    return np.array([[decode_rle({"size": [h, w], "counts": m.rle_counts}) for m in r.masks] for r in result.results])


# ------------------------------------------------------------------------------------------- runtimes


@pytest.mark.parametrize("multimask", [False, True])
def test_onnx_and_torch_runtimes_give_the_same_masks(make_engine, tiny_model, multimask):
    onnx, source = make_engine("onnx")
    torch_engine, _ = make_engine("torch", source=source)
    assert type(onnx.base).__name__ == "OnnxPredictor" and type(torch_engine.base) is Predictor
    first = torch_engine.segment("t", prompts=mixed_prompts() * 2, image=SCENE_PNG, multimask=multimask,
                                 want_low_res=True)
    embedding = source.values[("t", first.embedding_key)]
    logits_b = np.stack([r.low_res_logits for r in first.results])
    full = torch_engine.base.upscale(torch.from_numpy(logits_b), embedding).numpy()
    threshold = float(np.median(full))  # random weights: a threshold that splits the logits
    kwargs = dict(prompts=mixed_prompts() * 2, embedding_key=first.embedding_key, multimask=multimask,
                  threshold=threshold, want_low_res=True)
    a = onnx.segment("t", **kwargs)
    b = torch_engine.segment("t", **kwargs)
    m = 3 if multimask else 1
    assert len(a.results) == len(b.results) == 10 and all(len(r.masks) == m for r in a.results)
    np.testing.assert_array_equal(np.stack([r.low_res_logits for r in b.results]), logits_b)
    np.testing.assert_allclose(np.stack([r.low_res_logits for r in a.results]), logits_b, atol=1e-4)
    iou_a = np.array([[x.iou_score for x in r.masks] for r in a.results])
    iou_b = np.array([[x.iou_score for x in r.masks] for r in b.results])
    np.testing.assert_allclose(iou_a, iou_b, atol=SCORE_TOL)
    masks_b = rle_masks(b)
    assert_masks_match(rle_masks(a), masks_b, full, threshold)
    assert 0.05 < masks_b.mean() < 0.95
    assert source.gets == 2  # one fetch per engine; later calls by key are served from each decoder's LRU


def test_the_model_runs_on_the_process_compute_thread(make_engine):
    """Decoding runs on services.common.compute's thread, not on the calling thread (one OpenMP team per
    process; see the compute module)."""
    engine, _ = make_engine("torch")
    seen: list[int] = []
    predictor, decode = engine.base, engine.base.decode

    def recording_decode(*args, **kwargs):
        seen.append(threading.get_ident())
        return decode(*args, **kwargs)

    predictor.decode = recording_decode
    try:
        engine.segment("t", prompts=mixed_prompts()[:2], image=SCENE_PNG)
    finally:
        del predictor.decode
    assert seen and set(seen) == {compute.shared().run(threading.get_ident)}
    assert threading.get_ident() not in seen


def test_chunked_decoding_equals_one_call_and_errors_name_the_real_index(make_engine, monkeypatch):
    engine, _ = make_engine("torch")
    prompts = mixed_prompts() * 3
    whole = engine.segment("t", prompts=prompts, image=SCENE_PNG, threshold=-0.5, multimask=True)
    monkeypatch.setattr(engine_module, "PIXEL_BUDGET", 2 * 3 * H * W)  # two prompts per chunk
    chunked = engine.segment("t", prompts=prompts, image=SCENE_PNG, threshold=-0.5, multimask=True)
    assert [[m.rle_counts for m in r.masks] for r in chunked.results] == \
           [[m.rle_counts for m in r.masks] for r in whole.results]
    outside = prompts + [Prompt.from_box([0, 0, W + 5, 10])]
    with pytest.raises(InvalidPrompt) as info:
        engine.segment("t", prompts=outside, image=SCENE_PNG)
    assert info.value.field == f"prompts[{len(prompts)}].box"


# ---------------------------------------------------------------------------------------- conversions


def test_proto_prompts_convert_lazily_with_field_names():
    low = np.arange(32 * 32, dtype=np.float32).reshape(1, 32, 32)
    request = decoder_pb2.SegmentRequest(prompts=[
        decoder_pb2.Prompt(box=decoder_pb2.Box(x0=1, y0=2, x1=30, y1=40)),
        decoder_pb2.Prompt(points=[decoder_pb2.Point(x=5, y=6, label=1), decoder_pb2.Point(x=7.5, y=8, label=0)],
                           mask_input=common_pb2.Tensor(dtype="float32", shape=[1, 32, 32], data=low.tobytes())),
        decoder_pb2.Prompt(mask_input=common_pb2.Tensor(dtype="float64", shape=[1, 32, 32], data=b"")),
    ])
    prompts = codec.ProtoPrompts(request.prompts)
    assert len(prompts) == 3
    box = prompts[0]
    assert box.box.tolist() == [1, 2, 30, 40] and box.point_coords is None and box.mask_input is None
    points = prompts[-2]
    assert points.box is None and points.point_coords.tolist() == [[5, 6], [7.5, 8]]
    assert points.point_labels.tolist() == [1, 0] and np.array_equal(points.mask_input, low)
    with pytest.raises(InvalidMaskInput) as info:
        prompts[2]
    assert info.value.field == "prompts[2].mask_input"
    truncated = common_pb2.Tensor(dtype="float32", shape=[1, 32, 32], data=low.tobytes()[:-4])
    with pytest.raises(InvalidMaskInput, match="bytes"):
        codec.tensor_to_array(truncated, "m")
    assert [codec.encoding_name(v) for v in (0, 1, 2, 3, 4)] == ["rle", "rle", "png", "polygons", "none"]
    assert codec.encoding_name(9) == "enum 9"
    assert codec.tiling_from_proto(False, common_pb2.TilingOptions(enabled=True)) is None
    assert codec.tiling_from_proto(True, common_pb2.TilingOptions(enabled=True, overlap=8)) == TilingRequest(0, 8)


def test_mask_encodings_round_trip():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:25] = True
    rle = describe(mask, 0.9, 0.8, "rle")
    assert (rle.area, rle.bbox, rle.png, rle.polygons) == (200, (5, 10, 25, 20), b"", [])
    assert np.array_equal(decode_rle({"size": [40, 60], "counts": rle.rle_counts}), mask)
    assert np.array_equal(decode_png(describe(mask, 0.9, 0.8, "png").png), mask)
    polygons = describe(mask, 0.9, 0.8, "polygons").polygons
    assert np.array_equal(polygons_to_mask(polygons, 40, 60), mask)
    none = describe(mask, 0.9, 0.8, "none")
    assert none.rle_counts == "" and none.png == b"" and none.area == 200
    empty = describe(np.zeros((40, 60), bool), 0.1, 1.0, "polygons")
    assert empty.bbox is None and empty.area == 0 and empty.polygons == []
    message = codec.mask_message(rle)
    assert list(message.bbox) == [5, 10, 25, 20] and message.area == 200 and message.rle_counts == rle.rle_counts
    assert list(codec.mask_message(empty).bbox) == []


def test_segment_response_carries_low_res_logits_as_a_tensor(make_engine):
    engine, _ = make_engine("torch")
    result = engine.segment("t", prompts=mixed_prompts()[:2], image=SCENE_PNG, multimask=True, want_low_res=True,
                            encoding="png")
    reply = codec.segment_response(result)
    assert list(reply.image_size) == [H, W] and reply.model_id == engine.model_id and reply.adapter == ""
    tensor = reply.results[1].low_res_logits
    assert tensor.dtype == "float32" and list(tensor.shape) == [3, 32, 32]
    np.testing.assert_array_equal(np.frombuffer(tensor.data, "<f4").reshape(3, 32, 32),
                                  result.results[1].low_res_logits)
    assert len(reply.results[0].masks) == 3 and reply.results[0].masks[0].png.startswith(b"\x89PNG")
    plain = codec.segment_response(engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG))
    assert not plain.results[0].HasField("low_res_logits")


# --------------------------------------------------------------------------------- embeddings / cache


def test_keys_are_served_from_the_local_lru_while_the_encoder_is_down(make_engine):
    engine, source = make_engine()
    first = engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG)
    assert (len(source.embeds), source.gets, first.re_embedded) == (1, 1, False)
    again = engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG)  # same bytes: no Embed, no fetch
    assert (len(source.embeds), source.gets, again.embedding_key) == (1, 1, first.embedding_key)
    tiled = engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG, tiling=TilingRequest())
    other = engine.segment("u", prompts=mixed_prompts()[:1], image=SCENE_PNG)  # the memo is per tenant
    assert len(source.embeds) == 3 and len({first.embedding_key, tiled.embedding_key, other.embedding_key}) == 3
    source.down = True
    assert engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG).embedding_key == first.embedding_key
    by_key = engine.segment("t", prompts=mixed_prompts()[:1], embedding_key=first.embedding_key)
    assert by_key.results[0].masks[0].rle_counts == first.results[0].masks[0].rle_counts
    with pytest.raises(Unavailable):
        engine.segment("t", prompts=mixed_prompts()[:1], image=noise_png(1))
    with pytest.raises(NotFound):  # another tenant never sees this tenant's key (and the encoder is asked)
        source.down = False
        engine.segment("u", prompts=mixed_prompts()[:1], embedding_key=first.embedding_key)


def test_a_key_the_encoder_lost_is_re_embedded_from_the_image_else_not_found(make_engine):
    engine, source = make_engine()
    key = source.embed("t", SCENE_PNG, adapter="", tiling=None, call=CallOptions())  # not in the decoder's LRU
    source.forget()  # the encoder restarted
    with pytest.raises(NotFound) as info:
        engine.segment("t", prompts=mixed_prompts()[:1], embedding_key=key)
    assert info.value.field == "embedding_key" and "send the image" in str(info.value)
    result = engine.segment("t", prompts=mixed_prompts()[:1], embedding_key=key, image=SCENE_PNG)
    assert result.re_embedded and result.embedding_key == key


def test_bad_requests_fail_before_any_encoder_call(make_engine):
    engine, source = make_engine(SAMFORGE_MAX_PROMPTS="4")
    box = Prompt.from_box([1, 1, 20, 20])
    with pytest.raises(TooManyPrompts):
        engine.segment("t", prompts=[box] * 5, image=SCENE_PNG)
    with pytest.raises(InvalidPrompt) as info:
        engine.segment("t", prompts=[box, Prompt.from_box([1, float("nan"), 5, 5])], image=SCENE_PNG)
    assert info.value.field == "prompts[1].box"
    with pytest.raises(InvalidPrompt):
        engine.segment("t", prompts=[], image=SCENE_PNG)
    with pytest.raises(InvalidInput) as info:
        engine.segment("t", prompts=[box], embedding_key="../../etc/passwd")
    assert info.value.field == "embedding_key"
    with pytest.raises(InvalidInput) as info:
        engine.segment("t", prompts=[box])
    assert info.value.field == "image"
    with pytest.raises(InvalidInput) as info:
        engine.segment("t", prompts=[box], image=SCENE_PNG, threshold=float("nan"))
    assert info.value.field == "threshold"
    with pytest.raises(InvalidInput) as info:
        engine.segment("t", prompts=[box], image=SCENE_PNG, encoding="enum 9")
    assert info.value.field == "encoding"
    with pytest.raises(NotFound):
        engine.segment("t", prompts=[box], image=SCENE_PNG, adapter="missing")
    with pytest.raises(InvalidInput):
        engine.segment("t", prompts=[box], image=SCENE_PNG, adapter="../x")
    assert source.calls == []


def test_tiled_embeddings_decode_through_decode_tiled(make_engine):
    engine, source = make_engine()
    image = np.random.default_rng(3).integers(0, 256, (100, 180, 3), dtype=np.uint8)
    tiling = TilingRequest(tile_size=64, overlap=16)
    prompts = [Prompt.from_box([10, 10, 40, 40]), Prompt.from_box([5, 5, 170, 95])]  # in one tile / in none
    result = engine.segment("t", prompts=prompts, image=png(image), tiling=tiling, threshold=-1.0)
    value = source.values[("t", result.embedding_key)]
    assert len(value.tiles) > 1 and result.image_size == (100, 180)
    assert rle_masks(result).shape == (2, 1, 100, 180)
    with pytest.raises(InvalidInput) as info:
        engine.segment("t", prompts=prompts, image=png(image), tiling=tiling, want_low_res=True)
    assert info.value.field == "return_low_res_logits"
    with_mask = Prompt(box=np.array([10.0, 10, 40, 40]), mask_input=np.zeros((1, 32, 32), np.float32))
    with pytest.raises(InvalidMaskInput) as info:
        engine.segment("t", prompts=[*prompts, with_mask], image=png(image), tiling=tiling)
    assert info.value.field == "prompts[2].mask_input"


class SquaresPredictor:
    """Crafted decoder for :func:`generate`: per point an 8 x 8 square (IoU 0.9 - 0.01 k for the k-th point),
    the same square shifted by one pixel (IoU 0.8: NMS removes it) and an unstable mask (logits 0.5, IoU 0.95);
    the last point's masks all have IoU 0.5 (below the IoU threshold). ``upscale`` is the identity."""

    def check_embedding(self, embedding) -> None:
        pass

    def decode_low_res(self, features, prompts, original_size, multimask):
        assert multimask
        h, w = original_size
        low = torch.full((len(prompts), 3, h, w), -5.0)
        iou = torch.empty(len(prompts), 3)
        for i, prompt in enumerate(prompts):
            x, y = (int(v) for v in prompt.point_coords[0])
            k = int(prompt.point_coords[0, 1] > h / 2) * 2 + int(prompt.point_coords[0, 0] > w / 2)
            low[i, 0, y - 4:y + 4, x - 4:x + 4] = 5.0
            low[i, 1, y - 3:y + 5, x - 4:x + 4] = 5.0
            low[i, 2, y - 4:y + 4, x - 4:x + 4] = 0.5
            iou[i] = torch.tensor([0.9 - 0.01 * k, 0.8, 0.95]) if k < 3 else 0.5
        return low, iou

    def upscale(self, low_res, embedding):
        return low_res


def test_generate_filters_by_iou_and_stability_then_nms_sorts_and_limits():
    embedding = Embedding(features={"image_embed": torch.zeros(1, 1, 1, 1)}, original_size=(32, 32),
                          input_size=(32, 32), model_id="m", preprocess_version="p")
    options = EverythingOptions(points_per_side=2).resolved()
    found = generate(SquaresPredictor(), embedding, options)
    assert found.points_decoded == 4
    np.testing.assert_allclose(found.iou_scores, [0.9, 0.89, 0.88])  # best first; duplicates and point 3 gone
    np.testing.assert_allclose(found.stability_scores, 1.0)
    assert found.masks.shape == (3, 32, 32) and found.masks.sum(axis=(1, 2)).tolist() == [64, 64, 64]
    assert found.masks[0, 4:12, 4:12].all() and found.masks[1, 4:12, 20:28].all()
    assert len(generate(SquaresPredictor(), embedding, replace(options, max_masks=2)).masks) == 2
    assert len(generate(SquaresPredictor(), embedding, replace(options, box_nms_thresh=1.0)).masks) == 6
    unstable = generate(SquaresPredictor(), embedding, replace(options, stability_score_thresh=0.0))
    assert unstable.iou_scores.tolist() == pytest.approx([0.95] * 3)  # they win NMS over the squares they cover
    assert unstable.stability_scores.tolist() == [0.0] * 3
    assert len(generate(SquaresPredictor(), embedding, replace(options, min_mask_area=65)).masks) == 0


def test_segment_everything_through_the_engine(make_engine):
    engine, _ = make_engine("onnx")
    loose = EverythingOptions(points_per_side=4, pred_iou_thresh=1e-6, stability_score_thresh=1e-6, max_masks=5)
    result = engine.segment_everything("t", image=SCENE_PNG, options=loose, encoding="polygons")
    scores = [m.iou_score for m in result.masks]
    assert len(scores) <= 5 and scores == sorted(scores, reverse=True) and result.image_size == (H, W)
    assert all(m.area > 0 and m.polygons is not None for m in result.masks)
    reply = codec.everything_response(result)
    assert reply.embedding_key == result.embedding_key and list(reply.image_size) == [H, W]
    for bad in (EverythingOptions(points_per_side=99), EverythingOptions(box_nms_thresh=float("nan")),
                EverythingOptions(max_masks=-1), EverythingOptions(min_mask_area=-5)):
        with pytest.raises(InvalidInput):
            engine.segment_everything("t", embedding_key=result.embedding_key, options=bad)
    assert EverythingOptions().resolved() == EverythingOptions(16, 0.7, 0.85, 0.7, 0, 100)


# ------------------------------------------------------------------------------------------- adapters


def _artifact(model, method: str, folder, seed: int):
    return save_perturbed_adapter(model, method, folder, seed=seed, name=f"{method}{seed}")


@pytest.fixture()
def store(tmp_path, tiny_model):
    store = FileSystemAdapterStore(tmp_path / "registry")
    store.publish("t", "a", _artifact(tiny_model, "decoder", tmp_path / "a", 1))
    store.publish("t", "b", _artifact(tiny_model, "decoder", tmp_path / "b", 2))
    store.publish("t", "l", _artifact(tiny_model, "lora", tmp_path / "l", 3))
    return store


def test_adapter_lru_evicts_before_loading(make_engine, store, monkeypatch):
    engine, source = make_engine("onnx", store=store, SAMFORGE_ADAPTER_CACHE="1")
    resident_at_load: list[int] = []
    real = adapter_models.load_adapter

    def counting(model, path):
        resident_at_load.append(len(engine.adapters.loaded()))
        return real(model, path)

    monkeypatch.setattr(adapter_models, "load_adapter", counting)
    prompts = mixed_prompts()[:2]
    base = engine.segment("t", prompts=prompts, image=SCENE_PNG, want_low_res=True)
    results = {ref: engine.segment("t", prompts=prompts, embedding_key=base.embedding_key, adapter=ref,
                                   want_low_res=True) for ref in ["a", "b", "a:1"]}
    assert engine.adapters.loads == 3 and resident_at_load == [0, 0, 0]
    assert engine.adapters.loaded() == ["t/a:1"]
    assert [r.adapter for r in results.values()] == ["a:1", "b:1", "a:1"]
    assert source.embeds == [("t", "")]  # decoder-only adapters decode the base embeddings
    for ref in ("a", "b"):
        assert np.abs(results[ref].results[0].low_res_logits - base.results[0].low_res_logits).max() > 1e-2
    np.testing.assert_allclose(results["a"].results[0].low_res_logits, results["a:1"].results[0].low_res_logits)
    again = engine.segment("t", prompts=prompts, embedding_key=base.embedding_key, want_low_res=True)
    np.testing.assert_array_equal(again.results[0].low_res_logits, base.results[0].low_res_logits)
    assert engine.adapters.loads == 3


def test_encoder_side_adapter_embeds_with_the_exact_version(make_engine, store, tmp_path, tiny_model):
    store.promote("t", "l", "prod", 1)
    engine, source = make_engine("torch", store=store)
    result = engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG, adapter="l@prod")
    assert source.embeds == [("t", "l:1")] and result.adapter == "l:1"
    value = source.values[("t", result.embedding_key)]
    assert value.encoder_adapter is not None
    base = engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG)
    with pytest.raises(InvalidInput) as info:  # base embeddings with an encoder-side adapter: refused
        engine.segment("t", prompts=mixed_prompts()[:1], embedding_key=base.embedding_key, adapter="l")
    assert info.value.field == "embedding"
    v2 = store.publish("t", "l", _artifact(tiny_model, "lora", tmp_path / "l2", 4))
    weights = v2.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # changed on disk after publishing
    with pytest.raises(AdapterInvalid):
        engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG, adapter="l:2")
    assert engine.segment("t", prompts=mixed_prompts()[:1], image=SCENE_PNG, adapter="l:1").adapter == "l:1"


# ------------------------------------------------------------------------------------- encoder client


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_encoder_client_maps_status_codes_and_deadlines():
    assert channel_target("samforge-encoder:50051") == "dns:///samforge-encoder:50051"
    assert channel_target("127.0.0.1:1") == "dns:///127.0.0.1:1"
    for kept in ("dns:///a:1", "unix:/tmp/s", "ipv4:10.0.0.1:5,10.0.0.2:5"):
        assert channel_target(kept) == kept
    client = EncoderClient(grpc.insecure_channel("127.0.0.1:1"), 30.0, address="enc")
    try:
        cases = {grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.NOT_FOUND: NotFound,
                 grpc.StatusCode.INVALID_ARGUMENT: InvalidInput, grpc.StatusCode.FAILED_PRECONDITION: AdapterInvalid,
                 grpc.StatusCode.PERMISSION_DENIED: PermissionDenied}
        for code, kind in cases.items():
            assert isinstance(client._error(_RpcError(code, "image: bad"), "Embed", 30, False), kind)
        assert str(client._error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "image: bad"), "Embed", 30, False)) \
            == "image: bad"
        assert isinstance(client._error(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "Embed", 30, False),
                          Unavailable)
        assert isinstance(client._error(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "Embed", 2, True), Cancelled)
        assert client._timeout(CallOptions(time_remaining=lambda: 5.0)) == (5.0, True)
        assert client._timeout(CallOptions(time_remaining=lambda: 1e9)) == (30.0, False)
        with pytest.raises(Cancelled):
            client._timeout(CallOptions(time_remaining=lambda: 0.0))
        with pytest.raises(Unavailable):  # nothing listens on port 1: fails fast, not at the deadline
            client.get("t", "0" * 64, call=CallOptions())
    finally:
        client.close()


def test_onnx_runtime_falls_back_to_torch_without_onnxruntime(monkeypatch, tiny_model):
    assert select_runtime("onnx", cache_dir="unused").name == "onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now raises ImportError
    runtime = select_runtime("onnx", cache_dir="unused")
    assert runtime.name == "torch" and type(runtime.make(tiny_model)) is Predictor
    assert select_runtime("torch").name == "torch"
