"""Validation during training: mean per-instance Dice with deterministic evaluation prompts, over all
instances and over the ones the model can resolve at its input scale
(:func:`sam_core.data.resolution.is_resolvable`). :attr:`ValidationScore.selection` is what model
selection and early stopping use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_core.data.prompt_sim import PromptConfig
from sam_core.data.resolution import is_resolvable
from sam_core.evaluation.evaluate import EvalConfig, eval_cache_key, evaluate
from sam_core.evaluation.metrics import dice
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.training.data import TrainingData, Window


@dataclass(frozen=True)
class ValidationScore:
    """Mean Dice over all ``n`` instances and over the ``n_resolvable`` resolvable ones (nan if none)."""

    dice_all: float
    dice_resolvable: float
    n: int
    n_resolvable: int

    @property
    def selection(self) -> float:
        """The resolvable Dice when there is a resolvable instance, else the Dice over all instances: specks
        no input can resolve score noise, and selecting on noise picks a checkpoint at random."""
        return self.dice_resolvable if self.n_resolvable else self.dice_all

    @staticmethod
    def of(scores: list[float], resolvable: list[bool]) -> ValidationScore:
        kept = [s for s, ok in zip(scores, resolvable, strict=True) if ok]
        return ValidationScore(float(np.mean(scores)), float(np.mean(kept)) if kept else math.nan,
                               len(scores), len(kept))


def validation_score(predictor: Predictor, data: TrainingData, prompt_cfg: PromptConfig, seed: int,
                     reuse_embeddings: bool) -> ValidationScore:
    """Per-instance Dice on the validation split (at most ``data.max_instances`` per image) with deterministic
    eval prompts.

    Whole-image windows go through :func:`sam_core.evaluation.evaluate.evaluate` (cached embeddings handed over
    when the encoder is frozen). With native-resolution crops every instance is decoded in its own
    window (a proxy for tiled inference, used for model selection) and is resolvable at that window's scale;
    each window is encoded once for all the instances it holds.
    """
    if data.crop is None:
        cfg = EvalConfig(prompt=prompt_cfg, seed=seed, keep_worst=0, max_instances_per_image=data.max_instances)
        cache: dict[str, Any] = {}
        if reuse_embeddings:
            for i, sample in enumerate(data.ds):
                window = (0, 0, sample.height, sample.width)
                cache[eval_cache_key(predictor, sample.image_id, cfg)] = data.embedding(i, window)
        report = evaluate(predictor, data.ds, cfg, label="val", embeddings=cache)
        return ValidationScore.of([s.dice for s in report.scores], [s.resolvable for s in report.scores])
    by_window: dict[tuple[int, Window], list[int]] = {}
    for k, item in enumerate(data.items):
        by_window.setdefault((item.sample_index, item.window), []).append(k)
    scores: dict[int, float] = {}
    resolvable: dict[int, bool] = {}
    for (index, window), positions in by_window.items():
        emb = data.embedding(index, window) if reuse_embeddings else predictor.encode_one(data.view(index, window))
        for k in positions:
            prompt, mask = data.prompt_and_mask(data.items[k], np.random.default_rng([seed, k]), prompt_cfg)
            box = None if prompt["box"] is None else prompt["box"].astype(float)
            result = predictor.decode(emb, [Prompt(box=box, point_coords=prompt["point_coords"],
                                                   point_labels=prompt["point_labels"])], return_low_res=False)
            scores[k] = dice(result.masks[0, 0], mask)
            resolvable[k] = is_resolvable(mask, data.spec)
    order = sorted(scores)
    return ValidationScore.of([scores[k] for k in order], [resolvable[k] for k in order])
