"""Encoder execution backends (torch / onnx / triton) in-process with the tiny model: selection, equality,
adapter refusal, Triton error mapping against a port nobody listens on, and batches in flight."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.errors import AdapterInvalid, InvalidInput, ModelLoadError, Unavailable
from sam_core.export.onnx_encoder import encoder_export_path
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import load_model
from services.common.net import free_port
from services.common.settings import EncoderSettings
from services.encoder.backends import EncoderBackend, TritonEncoder, build_backend, triton_levels
from services.encoder.batcher import DynamicBatcher, EncodeJob
from services.encoder.engine import EmbeddingEngine
from tests.conftest import save_perturbed_adapter
from tests.services.test_encoder_engine import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(tmp_path, **env: str) -> EncoderSettings:
    return EncoderSettings.from_env({"SAMFORGE_MODEL": "tiny", "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"),
                                     "SAMFORGE_ONNX_CACHE_DIR": str(tmp_path / "onnx"), **env})


@pytest.mark.parametrize(("env", "field"), [
    ({"SAMFORGE_ENCODER_BACKEND": "tensorrt"}, "SAMFORGE_ENCODER_BACKEND"),
    ({"SAMFORGE_ENCODER_BACKEND": "onnx", "SAMFORGE_BF16": "true"}, "SAMFORGE_BF16"),
    ({"SAMFORGE_ENCODER_BACKEND": "triton", "SAMFORGE_TRITON_TIMEOUT_SECONDS": "0"},
     "SAMFORGE_TRITON_TIMEOUT_SECONDS"),
    ({"SAMFORGE_TRITON_RETRIES": "-1"}, "SAMFORGE_TRITON_RETRIES"),
])
def test_bad_backend_settings_name_the_variable(tmp_path, env, field):
    with pytest.raises(InvalidInput) as info:
        settings(tmp_path, **env)
    assert info.value.field == field


def test_default_backend_is_in_process_torch(tmp_path, tiny_model):
    backend = build_backend(settings(tmp_path), tiny_model)
    assert (backend.name, backend.encode, backend.concurrency, backend.serves_encoder_adapters) == \
        ("torch", None, 1, True)


def test_onnx_backend_embeds_like_torch_and_exports_once(tmp_path, tiny_model):
    cfg = settings(tmp_path, SAMFORGE_ENCODER_BACKEND="onnx")
    backend = build_backend(cfg, tiny_model)
    path = encoder_export_path(tiny_model, cfg.onnx_cache_dir)
    assert backend.name == "onnx" and backend.encode.path == path and path.is_file()
    exported_at = path.stat().st_mtime_ns
    assert build_backend(cfg, tiny_model).encode.path == path and path.stat().st_mtime_ns == exported_at
    onnx_engine = EmbeddingEngine(tiny_model, cfg, backend=backend)
    torch_engine = EmbeddingEngine(tiny_model, settings(tmp_path))
    try:
        for seed in range(3):
            ours, theirs = onnx_engine.embed("t", png(seed)), torch_engine.embed("t", png(seed))
            assert ours.key == theirs.key  # same model, same key: replicas on either backend share L2
            assert torch.allclose(ours.value.image_embedding, theirs.value.image_embedding, atol=1e-4)
    finally:
        onnx_engine.close()
        torch_engine.close()


def test_a_backend_without_encoder_adapters_refuses_them_and_serves_decoder_adapters(tmp_path, tiny_model):
    store = FileSystemAdapterStore(tmp_path / "registry")
    store.publish("t", "lora", save_perturbed_adapter(tiny_model, "lora", tmp_path / "lora", seed=1))
    store.publish("t", "dec", save_perturbed_adapter(tiny_model, "decoder", tmp_path / "dec", seed=2))
    reference = Predictor(tiny_model)
    remote = EncoderBackend("triton", reference.encode_tensor, concurrency=2, serves_encoder_adapters=False)
    engine = EmbeddingEngine(tiny_model, settings(tmp_path), store=store, backend=remote, watch_interval=0.05)
    try:
        with pytest.raises(AdapterInvalid) as info:
            engine.embed("t", png(5), adapter="lora")
        assert info.value.field == "adapter" and "triton" in str(info.value) and "t/lora:1" in str(info.value)
        assert engine.adapters.loads == 0  # refused before anything was loaded or encoded
        shared = engine.embed("t", png(5), adapter="dec")
        assert shared.value.encoder_adapter is None and engine.stats("t").encodes == 1
        assert torch.equal(shared.value.image_embedding, reference.encode_one(pixels(5)).image_embedding)
    finally:
        engine.close()


def pixels(seed: int) -> np.ndarray:
    """png(seed) decoded: H x W x 3 uint8."""
    return np.asarray(Image.open(io.BytesIO(png(seed))).convert("RGB"))


def test_triton_backend_fails_unavailable_promptly_when_nothing_listens(tiny_model):
    client = TritonEncoder(f"127.0.0.1:{free_port()}", "sam_encoder", timeout_s=10, retries=2, backoff_s=0.05)
    try:
        assert not client.ready()
        calls = client.calls
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            client(torch.zeros(1, 3, 32, 32))
        elapsed = time.monotonic() - start
        assert client.calls - calls == 3  # the first attempt and two retries
        assert "3 attempt(s)" in str(info.value) and "127.0.0.1" in str(info.value)
        assert elapsed < 5.0, elapsed  # far inside the 10 s deadline: refused connections are not waited out
    finally:
        client.close()


def test_triton_backend_deadline_bounds_the_whole_call_including_retries():
    listener = socket.socket()  # accepts TCP but never speaks HTTP/2: calls hang until the deadline
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    client = TritonEncoder(f"127.0.0.1:{listener.getsockname()[1]}", "sam_encoder", timeout_s=1.0, retries=5)
    try:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client(torch.zeros(1, 3, 32, 32))
        assert time.monotonic() - start < 4.0
    finally:
        client.close()
        listener.close()


class ConcurrencyProbe:
    """An encoder_fn that records how many calls overlap (each call holds for ``hold_s``)."""

    def __init__(self, predictor: Predictor, hold_s: float = 0.2) -> None:
        self.predictor, self.hold_s = predictor, hold_s
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.hold_s)  # stands in for a remote call's network + queue time
            return self.predictor.net.image_encoder(batch)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_batcher_keeps_at_most_concurrency_batches_in_flight(tiny_model, concurrency):
    probe = ConcurrencyProbe(Predictor(tiny_model))
    predictor = Predictor(tiny_model, encoder_fn=probe)
    batcher = DynamicBatcher(max_batch=1, max_wait_s=0.0, queue_size=16, concurrency=concurrency)
    try:
        futures = [batcher.submit(EncodeJob(predictor, predictor.prepare(pixels(i)))) for i in range(6)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert probe.peak == concurrency
    assert batcher.encodes == 6 and list(batcher.batch_sizes) == [1] * 6
    reference = Predictor(tiny_model).encode_one(pixels(3)).image_embedding
    assert torch.allclose(results[3][0].image_embedding, reference, atol=1e-5)


def test_onnx_backend_serves_every_sam2_level(tmp_path):
    """SAM 2 on the onnx backend: the engine's embeddings carry all three levels, equal to the torch backend's."""
    model = load_model("tiny_sam2")
    cfg = settings(tmp_path, SAMFORGE_MODEL="tiny_sam2", SAMFORGE_ENCODER_BACKEND="onnx")
    onnx_engine = EmbeddingEngine(model, cfg, backend=build_backend(cfg, model))
    torch_engine = EmbeddingEngine(model, settings(tmp_path, SAMFORGE_MODEL="tiny_sam2"))
    try:
        ours, theirs = onnx_engine.embed("t", png(1)).value, torch_engine.embed("t", png(1)).value
        assert list(ours.features) == list(theirs.features) == list(model.net.feature_names)
        for name, level in theirs.features.items():
            assert ours.features[name].shape == level.shape
            assert (ours.features[name] - level).abs().max().item() < 1e-4, name
    finally:
        onnx_engine.close()
        torch_engine.close()


def test_triton_levels_are_named_and_shape_checked():
    """The Triton client returns every requested output by name, and refuses a reply whose level is missing or
    mis-shaped as a deployment error naming SAMFORGE_TRITON_MODEL."""
    shapes = {"image_embed": (4, 2, 2), "high_res_feat_s0": (2, 8, 8)}
    good = {name: np.zeros((3, *shape), np.float32) for name, shape in shapes.items()}
    levels = triton_levels("m", shapes, good, batch=3)
    assert list(levels) == list(shapes) and levels["high_res_feat_s0"].shape == (3, 2, 8, 8)
    for bad in ({**good, "high_res_feat_s0": np.zeros((3, 2, 4, 4), np.float32)},
                {"image_embed": good["image_embed"]}, {**good, "image_embed": np.zeros((2, 4, 2, 2), np.float32)}):
        with pytest.raises(ModelLoadError) as info:
            triton_levels("m", shapes, bad, batch=3)
        assert info.value.field == "SAMFORGE_TRITON_MODEL"
