"""Reader of the MedSAM-style npz format: a directory of ``.npz`` files, one sample each.

Each file holds an image under ``imgs`` / ``image`` / ``img`` (H x W or H x W x 3) and a label map under
``gts`` / ``mask`` / ``label`` / ``seg``; every distinct non-zero id is one instance. Files are read with
``allow_pickle=False``; validation reads the image's shape from its ``.npy`` header only.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from sam_core.data.reading import READ_ERRORS, instance_labels, instances_from_labels, kept_ids, size_text
from sam_core.data.samples import Instance, Record, ValidationReport
from sam_core.io.images import to_rgb_uint8

NPZ_IMAGE_KEYS: tuple[str, ...] = ("imgs", "image", "img")
NPZ_LABEL_KEYS: tuple[str, ...] = ("gts", "mask", "label", "seg")


def _npz_key(files: Sequence[str], candidates: tuple[str, ...]) -> str | None:
    return next((k for k in candidates if k in files), None)


def _npz_shape(npz_path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an npz, read from its .npy header without decompressing the data."""
    with zipfile.ZipFile(npz_path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return tuple(np.lib.format.read_array_header_1_0(fh)[0])
        if version == (2, 0):
            return tuple(np.lib.format.read_array_header_2_0(fh)[0])
    with np.load(npz_path, allow_pickle=False) as npz:
        return tuple(npz[key].shape)


def _image_hw(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
        return int(shape[0]), int(shape[1])
    raise ValueError(f"image array has shape {shape}; expected H x W or H x W x 3 (3-D volumes: slice them)")


def _npz_labels(npz_path: Path, key: str) -> np.ndarray:
    with np.load(npz_path, allow_pickle=False) as npz:
        arr = npz[key]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"label array has shape {arr.shape}; expected H x W (3-D volumes: slice them)")
    return instance_labels(arr)


def _npz_image(npz_path: Path, key: str) -> np.ndarray:
    with np.load(npz_path, allow_pickle=False) as npz:
        arr = npz[key]
    return to_rgb_uint8(arr, field=f"{npz_path.name}:{key}")


def _npz_instances(npz_path: Path, key: str, ids: tuple[int, ...]) -> list[Instance]:
    return instances_from_labels(_npz_labels(npz_path, key), ids)


def read_npz(root: Path, min_area: int, report: ValidationReport) -> list[Record]:
    """Records of the usable ``.npz`` files in ``root`` (problems go to ``report``)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
    return [rec for p in files if (rec := _npz_record(p, min_area, report)) is not None]


def _npz_record(npz_path: Path, min_area: int, report: ValidationReport) -> Record | None:
    name = npz_path.name
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            keys = list(npz.files)
        image_key, label_key = _npz_key(keys, NPZ_IMAGE_KEYS), _npz_key(keys, NPZ_LABEL_KEYS)
        if image_key is None or label_key is None:
            missing = "image (imgs/image/img)" if image_key is None else "labels (gts/mask/label/seg)"
            report.add(name, "missing_partner", f"no {missing} array; arrays present: {keys}")
            return None
        height, width = _image_hw(_npz_shape(npz_path, image_key))
        labels = _npz_labels(npz_path, label_key)
    except READ_ERRORS as exc:
        report.add(name, "unreadable", f"cannot read npz: {exc}")
        return None
    if labels.shape != (height, width):
        report.add(
            name,
            "size_mismatch",
            f"{label_key} is {size_text(*labels.shape)} but {image_key} is {size_text(height, width)}",
        )
        return None
    ids = kept_ids(labels, min_area)
    if not ids:
        report.add(name, "empty_mask", f"no label id with >= {max(min_area, 1)} pixels; skipped")
        return None
    return Record(
        image_id=npz_path.stem,
        height=height,
        width=width,
        image_path=None,
        instance_ids=ids,
        load_pixels=partial(_npz_image, npz_path, image_key),
        load_instances=partial(_npz_instances, npz_path, label_key, ids),
        image_file=npz_path,
    )
