"""Segmentation data sets for fine-tuning: loading, validation, splits and a content fingerprint.

Three on-disk formats, auto-detected by :func:`load_dataset`:

* **folder**: ``DIR/images/`` plus ``DIR/masks/`` (binary, any non-zero pixel = foreground) and/or
  ``DIR/masks_instances/`` (instance ids, 0 = background), matched by file stem. Images:
  jpg/jpeg/png/bmp/tif/tiff; masks: png/tif/tiff/bmp. A stem in ``masks_instances/`` takes its instances
  from the ids; otherwise they are the 8-connected components of the binary mask.
* **COCO**: a ``.json`` file (polygons, compressed or uncompressed RLE); images are looked up under
  ``image_root``, by default the json's folder, then ``images/`` next to it. Crowd annotations are
  skipped unless ``include_crowd=True``.
* **npz** (MedSAM style): a directory of ``.npz`` files, each with an image under ``imgs``/``image``/``img``
  (H x W or H x W x 3) and a label map under ``gts``/``mask``/``label``/``seg``; every distinct non-zero
  id is one instance. Loaded with ``allow_pickle=False``.

Instances with fewer than ``min_area`` pixels are dropped in every format.

Building a data set validates it without decoding images (sizes come from the image headers, EXIF
orientation taken into account) and reads every mask once. Bad samples are excluded and reported in a
:class:`ValidationReport`; only a data set with no usable sample raises :class:`InvalidInput`.
Samples are materialised on access (``ds[i]``): the masks are read again then and the image is decoded
lazily by :meth:`Sample.load_image`, so a data set holds no pixel data in memory.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_core.errors import ImageDecodeError, InvalidInput, NotFound
from sam_core.io.images import DEFAULT_MAX_PIXELS, to_rgb_uint8
from sam_core.io.images import load_image as _decode_image_file

IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp")
NPZ_IMAGE_KEYS: tuple[str, ...] = ("imgs", "image", "img")
NPZ_LABEL_KEYS: tuple[str, ...] = ("gts", "mask", "label", "seg")
FINGERPRINT_VERSION = "samforge-dataset-v1"

ProblemKind = Literal["missing_partner", "size_mismatch", "unreadable", "empty_mask", "duplicate_stem"]
DatasetFormat = Literal["folder", "coco", "npz"]

_READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class Instance:
    """One object: ``mask`` H x W bool, ``instance_id`` its id in the source (label id, CC label, ann id)."""

    mask: np.ndarray
    instance_id: int


@dataclass
class Sample:
    """One image with its instances. ``image`` is None until :meth:`load_image` decodes it."""

    image_id: str
    image_path: Path | None
    image: np.ndarray | None
    instances: list[Instance]
    height: int
    width: int
    _image_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load_image(self) -> np.ndarray:
        """Decode (once) and return the image, H x W x 3 uint8 RGB."""
        if self.image is None:
            if self._image_loader is None:
                raise NotFound("sample has no image source", field=self.image_id)
            image = self._image_loader()
            if image.shape[:2] != (self.height, self.width):
                raise ImageDecodeError(
                    f"decoded size {image.shape[1]}x{image.shape[0]} != header size "
                    f"{self.width}x{self.height}",
                    field=str(self.image_path or self.image_id),
                )
            self.image = image
        return self.image


@dataclass(frozen=True)
class Problem:
    """A validation finding; ``file`` is the offending file relative to the data set root."""

    file: str
    kind: ProblemKind
    message: str


@dataclass
class ValidationReport:
    """Outcome of validating a data set (``duplicate_stem``: several images share a stem; all excluded)."""

    problems: list[Problem] = field(default_factory=list)
    n_samples: int = 0
    n_instances: int = 0
    n_skipped_empty: int = 0

    def add(self, file: str, kind: ProblemKind, message: str) -> None:
        self.problems.append(Problem(file, kind, message))
        if kind == "empty_mask":
            self.n_skipped_empty += 1

    def counts_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def summary(self, max_problems: int = 20) -> str:
        """Human-readable multi-line summary listing the first ``max_problems`` problems."""
        lines = [
            f"{self.n_samples} usable samples, {self.n_instances} instances, "
            f"{self.n_skipped_empty} skipped (empty mask), {len(self.problems)} problems"
        ]
        if self.problems:
            kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.counts_by_kind().items()))
            lines.append(f"problems by kind: {kinds}")
            lines += [f"  [{p.kind}] {p.file}: {p.message}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Record:
    """What validation keeps per usable sample (no pixel data)."""

    image_id: str
    height: int
    width: int
    image_path: Path | None
    instance_ids: tuple[int, ...]
    load_pixels: Callable[[], np.ndarray]
    load_instances: Callable[[], list[Instance]]
    image_file: Path
    label_files: tuple[Path, ...] = ()
    label_digest: str | None = None


class SegmentationDataset(Sequence[Sample]):
    """Validated samples sorted by ``image_id``; ``ds[i]`` materialises a :class:`Sample`.

    ``report`` is the validation report of the source the data set (or the split it is part of) was
    loaded from.
    """

    def __init__(
        self, records: Iterable[_Record], *, root: Path, fmt: DatasetFormat, report: ValidationReport
    ) -> None:
        self._records = sorted(records, key=lambda r: r.image_id)
        self._index = {r.image_id: i for i, r in enumerate(self._records)}
        self.root = root
        self.format = fmt
        self.report = report

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        rec = self._records[index]
        return Sample(
            rec.image_id, rec.image_path, None, rec.load_instances(), rec.height, rec.width, rec.load_pixels
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self._records]

    @property
    def n_instances(self) -> int:
        return sum(len(r.instance_ids) for r in self._records)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def get(self, image_id: str) -> Sample:
        if image_id not in self._index:
            raise NotFound(f"no sample with image id {image_id!r}", field=image_id)
        return self[self._index[image_id]]

    def subset(self, image_ids: Iterable[str]) -> SegmentationDataset:
        """Data set of the given ids (unknown ids raise NotFound)."""
        records = []
        for image_id in image_ids:
            if image_id not in self._index:
                raise NotFound(f"no sample with image id {image_id!r}", field=image_id)
            records.append(self._records[self._index[image_id]])
        return SegmentationDataset(records, root=self.root, fmt=self.format, report=self.report)

    def __repr__(self) -> str:
        n, n_inst = len(self), self.n_instances
        return f"SegmentationDataset({self.format}, {self.root}, {n} samples, {n_inst} instances)"


# --------------------------------------------------------------------------------------------------
# entry point


def load_dataset(
    path: str | Path,
    *,
    min_area: int = 0,
    image_root: str | Path | None = None,
    include_crowd: bool = False,
) -> SegmentationDataset:
    """Load and validate a data set, auto-detecting its format (see the module docstring).

    Raises NotFound (no such path) or InvalidInput (unknown layout, bad arguments, no usable sample).
    """
    path = Path(path)
    if min_area < 0:
        raise InvalidInput("must be >= 0", field="min_area")
    if not path.exists():
        raise NotFound(f"no such file or directory: {path}", field=str(path))
    fmt = _detect_format(path)
    if image_root is not None and fmt != "coco":
        raise InvalidInput(f"only used with a COCO .json data set, not a {fmt} one", field="image_root")
    report = ValidationReport()
    if fmt == "folder":
        records = _folder_records(path, min_area, report)
    elif fmt == "coco":
        root = Path(image_root) if image_root is not None else None
        records = _coco_records(path, root, min_area, include_crowd, report)
    else:
        records = _npz_records(path, min_area, report)
    report.n_samples = len(records)
    report.n_instances = sum(len(r.instance_ids) for r in records)
    if not records:
        first = "; ".join(f"{p.file}: {p.message}" for p in report.problems[:5]) or "no samples found"
        raise InvalidInput(f"no usable sample in {fmt} data set ({first})", field=str(path))
    root = path.parent if fmt == "coco" else path
    return SegmentationDataset(records, root=root, fmt=fmt, report=report)


def _detect_format(path: Path) -> DatasetFormat:
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_dir() and (path / "images").is_dir():
        return "folder"
    if path.is_dir() and any(p.suffix.lower() == ".npz" for p in path.iterdir() if p.is_file()):
        return "npz"
    raise InvalidInput(
        "unrecognised data set layout: expected a directory with images/ plus masks/ and/or "
        "masks_instances/, a COCO .json file, or a directory of MedSAM-style .npz files",
        field=str(path),
    )


# --------------------------------------------------------------------------------------------------
# shared helpers


def _rel(path: Path, root: Path) -> str:
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


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) as decoded by image_io (EXIF orientation applied), from the header only.

    Raises ValueError for images image_io would refuse as too large.
    """
    with Image.open(path) as im:
        width, height = im.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise ValueError(f"{width}x{height} pixels is over the limit of {DEFAULT_MAX_PIXELS} pixels")
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # broken EXIF is ignored by image_io as well
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


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
    if arr.ndim == 3:
        return (arr[..., :3] != 0).any(axis=2)
    return arr != 0


