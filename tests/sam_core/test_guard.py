"""The held-out split (signed, found by content, refusing a missing image) and the guard's verdicts."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from sam_core.data.dataset import load_dataset
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import EvalConfig, EvalReport
from sam_core.training.guard import (
    GuardOptions,
    HeldoutSplit,
    judge,
    promotion_refusal,
    stored_metrics,
)
from tests.conftest import write_blob_dataset


@pytest.fixture
def blobs(tmp_path):
    return write_blob_dataset(tmp_path / "blobs", n_images=10)


def make_split(folder, seed: int = 0) -> HeldoutSplit:
    return HeldoutSplit.create(load_dataset(folder), fraction=0.2, seed=seed, min_area=0, eval_cfg=EvalConfig())


def test_a_new_split_is_deterministic_signed_and_disjoint_from_the_rest(blobs):
    split = make_split(blobs)
    assert split == make_split(blobs) and len(split.images) == 2
    assert make_split(blobs, seed=1).signature != split.signature
    heldout, rest = split.select(load_dataset(blobs))
    assert heldout.image_ids == [i.image_id for i in split.images]
    assert set(rest.image_ids) == {f"img{i:02d}" for i in range(10)} - set(heldout.image_ids)
    assert HeldoutSplit.from_json(json.loads(json.dumps(split.to_json())), "x") == split
    assert split.eval_config() == EvalConfig()


def test_split_images_are_found_by_content_under_new_names(blobs, tmp_path):
    split = make_split(blobs)
    moved = tmp_path / "renamed"
    shutil.copytree(blobs, moved)
    for image in split.images:
        for sub in ("images", "masks"):
            (moved / sub / f"{image.image_id}.png").rename(moved / sub / f"new_{image.image_id}.png")
    write_blob_dataset(moved / "extra", n_images=3, seed=7)  # unrelated folder: not part of the data set
    heldout, rest = split.select(load_dataset(moved))
    assert heldout.image_ids == [i.image_id for i in split.images]  # scored under the recorded ids
    assert not any(i.startswith("new_") for i in rest.image_ids) and len(rest) == 8


def test_a_missing_or_relabelled_split_image_is_a_clear_error(blobs):
    split = make_split(blobs)
    first, second = split.images
    (blobs / "images" / f"{first.image_id}.png").unlink()
    (blobs / "masks" / f"{first.image_id}.png").unlink()
    cv2.imwrite(str(blobs / "masks" / f"{second.image_id}.png"), np.full((96, 128), 255, np.uint8))
    with pytest.raises(InvalidInput) as info:
        split.select(load_dataset(blobs))
    assert info.value.field == "heldout_split"
    assert f"{first.image_id} (image missing)" in info.value.detail
    assert f"{second.image_id} (labels changed)" in info.value.detail and split.signature[:12] in info.value.detail


def test_a_tampered_split_is_refused(blobs):
    data = make_split(blobs).to_json()
    data["images"] = data["images"][:1]
    with pytest.raises(InvalidInput, match="signature does not match"):
        HeldoutSplit.from_json(data, "adapter")
    with pytest.raises(InvalidInput, match="not a samforge-heldout-v1"):
        HeldoutSplit.from_json({"format": "other"}, "adapter")


def test_too_few_images_to_hold_one_out(tmp_path):
    folder = write_blob_dataset(tmp_path / "two", n_images=2)
    with pytest.raises(InvalidInput, match="at least 3 distinct images") as info:
        make_split(folder)
    assert info.value.field == "data"


def report(dice_all: float, dice_resolvable: float, n_resolvable: int) -> EvalReport:
    summary = {"dice_mean": dice_all, "dice_resolvable_mean": dice_resolvable, "n_resolvable": n_resolvable}
    return EvalReport([], summary, {}, [], "m", "x", 0.0)


@pytest.mark.parametrize(("candidate", "margin", "allow", "accepted"), [
    (0.80, 0.0, False, True), (0.70, 0.0, False, True), (0.69, 0.0, False, False),
    (0.72, 0.05, False, False), (0.75, 0.05, False, True), (0.10, 0.0, True, True), (0.66, -0.05, False, True),
])
def test_verdicts(blobs, candidate, margin, allow, accepted):
    split = make_split(blobs)
    verdict = judge(report(0.1, candidate, 3), report(0.9, 0.70, 3), "base model", split,
                    GuardOptions(min_improvement=margin, allow_regression=allow))
    assert verdict.accepted is accepted and verdict.metric == "dice_resolvable_mean"
    assert verdict.reason.startswith("accepted" if accepted else "rejected")
    assert stored_metrics(verdict) == {"heldout_dice": candidate, "heldout_baseline_dice": 0.70,
                                       "heldout_signature": split.signature}


def test_the_verdict_uses_all_instances_when_none_is_resolvable(blobs):
    verdict = judge(report(0.4, float("nan"), 0), report(0.5, float("nan"), 0), "base model", make_split(blobs),
                    GuardOptions())
    assert verdict.metric == "dice_mean" and not verdict.accepted
    assert (verdict.candidate, verdict.baseline) == (0.4, 0.5)


@pytest.mark.parametrize("value", [float("nan"), 2.0])
def test_bad_margins_name_the_field(value):
    with pytest.raises(InvalidInput) as info:
        GuardOptions(min_improvement=value)
    assert info.value.field == "min_improvement"


def test_promotion_refusal_compares_versions_on_the_same_split():
    same = {"heldout_dice": 0.6, "heldout_signature": "a" * 64}
    assert promotion_refusal("s:2", {**same, "heldout_dice": 0.7}, "s:1", same) is None
    assert promotion_refusal("s:2", same, "s:1", same) is None
    worse = promotion_refusal("s:2", {**same, "heldout_dice": 0.5}, "s:1", same)
    assert worse is not None and "s:2 scores 0.5000" in worse and "s:1 (0.6000)" in worse
    other = promotion_refusal("s:2", {**same, "heldout_signature": "b" * 64}, "s:1", same)
    assert other is not None and "not scored on the same held-out split" in other
    assert promotion_refusal("s:2", {}, "s:1", same) is not None
    assert promotion_refusal("s:2", {}, "s:1", {}) is None  # neither was guarded: nothing to compare
