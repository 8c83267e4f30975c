"""``full``: image encoder and mask decoder (MedSAM style); the prompt encoder stays frozen."""

from __future__ import annotations

from sam_core.modeling.family import ParamGroup
from sam_core.training.methods.base import FineTuningMethod


class FullMethod(FineTuningMethod):
    name = "full"
    summary = "image encoder + mask decoder (MedSAM)"
    recommended_lr = 5e-5
    changes_image_encoder = True
    trained_groups = (ParamGroup.IMAGE_ENCODER, ParamGroup.MASK_DECODER)

