"""PerSAM-F one-shot personalisation: mask geometry, fitting, segmenting, artifacts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sam_core.adapters.artifact import CONFIG_NAME, WEIGHTS_NAME, adapted_net, load_adapter, save_adapter
from sam_core.errors import AdapterInvalid, InvalidInput
from sam_core.evaluation.metrics import dice
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import build_tiny
from sam_core.training.methods import MethodConfig, trainable_state
from sam_core.training.persam import (
    ENCODER_ADAPTER_METRIC,
    MASK_WEIGHTS,
    PROMPT_MODE,
    TARGET_FEAT,
    PerSamModel,
    box_prior,
    centred_features,
    fit_persam,
    load_persam,
    mask_on_grid,
    save_persam,
    segment_persam,
    similarity_map,
    target_feature,
)


def one_object_image(height: int, width: int, center: tuple[int, int], axes: tuple[int, int], angle: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like conftest's synthetic_scene but with a single bright ellipse: (H x W x 3 uint8, H x W bool)."""
    import cv2

    rng = np.random.default_rng(seed)
    image = rng.normal(60, 12, (height, width)).clip(0, 255)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, center, axes, angle, 0, 360, 1, -1)
    image[mask > 0] = rng.normal(200, 10, int(mask.sum())).clip(0, 255)
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), mask.astype(bool)


@pytest.fixture(scope="module")
def tiny_predictor(tiny_model):
    return Predictor(tiny_model)


@pytest.fixture(scope="module")
def fitted(tiny_predictor, scene):
    image, masks = scene
    calls: list[tuple[int, float]] = []
    persam, info = fit_persam(tiny_predictor, image, masks[0], steps=40, lr=1e-2,
                              callback=lambda step, loss: calls.append((step, loss)))
    return persam, info, calls


# ------------------------------------------------------------------------------------------ geometry
def test_mask_on_grid_follows_resize_and_padding(tiny_predictor, scene):
    image, _ = scene  # 240 x 320 -> input 96 x 128 on the 128 px tiny model, padded to 128 x 128, grid 8 x 8
    embedding = tiny_predictor.encode_one(image)
    assert embedding.input_size == (96, 128)
    coverage = mask_on_grid(np.ones(image.shape[:2], bool), embedding, tiny_predictor.spec.img_size)
    assert coverage.shape == (8, 8)
    torch.testing.assert_close(coverage[:6], torch.ones(6, 8))  # 96 / 16 = 6 image rows of cells
    torch.testing.assert_close(coverage[6:], torch.zeros(2, 8))  # the padding
    left = np.zeros(image.shape[:2], bool)
    left[:, :160] = True
    coverage = mask_on_grid(left, embedding, tiny_predictor.spec.img_size)
    torch.testing.assert_close(coverage[:6, :4], torch.ones(6, 4))
    torch.testing.assert_close(coverage[:, 4:], torch.zeros(8, 4))


def test_tiny_object_falls_back_to_its_most_covered_cell(tiny_predictor, scene):
    image, _ = scene
    embedding = tiny_predictor.encode_one(image)
    speck = np.zeros(image.shape[:2], bool)
    speck[100:103, 200:203] = True  # 3 x 3 px: far below half a 40 x 40 px cell
    coverage = mask_on_grid(speck, embedding, tiny_predictor.spec.img_size)
    assert 0 < float(coverage.max()) < 0.5
    feat = target_feature(embedding.image_embedding, coverage)
    row, col = divmod(int(torch.argmax(coverage)), coverage.shape[1])
    expected = torch.nn.functional.normalize(embedding.image_embedding[0, :, row, col], dim=0)
    torch.testing.assert_close(feat, expected)
    with pytest.raises(InvalidInput):
        target_feature(embedding.image_embedding, torch.zeros_like(coverage))


def test_similarity_map_is_in_the_original_frame(tiny_predictor, scene):
    image, _ = scene
    embedding = tiny_predictor.encode_one(image)
    feat = torch.nn.functional.normalize(embedding.image_embedding[0, :, 2, 3], dim=0)
    sim = similarity_map(tiny_predictor, embedding, feat)
    assert sim.shape == image.shape[:2]
    assert float(sim.max()) <= 1.0 + 1e-5 and float(sim.min()) >= -1.0 - 1e-5


