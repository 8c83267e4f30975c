"""The resolvable-instance rule and the data diagnostics follow the model's resize: SAM 2 stretches a view to
img_size x img_size (each axis by its own factor), SAM 1 scales the longest side and keeps the aspect ratio."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from sam_core.data.dataset import load_dataset
from sam_core.data.diagnostics import diagnose
from sam_core.data.resolution import input_scale, input_shape, is_resolvable
from sam_core.evaluation.evaluate import EvalConfig, evaluate
from sam_core.inference.predictor import Predictor
from sam_core.modeling import preprocess
from sam_core.modeling.registry import SPECS, load_model

H, W = 128, 512  # not square: SAM 2 scales rows by 128 / 128 = 1 and columns by 128 / 512; SAM 1 both by 1/4
BARS = {  # (rows, columns) of a bar, and whether tiny (longest side) / tiny_sam2 (square) resolve it
    "wide": ((3, 40), False, True),      # 0.75 px tall at 1/4; 3 px tall at 1x
    "tall": ((40, 7), False, False),     # 1.75 px wide either way
    "block": ((10, 12), True, True),     # 2.5 / 3 px either way
}


def bar(rows: int, cols: int, top: int = 20, left: int = 30) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:top + rows, left:left + cols] = True
    return mask


def write_bars(root: Path, n_images: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks_instances").mkdir()
    for i in range(n_images):
        labels = np.zeros((H, W), np.uint8)
        for k, ((rows, cols), _, _) in enumerate(BARS.values(), start=1):
            labels[bar(rows, cols, top=10 + 3 * i, left=20 + 150 * (k - 1))] = k
        cv2.imwrite(str(root / "images" / f"img{i}.png"), np.where(labels > 0, 200, 40).astype(np.uint8))
        cv2.imwrite(str(root / "masks_instances" / f"img{i}.png"), labels)
    return root


@pytest.mark.parametrize("model", ["tiny", "tiny_sam2", "litemedsam", "sam2.1_hiera_t"])
def test_input_shape_is_the_models_resize(model):
    spec = SPECS[model]
    for size in [(512, 512), (480, 640), (1, 5000), (333, 77), (H, W)]:
        assert input_shape(size, spec) == preprocess.input_shape(size, spec), size
    assert input_shape((H, W), spec.img_size) == preprocess.resized_shape((H, W), spec.img_size)  # a bare size


def test_the_resolvable_rule_follows_the_resize_mode():
    assert input_scale((H, W), SPECS["tiny"]) == (0.25, 0.25)
    assert input_scale((H, W), SPECS["tiny_sam2"]) == (1.0, 0.25)
    for name, ((rows, cols), sam1, sam2) in BARS.items():
        assert is_resolvable(bar(rows, cols), SPECS["tiny"]) is sam1, name
        assert is_resolvable(bar(rows, cols), SPECS["tiny_sam2"]) is sam2, name
        assert is_resolvable(bar(rows, cols), SPECS["tiny"].img_size) is sam1, name  # a bare size: longest side
    # a native 128 px tile is square: seen 1:1 by both models, the 3 px side stays 3 px
    for model in ("tiny", "tiny_sam2"):
        assert is_resolvable(bar(3, 40), SPECS[model], tile=128), model


def test_diagnostics_sizes_at_the_square_input(tmp_path):
    data = load_dataset(write_bars(tmp_path / "bars"))
    sam1, sam2 = diagnose(data, SPECS["tiny"]), diagnose(data, SPECS["tiny_sam2"])
    assert sam1.n_instances == sam2.n_instances == 2 * len(BARS)
    assert sam1.n_unresolvable == 2 * sum(not s1 for _, s1, _ in BARS.values()) == 4
    assert sam2.n_unresolvable == 2 * sum(not s2 for _, _, s2 in BARS.values()) == 2
    sides = {(u.height, u.width) for u in sam2.unresolvable}
    assert sides == {BARS["tall"][0]}
    # areas: SAM 1 scales by 1/16, SAM 2 by 1 x 1/4; shorter sides: the wide bar is 3 px at SAM 2's input
    areas = sorted(rows * cols for (rows, cols), _, _ in BARS.values())
    assert sam1.area_input_px["p50"] == pytest.approx(areas[1] / 16)
    assert sam2.area_input_px["p50"] == pytest.approx(areas[1] / 4)
    assert sam2.short_side_input_px["p5"] == pytest.approx(1.75) and sam1.short_side_input_px["p5"] == 0.75
    assert "tiny_sam2" in sam2.summary_line()


def test_evaluation_marks_instances_resolvable_by_the_models_resize(tmp_path):
    data = load_dataset(write_bars(tmp_path / "bars", n_images=1))
    flags = {}
    for model in ("tiny", "tiny_sam2"):
        report = evaluate(Predictor(load_model(model)), data, EvalConfig())
        flags[model] = {(int(s.instance_id)): s.resolvable for s in report.scores}
    assert flags["tiny"] == {k: sam1 for k, (_, sam1, _) in enumerate(BARS.values(), start=1)}
    assert flags["tiny_sam2"] == {k: sam2 for k, (_, _, sam2) in enumerate(BARS.values(), start=1)}
