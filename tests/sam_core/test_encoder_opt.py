"""BatchNorm folding + channels-last leave the encoder's output unchanged (to float32 rounding)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sam_core.inference.predictor import Predictor
from sam_core.modeling.encoder_opt import fuse_conv_bn, optimized_encoder


def test_fuse_conv_bn_equals_conv_then_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    bn.eval()
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fuse_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_encoder_without_batchnorm_is_returned_as_is(tiny_model):
    encoder = tiny_model.net.image_encoder
    assert optimized_encoder(encoder) is encoder


@pytest.mark.integration
def test_litemedsam_folded_encoder_matches_and_leaves_the_original_alone(litemedsam_model):
    encoder = litemedsam_model.net.image_encoder.eval()
    before = copy.deepcopy(encoder.state_dict())
    fast = optimized_encoder(encoder)
    assert fast is not encoder
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = encoder(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.integration
def test_predictor_embeddings_with_and_without_optimisation(litemedsam_model, scene):
    image, _ = scene
    fast = Predictor(litemedsam_model).encode_one(image).image_embedding
    plain = Predictor(litemedsam_model, optimize_encoder=False).encode_one(image).image_embedding
    assert np.abs((fast - plain).numpy()).max() < 1e-4
