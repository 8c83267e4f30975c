"""Prompts and their validation.

A :class:`Prompt` asks for one object: a box, a set of points with labels, or both, optionally with
a low-resolution mask input (logits from a previous decode). Coordinates are in original-image
pixels, x to the right and y down; a box is (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0.
Point labels: 1 = foreground, 0 = background.

:func:`validate_prompts` checks a whole request and raises a typed error naming the exact field,
e.g. ``prompts[3].point_coords``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sam_core.errors import InvalidMaskInput, InvalidPrompt, TooManyPrompts

DEFAULT_MAX_PROMPTS = 256
MAX_POINTS_PER_PROMPT = 64


@dataclass(frozen=True)
class Prompt:
    """One object to segment.

    box: (4,) float or None; point_coords: P x 2 float or None; point_labels: (P,) int or None;
    mask_input: 1 x L x L (or L x L) low-res logits or None, L = the model's low-res size.
    """

    box: np.ndarray | None = None
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    @staticmethod
    def from_box(box: Sequence[float] | np.ndarray) -> Prompt:
        return Prompt(box=np.asarray(box, dtype=np.float64))

    @staticmethod
    def from_points(coords: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int] | np.ndarray) -> Prompt:
        return Prompt(point_coords=np.asarray(coords, dtype=np.float64), point_labels=np.asarray(labels))

    @property
    def n_points(self) -> int:
        return 0 if self.point_coords is None else int(len(self.point_coords))

    def signature(self) -> tuple[bool, int, bool]:
        """Prompts with equal signatures can be decoded in one batch with identical results."""
        return (self.box is not None, self.n_points, self.mask_input is not None)

    def extent(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) of everything the prompt names (box and points)."""
        xs: list[float] = []
        ys: list[float] = []
        if self.box is not None:
            xs += [float(self.box[0]), float(self.box[2])]
            ys += [float(self.box[1]), float(self.box[3])]
        if self.point_coords is not None:
            xs += [float(v) for v in self.point_coords[:, 0]]
            ys += [float(v) for v in self.point_coords[:, 1]]
        return min(xs), min(ys), max(xs), max(ys)


def _finite_array(value: np.ndarray, shape_ok: Callable[[np.ndarray], bool], expected: str, field: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidPrompt(f"must be numeric ({exc})", field=field) from exc
    if not shape_ok(array):
        raise InvalidPrompt(f"must have shape {expected}, got {array.shape}", field=field)
    if not np.all(np.isfinite(array)):
        raise InvalidPrompt("contains NaN or infinite values", field=field)
    return array


def _check_in_image(coords: np.ndarray, image_size: tuple[float, float], field: str) -> None:
    h, w = image_size
    xs, ys = coords[..., 0], coords[..., 1]
    if np.any(xs < 0) or np.any(xs > w) or np.any(ys < 0) or np.any(ys > h):
        raise InvalidPrompt(f"coordinates must lie inside the image (0..{w} x 0..{h})", field=field)


def validate_prompt(prompt: Prompt, image_size: tuple[float, float], low_res_size: int, field: str) -> Prompt:
    """Validate one prompt against an image of ``image_size`` (H, W); returns it with clean arrays."""
    if prompt.box is None and prompt.point_coords is None:
        raise InvalidPrompt("needs a box or at least one point", field=field)
    box = coords = labels = mask = None
    if prompt.box is not None:
        box = _finite_array(prompt.box, lambda a: a.shape == (4,), "(4,) = x0, y0, x1, y1", f"{field}.box")
        _check_in_image(box.reshape(2, 2), image_size, f"{field}.box")
        if box[2] < box[0] or box[3] < box[1]:
            raise InvalidPrompt("needs x1 >= x0 and y1 >= y0", field=f"{field}.box")
    if prompt.point_coords is not None:
        coords = _finite_array(
            prompt.point_coords,
            lambda a: a.ndim == 2 and a.shape[1] == 2 and 1 <= a.shape[0] <= MAX_POINTS_PER_PROMPT,
            f"P x 2 with 1 <= P <= {MAX_POINTS_PER_PROMPT}",
            f"{field}.point_coords",
        )
        _check_in_image(coords, image_size, f"{field}.point_coords")
        if prompt.point_labels is None:
            raise InvalidPrompt("required when point_coords is given", field=f"{field}.point_labels")
        labels = np.asarray(prompt.point_labels)
        if labels.shape != (coords.shape[0],):
            raise InvalidPrompt(
                f"must have one label per point ({coords.shape[0]}), got shape {labels.shape}",
                field=f"{field}.point_labels",
            )
        if not np.all(np.isin(labels, (0, 1))):
            raise InvalidPrompt("labels must be 1 (foreground) or 0 (background)", field=f"{field}.point_labels")
        labels = labels.astype(np.int64)
    elif prompt.point_labels is not None:
        raise InvalidPrompt("given without point_coords", field=f"{field}.point_labels")
    if prompt.mask_input is not None:
        mask = np.asarray(prompt.mask_input, dtype=np.float32)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.shape != (1, low_res_size, low_res_size):
            raise InvalidMaskInput(
                f"must be 1 x {low_res_size} x {low_res_size} low-res logits, got {np.shape(prompt.mask_input)}",
                field=f"{field}.mask_input",
            )
        if not np.all(np.isfinite(mask)):
            raise InvalidMaskInput("contains NaN or infinite values", field=f"{field}.mask_input")
    return Prompt(box=box, point_coords=coords, point_labels=labels, mask_input=mask)


def validate_prompts(prompts: Sequence[Prompt], image_size: tuple[float, float], low_res_size: int,
                     max_prompts: int = DEFAULT_MAX_PROMPTS) -> list[Prompt]:
    """Validate a request's prompt list; raises InvalidPrompt / TooManyPrompts / InvalidMaskInput."""
    if len(prompts) == 0:
        raise InvalidPrompt("at least one prompt is required", field="prompts")
    if len(prompts) > max_prompts:
        raise TooManyPrompts(f"{len(prompts)} prompts in one call; the limit is {max_prompts}", field="prompts")
    return [validate_prompt(p, image_size, low_res_size, f"prompts[{i}]") for i, p in enumerate(prompts)]


def all_present(values: Iterable[np.ndarray | None]) -> list[np.ndarray]:
    """One prompt field of prompts decoded together: every prompt of one signature has it (else ValueError)."""
    arrays = list(values)
    present = [v for v in arrays if v is not None]
    if len(present) != len(arrays):
        raise ValueError("prompts decoded together must share one signature")
    return present
