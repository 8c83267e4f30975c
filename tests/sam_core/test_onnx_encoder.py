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
