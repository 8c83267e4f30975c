"""The three services on the small random SAM 2 (``tiny_sam2``), real gRPC over loopback, real redis.

One stack (encoder + decoder + trainer, SAMFORGE_MODEL=tiny_sam2, SAMFORGE_CHECKPOINT a sharpened copy of its
random weights) for the module. The encoder runs with an L1 budget of one byte, so every ``GetEmbedding`` (the
test's and the decoder's) is served from the redis L2: the three-level embedding goes through L2 and the wire,
and must still equal the in-process encode bit for bit. Every served result is compared with the in-process
:class:`~sam_core.inference.predictor.Predictor` on the same weights (one thread, like the services): the
features, many prompts of every kind (boxes, points, box + points, mask input) in one Segment call on a
non-square image (SAM 2's square resize), tiled Embed + Segment, SegmentEverything, an encoder-side LoRA
published to the registry, and a decoder adapter trained through TrainerService and selected per request.
A SAM 2.1 id without a checkpoint is refused at start naming SAMFORGE_CHECKPOINT.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from sam_core.adapters.artifact import load_adapter
from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.inference.automatic import EverythingOptions, generate
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.tiling import decode_tiled, encode_tiled
from sam_core.inference.types import Embedding
from sam_core.io.masks import decode_rle
from sam_core.modeling.registry import load_model
from services._generated.sam.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    trainer_pb2,
)
from services.client import SamforgeClient
from services.common.embedding_codec import embedding_from_chunks
from services.demo import demo_scene
from services.stack import start_stack, write_demo_dataset
from tests.conftest import save_perturbed_adapter
from tests.integration.conftest import start_service

pytestmark = pytest.mark.integration

H, W = 150, 260  # not square: SAM 2 stretches it to 128 x 128, prompts must follow
IMAGE, _ = demo_scene(height=H, width=W, seed=3)
TOL = 1e-4  # low-res logits and IoU scores: same weights, same features, same thread count
LEVELS = ["image_embed", "high_res_feat_s0", "high_res_feat_s1"]
MASK_INPUT = (3 * np.random.default_rng(0).standard_normal((1, 32, 32))).astype(np.float32)  # 4 x the 8 x 8 embedding


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_PNG = png(IMAGE)


def prompts() -> list[Prompt]:
    """Boxes, single and multi-point prompts with negative points, and box + points: every signature."""
    return [
        Prompt.from_box([10, 12, 90, 70]), Prompt.from_box([120, 20, 250, 140]), Prompt.from_box([0, 0, 259, 149]),
        Prompt.from_points([[60, 40]], [1]), Prompt.from_points([[200, 100]], [1]),
        Prompt.from_points([[60, 40], [150, 120]], [1, 0]),
        Prompt(box=np.array([100.0, 30, 200, 130]), point_coords=np.array([[150.0, 80]]),
               point_labels=np.array([1])),
        Prompt(box=np.array([5.0, 5, 140, 145]), point_coords=np.array([[70.0, 70], [20, 130]]),
               point_labels=np.array([1, 0])),
        Prompt(box=np.array([20.0, 20, 120, 100]), mask_input=MASK_INPUT),
    ]


TILEABLE = [p for p in prompts() if p.mask_input is None]  # tiling refuses mask input


def prompt_message(prompt: Prompt) -> decoder_pb2.Prompt:
    message = decoder_pb2.Prompt()
    if prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt.box)
        message.box.CopyFrom(decoder_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    if prompt.point_coords is not None and prompt.point_labels is not None:
        for (x, y), label in zip(prompt.point_coords, prompt.point_labels, strict=True):
            message.points.append(decoder_pb2.Point(x=float(x), y=float(y), label=int(label)))
    if prompt.mask_input is not None:
        message.mask_input.CopyFrom(common_pb2.Tensor(dtype="float32", shape=list(prompt.mask_input.shape),
                                                      data=prompt.mask_input.astype("<f4").tobytes()))
    return message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny_sam2's random weights with the mask logits scaled 40x, in the official {"model": ...} format.

    The random decoder's logits stay within +-0.3, so no mask is stable at +-1 and SegmentEverything keeps none;
    scaled, the stability filter passes some. The services load it through SAMFORGE_CHECKPOINT.
    """
    state = {name: tensor * 40 if name.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and
             ".layers.2." in name else tensor for name, tensor in load_model("tiny_sam2").net.state_dict().items()}
    path = tmp_path_factory.mktemp("sam2-weights") / "tiny_sam2_sharp.pt"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, checkpoint):
    var = tmp_path_factory.mktemp("sam2-stack")
    running = start_stack(var, model="tiny_sam2", extra_env={
        "SAMFORGE_CHECKPOINT": str(checkpoint), "SAMFORGE_THREADS": "1", "SAMFORGE_REDIS_URL": redis_url,
        "SAMFORGE_CACHE_BYTES": "1"})
    try:
        yield running
    finally:
        codes = running.stop()
        assert codes == {"trainer": 0, "encoder": 0, "decoder": 0}, codes


