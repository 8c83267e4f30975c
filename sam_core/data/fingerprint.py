"""Content fingerprint of a data set: :func:`dataset_fingerprint`.

A sha256 over every usable sample's id, image file and labels (mask file, COCO annotations or npz
file), so it changes when any pixel or label the data set serves changes, and not when files are
merely listed in another order. Embedding stores and publish guards record it.
:func:`record_hashes` is the per-sample part (the held-out split of :mod:`sam_core.training.guard` signs it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from sam_core.data.dataset import SegmentationDataset
from sam_core.data.samples import Record
from sam_core.files import file_sha256

FINGERPRINT_VERSION = "samforge-dataset-v1"


def dataset_fingerprint(ds: SegmentationDataset) -> str:
    """sha256 hex over sorted (image_id, image file hash, mask hash); files are hashed by streaming.

    The mask hash covers the mask file actually used (folder), the image's annotations (COCO) or, for npz,
    the npz file itself (which holds both image and labels).
    """
    cache: dict[Path, str] = {}

    def file_hash(p: Path) -> str:
        if p not in cache:
            cache[p] = file_sha256(p)
        return cache[p]

    digest = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for rec in sorted(ds.records, key=lambda r: r.image_id):
        image_hash, mask_hash = record_hashes(rec, file_hash)
        digest.update(f"{rec.image_id}\0{image_hash}\0{mask_hash}\n".encode())
    return digest.hexdigest()


def record_hashes(rec: Record, file_hash: Callable[[Path], str] = file_sha256) -> tuple[str, str]:
    """(image file sha256, labels hash) of one sample: the mask files' sha256s (folder), the annotations'
    digest (COCO), or the image file's own hash when it holds the labels too (npz)."""
    image_hash = file_hash(rec.image_file)
    if rec.label_digest is not None:
        return image_hash, rec.label_digest
    return image_hash, ",".join(file_hash(p) for p in rec.label_files) or image_hash
