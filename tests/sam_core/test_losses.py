"""Tests of sam_core.training.losses."""

from __future__ import annotations

import math

import pytest
import torch

from sam_core.errors import InvalidInput
from sam_core.training.losses import (
    SegLossConfig,
    dice_loss,
    focal_loss,
    iou_of_logits,
    segmentation_loss,
)


def _target(b: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    t = torch.zeros(b, 1, h, w)
    t[:, :, 4:12, 3:10] = 1.0
    return t


def test_perfect_logits_give_near_zero_dice_and_full_iou() -> None:
    target = _target()
    logits = (target * 2 - 1) * 30.0
    assert dice_loss(logits, target).item() < 1e-4
    assert torch.allclose(iou_of_logits(logits, target), torch.ones(2))
    assert dice_loss(-logits, target).item() > 0.95


def test_hand_computed_values() -> None:
    logits = torch.zeros(1, 1, 1, 1)
    target = torch.ones(1, 1, 1, 1)
    # p = 0.5, ce = ln 2, (1 - p_t)^2 = 0.25, alpha = 0.25
    assert focal_loss(logits, target).item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-5)
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(1 - 2 * 0.5 / 1.5, rel=1e-5)
    pred = torch.tensor([[[1.0, 1.0, -1.0, -1.0]]])  # B x H x W layout
    gt = torch.tensor([[[0.0, 1.0, 1.0, 1.0]]])
    assert iou_of_logits(pred, gt).tolist() == [pytest.approx(0.25)]
    both_empty = iou_of_logits(-torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    assert both_empty.tolist() == [1.0]


def test_segmentation_loss_gradients_and_iou_head_mse() -> None:
    target = _target()
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    iou_pred = torch.full((2,), 0.5, requires_grad=True)
    total, parts = segmentation_loss(logits, target, iou_pred, SegLossConfig())
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert iou_pred.grad is not None and iou_pred.grad.abs().sum() > 0
    assert set(parts) == {"dice", "bce", "focal", "iou", "total"} and parts["focal"] == 0.0
    assert parts["total"] == pytest.approx(parts["dice"] + parts["bce"] + parts["iou"], rel=1e-5)

    perfect = (target * 2 - 1) * 30.0
    _, parts = segmentation_loss(perfect, target, torch.full((2, 1), 0.5), SegLossConfig())
    assert parts["iou"] == pytest.approx(0.25)  # (0.5 - 1.0)^2
    cfg = SegLossConfig(dice_weight=0, bce_weight=0, focal_weight=20.0, iou_weight=0)
    total, parts = segmentation_loss(perfect, target, torch.ones(2), cfg)
    assert parts["dice"] == parts["bce"] == parts["iou"] == 0.0
    assert total.item() == pytest.approx(20 * parts["focal"])


def test_bf16_inputs_are_computed_in_float32() -> None:
    target = _target()
    logits = (torch.randn(2, 1, 16, 16) * 50).bfloat16().requires_grad_()
    total, parts = segmentation_loss(logits, target.bool(), torch.zeros(2, dtype=torch.bfloat16))
    assert total.dtype == torch.float32 and math.isfinite(parts["total"])
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(InvalidInput) as err:
        dice_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 4))
    assert err.value.field == "target"
    with pytest.raises(InvalidInput):
        segmentation_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(3))
