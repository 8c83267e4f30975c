"""Which instances a model can resolve: the size of an object at the model's input scale.

A model sees an image (or a crop / tile of it, the *view*) resized so that its longest side is the
model's ``img_size`` (:func:`sam_core.modeling.preprocess.resized_shape`). An instance whose bounding
box is narrower than :data:`RESOLVABLE_MIN_SIDE_PX` pixels on either side at that scale is a speck the
model cannot resolve: Dice on it measures noise, not the model. The data diagnostics
(:mod:`sam_core.data.diagnostics`), evaluation (``dice_resolvable_mean``) and model selection in training
all use this one rule.

Pure numpy (no torch): :func:`input_shape` repeats ``resized_shape``'s rounding, and a test holds them
equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESOLVABLE_MIN_SIDE_PX = 2.0
"""Shorter bounding-box side, in model-input pixels, below which an instance is not resolvable."""


@dataclass(frozen=True)
class Extent:
    """An instance's bounding box height / width and its area, in native pixels."""

    height: int
    width: int
    area: int


def instance_extent(mask: np.ndarray) -> Extent:
    """Bounding box and area of an H x W bool mask (all zero for an empty mask)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return Extent(0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return Extent(int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1), int(np.count_nonzero(mask)))


def input_shape(view: tuple[int, int], img_size: int) -> tuple[int, int]:
    """(h, w) of a ``view`` (H, W) after resizing its longest side to ``img_size`` (each side >= 1)."""
    scale = img_size / max(view)
    return max(1, int(view[0] * scale + 0.5)), max(1, int(view[1] * scale + 0.5))


def input_scale(view: tuple[int, int], img_size: int) -> tuple[float, float]:
    """(row, column) factors from native pixels of ``view`` to model-input pixels."""
    h, w = input_shape(view, img_size)
    return h / view[0], w / view[1]


def short_side_at_input(extent: Extent, view: tuple[int, int], img_size: int) -> float:
    """The shorter bounding-box side of an instance, in model-input pixels, when ``view`` is the model input."""
    sy, sx = input_scale(view, img_size)
    return min(extent.height * sy, extent.width * sx)


def tile_view(image: tuple[int, int], tile: int | None) -> tuple[int, int]:
    """The view an instance is seen through: the whole image, or a ``tile`` x ``tile`` native window."""
    if tile is None:
        return image
    return min(image[0], tile), min(image[1], tile)


def is_resolvable(mask: np.ndarray, img_size: int, *, tile: int | None = None) -> bool:
    """True when ``mask`` is at least :data:`RESOLVABLE_MIN_SIDE_PX` on both sides at the model's input scale.

    ``tile``: the instance is seen through a native ``tile`` x ``tile`` window (tiled inference, crops)
    instead of the whole resized image.
    """
    extent = instance_extent(mask)
    view = tile_view((mask.shape[0], mask.shape[1]), tile)
    return extent.area > 0 and short_side_at_input(extent, view, img_size) >= RESOLVABLE_MIN_SIDE_PX