def test_features_are_centred_on_the_image_cells(tiny_predictor, scene):
    image, _ = scene  # grid 8 x 8, the image covers the top 6 rows
    embedding = tiny_predictor.encode_one(image)
    centred = centred_features(embedding, tiny_predictor.spec.img_size)
    assert centred.shape == embedding.image_embedding.shape
    torch.testing.assert_close(centred[0, :, :6].mean(dim=(1, 2)), torch.zeros(centred.shape[1]), atol=1e-5, rtol=0)
    # a component shared by every feature (the padding too) changes neither the centred features nor the map
    shared = 3.0 * torch.randn(1, 32, 1, 1)
    shifted = dataclasses.replace(embedding, features={"image_embed": embedding.image_embedding + shared})
    torch.testing.assert_close(centred_features(shifted, 128), centred, atol=1e-4, rtol=0)
    feat = torch.nn.functional.normalize(centred[0, :, 2, 3], dim=0)
    torch.testing.assert_close(similarity_map(tiny_predictor, shifted, feat),
                               similarity_map(tiny_predictor, embedding, feat), atol=1e-4, rtol=0)


def test_box_prior_boxes_the_region_around_the_argmax():
    sim = torch.zeros(100, 200)
    sim[20:40, 30:70] = 1.0  # the argmax's region: x 30..69, y 20..39
    sim[30, 50] = 1.5
    sim[60:90, 120:190] = 0.9  # above the threshold (0.75) but not connected to the argmax
    sim[:, 0] = -1.0
    box = box_prior(sim)
    np.testing.assert_allclose(box, [30 - 6, 20 - 3, 69 + 6, 39 + 3])  # widened by 15 % of 40 x 20 per side
    np.testing.assert_allclose(box_prior(sim, margin=0.0), [30, 20, 69, 39])
    edge = torch.zeros(50, 60)
    edge[0:10, 50:60] = 1.0
    np.testing.assert_allclose(box_prior(edge), [48.5, 0, 59, 10.5])  # clipped to the image


