"""Prompt simulation for fine-tuning and evaluation.

Pure functions on numpy arrays. Randomness only comes from an explicit ``np.random.Generator`` so a
run is reproducible given the generator's seed. Conventions (as in SAM / MedSAM):

* masks are H x W bool (any non-zero value counts as foreground);
* points are (x, y) pixel indices, x = column, y = row; labels 1 = foreground, 0 = background;
* a box is (x0, y0, x1, y1) float32 where x1 / y1 are the *inclusive* max pixel index
  (a one-pixel mask at (x=5, y=7) has box (5, 7, 5, 7)).

Eval prompts are jitter-free when ``PromptConfig.box_jitter == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from sam_core.errors import InvalidInput

PromptKind = Literal["box", "point", "box+point"]
_KINDS: tuple[str, ...] = ("box", "point", "box+point")


def _as_mask(mask: np.ndarray, field: str = "mask") -> np.ndarray:
    """Return ``mask`` as an H x W bool array (raises InvalidInput for other shapes)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InvalidInput(f"expected an H x W mask, got shape {arr.shape}", field=field)
    return arr.astype(bool, copy=False)


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box of an H x W mask -> (4,) float32 (x0, y0, x1, y1), x1/y1 inclusive max indices."""
    m = _as_mask(mask)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise InvalidInput("empty mask has no bounding box", field="mask")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def jitter_box(
    box: np.ndarray,
    rng: np.random.Generator,
    *,
    max_shift: float = 0.1,
    max_pixels: int | None = 20,
    image_size: tuple[int, int],
) -> np.ndarray:
    """Randomly move each box side, then clip to the image.

    Each x coordinate moves by U(-s_x, s_x) with s_x = min(max_shift * box_width, max_pixels) (same for y
    with the height); ``max_pixels=None`` removes the pixel cap. ``image_size`` is (h, w); the result is
    clipped to [0, w-1] x [0, h-1] and kept ordered (x0 <= x1, y0 <= y1). Returns (4,) float32.
    """
    b = np.asarray(box, dtype=np.float64).reshape(4)
    h, w = image_size
    side = np.array([b[2] - b[0] + 1.0, b[3] - b[1] + 1.0])
    shift = np.maximum(side * float(max_shift), 0.0)
    if max_pixels is not None:
        shift = np.minimum(shift, float(max_pixels))
    scale = np.array([shift[0], shift[1], shift[0], shift[1]])
    out = b + rng.uniform(-1.0, 1.0, size=4) * scale
    out[[0, 2]] = np.clip(out[[0, 2]], 0.0, w - 1.0)
    out[[1, 3]] = np.clip(out[[1, 3]], 0.0, h - 1.0)
    x0, x1 = sorted((out[0], out[2]))
    y0, y1 = sorted((out[1], out[3]))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def _choose(flat_idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` of ``flat_idx`` uniformly (without replacement while possible)."""
    if n <= 0 or flat_idx.size == 0:
        return flat_idx[:0]
    replace = n > flat_idx.size
    return rng.choice(flat_idx, size=n, replace=replace)


def _padded_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel (image border counts)."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def _center_index(mask: np.ndarray) -> int:
    """Flat index of the mask pixel farthest from the background (first on ties)."""
    return int(np.argmax(_padded_distance(mask)))