@contextmanager
def one_thread() -> Iterator[None]:
    """Compute like the services (SAMFORGE_THREADS=1): the same reduction order, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The in-process predictor and embedding."""
    with one_thread():
        predictor = Predictor(load_model("tiny_sam2", checkpoint))
        embedding = predictor.encode_one(IMAGE)
    return predictor, embedding


@pytest.fixture(scope="module")
def channels(stack):
    encoder = grpc.insecure_channel(stack.addresses["encoder"])
    decoder = grpc.insecure_channel(stack.addresses["decoder"], options=[("grpc.max_receive_message_length", 64 << 20)])
    yield encoder_pb2_grpc.EncoderServiceStub(encoder), decoder_pb2_grpc.DecoderServiceStub(decoder)
    encoder.close()
    decoder.close()


def segment(decoder, key: str, adapter: str = "") -> decoder_pb2.SegmentResponse:
    request = decoder_pb2.SegmentRequest(embedding_key=key, image=IMAGE_PNG, multimask=True,
                                         prompts=[prompt_message(p) for p in prompts()],
                                         adapter=common_pb2.AdapterRef(ref=adapter), return_low_res_logits=True)
    return decoder.Segment(request, timeout=120)


def low_res(reply: decoder_pb2.SegmentResponse) -> np.ndarray:
    """N x M x L x L served low-res logits."""
    return np.stack([np.frombuffer(r.low_res_logits.data, "<f4").reshape(tuple(r.low_res_logits.shape))
                     for r in reply.results])


def assert_same_as(reply: decoder_pb2.SegmentResponse, predictor: Predictor, embedding) -> None:
    """Low-res logits and IoU within TOL, masks equal wherever the logit is not within TOL of 0."""
    with one_thread():
        expected = predictor.decode(embedding, prompts(), multimask=True)
    np.testing.assert_allclose(low_res(reply), expected.low_res_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose([[m.iou_score for m in r.masks] for r in reply.results], expected.iou_scores,
                               atol=TOL, rtol=0)
    masks = np.array([[decode_rle({"size": [H, W], "counts": m.rle_counts}) for m in r.masks] for r in reply.results])
    logits = predictor.upscale(torch.from_numpy(expected.low_res_logits), embedding).numpy()
    away = np.abs(logits) > TOL
    assert np.array_equal(masks[away], expected.masks[away])


@pytest.mark.slow
def test_embed_streams_three_levels_equal_to_the_in_process_encode_through_l2(stack, channels, reference):
    predictor, embedding = reference
    encoder, _ = channels
    reply = encoder.Embed(encoder_pb2.EmbedRequest(image=IMAGE_PNG), timeout=120)
    info = reply.embedding
    shapes = predictor.net.feature_shapes()
    assert [(level.name, list(level.shape)) for level in info.levels] == \
           [(name, [1, *shapes[name]]) for name in LEVELS]
    assert list(info.original_size) == [H, W] and list(info.input_size) == [128, 128]
    assert info.model_id == predictor.model_id
    stats_before = encoder.Stats(encoder_pb2.StatsRequest(), timeout=30)
    served = embedding_from_chunks(encoder.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=info.key), timeout=60))
    stats_after = encoder.Stats(encoder_pb2.StatsRequest(), timeout=30)
    assert stats_after.l2_hits == stats_before.l2_hits + 1 and stats_after.cache_entries == 0  # L1 holds nothing
    assert list(served.features) == LEVELS
    for name in LEVELS:
        assert served.features[name].dtype == torch.float32
        assert torch.equal(served.features[name], embedding.features[name]), name
    assert served.original_size == embedding.original_size and served.input_size == embedding.input_size


