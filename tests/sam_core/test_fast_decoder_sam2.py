"""The re-associated fast decoder on SAM 2 / 2.1 equals the official SAM 2 mask decoder (high-resolution
features, object-score token, single-mask stability fallback), and is what a SAM 2 predictor selects."""

from __future__ import annotations

import copy

import pytest
import torch

from sam_core.inference.predictor import Predictor
from sam_core.modeling import sam2
from sam_core.modeling.family import PromptBatch
from sam_core.modeling.fast_decoder import FastMaskDecoder
from sam_core.modeling.registry import load_model
from sam_core.modeling.sam2 import EMBED, HIGH_RES_S0, HIGH_RES_S1, Sam2Decoding, Sam2FastDecoding

TOLERANCE = 1e-4  # the plain decoder's low-res logits and IoU, absolute


@pytest.fixture(scope="module")
def tiny2():
    return load_model("tiny_sam2")


def _features(net: sam2.Sam2Model, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, *shape, generator=g) for name, shape in net.feature_shapes().items()}


def _prompts(net: sam2.Sam2Model, n: int, kind: str, seed: int = 0) -> PromptBatch:
    g = torch.Generator().manual_seed(seed)
    size = net.image_size
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * size * 0.3], dim=1)
    points = (torch.rand(n, 3, 2, generator=g) * size, torch.randint(0, 2, (n, 3), generator=g, dtype=torch.int))
    low = 4 * net.feature_shapes()[EMBED][1]
    masks = torch.randn(n, 1, low, low, generator=g) * 4
    return PromptBatch(points=points if "points" in kind else None, boxes=boxes if "box" in kind else None,
                       masks=masks if kind == "box+mask" else None)


def _assert_parity(net: sam2.Sam2Model, features: dict[str, torch.Tensor], prompts: PromptBatch, multimask: bool,
                   chunk: int | None = None) -> None:
    fast = net.mask_decoding(fast=True)
    assert isinstance(fast, Sam2FastDecoding)
    if chunk is not None:
        fast.fast.chunk = chunk
    low, iou = fast(features, prompts, multimask)
    ref_low, ref_iou = Sam2Decoding(net)(features, prompts, multimask)
    assert low.shape == ref_low.shape and iou.shape == ref_iou.shape
    torch.testing.assert_close(low, ref_low, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["box", "points", "box+points", "box+mask"])
@pytest.mark.parametrize("multimask", [False, True])
def test_matches_official_decoder_on_every_prompt_kind(tiny2, kind, multimask):
    """5 prompts in chunks of 2, 2, 1; shared dense (>= 4 prompts: the low-rank first upscaling layer) or per
    prompt (mask input)."""
    net = tiny2.net
    _assert_parity(net, _features(net), _prompts(net, 5, kind), multimask, chunk=2)


def test_single_mask_fallback_selects_as_the_official_decoder(tiny2):
    """With the stability threshold at the median of the prompts' single-mask stability, some prompts keep
    token 0 and some fall back to their best multimask output: both branches are compared."""
    net = copy.deepcopy(tiny2.net)
    features, prompts = _features(net, seed=3), _prompts(net, 8, "box", seed=3)
    decoder = net.sam_mask_decoder
    with torch.inference_mode():
        sparse, dense = net.prompt_embeddings(prompts)
        every, _, _, _ = decoder.predict_masks(features[EMBED], net.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                               True, [features[HIGH_RES_S0], features[HIGH_RES_S1]])
        stability = decoder._get_stability_scores(every[:, 0:1]).flatten()
    decoder.dynamic_multimask_stability_thresh = float(stability.median())
    stable = stability >= decoder.dynamic_multimask_stability_thresh
    assert stable.any() and not stable.all()
    _assert_parity(net, features, prompts, multimask=False)


@pytest.mark.slow
def test_matches_official_decoder_at_sam2_1_hiera_t_size():
    """The real SAM 2.1 decoder (256 channels, 8 heads, 64 x 64 tokens, 256 x 256 / 128 x 128 high-res
    levels, random weights) on random features: 4 boxes, single mask (with the fallback) and multimask."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = sam2.from_config("configs/sam2.1/sam2.1_hiera_t.yaml")
    features, prompts = _features(net), _prompts(net, 4, "box")
    for multimask in (False, True):
        _assert_parity(net, features, prompts, multimask)


def test_per_prompt_features_with_autograd(tiny2):
    """Every prompt with its own image's features (Bh = B high-res rows, sliced per chunk) through the
    autograd path equals the official ``predict_masks`` without repeating the image."""
    net = tiny2.net
    features, prompts = _features(net, seed=5, batch=3), _prompts(net, 3, "box", seed=5)
    with torch.no_grad():
        sparse, dense = net.prompt_embeddings(prompts)
    pe = net.sam_prompt_encoder.get_dense_pe()
    high_res = (features[HIGH_RES_S0], features[HIGH_RES_S1])
    embed = features[EMBED].requires_grad_(True)
    fast = FastMaskDecoder.for_decoder(net.sam_mask_decoder, chunk=2)
    low, iou = fast.forward(embed, pe, sparse, dense, True, high_res=high_res)
    assert low.requires_grad
    ref_low, ref_iou, _, _ = net.sam_mask_decoder.predict_masks(embed, pe, sparse, dense, False, list(high_res))
    torch.testing.assert_close(low, ref_low[:, 1:], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(iou, ref_iou[:, 1:], atol=TOLERANCE, rtol=0)


def test_follows_weight_changes_between_calls(tiny2):
    """The memo of the shared first-block products is dropped when a decoder weight changes in place."""
    net = copy.deepcopy(tiny2.net)
    features, prompts = _features(net, seed=7), _prompts(net, 4, "box", seed=7)
    decoding = net.mask_decoding()
    first, _ = decoding(features, prompts, True)
    again, _ = decoding(features, prompts, True)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    with torch.no_grad():
        net.sam_mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
    low, _ = decoding(features, prompts, True)
    reference, _ = Sam2Decoding(net)(features, prompts, True)
    torch.testing.assert_close(low, reference, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(low, first, atol=1e-3)


def test_high_res_features_are_required_by_a_sam2_decoder(tiny2):
    net = tiny2.net
    features, prompts = _features(net), _prompts(net, 2, "box")
    sparse, dense = net.prompt_embeddings(prompts)
    fast = FastMaskDecoder.for_decoder(net.sam_mask_decoder)
    with pytest.raises(ValueError, match="high_res"):
        fast(features[EMBED], net.sam_prompt_encoder.get_dense_pe(), sparse, dense[:1], True)


def test_predictor_selects_the_fast_decoder_for_sam2_unless_told_not_to(tiny2):
    assert isinstance(Predictor(tiny2).decoding, Sam2FastDecoding)
    assert isinstance(Predictor(tiny2, fast_decoder=False).decoding, Sam2Decoding)
