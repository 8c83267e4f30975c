"""The exported image encoder runs in ONNX Runtime at any batch size and equals PyTorch."""

import pytest
import torch

from sam_core.export.onnx_encoder import OnnxEncoder, export_encoder_onnx

pytest.importorskip("onnxruntime")


def _check(model, path, tol):
    encoder = OnnxEncoder(path, threads=1)
    size = model.spec.img_size
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.net.image_encoder.eval()(x)
    for b in (1, 3):  # exported at batch 2: the batch axis is dynamic
        out = encoder(x[:b])
        assert out.shape == ref[:b].shape
        assert (out - ref[:b]).abs().max().item() < tol


def test_tiny_encoder_export(tiny_model, tmp_path):
    path = export_encoder_onnx(tiny_model, tmp_path / "encoder.onnx")
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind
    _check(tiny_model, path, 1e-4)


@pytest.mark.integration
def test_litemedsam_tinyvit_export_has_a_dynamic_batch(litemedsam_model, litemedsam_encoder_onnx):
    _check(litemedsam_model, litemedsam_encoder_onnx, 1e-4)


def test_state_dict_hash_takes_zero_dim_tensors_and_keeps_earlier_digests():
    """LiteMedSAM's encoder holds 0-dim BatchNorm counters; hashing them failed, and with it the encoder's keyed
    ONNX cache path (SAMFORGE_ENCODER_BACKEND=onnx). Tensors of one or more dims hash as before."""
    import hashlib

    from sam_core.modeling.registry import state_dict_sha256

    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    before = hashlib.sha256(f"w|{weight.dtype}|{tuple(weight.shape)}|".encode() + weight.numpy().tobytes())
    assert state_dict_sha256({"w": weight}) == before.hexdigest()
    counters = {"n": torch.tensor(7)}
    assert state_dict_sha256(counters) != state_dict_sha256({"n": torch.tensor(8)})
