"""Whether ``--method auto`` works on native-resolution tiles: the crop size of its crop recipes
(:func:`crop_plan`) and the ways the held-out split is scored (:func:`baseline_on_heldout`): a new split of data
with crop recipes is scored both on whole images and on tiles, for the baseline and for every candidate, since a
crop-trained decoder is meant to be served tiled and a whole-image one may serve best either way. Tiles that help
the base model by :data:`TILED_GAIN` put the crop recipes first."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sam_core.adapters.artifact import read_adapter_config
from sam_core.data.dataset import SegmentationDataset
from sam_core.data.diagnostics import DataReport, recommended_crop
from sam_core.evaluation.evaluate import EvalReport
from sam_core.training.config import Phase, ProgressEvent
from sam_core.training.finetune import FinetuneSpec, heldout_split
from sam_core.training.guard import HeldoutSplit, Scorer, guard_score

CROP_MIN_DOWNSCALE = 2.0
"""With every instance resolvable, crop recipes (at the input size, so a tile is never resized) are still tried when
the median image's longest side is at least this many times the model's input size."""
TILED_GAIN = 0.01
"""How much better (held-out Dice) the baseline must score on native-resolution tiles than on whole images for the
search to try crop recipes first."""


def crop_plan(report: DataReport) -> tuple[int | None, bool]:
    """(the crop size of the crop recipes or None without any, whether crops come first)."""
    recommended = next((r.value for r in report.recommendations if r.flag == "--crop"), None)
    if recommended is not None:
        return recommended, True
    if not report.unresolvable:
        large = report.image_long_side_px.get("p50", 0.0) >= CROP_MIN_DOWNSCALE * report.img_size
        return (report.img_size if large else None), False
    sides = sorted(min(u.height, u.width) for u in report.unresolvable)
    return recommended_crop(sides[len(sides) // 2], report.img_size), False


@dataclass(frozen=True)
class HeldoutMode:
    """The held-out split with one way of serving (whole images or native-resolution tiles; the split's signature
    covers it) and the baseline's score that way."""

    split: HeldoutSplit
    baseline: EvalReport

    @property
    def tiled(self) -> bool:
        return bool(self.split.eval["tiled"])

    @property
    def name(self) -> str:
        return "tiles" if self.tiled else "whole images"


@dataclass
class HeldoutBaseline:
    """The held-out images, the rest of the data, the ways the search scores on them (:class:`HeldoutMode`, one or
    two) and whether crop recipes go first."""

    images: SegmentationDataset
    rest: SegmentationDataset
    modes: tuple[HeldoutMode, ...]
    crops_first: bool

    @property
    def seconds(self) -> float:
        """Scoring a candidate in every mode, measured on the baseline: the estimate for an encoder-side one."""
        return sum(mode.baseline.seconds for mode in self.modes)

    @property
    def cached_seconds(self) -> float:
        """The same without encoding: the estimate for a candidate that keeps the base encoder, whose scoring
        reuses the embeddings the baseline cached."""
        return sum(mode.baseline.seconds - mode.baseline.encode_seconds for mode in self.modes)


def baseline_on_heldout(spec: FinetuneSpec, ds: SegmentationDataset, report: DataReport, scorer: Scorer,
                        emit: Callable[[ProgressEvent], None]) -> HeldoutBaseline:
    """The held-out split and the baseline's score on it. A new split of data with crop recipes (and no tiling
    asked for) is scored both ways, whole images and native-resolution tiles, and every candidate will be scored
    both ways too; crop recipes go first when the diagnostics recommend crops or when tiles beat whole images by
    :data:`TILED_GAIN` for the baseline. A stored split, or a job without crop recipes, has one mode: the split's
    own settings."""
    def scored(split: HeldoutSplit) -> HeldoutMode:
        return HeldoutMode(split, scorer(images, split.eval_config(), "baseline"))

    split, images, rest = heldout_split(spec, ds)
    first = scored(split)  # the job's own settings: whole images unless it asked for tiles
    crop, recommended = crop_plan(report)
    stored = spec.guard.baseline is not None and read_adapter_config(spec.guard.baseline).heldout_split is not None
    if stored or first.tiled or crop is None:
        return HeldoutBaseline(images, rest, (first,), crops_first=recommended)
    whole, tiled = first, scored(split.with_eval(dataclasses.replace(spec.eval, tiled=True)))
    whole_dice, tiled_dice = guard_score(whole.baseline)[0], guard_score(tiled.baseline)[0]
    crops_first = recommended or tiled_dice - whole_dice >= TILED_GAIN
    emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message=(
        f"baseline on the held-out split: whole images {whole_dice:.4f}, tiles {tiled_dice:.4f}; every candidate is "
        f"scored both ways, {'crop' if crops_first else 'whole-image'} recipes first")))
    return HeldoutBaseline(images, rest, (whole, tiled), crops_first)
