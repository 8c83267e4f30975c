"""Validation during training: mean per-instance Dice with deterministic evaluation prompts (what model
selection and early stopping use)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_core.data.prompt_sim import PromptConfig
from sam_core.evaluation.evaluate import EvalConfig, eval_cache_key, evaluate
from sam_core.evaluation.metrics import dice
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.training.data import TrainingData


def validation_dice(predictor: Predictor, data: TrainingData, prompt_cfg: PromptConfig, seed: int,
                    reuse_embeddings: bool) -> float:
    """Mean per-instance Dice on the validation split with deterministic eval prompts.

    Whole-image windows go through :func:`sam_core.evaluation.evaluate.evaluate` (cached embeddings handed over
    when the encoder is frozen). With native-resolution crops every instance is decoded in its own
    window (a proxy for tiled inference, used for model selection).
    """
    if data.crop is None:
        cfg = EvalConfig(prompt=prompt_cfg, seed=seed, keep_worst=0)
        cache: dict[str, Any] = {}
        if reuse_embeddings:
            for i, sample in enumerate(data.ds):
                window = (0, 0, sample.height, sample.width)
                cache[eval_cache_key(predictor, sample.image_id, cfg)] = data.embedding(i, window)
        return float(evaluate(predictor, data.ds, cfg, label="val", embeddings=cache).summary["dice_mean"])
    scores = []
    for k, item in enumerate(data.items):
        prompt, mask = data.prompt_and_mask(item, np.random.default_rng([seed, k]), prompt_cfg)
        emb = data.embedding(item.sample_index, item.window) if reuse_embeddings else \
            predictor.encode_one(data.view(item.sample_index, item.window))
        result = predictor.decode(emb, [Prompt(box=None if prompt["box"] is None else prompt["box"].astype(float),
                                               point_coords=prompt["point_coords"],
                                               point_labels=prompt["point_labels"])], return_low_res=False)
        scores.append(dice(result.masks[0, 0], mask))
    return float(np.mean(scores))
