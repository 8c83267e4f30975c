"""Reader of the COCO format: one ``.json`` file (polygons, compressed or uncompressed RLE).

Images are looked up under ``image_root``, by default the json's folder, then ``images/`` next to it; a
``file_name`` must stay inside that root (no absolute path, no ``..``). Crowd annotations are skipped
unless ``include_crowd=True``. The annotations of an image are hashed into its record's
``label_digest`` (they live in the json, not in a file of their own).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_core.data.reading import READ_ERRORS, image_size, size_text
from sam_core.data.samples import Instance, Record, ValidationReport
from sam_core.errors import InvalidInput
from sam_core.io.images import load_image as _decode_image_file

JsonObject = dict[str, Any]
"""A parsed JSON object (the COCO file, one of its images or annotations, an RLE)."""

def _read_coco(json_path: Path) -> JsonObject:
    """The parsed COCO json (an object with an ``images`` list); InvalidInput if it is not one."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read COCO json: {exc}", field=json_path.name) from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InvalidInput("not a COCO json: expected an object with an 'images' list", field=json_path.name)
    if not isinstance(data.get("annotations", []), list):
        raise InvalidInput("'annotations' must be a list", field=json_path.name)
    return data


def _segmentation_to_rle(seg: object, height: int, width: int) -> JsonObject:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE."""
    if isinstance(seg, dict):
        size = [int(v) for v in seg.get("size", [])]
        if size != [height, width]:
            raise _SizeMismatch(f"RLE size {size} (HxW) != image size [{height}, {width}]")
        counts = seg["counts"]
        if not isinstance(counts, list):
            return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        rle: JsonObject = mask_utils.frPyObjects(seg, height, width)
        return rle
    if not isinstance(seg, list):
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    polys = seg if seg and isinstance(seg[0], list) else [seg]
    polys = [[float(v) for v in p] for p in polys if len(p) >= 6 and len(p) % 2 == 0]
    if not polys:
        rle = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    return rle


class _SizeMismatch(ValueError):
    """An annotation whose RLE size differs from its image's (reported as ``size_mismatch``)."""


def _decode_rles(rles: tuple[JsonObject, ...], ids: tuple[int, ...]) -> list[Instance]:
    """The instances of one image from its compressed RLEs."""
    with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 copy-keyword DeprecationWarning
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return [Instance(mask_utils.decode(r).astype(bool), i) for r, i in zip(rles, ids, strict=True)]


def _coco_image_path(file_name: str, json_path: Path, image_root: Path | None) -> Path | None:
    """The image file for a COCO ``file_name``, which must stay inside its root (no absolute path, no
    ``..``): an uploaded annotation file must not make the trainer read files outside the data set."""
    roots = [image_root] if image_root is not None else [json_path.parent, json_path.parent / "images"]
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    for root in roots:
        candidate = root / relative
        if candidate.is_file() and candidate.resolve().is_relative_to(root.resolve()):
            return candidate
    return None


def _group_annotations(data: JsonObject, include_crowd: bool, json_name: str,
                       report: ValidationReport) -> dict[object, list[JsonObject]]:
    """Usable annotations by image id (bad ones reported, crowd ones skipped unless ``include_crowd``)."""
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    by_image: dict[object, list[JsonObject]] = {}
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or "segmentation" not in ann:
            report.add(json_name, "unreadable", f"annotation without segmentation: {str(ann)[:80]}")
            continue
        if ann.get("image_id") not in image_ids:
            msg = f"annotation {ann.get('id')} has unknown image_id {ann.get('image_id')}"
            report.add(json_name, "missing_partner", msg)
            continue
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image


def read_coco(
    json_path: Path, image_root: Path | None, min_area: int, include_crowd: bool, report: ValidationReport
) -> list[Record]:
    """Records of the usable images of a COCO json (problems go to ``report``); see the module docstring."""
    data = _read_coco(json_path)
    json_name = json_path.name
    by_image = _group_annotations(data, include_crowd, json_name, report)
    entries = [img for img in data["images"] if isinstance(img, dict) and "file_name" in img]
    for _ in range(len(data["images"]) - len(entries)):
        report.add(json_name, "unreadable", "an 'images' entry without file_name was ignored")
    stems: dict[str, int] = {}
    for img in entries:
        stem = Path(str(img["file_name"])).stem
        stems[stem] = stems.get(stem, 0) + 1
    records = []
    for img in sorted(entries, key=lambda e: str(e["file_name"])):
        file_name = str(img["file_name"])
        if stems[Path(file_name).stem] > 1:
            msg = f"several images have stem {Path(file_name).stem!r}; excluded"
            report.add(file_name, "duplicate_stem", msg)
            continue
        rec = _coco_record(img, by_image.get(img.get("id"), []), json_path, image_root, min_area, report)
        if rec is not None:
            records.append(rec)
    return records


def _coco_record(
    img: JsonObject,
    anns: list[JsonObject],
    json_path: Path,
    image_root: Path | None,
    min_area: int,
    report: ValidationReport,
) -> Record | None:
    """The record of one COCO image, or None (reported) if it is unusable."""
    file_name = str(img["file_name"])
    image_path = _coco_image_path(file_name, json_path, image_root)
    if image_path is None:
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            report.add(file_name, "unreadable",
                       "file_name must be relative to the image root (no absolute path, no ..)")
            return None
        where = image_root if image_root is not None else f"{json_path.parent} or its images/"
        report.add(file_name, "missing_partner", f"image file not found under {where}")
        return None
    try:
        height, width = image_size(image_path)
    except READ_ERRORS as exc:
        report.add(file_name, "unreadable", f"cannot read image header: {exc}")
        return None
    declared = (int(img.get("height", height)), int(img.get("width", width)))
    if declared != (height, width):
        report.add(
            file_name,
            "size_mismatch",
            f"json declares {size_text(*declared)} but the file is {size_text(height, width)}",
        )
        return None
    kept = _kept_rles(anns, file_name, json_path.name, (height, width), min_area, report)
    if kept is None:
        return None
    rles, ids = kept
    digest = hashlib.sha256(json.dumps(anns, sort_keys=True, default=str).encode()).hexdigest()
    return Record(
        image_id=Path(file_name).stem,
        height=height,
        width=width,
        image_path=image_path,
        instance_ids=ids,
        load_pixels=partial(_decode_image_file, image_path),
        load_instances=partial(_decode_rles, rles, ids),
        image_file=image_path,
        label_digest=digest,
    )


def _kept_rles(anns: list[JsonObject], file_name: str, json_name: str, size: tuple[int, int], min_area: int,
               report: ValidationReport) -> tuple[tuple[JsonObject, ...], tuple[int, ...]] | None:
    """(RLEs, ids) of the annotations with >= max(min_area, 1) pixels; None (reported) if none or one is bad."""
    height, width = size
    rles: list[JsonObject] = []
    ids: list[int] = []
    for k, ann in enumerate(anns):
        try:
            rle = _segmentation_to_rle(ann["segmentation"], height, width)
        except _SizeMismatch as exc:
            report.add(file_name, "size_mismatch", f"{json_name} annotation {ann.get('id')}: {exc}")
            return None
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            report.add(file_name, "unreadable", f"{json_name} annotation {ann.get('id')}: {exc}")
            return None
        if int(mask_utils.area(rle)) >= max(min_area, 1):
            rles.append(rle)
            ids.append(int(ann.get("id", k)))
    if not rles:
        report.add(file_name, "empty_mask", f"no annotation with >= {max(min_area, 1)} pixels; skipped")
        return None
    return tuple(rles), tuple(ids)
