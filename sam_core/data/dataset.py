"""Segmentation data sets for fine-tuning: :func:`load_dataset` and :class:`SegmentationDataset`.

Three on-disk formats, auto-detected by :func:`load_dataset` (each read by its own module):

* **folder** (:mod:`sam_core.data.folder`): ``DIR/images/`` plus ``DIR/masks/`` (binary) and/or
  ``DIR/masks_instances/`` (instance ids), matched by file stem;
* **COCO** (:mod:`sam_core.data.coco`): a ``.json`` file; images under ``image_root`` (default: next
  to the json); crowd annotations skipped unless ``include_crowd=True``;
* **npz** (:mod:`sam_core.data.npz`, MedSAM style): a directory of ``.npz`` files, image + label map.

Instances with fewer than ``min_area`` pixels are dropped in every format.

Building a data set validates it without decoding images (sizes come from the image headers, EXIF
orientation taken into account) and reads every mask once. Bad samples are excluded and reported in a
:class:`~sam_core.data.samples.ValidationReport`; only a data set with no usable sample raises
:class:`InvalidInput`. Samples are materialised on access (``ds[i]``): the masks are read again then and
the image is decoded lazily by :meth:`~sam_core.data.samples.Sample.load_image`, so a data set holds no
pixel data in memory. Splits: :mod:`sam_core.data.splits`; content fingerprint:
:mod:`sam_core.data.fingerprint`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from sam_core.data.coco import read_coco
from sam_core.data.folder import read_folder
from sam_core.data.npz import read_npz
from sam_core.data.samples import Record, Sample, ValidationReport
from sam_core.errors import InvalidInput, NotFound

DatasetFormat = Literal["folder", "coco", "npz"]


class SegmentationDataset(Sequence[Sample]):
    """Validated samples sorted by ``image_id``; ``ds[i]`` materialises a :class:`Sample`.

    ``report`` is the validation report of the source the data set (or the split it is part of) was
    loaded from.
    """

    def __init__(
        self, records: Iterable[Record], *, root: Path, fmt: DatasetFormat, report: ValidationReport
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
    def records(self) -> tuple[Record, ...]:
        """The validated records, by ``image_id`` (sizes, instance ids, source files; no pixel data)."""
        return tuple(self._records)

    @property
    def image_ids(self) -> list[str]:
        """Sample ids (file stems), sorted."""
        return [r.image_id for r in self._records]

    @property
    def n_instances(self) -> int:
        """Number of kept instances over all samples."""
        return sum(len(r.instance_ids) for r in self._records)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def get(self, image_id: str) -> Sample:
        """The sample with ``image_id`` (NotFound if there is none)."""
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
        records = read_folder(path, min_area, report)
    elif fmt == "coco":
        root = Path(image_root) if image_root is not None else None
        records = read_coco(path, root, min_area, include_crowd, report)
    else:
        records = read_npz(path, min_area, report)
    report.n_samples = len(records)
    report.n_instances = sum(len(r.instance_ids) for r in records)
    if not records:
        first = "; ".join(f"{p.file}: {p.message}" for p in report.problems[:5]) or "no samples found"
        raise InvalidInput(f"no usable sample in {fmt} data set ({first})", field=str(path))
    root = path.parent if fmt == "coco" else path
    return SegmentationDataset(records, root=root, fmt=fmt, report=report)


def _detect_format(path: Path) -> DatasetFormat:
    """The format of ``path`` (a COCO json, a folder with images/, or a folder of .npz files)."""
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
