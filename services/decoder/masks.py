"""One decoded mask as the client receives it: scores, area, box and the requested encoding (no protobuf).

Encodings: ``rle`` (COCO compressed counts, column-major, the default), ``png`` (8-bit 0/255), ``polygons``
(COCO-style flat outer contours, holes filled) and ``none`` (scores, area and box only). ``bbox`` is
(x0, y0, x1, y1) with x1/y1 exclusive, None for an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sam_core.errors import InvalidInput
from sam_core.io.masks import encode_png, encode_rle, mask_bbox, mask_to_polygons

ENCODINGS = ("rle", "png", "polygons", "none")


@dataclass(frozen=True)
class MaskOut:
    iou_score: float
    stability_score: float
    area: int
    bbox: tuple[int, int, int, int] | None
    rle_counts: str = ""
    png: bytes = b""
    polygons: list[list[float]] = field(default_factory=list)


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise InvalidInput(f"unknown mask encoding {encoding!r}; one of {', '.join(ENCODINGS)}", field="encoding")
    return encoding


def describe(mask: np.ndarray, iou_score: float, stability_score: float, encoding: str) -> MaskOut:
    """H x W bool mask -> :class:`MaskOut` with ``encoding`` applied."""
    area = int(np.count_nonzero(mask))
    rle_counts: str = ""
    png = b""
    polygons: list[list[float]] = []
    if encoding == "rle":
        rle_counts = encode_rle(mask)["counts"]
    elif encoding == "png":
        png = encode_png(mask)
    elif encoding == "polygons":
        polygons = mask_to_polygons(mask) if area else []
    return MaskOut(iou_score=float(iou_score), stability_score=float(stability_score), area=area,
                   bbox=mask_bbox(mask) if area else None, rle_counts=rle_counts, png=png, polygons=polygons)


def describe_batch(masks: np.ndarray, iou_scores: np.ndarray, stability_scores: np.ndarray,
                   encoding: str) -> list[list[MaskOut]]:
    """N x M x H x W masks with N x M scores -> N lists of M :class:`MaskOut`."""
    return [[describe(masks[i, j], iou_scores[i, j], stability_scores[i, j], encoding) for j in range(masks.shape[1])]
            for i in range(masks.shape[0])]
