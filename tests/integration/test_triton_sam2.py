"""SAM 2 on a real Triton Inference Server (SAMFORGE_ENCODER_BACKEND=triton): all three feature levels.

Triton (pytriton's ``tritonserver``, from ``.venv-triton``; see test_triton_backend.py) serves tiny_sam2's
exported encoder with its three outputs and dynamic batching; samforge's triton backend, called over
loopback gRPC, must give the in-process PyTorch encoder's levels, named, for batches Triton forms itself and
for batches the caller sends, and the encoder engine on that backend must embed like the torch backend.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sam_core.export.onnx_encoder import export_encoder_onnx
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import load_model
from services.common.settings import EncoderSettings
from services.encoder.backends import build_backend
from services.encoder.engine import EmbeddingEngine
from services.encoder.pytriton_encoder import PyTritonServer
from tests.integration.test_triton_backend import triton_python  # noqa: F401  # fixture
from tests.services.test_encoder_engine import png

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
LEVELS = ["image_embed", "high_res_feat_s0", "high_res_feat_s1"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_model("tiny_sam2")


@pytest.fixture(scope="module")
def triton(triton_python, model, tmp_path_factory):  # noqa: F811  # the imported fixture
    root = tmp_path_factory.mktemp("triton-sam2")
    onnx_path = export_encoder_onnx(model, root / "sam2_encoder.onnx")
    with PyTritonServer(triton_python, onnx_path, root, max_batch=4, max_queue_delay_us=200_000, threads=1) as server:
        yield server


def encoder_settings(tmp_path, **env: str) -> EncoderSettings:
    return EncoderSettings.from_env({"SAMFORGE_MODEL": "tiny_sam2", "SAMFORGE_REGISTRY_DIR": str(tmp_path / "registry"),
                                     "SAMFORGE_ONNX_CACHE_DIR": str(tmp_path / "onnx"), **env})


def assert_same_levels(served, reference) -> None:
    assert list(served) == LEVELS
    for name in LEVELS:
        assert served[name].shape == reference[name].shape, name
        assert (served[name] - reference[name]).abs().max().item() < TOL, name


def test_triton_backend_returns_the_three_levels_of_the_in_process_encoder(triton, model, tmp_path):
    backend = build_backend(encoder_settings(tmp_path, SAMFORGE_ENCODER_BACKEND="triton",
                                             SAMFORGE_TRITON_URL=triton.url), model)
    reference = Predictor(model)
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    try:
        assert backend.encode is not None and backend.encode.ready()
        expected = reference.encode_tensor(images)
        assert_same_levels(backend.encode(images[:3]), {n: t[:3] for n, t in expected.items()})  # one batch of 3
        with ThreadPoolExecutor(4) as pool:  # four single images at once: Triton batches and splits them
            served = list(pool.map(lambda i: backend.encode(images[i:i + 1]), range(4)))
        for i, levels in enumerate(served):
            assert_same_levels(levels, {n: t[i:i + 1] for n, t in expected.items()})
        assert max(triton.batch_sizes()) >= 3
    finally:
        backend.close()


def test_encoder_engine_on_triton_embeds_sam2_like_the_torch_backend(triton, model, tmp_path):
    cfg = encoder_settings(tmp_path, SAMFORGE_ENCODER_BACKEND="triton", SAMFORGE_TRITON_URL=triton.url)
    remote = EmbeddingEngine(model, cfg, backend=build_backend(cfg, model))
    local = EmbeddingEngine(model, encoder_settings(tmp_path))
    try:
        for seed in (2, 3):
            ours, theirs = remote.embed("t", png(seed)), local.embed("t", png(seed))
            assert ours.key == theirs.key
            assert_same_levels(ours.value.features, theirs.value.features)
    finally:
        remote.close()
        local.close()
