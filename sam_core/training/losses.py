"""Segmentation losses for fine-tuning SAM.

All functions accept logits of shape B x 1 x H x W or B x H x W (any float dtype, e.g. bf16 under
autocast) and a target of the same shape (bool / {0,1} float). Everything is computed in float32 so
the results are stable under mixed precision. The combined :func:`segmentation_loss` follows
lightning-sam: Dice + BCE (or focal) on the mask logits + MSE between the IoU head's prediction and
the actual IoU of the thresholded mask (detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam_core.errors import InvalidInput


def _flatten_pair(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x 1 x H x W | B x H x W) logits and target -> two B x N float32 tensors."""
    if logits.dim() not in (3, 4):
        raise InvalidInput(f"expected B x 1 x H x W or B x H x W, got {tuple(logits.shape)}", field="logits")
    if logits.numel() != target.numel() or logits.shape[0] != target.shape[0]:
        raise InvalidInput(
            f"shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}", field="target"
        )
    b = logits.shape[0]
    return logits.float().reshape(b, -1), target.float().reshape(b, -1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss: mean over the batch of 1 - (2|p*t| + eps) / (|p| + |t| + eps), p = sigmoid(logits)."""
    x, t = _flatten_pair(logits, target)
    p = torch.sigmoid(x)
    inter = (p * t).sum(dim=1)
    denom = p.sum(dim=1) + t.sum(dim=1)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits (float32)."""
    x, t = _flatten_pair(logits, target)
    return F.binary_cross_entropy_with_logits(x, t)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over all pixels; ``alpha < 0`` disables weighting."""
    x, t = _flatten_pair(logits, target)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss.mean()


@torch.no_grad()
def iou_of_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard IoU of (logits > 0) vs (target > 0.5) -> (B,) float32; both empty -> 1.0. No gradient."""
    x, t = _flatten_pair(logits, target)
    pred, gt = x > 0, t > 0.5
    inter = (pred & gt).sum(dim=1).float()
    union = (pred | gt).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


@dataclass
class SegLossConfig:
    """Weights of the loss terms; a zero weight skips computing that term."""

    dice_weight: float = 1.0
    bce_weight: float = 1.0
    focal_weight: float = 0.0
    iou_weight: float = 1.0


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    cfg: SegLossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Dice + BCE + focal + IoU-head MSE.

    logits/target: B x 1 x H x W (or B x H x W); iou_pred: (B,) or B x 1 predicted IoU.
    Returns (total scalar tensor with grad, parts {"dice", "bce", "focal", "iou", "total"} as floats;
    skipped terms are reported as 0.0).
    """
    cfg = cfg or SegLossConfig()
    iou_pred = iou_pred.float().reshape(-1)
    if iou_pred.shape[0] != logits.shape[0]:
        msg = f"expected {logits.shape[0]} values, got {tuple(iou_pred.shape)}"
        raise InvalidInput(msg, field="iou_pred")
    terms: dict[str, tuple[float, torch.Tensor | None]] = {
        "dice": (cfg.dice_weight, dice_loss(logits, target) if cfg.dice_weight else None),
        "bce": (cfg.bce_weight, bce_loss(logits, target) if cfg.bce_weight else None),
        "focal": (cfg.focal_weight, focal_loss(logits, target) if cfg.focal_weight else None),
        "iou": (
            cfg.iou_weight,
            F.mse_loss(iou_pred, iou_of_logits(logits, target)) if cfg.iou_weight else None,
        ),
    }
    total = logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for name, (weight, value) in terms.items():
        parts[name] = 0.0 if value is None else float(value.detach())
        if value is not None:
            total = total + weight * value
    parts["total"] = float(total.detach())
    return total, parts
