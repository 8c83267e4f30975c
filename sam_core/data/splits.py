"""Train / validation splits of a :class:`~sam_core.data.dataset.SegmentationDataset`.

* :func:`split_dataset`: deterministic pseudo-random split by a seed (stable under file listing order
  and under adding images);
* :func:`split_by_lists`: explicit id lists (unknown, repeated or overlapping ids are errors);
* :func:`split_first_last`: the first / last ids in sorted order.

Every split returns ``(train, val)`` subsets of the data set; ids never appear in both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from sam_core.data.dataset import SegmentationDataset
from sam_core.errors import InvalidInput


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
    known = set(ds.image_ids)
    seen: set[str] = set()
    for k, image_id in enumerate(ids):
        if image_id not in known:
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
