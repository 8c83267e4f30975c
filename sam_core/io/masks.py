"""Encodings clients use for binary masks.

A mask is an ``(H, W)`` bool array (``True`` = foreground); a batch is ``(N, H, W)``. Inputs may also
be integer arrays holding only 0 and 1. Encodings:

* ``"array"``: the bool arrays themselves (in-process callers).
* ``"rle"``: COCO compressed RLE ``{"size": [h, w], "counts": str}`` (column-major, JSON-friendly).
* ``"png"``: single-channel 8-bit PNG bytes with values 0/255 (opens in any image viewer).
* ``"polygons"``: COCO-style flat polygons ``[x0, y0, x1, y1, ...]`` of the outer boundaries.

Decoders treat their input as untrusted: RLE counts are parsed and checked in numpy before any
pixel is written (pycocotools' own decoder returns uninitialised memory for short counts) and the
declared size is capped like images are (decompression-bomb guard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from sam_core.errors import ImageDecodeError, ImageTooLarge, InvalidInput
from sam_core.io.images import DEFAULT_MAX_PIXELS, _open_image

ENCODINGS: tuple[str, ...] = ("array", "rle", "png", "polygons")

_MAX_RLE_CHARS_PER_COUNT = 8  # 40 bits: far above any allowed H * W, and int64 math cannot overflow


# --------------------------------------------------------------------------------------------------
# validation


def _as_bool_mask(mask: Any, *, ndim: int, field: str) -> np.ndarray:
    """Return ``mask`` as a bool array of rank ``ndim`` (bool passes through without a copy).

    Integer arrays must hold only 0 and 1. Other dtypes, ranks or empty spatial axes -> InvalidInput.
    """
    if not isinstance(mask, np.ndarray):
        raise InvalidInput(f"expected a numpy array, got {type(mask).__name__}", field=field)
    expected = "H x W" if ndim == 2 else "N x H x W"
    if mask.ndim != ndim or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise InvalidInput(f"expected a {expected} mask with H, W > 0, got shape {mask.shape}", field=field)
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "iu":
        raise InvalidInput(f"mask dtype must be bool or a 0/1 integer type, got {mask.dtype}", field=field)
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise InvalidInput("integer masks must contain only 0 and 1", field=field)
    return mask.astype(bool)


def _check_size(height: Any, width: Any, max_pixels: int, *, field: str) -> tuple[int, int]:
    """Validate a declared mask size (positive ints, at most ``max_pixels`` pixels)."""
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InvalidInput(
                f"mask size must be two positive integers, got {height!r}, {width!r}", field=field
            )
    height, width = int(height), int(width)
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"mask is {width}x{height} = {height * width} pixels, over the limit of {max_pixels}", field=field
        )
    return height, width


def _transpose_u8(array: np.ndarray) -> np.ndarray:
    """C-contiguous transpose of a 2-D uint8 array (OpenCV's blocked transpose beats numpy's copy)."""
    return cv2.transpose(np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------------
# RLE


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an ``(H, W)`` mask as COCO compressed RLE: ``{"size": [H, W], "counts": str}``."""
    mask = _as_bool_mask(mask, ndim=2, field="mask")
    fortran = _transpose_u8(mask.view(np.uint8)).T  # == np.asfortranarray(mask), ~10x faster
    rle = mask_utils.encode(fortran)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("utf-8")}


