"""Data diagnostics: what a model will actually see of a data set, and what to do about it.

:func:`diagnose` reads every sample's masks once (no image is decoded) and returns a :class:`DataReport`:

* instance counts per image;
* the size distribution at the model's input scale (percentiles of the shorter bounding-box side and of
  the area, in model-input pixels, the whole image resized as the model resizes it: longest side to
  ``img_size``, or stretched to ``img_size x img_size`` for SAM 2's square resize);
* unresolvable instances (:func:`sam_core.data.resolution.is_resolvable`: shorter side below
  :data:`~sam_core.data.resolution.RESOLVABLE_MIN_SIDE_PX` at input scale), counted and listed;
* near-empty instances (at most :data:`NEAR_EMPTY_AREA_PX` native pixels) and the masks the readers
  excluded as empty or of another size than their image (from the data set's validation report);
* duplicate images (byte-identical image files);
* :class:`Recommendation` s, each with its reason: ``--crop N`` (the largest crop at which the median
  unresolvable instance becomes resolvable), ``--tile`` (images many times the input size) and
  ``--min-area N`` (instances that stay unresolvable even in that crop).

The report is plain data: :meth:`DataReport.to_json` is strict JSON, :meth:`DataReport.summary_line` the one
line a training job reports first, :meth:`DataReport.summary` the readable text of ``samforge data check``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sam_core.data.dataset import SegmentationDataset
from sam_core.data.resolution import (
    RESOLVABLE_MIN_SIDE_PX,
    Extent,
    input_scale,
    instance_extent,
    short_side_at_input,
    tile_view,
)
from sam_core.data.samples import Sample
from sam_core.files import file_sha256

if TYPE_CHECKING:  # only its name, img_size and resize are read: diagnostics need no torch
    from sam_core.modeling.family import ModelSpec

NEAR_EMPTY_AREA_PX = 4
"""Instances of at most this many native pixels are reported as near-empty."""
CROP_MIN_UNRESOLVABLE_FRACTION = 0.05
"""Recommend ``--crop`` when at least this fraction of the instances is unresolvable."""
CROP_STEP_PX = 32
"""Recommended crop sizes are multiples of this."""
TILE_MIN_DOWNSCALE = 4.0
"""Recommend ``--tile`` when the median image's longest side is at least this many times ``img_size``."""
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class InstanceSize:
    """One instance: where it is, its native extent and its shorter side at the model's input scale."""

    image_id: str
    instance_index: int
    instance_id: int
    height: int
    width: int
    area: int
    short_side_input_px: float


@dataclass(frozen=True)
class Recommendation:
    """A command-line flag to use (``value`` None for a switch) and why."""

    flag: str
    value: int | None
    reason: str

    def text(self) -> str:
        return f"{self.flag}{'' if self.value is None else f' {self.value}'}: {self.reason}"


@dataclass
class DataReport:
    """What :func:`diagnose` found (sizes ``*_input_px`` are at the model's input scale)."""

    model: str
    img_size: int
    min_side_px: float
    n_images: int
    n_instances: int
    instances_per_image: dict[str, int]
    short_side_input_px: dict[str, float]
    area_input_px: dict[str, float]
    image_long_side_px: dict[str, float]
    unresolvable: list[InstanceSize]
    near_empty: list[InstanceSize]
    duplicate_images: list[list[str]]
    excluded: dict[str, list[str]]
    recommendations: list[Recommendation] = field(default_factory=list)

    @property
    def n_unresolvable(self) -> int:
        return len(self.unresolvable)

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON dict of every field, plus ``n_unresolvable``."""
        data = asdict(self)
        data["n_unresolvable"] = self.n_unresolvable
        return data

    def summary_line(self) -> str:
        """One line: counts, unresolvable share, the recommended flags."""
        share = self.n_unresolvable / max(1, self.n_instances)
        flags = " ".join(f"{r.flag}{'' if r.value is None else f' {r.value}'}" for r in self.recommendations)
        return (f"data: {self.n_images} images, {self.n_instances} instances, {self.n_unresolvable} "
                f"({share:.0%}) below {self.min_side_px:g} px at {self.model}'s {self.img_size} px input; "
                f"{len(self.duplicate_images)} duplicate groups; "
                + (f"recommended: {flags}" if flags else "no action recommended"))

    def summary(self, max_listed: int = 20) -> str:
        """Readable multi-line report (the first ``max_listed`` unresolvable instances listed)."""
        counts = list(self.instances_per_image.values())
        lines = [self.summary_line(),
                 f"instances per image: min {min(counts, default=0)}, median {_median(counts):g}, "
                 f"max {max(counts, default=0)}",
                 "shorter side at input (px): " + _percentile_text(self.short_side_input_px),
                 "area at input (px): " + _percentile_text(self.area_input_px),
                 "image longest side (native px): " + _percentile_text(self.image_long_side_px)]
        if self.unresolvable:
            lines.append(f"unresolvable instances ({self.n_unresolvable}):")
            lines += [f"  {u.image_id} #{u.instance_index} (id {u.instance_id}): {u.width}x{u.height} px native, "
                      f"{u.short_side_input_px:.2f} px at input" for u in self.unresolvable[:max_listed]]
            if self.n_unresolvable > max_listed:
                lines.append(f"  ... and {self.n_unresolvable - max_listed} more")
        lines.append(f"near-empty instances (<= {NEAR_EMPTY_AREA_PX} px): {len(self.near_empty)}")
        lines += [f"duplicate images: {', '.join(group)}" for group in self.duplicate_images]
        lines += [f"excluded ({kind}): {', '.join(files)}" for kind, files in sorted(self.excluded.items())]
        lines += [f"recommend {r.text()}" for r in self.recommendations]
        return "\n".join(lines)


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else 0.0


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}


def _percentile_text(stats: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in stats.items()) or "n/a"


def _image_hash(sample: Sample) -> str:
    """Hash of the image file's bytes (of the decoded pixels when the sample has no file)."""
    if sample.image_path is not None:
        return file_sha256(sample.image_path)
    return hashlib.sha256(np.ascontiguousarray(sample.load_image()).tobytes()).hexdigest()


