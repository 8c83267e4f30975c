"""Tests of sam_core.data.prompt_sim (pure numpy, seeded generators)."""

from __future__ import annotations

import numpy as np
import pytest

from sam_core.data.prompt_sim import (
    PromptConfig,
    box_from_mask,
    correction_point,
    jitter_box,
    sample_points,
    simulate_prompt,
)
from sam_core.errors import InvalidInput


def _rect() -> np.ndarray:
    """64 x 80 mask with rows 5..9 and columns 3..12 set."""
    m = np.zeros((64, 80), bool)
    m[5:10, 3:13] = True
    return m


def test_box_from_mask_is_tight_and_inclusive() -> None:
    box = box_from_mask(_rect())
    assert box.dtype == np.float32 and box.tolist() == [3, 5, 12, 9]
    one = np.zeros((10, 10), bool)
    one[7, 5] = True
    assert box_from_mask(one).tolist() == [5, 7, 5, 7]
    with pytest.raises(InvalidInput):
        box_from_mask(np.zeros((4, 4), bool))


def test_jitter_is_bounded_by_fraction_and_pixel_cap() -> None:
    rng = np.random.default_rng(0)
    box = np.array([100, 100, 199, 149], np.float32)  # 100 x 50 box
    for _ in range(200):
        out = jitter_box(box, rng, max_shift=0.1, max_pixels=20, image_size=(1000, 1000))
        delta = np.abs(out - box)
        assert delta[[0, 2]].max() <= 10.0 + 1e-4 and delta[[1, 3]].max() <= 5.0 + 1e-4
    big = np.array([100, 100, 599, 599], np.float32)  # 10 % of 500 = 50 px, capped at 20
    deltas = [np.abs(jitter_box(big, rng, image_size=(1000, 1000)) - big).max() for _ in range(200)]
    assert max(deltas) <= 20.0 + 1e-4 and max(deltas) > 15.0


def test_jitter_is_clipped_to_the_image_and_ordered() -> None:
    rng = np.random.default_rng(1)
    box = np.array([0, 0, 31, 23], np.float32)  # whole 24 x 32 image
    for _ in range(100):
        x0, y0, x1, y1 = jitter_box(box, rng, max_shift=0.5, max_pixels=None, image_size=(24, 32))
        assert 0 <= x0 <= x1 <= 31 and 0 <= y0 <= y1 <= 23
    assert np.array_equal(jitter_box(box, rng, max_shift=0.0, image_size=(24, 32)), box)


def test_points_fall_inside_mask_and_background() -> None:
    mask = _rect()
    coords, labels = sample_points(mask, np.random.default_rng(0), n_pos=5, n_neg=7)
    assert coords.shape == (12, 2) and coords.dtype == np.float32 and labels.dtype == np.int32
    assert labels.tolist() == [1] * 5 + [0] * 7
    xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert mask[ys[:5], xs[:5]].all() and not mask[ys[5:], xs[5:]].any()


def test_points_full_mask_gives_fewer_negatives_and_center_option() -> None:
    coords, labels = sample_points(np.ones((8, 8), bool), np.random.default_rng(0), n_pos=1, n_neg=3)
    assert labels.tolist() == [1]
    square = np.zeros((21, 21), bool)
    square[5:16, 5:16] = True
    coords, _ = sample_points(square, np.random.default_rng(0), n_pos=2, from_center=True)
    assert coords[0].tolist() == [10.0, 10.0]
    with pytest.raises(InvalidInput):
        sample_points(np.zeros((4, 4), bool), np.random.default_rng(0))


def test_sampling_is_deterministic_given_the_seed() -> None:
    mask = _rect()
    a = sample_points(mask, np.random.default_rng(42), n_pos=3, n_neg=3)
    b = sample_points(mask, np.random.default_rng(42), n_pos=3, n_neg=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    cfg = PromptConfig(kind="box+point", n_pos=2, n_neg=1)
    p1 = simulate_prompt(mask, np.random.default_rng(3), cfg)
    p2 = simulate_prompt(mask, np.random.default_rng(3), cfg)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_correction_point_targets_the_larger_error() -> None:
    gt = np.zeros((40, 40), bool)
    gt[5:35, 5:35] = True
    pred = gt.copy()
    pred[5:35, 20:35] = False  # big false-negative block: columns 20..34
    pred[0:2, 0:2] = True  # small false positive
    coord, label = correction_point(pred, gt, np.random.default_rng(0))
    x, y = int(coord[0]), int(coord[1])
    assert label == 1 and gt[y, x] and not pred[y, x]
    assert x == 27 and 12 <= y <= 27  # the block's medial band: 8 px from its boundary

    over = gt.copy()
    over[0:40, 36:40] = True  # only false positives
    coord, label = correction_point(over, gt, np.random.default_rng(0))
    assert label == 0 and over[int(coord[1]), int(coord[0])] and not gt[int(coord[1]), int(coord[0])]
    assert correction_point(gt, gt, np.random.default_rng(0)) is None


def test_simulate_prompt_kinds_and_jitter_free_eval() -> None:
    mask = _rect()
    rng = np.random.default_rng(0)
    eval_box = simulate_prompt(mask, rng, PromptConfig(kind="box", box_jitter=0))
    assert eval_box["box"].tolist() == [3, 5, 12, 9] and eval_box["point_coords"] is None
    pts = simulate_prompt(mask, rng, PromptConfig(kind="point", n_pos=2, n_neg=1))
    assert pts["box"] is None and pts["point_coords"].shape == (3, 2)
    assert pts["point_labels"].tolist() == [1, 1, 0]
    both = simulate_prompt(mask, rng, PromptConfig(kind="box+point"))
    assert both["box"].shape == (4,) and both["point_coords"].shape == (1, 2)
    with pytest.raises(InvalidInput):
        PromptConfig(kind="lasso")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        PromptConfig(kind="point", n_pos=0, n_neg=0)
