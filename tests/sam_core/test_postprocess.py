"""Mask post-processing (upscale, threshold, stability) equals the plain batched path it replaced."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_core.inference.postprocess import count_above, stability_score
from sam_core.inference.predictor import Predictor
from sam_core.inference.types import Embedding
from sam_core.modeling.preprocess import resized_shape, upscale_logits


def _reference_upscale(low_res, img_size, input_size, original_size):
    """``Sam.postprocess_masks``: always both bilinear resizes."""
    masks = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def _reference_stability(logits, threshold, offset=1.0):
    inter = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int64)
    union = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int64)
    return torch.where(union > 0, inter.float() / union.clamp(min=1).float(), torch.ones_like(inter.float()))


def _logits(n, m, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, side, side, generator=g) * 6
    logits[0, 0] = -20.0  # an empty mask: stability 1 by definition
    logits[-1, -1, :4, :4] = 1.0  # values exactly at threshold + offset
    return logits


@pytest.mark.parametrize("low, img", [(64, 128), (256, 256)])  # SAM-like (two resizes), LiteMedSAM (one)
@pytest.mark.parametrize("original", [(97, 131), (131, 97), (200, 200), (83, 128), (128, 128)])
def test_upscale_equals_two_resizes(low, img, original):
    input_size = resized_shape(original, img)
    low_res = _logits(3, 2, low)
    ours = upscale_logits(low_res, img, input_size, original)
    assert ours.shape == (3, 2, *original)
    assert torch.equal(ours, _reference_upscale(low_res, img, input_size, original))


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.7])
@pytest.mark.parametrize("original", [(97, 131), (131, 97), (128, 128)])
def test_postprocess_equals_batched_reference(tiny_model, multimask, threshold, original):
    predictor = Predictor(tiny_model, decode_batch=2)
    spec = predictor.spec
    embedding = Embedding(features={"image_embed": torch.zeros(1)}, original_size=original,
                          input_size=resized_shape(original, spec.img_size), model_id=predictor.model_id,
                          preprocess_version=spec.preprocess_version)
    m = 3 if multimask else 1
    low_res = _logits(5, m, spec.low_res_size, seed=int(threshold * 10) + m)
    masks = np.zeros((5, m, *original), dtype=bool)
    stability = torch.full((5, m), -1.0)
    predictor.postprocess(low_res, embedding, threshold, masks, stability)
    ref = _reference_upscale(low_res, spec.img_size, embedding.input_size, original)
    np.testing.assert_array_equal(masks, (ref > threshold).numpy())
    assert torch.equal(stability, _reference_stability(ref, threshold))
    assert stability[0, 0] == 1.0


def test_stability_score_counts():
    logits = torch.tensor([[[0.5, 1.5], [-0.5, -1.5]], [[-3.0, -3.0], [-3.0, -3.0]]])
    torch.testing.assert_close(stability_score(logits, 0.0), torch.tensor([1 / 3, 1.0]))
    assert torch.equal(stability_score(_logits(4, 3, 33), 0.2), _reference_stability(_logits(4, 3, 33), 0.2))


def test_dense_pe_cache_follows_the_weights(tiny_model):
    model = dataclasses.replace(tiny_model, net=copy.deepcopy(tiny_model.net))
    predictor = Predictor(model)
    encoder = model.net.prompt_encoder
    first = predictor.decoding.dense_pe()
    assert torch.equal(first, encoder.get_dense_pe())
    assert predictor.decoding.dense_pe() is first  # cached
    with torch.no_grad():
        encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
    second = predictor.decoding.dense_pe()
    assert not torch.equal(first, second)
    assert torch.equal(second, encoder.get_dense_pe())


@pytest.mark.parametrize("shape", [(7, 9), (2, 3, 31, 17), (1, 1, 40, 40)])
@pytest.mark.parametrize("value", [0.0, 0.7, -1.3])
def test_count_above_equals_torch(shape, value):
    g = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(*shape[:-1], shape[-1] + 5, generator=g)[..., 2:-3]  # a non-contiguous view
    logits[..., 0, 0] = float("nan")
    logits[..., 1, 1] = torch.tensor(value, dtype=torch.float32)  # exactly at the (float32) threshold
    expected = (logits > value).sum(dim=(-1, -2), dtype=torch.int64)
    assert torch.equal(count_above(logits, value), expected)
    assert torch.equal(count_above(logits.double(), value), (logits.double() > value).sum(dim=(-1, -2)))


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (2, 3000), (1, 1)])
def test_extreme_aspect_ratios_embed_and_decode(tiny_model, shape):
    """A valid image whose short side would round to zero pixels at the model's input size still embeds
    (each resized side is clamped to one pixel), and its masks come back at the original size."""
    from sam_core.inference.prompts import Prompt

    h, w = shape
    predictor = Predictor(tiny_model)
    embedding = predictor.encode_one(np.full((h, w, 3), 100, np.uint8))
    assert min(embedding.input_size) >= 1 and max(embedding.input_size) == tiny_model.spec.img_size
    result = predictor.decode(embedding, [Prompt.from_box([0, 0, w - 1, h - 1])])
    assert result.masks.shape == (1, 1, h, w)


def test_resized_shape_matches_segment_anything_where_no_side_vanishes():
    from segment_anything.utils.transforms import ResizeLongestSide

    for size in [(480, 640), (1000, 3), (3, 1000), (257, 256), (1, 1)]:
        expected = ResizeLongestSide.get_preprocess_shape(size[0], size[1], 1024)
        assert resized_shape(size, 1024) == expected
    assert resized_shape((1, 5000), 256) == (1, 256)


@pytest.mark.parametrize("model", ["litemedsam", "vit_b"])  # cv2 INTER_AREA and PIL bilinear resizes
def test_both_resizes_accept_a_one_pixel_side(model):
    from sam_core.modeling.preprocess import resize_image
    from sam_core.modeling.registry import SPECS

    spec = SPECS[model]
    assert resize_image(np.full((1, 5000, 3), 7, np.uint8), spec).shape == (1, spec.img_size, 3)
    assert resize_image(np.full((5000, 2, 3), 7, np.uint8), spec).shape == (spec.img_size, 1, 3)
