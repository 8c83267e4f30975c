"""SAM 2 in ONNX Runtime: the encoder graph gives all three named feature levels at any batch size, and the
prompt decoder graph gives the in-process decoder's low-res logits and IoU for every prompt kind.

tiny_sam2 (128 px) covers the mechanics in seconds; the slow test repeats the encoder check on a random
sam2.1_hiera_t (1024 px) loaded from a checkpoint in the official ``{"model": state_dict}`` format.
"""

from __future__ import annotations

import pytest
import torch

from sam_core.export.onnx_encoder import OnnxEncoder, encoder_output_names, export_encoder_onnx
from sam_core.modeling.registry import load_model

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny2():
    return load_model("tiny_sam2")


def _check_encoder(model, folder, batches=(1, 3)) -> None:
    """Export at batch 2, run at ``batches``: every level named, shaped as the family says, within TOL."""
    path = export_encoder_onnx(model, folder / "encoder.onnx")
    assert path.exists() and not list(folder.glob(".*.tmp"))
    encoder = OnnxEncoder(path, threads=1)
    assert encoder.output_names == encoder_output_names(model.net) == model.net.feature_names
    size = model.spec.img_size
    images = torch.rand(max(batches), 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model.net.encode(images)
    for batch in batches:
        features = model.net.features_from_encoder(encoder(images[:batch]))
        assert list(features) == list(model.net.feature_names)
        for name, (channels, h, w) in model.net.feature_shapes().items():
            assert features[name].shape == (batch, channels, h, w), name
            difference = (features[name] - reference[name][:batch]).abs().max().item()
            assert difference < TOL, (name, batch, difference)


def test_tiny_sam2_encoder_has_three_named_levels_and_a_dynamic_batch(tiny2, tmp_path):
    _check_encoder(tiny2, tmp_path)


@pytest.mark.slow
def test_sam2_1_hiera_t_encoder_export(tmp_path):
    from sam2.build_sam import build_sam2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        official = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, checkpoint)
    del official
    _check_encoder(load_model("sam2.1_hiera_t", checkpoint=checkpoint), tmp_path, batches=(1,))