def _sample_sizes(sample: Sample, spec: ModelSpec) -> list[InstanceSize]:
    view = (sample.height, sample.width)
    sizes = []
    for index, inst in enumerate(sample.instances):
        ext: Extent = instance_extent(inst.mask)
        sizes.append(InstanceSize(sample.image_id, index, inst.instance_id, ext.height, ext.width, ext.area,
                                  round(short_side_at_input(ext, view, spec), 3)))
    return sizes


def diagnose(data: SegmentationDataset | Sequence[Sample], spec: ModelSpec) -> DataReport:
    """Diagnose ``data`` for a model with ``spec`` (see the module docstring)."""
    per_image: dict[str, int] = {}
    sizes: list[InstanceSize] = []
    long_sides: list[int] = []
    views: list[tuple[int, int]] = []
    input_areas: list[float] = []
    by_hash: dict[str, list[str]] = {}
    for sample in data:
        image_sizes = _sample_sizes(sample, spec)
        sy, sx = input_scale((sample.height, sample.width), spec)
        input_areas += [s.area * sy * sx for s in image_sizes]
        sizes += image_sizes
        views += [(sample.height, sample.width)] * len(image_sizes)
        per_image[sample.image_id] = len(image_sizes)
        long_sides.append(max(sample.height, sample.width))
        by_hash.setdefault(_image_hash(sample), []).append(sample.image_id)
    excluded: dict[str, list[str]] = {}
    if isinstance(data, SegmentationDataset):
        for problem in data.report.problems:
            if problem.kind in ("empty_mask", "size_mismatch"):
                excluded.setdefault(problem.kind, []).append(problem.file)
    report = DataReport(
        model=spec.name, img_size=spec.img_size, min_side_px=RESOLVABLE_MIN_SIDE_PX,
        n_images=len(per_image), n_instances=len(sizes), instances_per_image=per_image,
        short_side_input_px=_percentiles([s.short_side_input_px for s in sizes]),
        area_input_px=_percentiles(input_areas), image_long_side_px=_percentiles(long_sides),
        unresolvable=[s for s in sizes if s.short_side_input_px < RESOLVABLE_MIN_SIDE_PX],
        near_empty=[s for s in sizes if s.area <= NEAR_EMPTY_AREA_PX],
        duplicate_images=[ids for ids in by_hash.values() if len(ids) > 1], excluded=excluded)
    report.recommendations = recommend(report, sizes, views, spec)
    return report


def recommended_crop(native_short_side: float, img_size: int) -> int:
    """Largest multiple of :data:`CROP_STEP_PX` at which ``native_short_side`` reaches the resolvable size."""
    largest = native_short_side * img_size / RESOLVABLE_MIN_SIDE_PX
    return max(CROP_STEP_PX, int(largest // CROP_STEP_PX) * CROP_STEP_PX)


def recommend(report: DataReport, sizes: Sequence[InstanceSize], views: Sequence[tuple[int, int]],
              spec: ModelSpec) -> list[Recommendation]:
    """``--crop`` / ``--min-area`` for unresolvable instances, ``--tile`` for huge images (see the module doc).

    ``views``: the (H, W) of each instance's image, in the order of ``sizes``; ``spec``: the model's resize.
    """
    out: list[Recommendation] = []
    n, img = max(1, report.n_instances), report.img_size
    median_long = report.image_long_side_px.get("p50", 0.0)
    if median_long >= TILE_MIN_DOWNSCALE * img:
        out.append(Recommendation("--tile", None, f"the median image is {median_long:g} px on its longest side, "
                                  f"{median_long / img:.1f}x the {img} px input: whole-image inference downscales it"))
    if report.n_unresolvable / n < CROP_MIN_UNRESOLVABLE_FRACTION:
        return out
    specks = report.unresolvable
    median_side = _median([min(u.height, u.width) for u in specks])
    crop = recommended_crop(median_side, img)
    out.append(Recommendation("--crop", crop, f"{len(specks)} of {report.n_instances} instances "
                              f"({len(specks) / n:.0%}) are below {report.min_side_px:g} px at the {img} px input; "
                              f"in a {crop} px native crop the median one ({median_side:g} px) is resolvable"))
    still = [s for s, view in zip(sizes, views, strict=True)
             if short_side_at_input(Extent(s.height, s.width, s.area), tile_view(view, crop), spec)
             < RESOLVABLE_MIN_SIDE_PX]
    if still:
        min_area = max(s.area for s in still) + 1
        dropped = sum(1 for s in sizes if s.area < min_area)
        out.append(Recommendation("--min-area", min_area, f"{len(still)} instances stay below "
                                  f"{report.min_side_px:g} px even in a {crop} px crop; --min-area {min_area} "
                                  f"drops {dropped} of {report.n_instances} instances (none can be learned or "
                                  "measured)"))
    return out