@pytest.mark.slow
def test_segment_many_prompts_in_one_call_equals_the_in_process_predictor(stack, channels, reference):
    predictor, embedding = reference
    encoder, decoder = channels
    key = encoder.Embed(encoder_pb2.EmbedRequest(image=IMAGE_PNG), timeout=120).embedding.key
    by_key = segment(decoder, key)
    assert by_key.model_id == predictor.model_id and list(by_key.image_size) == [H, W]
    assert len(by_key.results) == len(prompts()) and all(len(r.masks) == 3 for r in by_key.results)
    assert_same_as(by_key, predictor, embedding)
    image_only = decoder.Segment(decoder_pb2.SegmentRequest(image=IMAGE_PNG, prompts=[prompt_message(prompts()[0])]),
                                 timeout=120)  # the bytes -> key memo path
    assert image_only.embedding_key == key and not image_only.re_embedded


@pytest.mark.slow
def test_tiled_embed_and_segment_equal_the_in_process_tiles(stack, channels, reference):
    """Native 128 px tiles of the 150 x 260 image (square, so SAM 2 does not stretch them) plus the whole image."""
    predictor, _ = reference
    encoder, decoder = channels
    tiling = common_pb2.TilingOptions(enabled=True)
    info = encoder.Embed(encoder_pb2.EmbedRequest(image=IMAGE_PNG, tiling=tiling), timeout=120).embedding
    with one_thread():
        expected = encode_tiled(predictor, IMAGE)
        decoded = decode_tiled(predictor, expected, TILEABLE, multimask=True)
    assert info.num_tiles == len(expected.tiles) > 1 and [level.name for level in info.levels] == LEVELS
    served = embedding_from_chunks(encoder.GetEmbedding(encoder_pb2.GetEmbeddingRequest(key=info.key), timeout=60))
    assert not isinstance(served, Embedding) and served.origins == expected.origins
    for ours, theirs in zip([served.whole, *served.tiles], [expected.whole, *expected.tiles], strict=True):
        assert all(torch.equal(ours.features[name], theirs.features[name]) for name in LEVELS)
    reply = decoder.Segment(decoder_pb2.SegmentRequest(embedding_key=info.key, image=IMAGE_PNG, multimask=True,
                                                       prompts=[prompt_message(p) for p in TILEABLE], tiling=tiling),
                            timeout=120)
    np.testing.assert_allclose([[m.iou_score for m in r.masks] for r in reply.results], decoded.iou_scores,
                               atol=TOL, rtol=0)
    masks = np.array([[decode_rle({"size": [H, W], "counts": m.rle_counts}) for m in r.masks] for r in reply.results])
    assert np.array_equal(masks, decoded.masks)


