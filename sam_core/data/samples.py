"""What a data set is made of: instances, samples, validation findings and the per-sample record.

* :class:`Instance`: one object mask; :class:`Sample`: one image with its instances, the image decoded
  lazily by :meth:`Sample.load_image`.
* :class:`Problem` / :class:`ValidationReport`: what validation excluded and why (a bad sample is
  reported, never fatal on its own).
* :class:`Record`: what a format reader (:mod:`sam_core.data.folder`, :mod:`sam_core.data.coco`,
  :mod:`sam_core.data.npz`) keeps per usable sample: sizes, instance ids, the files it came from and
  how to load its pixels and masks again; no pixel data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sam_core.errors import ImageDecodeError, NotFound

ProblemKind = Literal["missing_partner", "size_mismatch", "unreadable", "empty_mask", "duplicate_stem"]


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
        """Record one problem (``empty_mask`` also counts as a skipped sample)."""
        self.problems.append(Problem(file, kind, message))
        if kind == "empty_mask":
            self.n_skipped_empty += 1

    def counts_by_kind(self) -> dict[str, int]:
        """Number of problems of each kind."""
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
class Record:
    """What validation keeps per usable sample (no pixel data).

    ``load_pixels`` returns the H x W x 3 uint8 image, ``load_instances`` the kept instances;
    ``image_file`` / ``label_files`` / ``label_digest`` identify the source for the fingerprint.
    """

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
