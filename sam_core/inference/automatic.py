"""Automatic mask generation on one embedding (segment-anything's ``SamAutomaticMaskGenerator``, one crop).

1. a ``points_per_side`` x ``points_per_side`` grid of foreground points (``build_point_grid``);
2. batched multimask decoding (3 masks per point) with the service's predictor (ONNX Runtime or PyTorch);
3. keep masks with predicted IoU > ``pred_iou_thresh`` and stability >= ``stability_score_thresh`` (stability:
   IoU of the masks thresholded at logit +1 and -1, :func:`sam_core.inference.predictor.stability_score`);
4. drop empty masks and masks smaller than ``min_mask_area`` pixels;
5. box NMS (``torchvision.ops.batched_nms`` over the masks' boxes, scores = predicted IoU, ``box_nms_thresh``);
6. the ``max_masks`` best by predicted IoU, best first.

Differences from SAM's generator: no crop layers and no small-region/hole removal (``min_mask_area`` drops
whole masks instead); an all-background logit map has stability 1 here (NaN in SAM), which step 4 removes.
Memory stays bounded: logits are upscaled for at most ~``PIXEL_BUDGET`` pixels at a time and each kept mask
is stored cropped to its box.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid
from torchvision.ops import batched_nms

from sam_core.errors import InvalidInput
from sam_core.inference.postprocess import stability_score
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.types import Embedding

PIXEL_BUDGET = 1 << 24  # float32 logits upscaled at once: 64 MB
POINTS_PER_BATCH = 64
MAX_POINTS_PER_SIDE = 32  # 1024 points: ~37 s of LiteMedSAM decoding on one CPU core


@dataclass(frozen=True)
class EverythingOptions:
    """Zero means "the default" for every field (proto3 scalars), see :meth:`resolved`."""

    points_per_side: int = 0
    pred_iou_thresh: float = 0.0
    stability_score_thresh: float = 0.0
    box_nms_thresh: float = 0.0
    min_mask_area: int = 0
    max_masks: int = 0

    def resolved(self) -> EverythingOptions:
        """Defaults applied (16, 0.7, 0.85, 0.7, 0, 100) and ranges checked (InvalidInput names the field)."""
        out = replace(self, points_per_side=self.points_per_side or 16, pred_iou_thresh=self.pred_iou_thresh or 0.7,
                      stability_score_thresh=self.stability_score_thresh or 0.85,
                      box_nms_thresh=self.box_nms_thresh or 0.7, max_masks=self.max_masks or 100)
        if not 1 <= out.points_per_side <= MAX_POINTS_PER_SIDE:
            raise InvalidInput(f"must be in [1, {MAX_POINTS_PER_SIDE}], got {out.points_per_side}",
                               field="points_per_side")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            value = getattr(out, name)
            if not 0.0 <= value <= 1.0:  # also False for NaN
                raise InvalidInput(f"must be in [0, 1], got {value}", field=name)
        if out.min_mask_area < 0:
            raise InvalidInput(f"must be >= 0, got {out.min_mask_area}", field="min_mask_area")
        if out.max_masks < 1:
            raise InvalidInput(f"must be >= 1, got {out.max_masks}", field="max_masks")
        return out


@dataclass
class _Candidates:
    """Kept masks so far: crops (bool, cropped to ``boxes``), boxes (K x 4 inclusive xyxy), scores."""

    crops: list[np.ndarray]
    boxes: list[torch.Tensor]
    iou: list[torch.Tensor]
    stability: list[torch.Tensor]


@dataclass(frozen=True)
class GeneratedMasks:
    """masks: K x H x W bool; iou_scores / stability_scores: (K,) float32; best predicted IoU first."""

    masks: np.ndarray
    iou_scores: np.ndarray
    stability_scores: np.ndarray
    points_decoded: int


def point_prompts(size: tuple[int, int], points_per_side: int) -> list[Prompt]:
    """Grid points (x, y) in pixels of an H x W image as single foreground-point prompts."""
    h, w = size
    grid = build_point_grid(points_per_side) * np.array([w, h], dtype=np.float64)
    return [Prompt(point_coords=point[None, :], point_labels=np.ones(1, np.int64)) for point in grid]


@torch.inference_mode()
def generate(predictor: Predictor, embedding: Embedding, options: EverythingOptions) -> GeneratedMasks:
    """Run steps 1-6 of the module docstring on ``embedding`` (``options`` already :meth:`resolved`)."""
    predictor.check_embedding(embedding)
    h, w = embedding.original_size
    prompts = point_prompts((h, w), options.points_per_side)
    batch = max(1, min(POINTS_PER_BATCH, PIXEL_BUDGET // (3 * h * w)))
    found = _Candidates([], [], [], [])
    for start in range(0, len(prompts), batch):
        _decode_batch(predictor, embedding, prompts[start:start + batch], options, found)
    if not found.crops:
        empty = np.zeros(0, np.float32)
        return GeneratedMasks(np.zeros((0, h, w), bool), empty, empty, len(prompts))
    boxes = torch.cat(found.boxes).float()
    iou = torch.cat(found.iou).float()
    keep = batched_nms(boxes, iou, torch.zeros(len(iou), dtype=torch.int64), options.box_nms_thresh)
    keep = keep[torch.argsort(iou[keep], descending=True, stable=True)][:options.max_masks].tolist()
    stability = torch.cat(found.stability).float()
    masks = np.zeros((len(keep), h, w), bool)
    for row, index in enumerate(keep):
        x0, y0, x1, y1 = (int(v) for v in boxes[index])
        masks[row, y0:y1 + 1, x0:x1 + 1] = found.crops[index]
    return GeneratedMasks(masks, iou[keep].numpy(), stability[keep].numpy(), len(prompts))


def _decode_batch(predictor: Predictor, embedding: Embedding, prompts: list[Prompt], options: EverythingOptions,
                  found: _Candidates) -> None:
    low_res, iou = predictor.decode_low_res(embedding.features, prompts, embedding.original_size, True)
    logits = predictor.upscale(low_res, embedding).flatten(0, 1).cpu()
    iou = iou.flatten(0, 1).float().cpu()
    keep = iou > options.pred_iou_thresh
    logits, iou = logits[keep], iou[keep]
    stability = stability_score(logits, 0.0)
    keep = stability >= options.stability_score_thresh
    masks = logits[keep] > 0.0
    iou, stability = iou[keep], stability[keep]
    areas = masks.sum(dim=(-1, -2))
    keep = (areas > 0) & (areas >= options.min_mask_area)
    masks, iou, stability = masks[keep], iou[keep], stability[keep]
    boxes = batched_mask_to_box(masks)
    for mask, box in zip(masks, boxes, strict=True):
        x0, y0, x1, y1 = (int(v) for v in box)
        found.crops.append(mask[y0:y1 + 1, x0:x1 + 1].numpy().copy())
    found.boxes.append(boxes)
    found.iou.append(iou)
    found.stability.append(stability)