def _instance_labels(arr: np.ndarray) -> np.ndarray:
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


def _components(fg: np.ndarray) -> np.ndarray:
    """8-connected components of an H x W bool mask -> H x W int32 labels (0 = background)."""
    _, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    return labels


def _kept_ids(labels: np.ndarray, min_area: int) -> tuple[int, ...]:
    """Sorted non-zero ids of a label map with at least max(min_area, 1) pixels."""
    if labels.size and labels.min() >= 0 and labels.max() < (1 << 20):
        counts = np.bincount(labels.ravel())
        ids = np.arange(counts.size)
    else:
        ids, counts = np.unique(labels, return_counts=True)
    keep = (ids != 0) & (counts >= max(min_area, 1))
    return tuple(int(i) for i in ids[keep])


def _instances_from_labels(labels: np.ndarray, ids: Sequence[int]) -> list[Instance]:
    return [Instance(labels == i, int(i)) for i in ids]


def _size_text(h: int, w: int) -> str:
    return f"{w}x{h} (WxH)"


# --------------------------------------------------------------------------------------------------
# folder format


def _folder_label_map(mask_path: Path, is_instances: bool) -> np.ndarray:
    arr = _read_mask_array(mask_path)
    if arr.ndim not in (2, 3):
        raise ValueError(f"unexpected mask shape {arr.shape}")
    return _instance_labels(arr) if is_instances else _components(_binary_foreground(arr))


