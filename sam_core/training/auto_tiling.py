"""Whether ``--method auto`` works on native-resolution tiles: the crop size of its crop recipes
(:func:`crop_plan`) and the held-out split's evaluation mode, measured on the base model
(:func:`baseline_on_heldout`): a new split of data with crop recipes is scored both whole and on tiles, and tiles
that win by :data:`TILED_GAIN` make the split tiled."""

from __future__ import annotations

import dataclasses
import time
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
the median image's longest side is at least this many times the model's input size, if tiles help the base model."""
TILED_GAIN = 0.01
"""How much better (held-out Dice) the baseline must score on native-resolution tiles than on whole images for the
search to score the held-out split tiled and try crop recipes first."""


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


@dataclass
class HeldoutBaseline:
    """The held-out split the search scores on, its images, the rest of the data, and the baseline's score."""

    spec: FinetuneSpec  # evaluates tiled when the split is
    split: HeldoutSplit
    images: SegmentationDataset
    rest: SegmentationDataset
    report: EvalReport
    seconds: float  # the baseline's scoring: the estimate of an encoder-side candidate's
    cached_seconds: float = 0.0  # the same with its embeddings cached: the estimate for frozen-encoder candidates


def baseline_on_heldout(spec: FinetuneSpec, ds: SegmentationDataset, report: DataReport, scorer: Scorer,
                        emit: Callable[[ProgressEvent], None]) -> HeldoutBaseline:
    """The held-out split and the baseline's score on it. A new split of data with crop recipes is scored both
    ways when the diagnostics did not already ask for tiles: if native-resolution tiles beat whole images by
    :data:`TILED_GAIN` for the baseline, the split (and so every candidate's score) is tiled, and the crop recipes
    go first. A stored split keeps its own settings. The chosen split is scored once more with the embeddings
    cached, to time what a candidate that keeps the base encoder (whose scoring reuses them) costs."""
    def scored(job: FinetuneSpec) -> HeldoutBaseline:
        split, images, rest = heldout_split(job, ds)
        started = time.perf_counter()
        baseline = scorer(images, split.eval_config(), "baseline")
        return HeldoutBaseline(job, split, images, rest, baseline, time.perf_counter() - started)

    choice = whole = scored(spec)
    stored = spec.guard.baseline is not None and read_adapter_config(spec.guard.baseline).heldout_split is not None
    if not (stored or whole.split.eval["tiled"] or crop_plan(report)[0] is None):
        tiled = scored(dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, tiled=True)))
        whole_dice, tiled_dice = guard_score(whole.report)[0], guard_score(tiled.report)[0]
        choice = tiled if tiled_dice - whole_dice >= TILED_GAIN else whole
        emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message=(
            f"baseline on the held-out split: whole images {whole_dice:.4f}, tiles {tiled_dice:.4f}: "
            + ("tiled" if choice is tiled else "whole images"))))
    started = time.perf_counter()
    scorer(choice.images, choice.split.eval_config(), "baseline")
    return dataclasses.replace(choice, cached_seconds=time.perf_counter() - started)
