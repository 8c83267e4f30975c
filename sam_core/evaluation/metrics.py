"""Evaluation metrics for binary masks (H x W bool).

* :func:`dice`, :func:`iou`: both masks empty -> 1.0, exactly one empty -> 0.0.
* :func:`hd95`: 95th-percentile symmetric Hausdorff distance between the mask *surfaces*
  (MONAI / DeepMind surface-distance definition: max of the two directed 95th percentiles).
  Both empty -> 0.0; exactly one empty -> ``inf`` (no surface to measure against).
* :func:`nsd`: normalized surface Dice at a tolerance (MONAI ``compute_surface_dice``, used by MedSAM):
  (#pred surface points within ``tolerance`` of the gt surface + #gt surface points within tolerance of the
  pred surface) / (#pred surface points + #gt surface points). Both empty -> 1.0, one empty -> 0.0.

The surface of a mask is its set of pixels with a 4-neighbour outside the mask (pixels on the image border
count as surface). ``spacing`` is the pixel size along (rows, cols), i.e. (dy, dx). Distances are exact
Euclidean distance transforms on the crop around both masks (OpenCV for isotropic spacing; scipy, imported
only then, for anisotropic spacing), so a 512 x 512 pair takes a few ms.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from sam_core.errors import InvalidInput

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_METRICS = ("dice", "iou", "hd95", "nsd")


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if p.ndim != 2 or p.shape != g.shape:
        raise InvalidInput(f"pred shape {p.shape} must equal gt shape {g.shape} (H x W)", field="pred")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice 2|P&G| / (|P| + |G|) of two H x W masks."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(p & g)) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two H x W masks."""
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else int(np.count_nonzero(p & g)) / union


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus a 1-pixel False border (distances unchanged)."""
    both = p | g
    rows = np.flatnonzero(both.any(axis=1))
    cols = np.flatnonzero(both.any(axis=0))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.pad(p[sl], 1), np.pad(g[sl], 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the array counts as outside)."""
    eroded: np.ndarray = cv2.erode(mask.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    surface: np.ndarray = mask & (eroded == 0)
    return surface


def _distance_to(surface: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Exact Euclidean distance of every pixel to the nearest ``surface`` pixel, in spacing units."""
    dy, dx = float(spacing[0]), float(spacing[1])
    if dy == dx:
        dist = cv2.distanceTransform((~surface).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return dist.astype(np.float64) * dy
    from scipy import ndimage  # only anisotropic spacing needs scipy

    edt: np.ndarray = ndimage.distance_transform_edt(~surface, sampling=(dy, dx))
    return edt


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances: (pred surface -> gt surface (Np,), gt surface -> pred surface (Ng,)).

    Both masks must be non-empty (see :func:`hd95` / :func:`nsd` for the empty cases).
    """
    p, g = _pair(pred, gt)
    if not p.any() or not g.any():
        empty = "pred" if not p.any() else "gt"
        raise InvalidInput("surface distances need two non-empty masks", field=empty)
    p, g = _crop_to_union(p, g)
    sp, sg = _surface(p), _surface(g)
    return _distance_to(sg, spacing)[sp], _distance_to(sp, spacing)[sg]


def _hd95_from(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _nsd_from(d_pg: np.ndarray, d_gp: np.ndarray, tolerance: float) -> float:
    ok = int(np.count_nonzero(d_pg <= tolerance)) + int(np.count_nonzero(d_gp <= tolerance))
    return ok / (d_pg.size + d_gp.size)


def _empty_case(p: np.ndarray, g: np.ndarray, both: float, one: float) -> float | None:
    pe, ge = not p.any(), not g.any()
    if pe and ge:
        return both
    return one if pe or ge else None


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric surface Hausdorff distance (both empty -> 0.0, one empty -> inf)."""
    p, g = _pair(pred, gt)
    special = _empty_case(p, g, 0.0, math.inf)
    return special if special is not None else _hd95_from(*surface_distances(p, g, spacing))


def nsd(
    pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, spacing: tuple[float, float] = (1.0, 1.0)
) -> float:
    """Normalized surface Dice at ``tolerance`` (unit of spacing); both empty -> 1.0, one empty -> 0.0."""
    p, g = _pair(pred, gt)
    special = _empty_case(p, g, 1.0, 0.0)
    return special if special is not None else _nsd_from(*surface_distances(p, g, spacing), tolerance)


@dataclass
class InstanceScore:
    """Metrics of one predicted instance against its ground truth."""

    image_id: str
    instance_id: int
    dice: float
    iou: float
    hd95: float
    nsd: float
    resolvable: bool = True


def score_instance(
    image_id: str,
    instance_id: int,
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    tolerance: float = 2.0,
    spacing: tuple[float, float] = (1.0, 1.0),
    resolvable: bool = True,
) -> InstanceScore:
    """All four metrics for one H x W pair, computing the surface distances only once.

    ``resolvable``: whether the model can resolve the ground truth at its input scale
    (:func:`sam_core.data.resolution.is_resolvable`); carried into the score for :func:`summarize`.
    """
    p, g = _pair(pred, gt)
    hd = _empty_case(p, g, 0.0, math.inf)
    ns = _empty_case(p, g, 1.0, 0.0)
    if hd is None or ns is None:  # both None together: neither mask is empty
        d_pg, d_gp = surface_distances(p, g, spacing)
        hd, ns = _hd95_from(d_pg, d_gp), _nsd_from(d_pg, d_gp, tolerance)
    return InstanceScore(image_id, int(instance_id), dice(p, g), iou(p, g), float(hd), float(ns), resolvable)


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """(mean, median) of the finite values; nan when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(np.median(arr))


def summarize(scores: Sequence[InstanceScore]) -> dict[str, float]:
    """Aggregate instance scores.

    Returns a flat dict: ``n_instances``, ``n_images``, ``hd95_inf_count`` and for each metric m in
    (dice, iou, hd95, nsd): ``m_mean`` (over instances), ``m_median`` (over instances) and ``m_image_mean``
    (mean of each image's instance mean, then over images). Infinite HD95 values (one mask empty) are
    excluded from every HD95 aggregate and counted in ``hd95_inf_count``. Empty input -> nan aggregates.
    ``n_resolvable``, ``dice_resolvable_mean`` and ``iou_resolvable_mean`` are over the instances the model
    can resolve at its input scale only (nan when there is none).
    """
    out: dict[str, float] = {
        "n_instances": len(scores),
        "n_images": len({s.image_id for s in scores}),
        "hd95_inf_count": sum(1 for s in scores if math.isinf(s.hd95)),
    }
    by_image: dict[str, list[InstanceScore]] = defaultdict(list)
    for s in scores:
        by_image[s.image_id].append(s)
    for m in _METRICS:
        out[f"{m}_mean"], out[f"{m}_median"] = _stats([getattr(s, m) for s in scores])
        image_means = [_stats([getattr(s, m) for s in group])[0] for group in by_image.values()]
        out[f"{m}_image_mean"] = _stats(image_means)[0]
    resolvable = [s for s in scores if s.resolvable]
    out["n_resolvable"] = len(resolvable)
    for m in ("dice", "iou"):
        out[f"{m}_resolvable_mean"] = _stats([getattr(s, m) for s in resolvable])[0]
    return out