def _folder_instances(mask_path: Path, is_instances: bool, ids: tuple[int, ...]) -> list[Instance]:
    return _instances_from_labels(_folder_label_map(mask_path, is_instances), ids)


def _folder_records(root: Path, min_area: int, report: ValidationReport) -> list[_Record]:
    if not (root / "masks").is_dir() and not (root / "masks_instances").is_dir():
        raise InvalidInput("expected masks/ and/or masks_instances/ next to images/", field=str(root))
    images, dup_images = _index_dir(root / "images", IMAGE_EXTS, root, report)
    binary, dup_binary = _index_dir(root / "masks", MASK_EXTS, root, report)
    instances, dup_inst = _index_dir(root / "masks_instances", MASK_EXTS, root, report)
    skip = dup_images | dup_binary | dup_inst
    for stem in sorted((set(binary) | set(instances)) - set(images) - skip):
        for mask_path in filter(None, (binary.get(stem), instances.get(stem))):
            report.add(_rel(mask_path, root), "missing_partner", f"no image with stem {stem!r} in images/")
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
) -> _Record | None:
    try:
        height, width = _image_size(image_path)
    except _READ_ERRORS as exc:
        report.add(_rel(image_path, root), "unreadable", f"cannot read image header: {exc}")
        return None
    try:
        labels = _folder_label_map(mask_path, is_inst)
    except _READ_ERRORS as exc:
        report.add(_rel(mask_path, root), "unreadable", f"cannot read mask: {exc}")
        return None
    if labels.shape != (height, width):
        report.add(
            _rel(mask_path, root),
            "size_mismatch",
            f"mask is {_size_text(*labels.shape)} but image {_rel(image_path, root)} is "
            f"{_size_text(height, width)}",
        )
        return None
    ids = _kept_ids(labels, min_area)
    if not ids:
        msg = f"no instance with >= {max(min_area, 1)} pixels; skipped"
        report.add(_rel(mask_path, root), "empty_mask", msg)
        return None
    return _Record(
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


# --------------------------------------------------------------------------------------------------
# COCO format


def _read_coco(json_path: Path) -> dict:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read COCO json: {exc}", field=json_path.name) from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InvalidInput("not a COCO json: expected an object with an 'images' list", field=json_path.name)
    if not isinstance(data.get("annotations", []), list):
        raise InvalidInput("'annotations' must be a list", field=json_path.name)
    return data


def _segmentation_to_rle(seg: object, height: int, width: int) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE."""
    if isinstance(seg, dict):
        size = [int(v) for v in seg.get("size", [])]
        if size != [height, width]:
            raise _SizeMismatch(f"RLE size {size} (HxW) != image size [{height}, {width}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(seg, height, width)
        return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    if not isinstance(seg, list):
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    polys = seg if seg and isinstance(seg[0], list) else [seg]
    polys = [[float(v) for v in p] for p in polys if len(p) >= 6 and len(p) % 2 == 0]
    if not polys:
        return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))


class _SizeMismatch(ValueError):
    pass


def _decode_rles(rles: tuple[dict, ...], ids: tuple[int, ...]) -> list[Instance]:
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


def _group_annotations(data: dict, include_crowd: bool, json_name: str, report: ValidationReport) -> dict:
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    by_image: dict[object, list[dict]] = {}
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


def _coco_records(
    json_path: Path, image_root: Path | None, min_area: int, include_crowd: bool, report: ValidationReport
) -> list[_Record]:
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
    img: dict,
    anns: list[dict],
    json_path: Path,
    image_root: Path | None,
    min_area: int,
    report: ValidationReport,
) -> _Record | None:
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
        height, width = _image_size(image_path)
    except _READ_ERRORS as exc:
        report.add(file_name, "unreadable", f"cannot read image header: {exc}")
        return None
    declared = (int(img.get("height", height)), int(img.get("width", width)))
    if declared != (height, width):
        report.add(
            file_name,
            "size_mismatch",
            f"json declares {_size_text(*declared)} but the file is {_size_text(height, width)}",
        )
        return None
    rles, ids = [], []
    for k, ann in enumerate(anns):
        try:
            rle = _segmentation_to_rle(ann["segmentation"], height, width)
        except _SizeMismatch as exc:
            report.add(file_name, "size_mismatch", f"{json_path.name} annotation {ann.get('id')}: {exc}")
            return None
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            report.add(file_name, "unreadable", f"{json_path.name} annotation {ann.get('id')}: {exc}")
            return None
        if int(mask_utils.area(rle)) >= max(min_area, 1):
            rles.append(rle)
            ids.append(int(ann.get("id", k)))
    if not rles:
        report.add(file_name, "empty_mask", f"no annotation with >= {max(min_area, 1)} pixels; skipped")
        return None
    digest = hashlib.sha256(json.dumps(anns, sort_keys=True, default=str).encode()).hexdigest()
    return _Record(
        image_id=Path(file_name).stem,
        height=height,
        width=width,
        image_path=image_path,
        instance_ids=tuple(ids),
        load_pixels=partial(_decode_image_file, image_path),
        load_instances=partial(_decode_rles, tuple(rles), tuple(ids)),
        image_file=image_path,
        label_digest=digest,
    )


# --------------------------------------------------------------------------------------------------
# npz format


def _npz_key(files: Sequence[str], candidates: tuple[str, ...]) -> str | None:
    return next((k for k in candidates if k in files), None)


def _npz_shape(npz_path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an npz, read from its .npy header without decompressing the data."""
    with zipfile.ZipFile(npz_path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)[0]
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)[0]
    with np.load(npz_path, allow_pickle=False) as npz:
        return npz[key].shape


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
    return _instance_labels(arr)


