"""Reader of the folder format: ``DIR/images/`` plus ``DIR/masks/`` and/or ``DIR/masks_instances/``.

Images (jpg/jpeg/png/bmp/tif/tiff) and masks (png/tif/tiff/bmp) are matched by file stem; hidden files
are ignored. ``masks/`` holds binary masks (any non-zero pixel = foreground; the instances are its
8-connected components); ``masks_instances/`` holds instance ids (0 = background) and takes
precedence for a stem present in both. Several files with one stem are all excluded
(``duplicate_stem``); an image without a mask or a mask without an image is ``missing_partner``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sam_core.data.reading import (
    READ_ERRORS,
    image_size,
    instance_labels,
    instances_from_labels,
    kept_ids,
    size_text,
)
from sam_core.data.samples import Instance, Record, ValidationReport
from sam_core.errors import InvalidInput
from sam_core.io.images import load_image as _decode_image_file

IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp")


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the data set root, for reports (as given if outside it)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _index_dir(
    directory: Path, exts: tuple[str, ...], root: Path, report: ValidationReport
) -> tuple[dict[str, Path], set[str]]:
    """Map stem -> file for files with ``exts`` (hidden files ignored); duplicate stems are reported."""
    if not directory.is_dir():
        return {}, set()
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts:
            by_stem.setdefault(p.stem, []).append(p)
    duplicates = {s for s, files in by_stem.items() if len(files) > 1}
    for stem in sorted(duplicates):
        names = ", ".join(_rel(p, root) for p in by_stem[stem])
        for p in by_stem[stem]:
            report.add(_rel(p, root), "duplicate_stem", f"stem {stem!r} is ambiguous ({names}); excluded")
    return {s: files[0] for s, files in by_stem.items() if s not in duplicates}, duplicates


def _read_mask_array(path: Path) -> np.ndarray:
    """Raw mask pixels: H x W (palette masks give their indices) or H x W x C for colour masks."""
    with Image.open(path) as im:
        if im.mode == "1":
            return np.asarray(im, dtype=np.uint8)
        if im.mode in ("LA", "PA"):
            return np.asarray(im.getchannel(0))
        if im.mode not in ("L", "P", "I", "F", "RGB", "RGBA") and not im.mode.startswith("I;16"):
            return np.asarray(im.convert("RGB"))
        return np.asarray(im)


def _binary_foreground(arr: np.ndarray) -> np.ndarray:
    """H x W (or H x W x C, alpha ignored) -> H x W bool, any non-zero colour = foreground."""
    foreground: np.ndarray = (arr[..., :3] != 0).any(axis=2) if arr.ndim == 3 else arr != 0
    return foreground


def _components(fg: np.ndarray) -> np.ndarray:
    """8-connected components of an H x W bool mask -> H x W int32 labels (0 = background)."""
    _, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    return labels


def _folder_label_map(mask_path: Path, is_instances: bool) -> np.ndarray:
    arr = _read_mask_array(mask_path)
    if arr.ndim not in (2, 3):
        raise ValueError(f"unexpected mask shape {arr.shape}")
    return instance_labels(arr) if is_instances else _components(_binary_foreground(arr))


def _folder_instances(mask_path: Path, is_instances: bool, ids: tuple[int, ...]) -> list[Instance]:
    return instances_from_labels(_folder_label_map(mask_path, is_instances), ids)


def read_folder(root: Path, min_area: int, report: ValidationReport) -> list[Record]:
    """Records of the usable samples of a folder data set (problems go to ``report``)."""
    if not (root / "masks").is_dir() and not (root / "masks_instances").is_dir():
        raise InvalidInput("expected masks/ and/or masks_instances/ next to images/", field=str(root))
    images, dup_images = _index_dir(root / "images", IMAGE_EXTS, root, report)
    binary, dup_binary = _index_dir(root / "masks", MASK_EXTS, root, report)
    instances, dup_inst = _index_dir(root / "masks_instances", MASK_EXTS, root, report)
    skip = dup_images | dup_binary | dup_inst
    for stem in sorted((set(binary) | set(instances)) - set(images) - skip):
        for orphan in filter(None, (binary.get(stem), instances.get(stem))):
            report.add(_rel(orphan, root), "missing_partner", f"no image with stem {stem!r} in images/")
    records = []
    for stem, image_path in sorted(images.items()):
        if stem in skip:
            continue
        is_inst = stem in instances
        mask_path = instances.get(stem) or binary.get(stem)
        if mask_path is None:
            msg = "no mask with this stem in masks/ or masks_instances/"
            report.add(_rel(image_path, root), "missing_partner", msg)
            continue
        rec = _folder_record(root, stem, image_path, mask_path, is_inst, min_area, report)
        if rec is not None:
            records.append(rec)
    return records


def _folder_record(
    root: Path,
    stem: str,
    image_path: Path,
    mask_path: Path,
    is_inst: bool,
    min_area: int,
    report: ValidationReport,
) -> Record | None:
    try:
        height, width = image_size(image_path)
    except READ_ERRORS as exc:
        report.add(_rel(image_path, root), "unreadable", f"cannot read image header: {exc}")
        return None
    try:
        labels = _folder_label_map(mask_path, is_inst)
    except READ_ERRORS as exc:
        report.add(_rel(mask_path, root), "unreadable", f"cannot read mask: {exc}")
        return None
    if labels.shape != (height, width):
        report.add(
            _rel(mask_path, root),
            "size_mismatch",
            f"mask is {size_text(*labels.shape)} but image {_rel(image_path, root)} is "
            f"{size_text(height, width)}",
        )
        return None
    ids = kept_ids(labels, min_area)
    if not ids:
        msg = f"no instance with >= {max(min_area, 1)} pixels; skipped"
        report.add(_rel(mask_path, root), "empty_mask", msg)
        return None
    return Record(
        image_id=stem,
        height=height,
        width=width,
        image_path=image_path,
        instance_ids=ids,
        load_pixels=partial(_decode_image_file, image_path),
        load_instances=partial(_folder_instances, mask_path, is_inst, ids),
        image_file=image_path,
        label_files=(mask_path,),
    )
