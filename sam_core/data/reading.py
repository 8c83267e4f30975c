"""Helpers the format readers share: image sizes from headers, label maps, instance ids, read errors.

:data:`READ_ERRORS` are the exceptions that mean "this file cannot be read" (reported as ``unreadable``,
never raised out of a reader). :func:`image_size` reads only the image header and applies the EXIF
orientation exactly as :func:`sam_core.io.images.load_image` will when the image is decoded.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sam_core.data.samples import Instance
from sam_core.io.images import DEFAULT_MAX_PIXELS

READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)
EXIF_ORIENTATION = 0x0112


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as decoded by image_io (EXIF orientation applied), from the header only.

    Raises ValueError for images image_io would refuse as too large.
    """
    with Image.open(path) as im:
        width, height = im.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise ValueError(f"{width}x{height} pixels is over the limit of {DEFAULT_MAX_PIXELS} pixels")
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # broken EXIF is ignored by image_io as well
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def instance_labels(arr: np.ndarray) -> np.ndarray:
    """Instance id map -> H x W int64. Colour maps are accepted only when all channels are equal."""
    if arr.ndim == 3:
        colour = arr[..., :3]
        if not (colour == colour[..., :1]).all():
            raise ValueError("colour instance masks are not supported; save ids as 1-channel uint8/uint16")
        arr = colour[..., 0]
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError("instance ids must be integers")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"unsupported mask dtype {arr.dtype}")
    return arr.astype(np.int64)


def kept_ids(labels: np.ndarray, min_area: int) -> tuple[int, ...]:
    """Sorted non-zero ids of a label map with at least max(min_area, 1) pixels."""
    if labels.size and labels.min() >= 0 and labels.max() < (1 << 20):
        counts = np.bincount(labels.ravel())
        ids = np.arange(counts.size)
    else:
        ids, counts = np.unique(labels, return_counts=True)
    keep = (ids != 0) & (counts >= max(min_area, 1))
    return tuple(int(i) for i in ids[keep])


def instances_from_labels(labels: np.ndarray, ids: Sequence[int]) -> list[Instance]:
    """One :class:`Instance` (H x W bool mask) per id of a label map."""
    return [Instance(labels == i, int(i)) for i in ids]


def size_text(h: int, w: int) -> str:
    """A size for messages: ``"<w>x<h> (WxH)"``."""
    return f"{w}x{h} (WxH)"