def sample_points(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    n_pos: int = 1,
    n_neg: int = 0,
    from_center: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n_pos`` foreground and ``n_neg`` background points.

    Returns (coords N x 2 float32 (x, y), labels (N,) int32), positives first. Points are drawn uniformly
    (without replacement while the region has enough pixels). If the background is empty fewer
    negatives are returned. ``from_center`` makes the first positive the pixel of maximum distance
    to the background (cv2.distanceTransform). An empty mask with ``n_pos > 0`` raises InvalidInput.
    """
    m = _as_mask(mask)
    width = m.shape[1]
    fg = np.flatnonzero(m)
    if n_pos > 0 and fg.size == 0:
        raise InvalidInput("cannot sample positive points from an empty mask", field="mask")
    if from_center and n_pos > 0:
        pos = np.concatenate([[_center_index(m)], _choose(fg, n_pos - 1, rng)])
    else:
        pos = _choose(fg, n_pos, rng)
    neg = _choose(np.flatnonzero(~m), n_neg, rng)
    idx = np.concatenate([pos, neg]).astype(np.int64)
    coords = np.stack([idx % width, idx // width], axis=1).astype(np.float32)
    labels = np.concatenate([np.ones(pos.size, np.int32), np.zeros(neg.size, np.int32)])
    return coords.reshape(-1, 2), labels


def correction_point(
    pred_mask: np.ndarray, gt_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, int] | None:
    """Next corrective click for iterative training/eval (SAM / RITM style).

    Picks the larger error region (by pixel count; ties -> the thicker one): false negatives
    (gt & ~pred) give a positive point (label 1), false positives (pred & ~gt) a negative one (label 0).
    The point is the pixel of maximum distance to the region's boundary (ties broken with ``rng``).
    Returns (coord (2,) float32 (x, y), label) or None when the prediction is perfect.
    """
    pred = _as_mask(pred_mask, "pred_mask")
    gt = _as_mask(gt_mask, "gt_mask")
    if pred.shape != gt.shape:
        raise InvalidInput(f"shape {pred.shape} != gt shape {gt.shape}", field="pred_mask")
    fn, fp = gt & ~pred, pred & ~gt
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn == 0 and n_fp == 0:
        return None
    if n_fn == n_fp:  # both non-empty: the deeper error region wins (false negatives on a tie)
        dist_fn, dist_fp = _padded_distance(fn), _padded_distance(fp)
        use_fn = float(dist_fn.max()) >= float(dist_fp.max())
        dist = dist_fn if use_fn else dist_fp
    else:
        use_fn = n_fn > n_fp
        dist = _padded_distance(fn if use_fn else fp)
    best = np.flatnonzero(dist >= dist.max() - 1e-6)
    flat = int(rng.choice(best))
    width = gt.shape[1]
    coord = np.array([flat % width, flat // width], dtype=np.float32)
    return coord, 1 if use_fn else 0


@dataclass(frozen=True)
class PromptConfig:
    """How to turn a ground-truth mask into a prompt.

    kind: "box", "point" or "box+point". box_jitter: max shift as a fraction of the box side
    (0 = exact tight box, use that for eval); box_jitter_max_px: cap of the shift in pixels (None = no cap).
    correction_rounds: number of iterative corrective clicks the training/eval loop adds with
    :func:`correction_point` (simulate_prompt itself produces only the initial prompt).
    point_from_center: first positive point = the mask's most interior pixel (deterministic).
    """

    kind: PromptKind = "box"
    n_pos: int = 1
    n_neg: int = 0
    box_jitter: float = 0.1
    box_jitter_max_px: int | None = 20
    correction_rounds: int = 0
    point_from_center: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidInput(f"must be one of {_KINDS}, got {self.kind!r}", field="kind")
        for name in ("n_pos", "n_neg", "correction_rounds"):
            if getattr(self, name) < 0:
                raise InvalidInput("must be >= 0", field=name)
        if self.box_jitter < 0:
            raise InvalidInput("must be >= 0", field="box_jitter")
        if "point" in self.kind and self.n_pos + self.n_neg == 0:
            raise InvalidInput(f"kind {self.kind!r} needs n_pos + n_neg >= 1", field="n_pos")

    @property
    def uses_box(self) -> bool:
        return "box" in self.kind

    @property
    def uses_points(self) -> bool:
        return "point" in self.kind


def prompt_config(kind: PromptKind = "box", jitter: float = 0.0) -> PromptConfig:
    """The CLI's and trainer service's prompts: ``jitter`` > 0 for training (boxes shifted by up to
    that fraction, capped at 20 px); 0 for evaluation (exact boxes, points from the mask centre)."""
    return PromptConfig(kind=kind, box_jitter=jitter, box_jitter_max_px=20 if jitter else 0,
                        point_from_center=jitter == 0.0)


def simulate_prompt(mask: np.ndarray, rng: np.random.Generator, cfg: PromptConfig) -> dict[str, np.ndarray | None]:
    """Prompt for one H x W mask.

    Returns {"box": (4,) float32 or None, "point_coords": P x 2 float32 or None,
    "point_labels": (P,) int32 or None}.
    """
    m = _as_mask(mask)
    out: dict[str, np.ndarray | None] = {"box": None, "point_coords": None, "point_labels": None}
    if cfg.uses_box:
        box = box_from_mask(m)
        if cfg.box_jitter > 0 and cfg.box_jitter_max_px != 0:
            box = jitter_box(
                box, rng, max_shift=cfg.box_jitter, max_pixels=cfg.box_jitter_max_px, image_size=m.shape
            )
        out["box"] = box
    if cfg.uses_points:
        coords, labels = sample_points(
            m, rng, n_pos=cfg.n_pos, n_neg=cfg.n_neg, from_center=cfg.point_from_center
        )
        out["point_coords"], out["point_labels"] = coords, labels
    return out