def _npz_image(npz_path: Path, key: str) -> np.ndarray:
    with np.load(npz_path, allow_pickle=False) as npz:
        arr = npz[key]
    return to_rgb_uint8(arr, field=f"{npz_path.name}:{key}")


def _npz_instances(npz_path: Path, key: str, ids: tuple[int, ...]) -> list[Instance]:
    return _instances_from_labels(_npz_labels(npz_path, key), ids)


def _npz_records(root: Path, min_area: int, report: ValidationReport) -> list[_Record]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
    return [rec for p in files if (rec := _npz_record(p, min_area, report)) is not None]


def _npz_record(npz_path: Path, min_area: int, report: ValidationReport) -> _Record | None:
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
    except _READ_ERRORS as exc:
        report.add(name, "unreadable", f"cannot read npz: {exc}")
        return None
    if labels.shape != (height, width):
        report.add(
            name,
            "size_mismatch",
            f"{label_key} is {_size_text(*labels.shape)} but {image_key} is {_size_text(height, width)}",
        )
        return None
    ids = _kept_ids(labels, min_area)
    if not ids:
        report.add(name, "empty_mask", f"no label id with >= {max(min_area, 1)} pixels; skipped")
        return None
    return _Record(
        image_id=npz_path.stem,
        height=height,
        width=width,
        image_path=None,
        instance_ids=ids,
        load_pixels=partial(_npz_image, npz_path, image_key),
        load_instances=partial(_npz_instances, npz_path, label_key, ids),
        image_file=npz_path,
    )