# ------------------------------------------------------------------------------------------ fit / segment
def test_fit_persam_learns_three_weights(fitted, tiny_model):
    persam, info, calls = fitted
    assert persam.mask_weights.shape == (3,) and persam.target_feat.shape == (32,)
    assert float(persam.mask_weights.sum()) == pytest.approx(1.0, abs=1e-5)  # PerSAM-F: (1 - w1 - w2, w1, w2)
    assert float(persam.target_feat.norm()) == pytest.approx(1.0, abs=1e-5)
    assert persam.base_model_id == tiny_model.model_id
    losses = info["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert min(losses) <= losses[0]
    assert [step for step, _ in calls] == list(range(40)) and [loss for _, loss in calls] == losses
    assert 0.0 <= info["ref_dice"] <= 1.0 and info["seconds"] > 0
    assert 0.0 <= info["fit_dice"] <= 1.0 and 0.0 <= info["initial_fit_dice"] <= 1.0
    assert persam.prompt_mode == info["prompt_mode"] and info["ref_dice"] == info[f"ref_dice_{persam.prompt_mode}"]
    assert persam.encoder_adapter_id is None  # the base encoder


def test_fit_persam_rejects_bad_references(tiny_predictor, scene):
    image, masks = scene
    with pytest.raises(InvalidInput, match="empty"):
        fit_persam(tiny_predictor, image, np.zeros_like(masks[0]), steps=1)
    with pytest.raises(InvalidInput):
        fit_persam(tiny_predictor, image, masks[0][:-1], steps=1)
    with pytest.raises(InvalidInput) as error:
        fit_persam(tiny_predictor, image, masks[0], steps=1, prompt_mode="boxes")
    assert error.value.field == "prompt_mode"


@pytest.mark.parametrize(("instance", "chosen"), [(0, "points"), (1, "box")])
def test_auto_mode_keeps_the_mode_with_the_higher_reference_dice(tiny_predictor, scene, instance, chosen):
    """Deterministic on the tiny model (seed 0), whose reference Dice favours points for the scene's first
    ellipse and the box for its second; the explicit fits reproduce auto's reference Dice values."""
    image, masks = scene
    reference = masks[instance]
    embedding = tiny_predictor.encode_one(image)
    auto, info = fit_persam(tiny_predictor, image, reference, steps=20, lr=1e-2, embedding=embedding)
    assert info["prompt_mode"] == chosen, info
    by_mode = {mode: fit_persam(tiny_predictor, None, reference, steps=20, lr=1e-2, prompt_mode=mode,
                                embedding=embedding) for mode in ("points", "box")}
    for mode, (persam, mode_info) in by_mode.items():
        assert persam.prompt_mode == mode_info["prompt_mode"] == mode
        assert mode_info["ref_dice"] == info[f"ref_dice_{mode}"] == mode_info[f"ref_dice_{mode}"]
        torch.testing.assert_close(persam.mask_weights, auto.mask_weights, rtol=0, atol=0)  # always fitted
        mask, seg = segment_persam(tiny_predictor, persam, image, embedding=embedding)
        assert seg["prompt_mode"] == mode and dice(mask, reference) == info[f"ref_dice_{mode}"]
        assert (seg["box"] is None) == (mode == "points")
    expected = "box" if info["ref_dice_box"] > info["ref_dice_points"] else "points"
    assert auto.prompt_mode == info["prompt_mode"] == expected
    assert info["ref_dice"] == max(info["ref_dice_box"], info["ref_dice_points"])
    again, info_again = fit_persam(tiny_predictor, image, reference, steps=20, lr=1e-2)  # encodes itself
    assert again.prompt_mode == auto.prompt_mode and info_again["ref_dice"] == info["ref_dice"]
    with pytest.raises(InvalidInput):
        fit_persam(tiny_predictor, None, reference, steps=1)  # neither an image nor an embedding


@pytest.mark.parametrize("mode", ["points", "box"])
@pytest.mark.parametrize("cascade", [False, True])
def test_segment_persam_returns_a_bool_mask(fitted, tiny_predictor, scene, cascade, mode):
    persam = dataclasses.replace(fitted[0], prompt_mode=mode)
    image = np.ascontiguousarray(scene[0][::-1])  # another image of the same size
    mask, info = segment_persam(tiny_predictor, persam, image, cascade=cascade)
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert set(info) >= {"score", "point", "similarity_max", "box"} and info["prompt_mode"] == mode
    if mode == "box":
        x0, y0, x1, y1 = info["box"]
        assert 0 <= x0 <= info["point"][0] <= x1 < image.shape[1] and 0 <= y0 <= info["point"][1] <= y1 < image.shape[0]
    x, y = info["point"]
    assert 0 <= x < image.shape[1] and 0 <= y < image.shape[0]
    embedding = tiny_predictor.encode_one(image)
    again, _ = segment_persam(tiny_predictor, persam, None, cascade=cascade, embedding=embedding)
    np.testing.assert_array_equal(mask, again)


def test_segment_persam_refuses_another_models_concept(fitted, tiny_predictor, scene):
    persam, _, _ = fitted
    other = Predictor(build_tiny(seed=1))
    with pytest.raises(AdapterInvalid):
        segment_persam(other, persam, scene[0])
    with pytest.raises(InvalidInput) as error:
        segment_persam(tiny_predictor, dataclasses.replace(persam, prompt_mode="lines"), scene[0])
    assert error.value.field == "prompt_mode"


def _adapter_model(tiny_model, tmp_path, method: str):
    """The tiny model with a saved-and-loaded ``method`` adapter whose trainable tensors were perturbed."""
    cfg = MethodConfig(method)
    sam = adapted_net(tiny_model, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    save_adapter(tmp_path / method, tiny_model, trainable_state(sam), cfg, name=method)
    return load_adapter(tiny_model, tmp_path / method)


def test_segment_persam_refuses_another_image_encoder(fitted, tiny_model, tiny_predictor, scene, tmp_path):
    persam = fitted[0]
    lora = _adapter_model(tiny_model, tmp_path, "lora")
    assert lora.model_id == tiny_model.model_id and lora.encoder_adapter_id is not None
    lora_predictor = Predictor(lora)
    with pytest.raises(AdapterInvalid, match="encoder adapter"):
        segment_persam(lora_predictor, persam, scene[0])
    decoder = _adapter_model(tiny_model, tmp_path, "decoder")  # shares the base encoder: accepted
    assert decoder.encoder_adapter_id is None
    mask, _ = segment_persam(Predictor(decoder), persam, scene[0])
    assert mask.shape == scene[0].shape[:2]

    on_lora, _ = fit_persam(lora_predictor, scene[0], scene[1][0], steps=5)
    assert on_lora.encoder_adapter_id == lora.encoder_adapter_id and on_lora.base_model_id == tiny_model.model_id
    segment_persam(lora_predictor, on_lora, scene[0])
    with pytest.raises(AdapterInvalid, match="encoder adapter"):
        segment_persam(tiny_predictor, on_lora, scene[0])
    config = save_persam(tmp_path / "on_lora", tiny_model, on_lora)  # the base model's id, the adapter recorded
    assert config.metrics[ENCODER_ADAPTER_METRIC] == lora.encoder_adapter_id
    loaded = load_persam(tiny_model, tmp_path / "on_lora")
    assert loaded.encoder_adapter_id == lora.encoder_adapter_id
    with pytest.raises(AdapterInvalid, match="encoder adapter"):
        segment_persam(tiny_predictor, loaded, scene[0])
    with pytest.raises(InvalidInput):
        save_persam(tmp_path / "clash", tiny_model, on_lora, metrics={ENCODER_ADAPTER_METRIC: None})


# ------------------------------------------------------------------------------------------ artifacts
def test_save_load_round_trip_gives_identical_masks(fitted, tiny_model, tiny_predictor, scene, tmp_path):
    persam, info, _ = fitted
    config = save_persam(tmp_path / "p1", tiny_model, persam, metrics={"ref_dice": info["ref_dice"]}, name="blob")
    assert config.method == "persam" and config.shares_base_embeddings and config.n_parameters == 36
    assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert json.loads((tmp_path / "p1" / CONFIG_NAME).read_text())["name"] == "blob"
    loaded = load_persam(tiny_model, tmp_path / "p1")
    torch.testing.assert_close(loaded.target_feat, persam.target_feat, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mask_weights, persam.mask_weights, rtol=0, atol=0)
    assert loaded.prompt_mode == persam.prompt_mode and loaded.encoder_adapter_id is None
    assert config.metrics == {"ref_dice": info["ref_dice"], ENCODER_ADAPTER_METRIC: None}
    other_mode = "box" if persam.prompt_mode == "points" else "points"
    save_persam(tmp_path / "p2", tiny_model, dataclasses.replace(persam, prompt_mode=other_mode))
    assert load_persam(tiny_model, tmp_path / "p2").prompt_mode == other_mode
    embedding = tiny_predictor.encode_one(scene[0])
    a, info_a = segment_persam(tiny_predictor, persam, scene[0], embedding=embedding)
    b, info_b = segment_persam(tiny_predictor, loaded, scene[0], embedding=embedding)
    np.testing.assert_array_equal(a, b)
    assert info_a == info_b


def test_load_persam_refuses_a_wrong_base_model(fitted, tiny_model, tmp_path):
    save_persam(tmp_path / "p", tiny_model, fitted[0])
    with pytest.raises(AdapterInvalid, match="trained on"):
        load_persam(build_tiny(seed=1), tmp_path / "p")
    with pytest.raises(InvalidInput):
        save_persam(tmp_path / "q", build_tiny(seed=1), fitted[0])


def test_load_persam_refuses_a_decoder_artifact(tiny_model, tmp_path):
    cfg = MethodConfig("decoder")
    save_adapter(tmp_path / "dec", tiny_model, trainable_state(adapted_net(tiny_model, cfg)), cfg)
    with pytest.raises(AdapterInvalid, match="not persam"):
        load_persam(tiny_model, tmp_path / "dec")


def test_load_persam_refuses_bad_tensors(fitted, tiny_model, tmp_path):
    persam = fitted[0]
    mode = torch.tensor([0])
    good = {TARGET_FEAT: persam.target_feat, MASK_WEIGHTS: persam.mask_weights, PROMPT_MODE: mode}
    metrics = {ENCODER_ADAPTER_METRIC: None}
    cases = {
        "missing": {TARGET_FEAT: persam.target_feat, MASK_WEIGHTS: persam.mask_weights},  # no prompt mode
        "unexpected": {**good, "persam.extra": torch.zeros(2)},
        "wrong shape": {**good, TARGET_FEAT: persam.target_feat[:8]},
        "non-finite": {**good, MASK_WEIGHTS: torch.tensor([float("nan"), 0.5, 0.5])},
        "prompt_mode must be an integer": {**good, PROMPT_MODE: torch.tensor([2])},
        "prompt_mode must be an integer in": {**good, PROMPT_MODE: torch.tensor([1.0])},
    }
    for i, (label, tensors) in enumerate(cases.items()):
        save_adapter(tmp_path / f"case{i}", tiny_model, tensors, MethodConfig("persam"), metrics=metrics)
        with pytest.raises(AdapterInvalid, match=label):
            load_persam(tiny_model, tmp_path / f"case{i}")
    save_adapter(tmp_path / "no_encoder_id", tiny_model, good, MethodConfig("persam"))
    with pytest.raises(AdapterInvalid, match=ENCODER_ADAPTER_METRIC):
        load_persam(tiny_model, tmp_path / "no_encoder_id")
    save_persam(tmp_path / "tampered", tiny_model, persam)
    weights = tmp_path / "tampered" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid, match="checksum"):
        load_persam(tiny_model, tmp_path / "tampered")
    with pytest.raises(InvalidInput):
        save_persam(tmp_path / "bad", tiny_model, PerSamModel(persam.target_feat, torch.ones(2), persam.base_model_id))


# ------------------------------------------------------------------------------------------ real weights
@pytest.mark.slow
def test_litemedsam_finds_the_object_in_a_new_image(litemedsam_model):
    """Fit on image A's ellipse, segment image B whose similar ellipse is elsewhere.

    LiteMedSAM was trained with box prompts only: with PerSAM's two point prompts its multimask logits
    barely outline the object (reference Dice ~0.02 here, ~0.29 on B), so ``prompt_mode="auto"`` keeps
    the box prior (reference Dice ~0.99), which segments B's object (measured Dice ~0.99).
    """
    predictor = Predictor(litemedsam_model)
    image_a, mask_a = one_object_image(240, 320, (90, 80), (38, 20), 20, seed=0)
    image_b, mask_b = one_object_image(240, 320, (220, 160), (30, 26), 60, seed=1)
    persam, info = fit_persam(predictor, image_a, mask_a, steps=50)
    assert mask_a[info["point"][1], info["point"][0]]  # the prior finds the reference's own object
    assert all(np.isfinite(info["losses"])) and persam.mask_weights.shape == (3,)
    assert info["ref_dice_points"] < 0.2 and info["ref_dice_box"] > 0.9
    assert persam.prompt_mode == info["prompt_mode"] == "box"

    embedding_b = predictor.encode_one(image_b)
    mask, seg = segment_persam(predictor, persam, image_b, embedding=embedding_b)
    x, y = seg["point"]
    assert mask_b[y, x], f"location prior argmax {seg['point']} is outside B's object"
    x0, y0, x1, y1 = seg["box"]
    ys, xs = np.nonzero(mask_b)
    assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()  # the box prior holds B's object
    assert mask.shape == mask_b.shape and mask.dtype == bool
    b_dice = dice(mask, mask_b)
    points_mask, _ = segment_persam(predictor, dataclasses.replace(persam, prompt_mode="points"), None,
                                    embedding=embedding_b)
    print(f"LiteMedSAM PerSAM: ref dice points {info['ref_dice_points']:.3f} box {info['ref_dice_box']:.3f}; "
          f"B dice box {b_dice:.3f}, points {dice(points_mask, mask_b):.3f}")
    assert b_dice > 0.9
