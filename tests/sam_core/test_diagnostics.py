"""Data diagnostics: sizes at the model's input scale, specks named, crops recommended."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from sam_core.data.dataset import load_dataset
from sam_core.data.diagnostics import NEAR_EMPTY_AREA_PX, diagnose, recommended_crop
from sam_core.data.resolution import RESOLVABLE_MIN_SIDE_PX, input_shape, is_resolvable
from sam_core.modeling.preprocess import resized_shape
from sam_core.modeling.registry import SPECS
from tests.conftest import write_blob_dataset

SPECK_SIDES = (1, 1, 2, 2, 3, 3)  # native px; at LiteMedSAM's 256 px input a 512 px image halves them


def write_speck_dataset(root: Path, n_images: int = 3, size: int = 512) -> Path:
    """Instance-id folder set: per image one 60 px blob and six square specks of 1-3 px."""
    (root / "images").mkdir(parents=True)
    (root / "masks_instances").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        image = rng.integers(0, 60, (size, size), dtype=np.uint8)
        labels = np.zeros((size, size), np.uint8)
        labels[100 + i:160 + i, 100:160] = 1
        for k, side in enumerate(SPECK_SIDES):
            y, x = 300 + 30 * k, 300 + 10 * i
            labels[y:y + side, x:x + side] = 2 + k
        image[labels > 0] = 200
        cv2.imwrite(str(root / "images" / f"img{i}.png"), image)
        cv2.imwrite(str(root / "masks_instances" / f"img{i}.png"), labels)
    return root


def test_input_shape_matches_the_models_resize() -> None:
    for size in [(512, 512), (480, 640), (1, 5000), (333, 77), (1024, 768)]:
        for img_size in (128, 256, 1024):
            assert input_shape(size, img_size) == resized_shape(size, img_size)


def test_resolvable_rule_at_input_scale() -> None:
    mask = np.zeros((512, 512), bool)
    mask[10:13, 10:13] = True  # 3 px native -> 1.5 px at 256
    assert not is_resolvable(mask, 256)
    assert is_resolvable(mask, 1024)  # 3 px native at 1024 / 512 = 2x
    assert is_resolvable(mask, 256, tile=256)  # a native 256 px tile: 3 px stays 3 px
    assert not is_resolvable(np.zeros((8, 8), bool), 256)


def test_specks_are_named_and_crops_recommended(tmp_path: Path) -> None:
    ds = load_dataset(write_speck_dataset(tmp_path / "specks"))
    report = diagnose(ds, SPECS["litemedsam"])
    assert report.n_images == 3 and report.n_instances == 3 * (1 + len(SPECK_SIDES))
    assert report.instances_per_image == {f"img{i}": 7 for i in range(3)}
    # every speck (<= 3 px native = <= 1.5 px at input) is unresolvable; no blob is
    assert report.n_unresolvable == 3 * len(SPECK_SIDES)
    assert {(u.image_id, u.instance_index) for u in report.unresolvable} == {
        (f"img{i}", k) for i in range(3) for k in range(1, 7)}
    assert all(u.short_side_input_px < RESOLVABLE_MIN_SIDE_PX for u in report.unresolvable)
    assert report.short_side_input_px["p95"] == pytest.approx(30.0)
    assert len(report.near_empty) == 3 * sum(1 for s in SPECK_SIDES if s * s <= NEAR_EMPTY_AREA_PX)
    flags = {r.flag: r for r in report.recommendations}
    # median speck is 2 px native: resolvable (2 px) in a native 256 px crop at 256 px input
    assert flags["--crop"].value == 256 and "256 px" in flags["--crop"].reason
    # the 1 px specks stay below 2 px even then: --min-area 2 drops exactly them
    assert flags["--min-area"].value == 2 and "drops 6 of 21" in flags["--min-area"].reason
    assert "--tile" not in flags
    text = report.summary()
    assert "img0 #1 (id 2): 1x1 px native, 0.50 px at input" in text
    assert "--crop 256" in report.summary_line()
    json.loads(json.dumps(report.to_json(), allow_nan=False))


def test_clean_set_needs_nothing(tmp_path: Path) -> None:
    report = diagnose(load_dataset(write_blob_dataset(tmp_path / "blobs")), SPECS["litemedsam"])
    assert report.n_unresolvable == 0 and report.recommendations == []
    assert report.duplicate_images == [] and report.excluded == {}
    assert "no action recommended" in report.summary_line()


def test_duplicates_and_excluded_masks_are_reported(tmp_path: Path) -> None:
    root = write_blob_dataset(tmp_path / "blobs", n_images=4)
    shutil.copy(root / "images" / "img00.png", root / "images" / "copy.png")
    shutil.copy(root / "masks" / "img00.png", root / "masks" / "copy.png")
    cv2.imwrite(str(root / "masks" / "img01.png"), np.zeros((96, 128), np.uint8))  # empty
    cv2.imwrite(str(root / "masks" / "img02.png"), np.full((50, 50), 255, np.uint8))  # size mismatch
    report = diagnose(load_dataset(root), SPECS["tiny"])
    assert report.duplicate_images == [["copy", "img00"]]
    assert report.excluded == {"empty_mask": ["masks/img01.png"], "size_mismatch": ["masks/img02.png"]}
    assert "duplicate images: copy, img00" in report.summary()


def test_huge_images_get_tile(tmp_path: Path) -> None:
    root = write_blob_dataset(tmp_path / "big", n_images=2, height=300, width=600)
    flags = {r.flag: r for r in diagnose(load_dataset(root), SPECS["tiny"]).recommendations}
    assert flags["--tile"].value is None and "600 px" in flags["--tile"].reason


def test_recommended_crop_is_a_multiple_of_32() -> None:
    assert recommended_crop(1, 256) == 128
    assert recommended_crop(2.5, 256) == 320
    assert recommended_crop(1, 128) == 64
