"""``persam``: one-shot personalisation (PerSAM-F). Trains no model weights: it is fitted from one reference
image and mask by :func:`sam_core.training.persam.fit_persam`, and its artifact holds that procedure's
tensors (target feature, mask weights, prompt mode), loaded by :func:`sam_core.training.persam.load_persam`."""

from __future__ import annotations

from sam_core.training.methods.base import FineTuningMethod


class PersamMethod(FineTuningMethod):
    name = "persam"
    summary = "one-shot personalisation from one reference mask (PerSAM-F); prompt-free segmentation"
    recommended_lr = 1e-3
    one_shot = True
    trained_groups = ()

