"""Which instances a model can resolve: the size of an object at the model's input scale.

A model sees an image (or a crop / tile of it, the *view*) resized the way its ``ModelSpec.resize`` says
(:func:`sam_core.modeling.preprocess.input_shape`): ``"longest_side"`` (SAM 1) scales the longest side to
``img_size`` keeping the aspect ratio; ``"square"`` (SAM 2) stretches the view to ``img_size x img_size``,
each axis by its own factor, so a wide view's rows are magnified more than its columns. An instance whose
bounding box is narrower than :data:`RESOLVABLE_MIN_SIDE_PX` pixels on either side at that scale is a speck
the model cannot resolve: Dice on it measures noise, not the model. The data diagnostics
(:mod:`sam_core.data.diagnostics`), evaluation (``dice_resolvable_mean``) and model selection in training
all use this one rule.

Every function takes the model's ``ModelSpec`` (its ``img_size`` and ``resize``) or, for SAM 1 callers, a
bare ``img_size`` meaning a longest-side resize. Pure numpy (no torch): :func:`input_shape` repeats
``preprocess.input_shape``'s rounding, and a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:  # only img_size and resize are read: resolution needs no torch
    from sam_core.modeling.family import ModelSpec

InputSize: TypeAlias = "int | ModelSpec"
"""A model's ``ModelSpec``, or its ``img_size`` alone meaning a longest-side resize (SAM 1)."""

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


def input_side(size: InputSize) -> int:
    """The model's ``img_size``."""
    return size if isinstance(size, int) else size.img_size


def input_shape(view: tuple[int, int], size: InputSize) -> tuple[int, int]:
    """(h, w) of a ``view`` (H, W) at the model's input: S x S for a square resize, else its longest side
    scaled to S (each side >= 1)."""
    side = input_side(size)
    if not isinstance(size, int) and size.resize == "square":
        return side, side
    scale = side / max(view)
    return max(1, int(view[0] * scale + 0.5)), max(1, int(view[1] * scale + 0.5))


def input_scale(view: tuple[int, int], size: InputSize) -> tuple[float, float]:
    """(row, column) factors from native pixels of ``view`` to model-input pixels."""
    h, w = input_shape(view, size)
    return h / view[0], w / view[1]


def short_side_at_input(extent: Extent, view: tuple[int, int], size: InputSize) -> float:
    """The shorter bounding-box side of an instance, in model-input pixels, when ``view`` is the model input."""
    sy, sx = input_scale(view, size)
    return min(extent.height * sy, extent.width * sx)


def tile_view(image: tuple[int, int], tile: int | None) -> tuple[int, int]:
    """The view an instance is seen through: the whole image, or a ``tile`` x ``tile`` native window."""
    if tile is None:
        return image
    return min(image[0], tile), min(image[1], tile)


def is_resolvable(mask: np.ndarray, size: InputSize, *, tile: int | None = None) -> bool:
    """True when ``mask`` is at least :data:`RESOLVABLE_MIN_SIDE_PX` on both sides at the model's input scale.

    ``size``: the model's spec (or bare ``img_size``, see the module docstring). ``tile``: the instance is
    seen through a native ``tile`` x ``tile`` window (tiled inference, crops) instead of the whole image.
    """
    extent = instance_extent(mask)
    view = tile_view((mask.shape[0], mask.shape[1]), tile)
    return extent.area > 0 and short_side_at_input(extent, view, size) >= RESOLVABLE_MIN_SIDE_PX
