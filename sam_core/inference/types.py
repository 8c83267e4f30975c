"""Value types of inference: an image's :class:`Embedding` and a decode's :class:`DecodeResult`.

They depend on nothing in sam_core but the :data:`~sam_core.modeling.family.Features` alias, so caches,
stores, codecs and services can hold them without importing the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sam_core.modeling.family import Features, image_embedding


@dataclass
class Embedding:
    """One image's embedding and the facts needed to decode against it.

    features: named feature tensors, each 1 x C_l x h_l x w_l float32, in the model's ``feature_names``
    order. SAM 1 / LiteMedSAM: ``image_embed`` 1 x 256 x 64 x 64; SAM 2.1: ``image_embed`` 1 x 256 x 64 x 64
    plus two high-resolution levels. The first is always the decoder's image embedding
    (:attr:`image_embedding`).
    original_size: (H, W) of the canonical image; input_size: (h, w) after the resize, before padding.
    """

    features: Features
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_id: str
    preprocess_version: str
    encoder_adapter: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of all feature levels."""
        return sum(t.element_size() * t.nelement() for t in self.features.values())

    @property
    def image_embedding(self) -> torch.Tensor:
        """The first (lowest-resolution) level: what prompts attend to, 1 x C x h x w."""
        return image_embedding(self.features)

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of every level, in order."""
        return {name: tuple(t.shape) for name, t in self.features.items()}


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
