"""Tests of sam_core.evaluation.metrics against hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from sam_core.errors import InvalidInput
from sam_core.evaluation.metrics import InstanceScore, dice, hd95, iou, nsd, score_instance, summarize


def _square(size: int = 64, top: int = 10, left: int = 10, side: int = 20) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top : top + side, left : left + side] = True
    return m


def test_dice_and_iou_of_offset_squares() -> None:
    a = _square(side=10)
    b = _square(side=10, left=15)  # 5 px to the right: overlap 10 x 5 = 50, union 150
    assert iou(a, b) == pytest.approx(50 / 150)
    assert dice(a, b) == pytest.approx(100 / 200)
    assert iou(a, a) == dice(a, a) == 1.0


def test_empty_cases() -> None:
    empty, a = np.zeros((8, 8), bool), _square(8, 2, 2, 3)
    assert dice(empty, empty) == iou(empty, empty) == 1.0
    assert dice(a, empty) == iou(empty, a) == 0.0
    assert hd95(empty, empty) == 0.0 and math.isinf(hd95(a, empty)) and math.isinf(hd95(empty, a))
    assert nsd(empty, empty) == 1.0 and nsd(a, empty) == 0.0


def test_hd95_of_shifted_square_is_the_shift() -> None:
    a, b = _square(), _square(left=13)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(b, a) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0
    assert hd95(a, b, spacing=(0.5, 0.5)) == pytest.approx(1.5)


def test_hd95_anisotropic_spacing() -> None:
    pytest.importorskip("scipy")
    a, b = _square(), _square(left=13)
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)  # shift along columns, dx = 2


def test_hd95_of_two_pixels_is_their_distance() -> None:
    a, b = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    a[2, 2] = True
    b[5, 6] = True  # 3-4-5 triangle
    assert hd95(a, b) == pytest.approx(5.0)


def test_nsd() -> None:
    a, b = _square(), _square(left=13)
    assert nsd(a, b, tolerance=3.0) == 1.0
    assert nsd(a, b, tolerance=5.0) == 1.0
    assert 0.0 < nsd(a, b, tolerance=1.0) < nsd(a, b, tolerance=2.0) < 1.0
    assert nsd(a, a, tolerance=0.0) == 1.0
    far = _square(left=40)
    assert nsd(a, far, tolerance=1.0) == 0.0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(InvalidInput):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_score_instance_matches_single_metrics_and_is_fast() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    gt = (yy - 250) ** 2 + (xx - 260) ** 2 < 120**2
    pred = ((yy - 255) ** 2 + (xx - 250) ** 2 < 118**2) ^ (rng.random((512, 512)) < 0.001)
    start = time.perf_counter()
    s = score_instance("img", 3, pred, gt, tolerance=2.0)
    elapsed = time.perf_counter() - start
    assert s.dice == pytest.approx(dice(pred, gt)) and s.iou == pytest.approx(iou(pred, gt))
    assert s.hd95 == pytest.approx(hd95(pred, gt)) and s.nsd == pytest.approx(nsd(pred, gt, 2.0))
    assert elapsed < 0.2


def test_summarize_means_medians_and_inf() -> None:
    scores = [
        InstanceScore("a", 1, dice=1.0, iou=1.0, hd95=0.0, nsd=1.0),
        InstanceScore("a", 2, dice=0.5, iou=0.4, hd95=2.0, nsd=0.5),
        InstanceScore("a", 3, dice=0.0, iou=0.0, hd95=math.inf, nsd=0.0),
        InstanceScore("b", 1, dice=0.9, iou=0.8, hd95=4.0, nsd=0.9),
    ]
    out = summarize(scores)
    assert out["n_instances"] == 4 and out["n_images"] == 2 and out["hd95_inf_count"] == 1
    assert out["dice_mean"] == pytest.approx(2.4 / 4)
    assert out["dice_image_mean"] == pytest.approx((1.5 / 3 + 0.9) / 2)
    assert out["dice_median"] == pytest.approx(0.7)
    assert out["hd95_mean"] == pytest.approx(2.0)  # inf excluded
    assert out["hd95_image_mean"] == pytest.approx((1.0 + 4.0) / 2)
    assert out["hd95_median"] == pytest.approx(2.0)
    empty = summarize([])
    assert empty["n_instances"] == 0 and math.isnan(empty["dice_mean"])