@pytest.mark.slow
def test_segment_everything_equals_the_in_process_generator(stack, channels, reference):
    predictor, embedding = reference
    _, decoder = channels
    # a random model's masks all span most of the image: box NMS below 1.0 would leave one
    thresholds = {"pred_iou_thresh": 1e-6, "stability_score_thresh": 1e-6, "box_nms_thresh": 1.0}
    options = EverythingOptions(points_per_side=4, **thresholds)
    request = decoder_pb2.SegmentEverythingRequest(image=IMAGE_PNG, points_per_side=4, **thresholds)
    reply = decoder.SegmentEverything(request, timeout=120)
    with one_thread():
        expected = generate(predictor, embedding, options.resolved())
    assert len(reply.masks) == len(expected.masks) > 1
    np.testing.assert_allclose([m.iou_score for m in reply.masks], expected.iou_scores, atol=TOL, rtol=0)
    for served, mask in zip(reply.masks, expected.masks, strict=True):
        assert np.array_equal(decode_rle({"size": [H, W], "counts": served.rle_counts}), mask)


@pytest.mark.slow
def test_a_decoder_adapter_trained_through_the_trainer_serves_like_the_in_process_adapter(stack, channels, reference):
    predictor, embedding = reference
    encoder, decoder = channels
    write_demo_dataset(stack.var_dir / "data" / "default" / "sam2-scenes", n=6)
    with SamforgeClient(trainer=stack.addresses["trainer"]) as client:
        job = client.create_job(dataset="sam2-scenes", method="decoder", adapter_name="sam2dec", promote_to="prod",
                                allow_regression=True, epochs=1, batch_size=4, lr=1e-3)
        done = client.wait_job(job.id, timeout=600)
    assert done.state == trainer_pb2.JOB_STATE_SUCCEEDED and done.adapter_version == 1, done
    key = encoder.Embed(encoder_pb2.EmbedRequest(image=IMAGE_PNG), timeout=120).embedding.key
    tuned = segment(decoder, key, adapter="sam2dec@prod")
    base = segment(decoder, key)
    assert tuned.adapter == "sam2dec:1" and base.adapter == "" and tuned.embedding_key == key
    assert not np.allclose(low_res(tuned), low_res(base), atol=1e-3)
    store = FileSystemAdapterStore(stack.var_dir / "registry")
    adapted = load_adapter(predictor.model, store.path_of(store.resolve("default", "sam2dec@prod")))
    assert_same_as(tuned, Predictor(adapted), embedding)
    assert_same_as(base, predictor, embedding)


def test_a_sam2_model_without_a_checkpoint_fails_at_start_naming_the_setting(tmp_path):
    """Refused by the settings check (exit 2) before the port is bound or a weight is read. The check is the
    common settings' (tests/services/test_settings.py covers the decoder and the trainer): one process here."""
    env = {"SAMFORGE_MODEL": "sam2.1_hiera_t", "SAMFORGE_CHECKPOINT": ""}
    process = start_service("encoder", env, tmp_path, wait=False)
    assert process.proc.wait(120) == 2, process.log()[-2000:]
    log = process.log()
    assert "SAMFORGE_CHECKPOINT" in log and "sam2.1_hiera_t" in log and "listening" not in log, log[-2000:]


@pytest.mark.slow
def test_an_encoder_side_lora_adapter_embeds_and_decodes_like_the_in_process_adapter(stack, channels, reference,
                                                                                        tmp_path):
    """LoRA on Hiera's attention: the encoder embeds with it (its own key), the decoder decodes with it."""
    predictor, _ = reference
    encoder, decoder = channels
    store = FileSystemAdapterStore(stack.var_dir / "registry")
    version = store.publish("default", "sam2lora",
                            save_perturbed_adapter(predictor.model, "lora", tmp_path / "lora", name="sam2lora"))
    adapted = Predictor(load_adapter(predictor.model, store.path_of(version)))
    assert adapted.model.encoder_adapter_id is not None
    with one_thread():
        embedding = adapted.encode_one(IMAGE)
    base_key = encoder.Embed(encoder_pb2.EmbedRequest(image=IMAGE_PNG), timeout=120).embedding.key
    reply = segment(decoder, "", adapter=f"sam2lora:{version.version}")
    assert reply.adapter == f"sam2lora:{version.version}" and reply.embedding_key != base_key
    assert_same_as(reply, adapted, embedding)
