"""SAM 2.1 parity: samforge's Sam2Model vs the official SAM2ImagePredictor on the same random sam2.1_hiera_t
weights, saved in the official checkpoint format and loaded back through the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core.errors import ModelLoadError
from sam_core.modeling.family import PromptBatch
from sam_core.modeling.preprocess import preprocess, upscale_logits
from sam_core.modeling.registry import load_model

pytestmark = pytest.mark.slow
NAME, CONFIG = "sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official SAM2ImagePredictor with the image set, checkpoint path, image)."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_sam2(CONFIG, ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    image = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    return predictor, path, image


@pytest.fixture(scope="module")
def ours(official):
    """(LoadedModel from the checkpoint, its features of the image)."""
    _, path, image = official
    loaded = load_model(NAME, checkpoint=path)
    with torch.no_grad():
        features = loaded.net.encode(preprocess(image, loaded.spec)[0])
    return loaded, features


def test_checkpoint_round_trip_and_encode_equals_set_image(official, ours):
    predictor, path, _ = official
    loaded, features = ours
    assert loaded.model_id.startswith(f"{NAME}-") and loaded.source == str(path)
    reference = predictor._features
    torch.testing.assert_close(features["image_embed"], reference["image_embed"], atol=1e-5, rtol=0)
    torch.testing.assert_close(features["high_res_feat_s0"], reference["high_res_feats"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(features["high_res_feat_s1"], reference["high_res_feats"][1], atol=1e-5, rtol=0)
    for name, (c, h, w) in loaded.net.feature_shapes().items():
        assert features[name].shape == (1, c, h, w)


def _cases():
    points = (torch.tensor([[[300.0, 400.0], [620.0, 500.0]]]), torch.tensor([[1, 0]], dtype=torch.int))
    boxes = torch.tensor([[100.0, 150.0, 700.0, 800.0]])
    many = torch.stack([torch.tensor([20.0 + 60 * i, 40.0 + 30 * i, 500.0 + 50 * i, 600.0 + 40 * i]) for i in range(6)])
    return {
        "points": PromptBatch(points=points),
        "box": PromptBatch(boxes=boxes),
        "box+points": PromptBatch(points=points, boxes=boxes),
        "many boxes": PromptBatch(boxes=many),
        "many points": PromptBatch(points=(torch.rand(5, 3, 2, generator=torch.Generator().manual_seed(1)) * 1024,
                                           torch.tensor([[1, 1, 0]] * 5, dtype=torch.int))),
    }


def _official(predictor, prompts: PromptBatch, multimask: bool):
    coords, labels = prompts.points if prompts.points is not None else (None, None)
    masks, iou, low_res = predictor._predict(coords, labels, prompts.boxes, prompts.masks,
                                             multimask_output=multimask, return_logits=True)
    return masks, iou, low_res


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", list(_cases()))
def test_decoding_matches_the_official_predictor(official, ours, case, multimask):
    predictor, _, image = official
    loaded, features = ours
    prompts = _cases()[case]
    masks, iou, low_res = _official(predictor, prompts, multimask)
    ours_low, ours_iou = loaded.net.mask_decoding()(features, prompts, multimask)
    torch.testing.assert_close(ours_low.clamp(-32.0, 32.0), low_res, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_iou, iou, atol=1e-4, rtol=0)
    upscaled = upscale_logits(ours_low, loaded.spec, (1024, 1024), image.shape[:2])
    torch.testing.assert_close(upscaled, masks, atol=1e-4, rtol=0)


def test_mask_input_decoding_matches_the_official_predictor(official, ours):
    predictor, _, _ = official
    loaded, features = ours
    first = _cases()["box+points"]
    _, _, low_res = _official(predictor, first, False)
    prompts = PromptBatch(points=first.points, masks=low_res)
    _, iou, again = _official(predictor, prompts, True)
    ours_low, ours_iou = loaded.net.mask_decoding()(features, prompts, True)
    torch.testing.assert_close(ours_low.clamp(-32.0, 32.0), again, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_iou, iou, atol=1e-4, rtol=0)


def test_strict_loading_names_a_missing_and_an_unexpected_key(official, tmp_path):
    _, path, _ = official
    state = torch.load(path, weights_only=True)["model"]
    missing = dict(state)
    del missing["sam_mask_decoder.iou_token.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match=r"missing.*sam_mask_decoder\.iou_token\.weight"):
        load_model(NAME, checkpoint=tmp_path / "missing.pt")
    extra = dict(state, **{"image_encoder.trunk.extra_head.weight": torch.zeros(2)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match=r"unexpected.*image_encoder\.trunk\.extra_head\.weight"):
        load_model(NAME, checkpoint=tmp_path / "extra.pt")


# ---------------------------------------------------------------------------------------------- end to end
BOX = [40.0, 30.0, 330.0, 250.0]


def _official_box(predictor):
    logits, iou, _ = predictor.predict(box=np.array(BOX), multimask_output=False, return_logits=True)
    return logits[0], float(iou[0])


def _assert_same_mask(mask: np.ndarray, logits: np.ndarray) -> None:
    """Equal wherever the official logit is not within 1e-3 of the threshold."""
    decided = np.abs(logits) > 1e-3
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(mask[decided], logits[decided] > 0)


def test_predictor_matches_the_official_predictor(official, ours):
    from sam_core.inference.predictor import Predictor
    from sam_core.inference.prompts import Prompt

    predictor, _, image = official
    loaded, _ = ours
    ours_predictor = Predictor(loaded)
    result = ours_predictor.decode(ours_predictor.encode_one(image), [Prompt.from_box(BOX)], multimask=False)
    logits, iou = _official_box(predictor)
    assert abs(float(result.iou_scores[0, 0]) - iou) < 1e-3
    _assert_same_mask(result.masks[0, 0], logits)


def test_cli_predict_with_the_checkpoint_matches_the_official_predictor(official, tmp_path, capsys):
    import json

    from sam_core.io.masks import decode_png
    from services.cli import main
    from tests.conftest import png_bytes

    predictor, path, image = official
    (tmp_path / "image.png").write_bytes(png_bytes(image))
    code = main(["predict", "--model", NAME, "--checkpoint", str(path), "--image", str(tmp_path / "image.png"),
                 "--box", ",".join(str(int(v)) for v in BOX), "--out", str(tmp_path / "mask.png")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    logits, iou = _official_box(predictor)
    assert abs(summary["prompts"][0]["iou_score"] - iou) < 1e-3
    _assert_same_mask(decode_png((tmp_path / "mask.png").read_bytes()).astype(bool), logits)
