"""Mask post-processing shared by the predictor, tiling and automatic mask generation."""

from __future__ import annotations

import numpy as np
import torch

STABILITY_OFFSET = 1.0


def stability_score(logits: torch.Tensor, threshold: float, offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """IoU between the masks thresholded at ``threshold + offset`` and ``threshold - offset``.

    logits: ... x H x W -> ... (same definition as segment_anything.utils.amg; exact integer counts).
    """
    inter = count_above(logits, threshold + offset)
    union = count_above(logits, threshold - offset)
    return torch.where(union > 0, inter.float() / union.clamp(min=1).float(), torch.ones_like(inter.float()))


def count_above(logits: torch.Tensor, value: float) -> torch.Tensor:
    """Number of elements > ``value`` per H x W plane: ... x H x W -> ... int64 (on ``logits.device``).

    For float32 CPU tensors without grad: NumPy's comparison into one reused bool plane and
    ``np.count_nonzero`` (about 2.5x faster than torch's bool sum, which widens to int64 first). The
    comparison is in float32 either way (``value`` rounded to float32, as torch rounds a Python scalar).
    """
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.requires_grad or logits.dim() < 2:
        return torch.count_nonzero(logits > value, dim=(-1, -2))
    planes = logits.detach().numpy().reshape(-1, *logits.shape[-2:])
    above = np.empty(planes.shape[1:], dtype=bool)
    v = np.float32(value)
    counts = [np.count_nonzero(np.greater(plane, v, out=above)) for plane in planes]
    return torch.tensor(counts, dtype=torch.int64).reshape(logits.shape[:-2])