# --------------------------------------------------------------------------------------------------
# splits


def _sorted_ids(ds: SegmentationDataset) -> list[str]:
    return sorted(ds.image_ids)


def split_dataset(
    ds: SegmentationDataset, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Deterministic random split -> (train, val).

    Ids are ordered by sha256(seed, image_id), so the split depends only on the seed and the ids (not on
    the file-system listing order, nor on the numpy version), and adding an image moves no other one
    between train and val. n_val = round(n * val_fraction), at least 1 when val_fraction > 0 and n >= 2,
    and at most n - 1.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput(f"must be in [0, 1), got {val_fraction}", field="val_fraction")
    ids = _sorted_ids(ds)
    n = len(ids)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))

    def key(image_id: str) -> str:
        return hashlib.sha256(f"{seed}\0{image_id}".encode()).hexdigest()

    val = set(sorted(ids, key=key)[:n_val])
    return ds.subset(i for i in ids if i not in val), ds.subset(i for i in ids if i in val)


def _check_ids(ds: SegmentationDataset, ids: Sequence[str], name: str) -> None:
    seen: set[str] = set()
    for k, image_id in enumerate(ids):
        if image_id not in ds:
            excluded = any(Path(p.file).stem == image_id for p in ds.report.problems)
            hint = " (excluded by validation, see the report)" if excluded else ""
            raise InvalidInput(f"unknown image id {image_id!r}{hint}", field=f"{name}[{k}]")
        if image_id in seen:
            raise InvalidInput(f"image id {image_id!r} listed twice", field=f"{name}[{k}]")
        seen.add(image_id)


def split_by_lists(
    ds: SegmentationDataset, train_ids: Sequence[str], val_ids: Sequence[str]
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Explicit split -> (train, val). Unknown, duplicated or overlapping ids raise InvalidInput."""
    train_ids, val_ids = list(train_ids), list(val_ids)
    _check_ids(ds, train_ids, "train_ids")
    _check_ids(ds, val_ids, "val_ids")
    overlap = sorted(set(train_ids) & set(val_ids))
    if overlap:
        raise InvalidInput(f"ids in both train and val: {overlap[:5]}", field="val_ids")
    return ds.subset(train_ids), ds.subset(val_ids)


def split_first_last(
    ds: SegmentationDataset, n_train: int, n_val: int
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Sorted stems: the first ``n_train`` -> train, the last ``n_val`` -> val (must not overlap)."""
    ids = _sorted_ids(ds)
    if n_train < 0:
        raise InvalidInput("must be >= 0", field="n_train")
    if n_val < 0 or n_train + n_val > len(ids):
        msg = f"n_train + n_val must be <= {len(ids)} samples, got {n_train} + {n_val}"
        raise InvalidInput(msg, field="n_val")
    return ds.subset(ids[:n_train]), ds.subset(ids[len(ids) - n_val :])


# --------------------------------------------------------------------------------------------------
# fingerprint


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(ds: SegmentationDataset) -> str:
    """sha256 hex over sorted (image_id, image file hash, mask hash); files are hashed by streaming.

    The mask hash covers the mask file actually used (folder), the image's annotations (COCO) or, for npz,
    the npz file itself (which holds both image and labels).
    """
    cache: dict[Path, str] = {}

    def file_hash(p: Path) -> str:
        if p not in cache:
            cache[p] = _file_sha256(p)
        return cache[p]

    digest = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for rec in sorted(ds._records, key=lambda r: r.image_id):
        image_hash = file_hash(rec.image_file)
        if rec.label_digest is not None:
            mask_hash = rec.label_digest
        else:
            mask_hash = ",".join(file_hash(p) for p in rec.label_files) or image_hash
        digest.update(f"{rec.image_id}\0{image_hash}\0{mask_hash}\n".encode())
    return digest.hexdigest()
