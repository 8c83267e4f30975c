"""Value types of inference: an image's :class:`Embedding` and a decode's :class:`DecodeResult`.

They depend on nothing else in sam_core, so caches, stores, codecs and services can hold them without
importing the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Embedding:
    """One image's embedding and the facts needed to decode against it.

    features: 1 x C x h x w float32 (C=256, h=w=64 for SAM and LiteMedSAM).
    original_size: (H, W) of the canonical image; input_size: (h, w) after the resize, before padding.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_id: str
    preprocess_version: str
    encoder_adapter: str | None = None

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


@dataclass
class DecodeResult:
    """N prompts, M masks each (M = 3 with multimask, else 1).

    masks: N x M x H x W bool; iou_scores / stability_scores: N x M float32;
    low_res_logits: N x M x L x L float32 (L = 256 for SAM and LiteMedSAM) or None (tiled decode).
    """

    masks: np.ndarray
    iou_scores: np.ndarray
    stability_scores: np.ndarray
    low_res_logits: np.ndarray | None
    timings_ms: dict[str, float] = field(default_factory=dict)