def decode_rle(rle: dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode COCO RLE into an ``(H, W)`` bool mask.

    ``counts`` may be the compressed string (``str`` or ``bytes``) or the uncompressed list of run
    lengths. A malformed dict (missing keys, bad size, invalid characters, runs that do not add up to
    ``H * W``) raises InvalidInput with field ``"rle"``; a size over ``max_pixels`` raises ImageTooLarge.
    """
    field = "rle"
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InvalidInput('expected a dict with "size" and "counts"', field=field)
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise InvalidInput(f'"size" must be [height, width], got {size!r}', field=field)
    height, width = _check_size(size[0], size[1], max_pixels, field=field)
    runs = _rle_runs(rle["counts"], field=field)
    if runs.size and runs.max() > height * width:
        raise InvalidInput(f"RLE run of {int(runs.max())} pixels exceeds the mask size", field=field)
    if int(runs.sum()) != height * width:
        raise InvalidInput(
            f"RLE runs cover {int(runs.sum())} pixels, size says {height * width}", field=field
        )
    values = (np.arange(runs.size) & 1).astype(bool)  # runs alternate background / foreground
    flat = np.repeat(values, runs)
    return _transpose_u8(flat.view(np.uint8).reshape(width, height)).view(bool)  # RLE is column-major


def _rle_runs(counts: Any, *, field: str) -> np.ndarray:
    """Run lengths (int64) from compressed (str/bytes) or uncompressed (list of ints) counts."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as exc:
            raise InvalidInput("RLE counts must be ASCII", field=field) from exc
    if isinstance(counts, (bytes, bytearray)):
        return _parse_rle_string(bytes(counts), field=field)
    if isinstance(counts, (list, tuple)) and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in counts
    ):
        runs = np.asarray(counts, dtype=np.int64).reshape(-1)
        if runs.size and runs.min() < 0:
            raise InvalidInput("RLE counts must be non-negative", field=field)
        return runs
    raise InvalidInput(
        f'"counts" must be a str, bytes or list of ints, got {type(counts).__name__}', field=field
    )


def _parse_rle_string(data: bytes, *, field: str) -> np.ndarray:
    """Vectorised port of pycocotools' ``rleFrString`` with validation.

    Each count is a little-endian sequence of 5-bit groups stored as ``chr(48 + c)``; bit 0x20 of a
    char means "more groups follow", bit 0x10 of the last group is the sign. From the 4th count on,
    the value is a delta to the count two places earlier.
    """
    if not data:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    if chars.min() < 0 or chars.max() > 63:
        raise InvalidInput("RLE counts contain characters outside '0'..'o'", field=field)
    ends = (chars & 0x20) == 0
    if not ends[-1]:
        raise InvalidInput("RLE counts string ends in the middle of a number", field=field)
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    group = np.cumsum(np.concatenate(([0], ends[:-1].astype(np.int64))))
    position = np.arange(chars.size) - starts[group]
    if position.max() >= _MAX_RLE_CHARS_PER_COUNT:
        raise InvalidInput("RLE count too large", field=field)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    last = chars[ends]
    negative = (last & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # index 1, 3, 5...: each a delta to two back (from index 3)
    runs[2::2] = np.cumsum(values[2::2])  # index 2, 4, 6...: index 2 is absolute, deltas from 4
    if runs.min() < 0:
        raise InvalidInput("RLE counts decode to a negative run length", field=field)
    return runs


# --------------------------------------------------------------------------------------------------
# PNG


def encode_png(mask: np.ndarray) -> bytes:
    """Encode an ``(H, W)`` mask as a single-channel 8-bit PNG with values 0 and 255."""
    mask = _as_bool_mask(mask, ndim=2, field="mask")
    ok, buffer = cv2.imencode(".png", mask.view(np.uint8) * np.uint8(255))
    if not ok:  # pragma: no cover - OpenCV only fails here on allocation errors
        raise RuntimeError("OpenCV failed to encode the mask as PNG")
    return buffer.tobytes()


def decode_png(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "mask") -> np.ndarray:
    """Decode PNG bytes into an ``(H, W)`` bool mask: gray value > 127 is foreground.

    Colour PNGs are converted to luminance first, 1-bit PNGs map 1 to foreground. The pixel limit is
    checked from the header before decoding; corrupt data raises ImageDecodeError.
    """
    im = _open_image(data, max_bytes=None, max_pixels=max_pixels, field=field, formats=("PNG",))
    try:
        if im.mode == "1":
            return np.array(im, dtype=bool)
        gray = im if im.mode == "L" else im.convert("L")
        return np.asarray(gray) > 127
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot convert PNG mode {im.mode!r} to a mask: {exc}", field=field) from exc
    finally:
        im.close()


# --------------------------------------------------------------------------------------------------
# polygons


def mask_to_polygons(mask: np.ndarray, *, min_area: float = 0.0, tolerance: float = 0.0) -> list[list[float]]:
    """Outer boundaries of an ``(H, W)`` mask as COCO-style flat polygons ``[x0, y0, x1, y1, ...]``.

    Vertices are pixel coordinates of the *centres* of boundary pixels (as ``cv2.findContours``
    returns them), so :func:`polygons_to_mask` reproduces the pixels of simple shapes exactly. Holes
    are not represented (filled on the way back). ``tolerance > 0`` simplifies each polygon with
    ``cv2.approxPolyDP`` (max deviation in pixels). Polygons whose area (of the vertex polygon, which
    is smaller than the pixel count: a 10x10 square has area 81) is below ``min_area`` are dropped.

    Components whose contour has fewer than 3 vertices (a single pixel, a 1-pixel-wide straight
    segment) have no area and are dropped: COCO tools would read a 4-number polygon as a box.
    """
    mask = _as_bool_mask(mask, ndim=2, field="mask")
    pixels = np.ascontiguousarray(mask.view(np.uint8))
    contours, _ = cv2.findContours(pixels, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, float(tolerance), True)
        if len(contour) < 3 or cv2.contourArea(contour) < min_area:
            continue
        polygons.append(contour.reshape(-1).astype(float).tolist())
    return polygons


def polygons_to_mask(
    polygons: Sequence[Sequence[float]], height: int, width: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Rasterise flat polygons (see :func:`mask_to_polygons`) into an ``(height, width)`` bool mask.

    Each polygon is filled on its own (overlaps union, they do not cancel); coordinates are rounded
    to the nearest pixel. Malformed polygons raise InvalidInput with field ``"polygons"``.
    """
    height, width = _check_size(height, width, max_pixels, field="polygons")
    canvas = np.zeros((height, width), dtype=np.uint8)
    for index, polygon in enumerate(polygons):
        points = _polygon_points(polygon, field=f"polygons[{index}]")
        cv2.fillPoly(canvas, [points], 1)
    return canvas.view(bool)


def _polygon_points(polygon: Sequence[float], *, field: str) -> np.ndarray:
    """Flat ``[x0, y0, ...]`` -> ``(K, 2)`` int32 points for OpenCV (K >= 3, finite coordinates)."""
    try:
        coords = np.asarray(polygon, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("polygon must be a flat list of numbers", field=field) from exc
    if coords.ndim != 1 or coords.size < 6 or coords.size % 2:
        raise InvalidInput(
            f"polygon needs an even number (>= 6) of coordinates, got shape {coords.shape}", field=field
        )
    if not np.isfinite(coords).all() or np.abs(coords).max() > 2**30:
        raise InvalidInput("polygon coordinates must be finite and within +-2**30", field=field)
    return np.rint(coords).astype(np.int32).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# statistics


def mask_area(mask: np.ndarray) -> int:
    """Number of foreground pixels of an ``(H, W)`` mask."""
    return int(np.count_nonzero(_as_bool_mask(mask, ndim=2, field="mask")))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box ``(x0, y0, x1, y1)`` of an ``(H, W)`` mask, ``x0, y0`` inclusive and ``x1, y1`` exclusive.

    So ``x1 - x0`` is the box width in pixels and ``mask[y0:y1, x0:x1]`` holds every foreground pixel.
    Returns ``None`` for an empty mask.
    """
    mask = _as_bool_mask(mask, ndim=2, field="mask")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --------------------------------------------------------------------------------------------------
# batch


def encode_masks(masks: np.ndarray, encoding: str) -> list[Any]:
    """Encode an ``(N, H, W)`` batch, one entry per mask, with ``encoding`` in :data:`ENCODINGS`.

    ``"array"``: ``(H, W)`` bool arrays; ``"rle"``: dicts (:func:`encode_rle`); ``"png"``: bytes
    (:func:`encode_png`); ``"polygons"``: a list of flat polygons per mask (:func:`mask_to_polygons`).
    """
    if encoding not in ENCODINGS:
        raise InvalidInput(
            f"unknown mask encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}", field="encoding"
        )
    batch = _as_bool_mask(masks, ndim=3, field="masks")
    encoder = {
        "array": lambda m: m,
        "rle": encode_rle,
        "png": encode_png,
        "polygons": mask_to_polygons,
    }[encoding]
    return [encoder(mask) for mask in batch]
