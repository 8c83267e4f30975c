"""What a training run is asked to do (:class:`TrainConfig`), what it reports while running
(:class:`ProgressEvent` in a :class:`Phase`) and what it returns (:class:`TrainResult`), plus the pure
learning-rate schedule :func:`get_lr`."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sam_core.data.prompt_sim import PromptConfig
from sam_core.errors import InvalidInput
from sam_core.modeling.registry import LoadedModel
from sam_core.training.losses import SegLossConfig
from sam_core.training.methods import MethodConfig


class Phase(str, enum.Enum):
    """Progress phases of a fine-tuning job, in the order they usually occur."""

    CHECKING_DATA = "checking_data"  # data diagnostics; the message is their one-line summary
    EMBEDDING = "embedding"  # caching the frozen encoder's embeddings
    VALIDATING = "validating"
    TRAINING = "training"
    EVALUATING = "evaluating"  # zero-shot vs fine-tuned report (finetune)
    STOPPED_EARLY = "stopped_early"  # patience or time budget ran out; the best state is published
    DONE = "done"

    @property
    def final(self) -> bool:
        """True for the phases that end a run (its adapter is published)."""
        return self in (Phase.DONE, Phase.STOPPED_EARLY)


@dataclass(frozen=True)
class TrainConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval_prompt: PromptConfig = field(default_factory=lambda: PromptConfig(box_jitter=0.0, box_jitter_max_px=0))
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    # Native-resolution crops (pixels) around each instance instead of the whole resized image: train
    # the way tiled inference sees small objects. None = whole images.
    crop: int | None = None
    # With crops, each step sees an instance through any grid window that contains it (drawn per step), not
    # only the one that centres it: tiled inference sees instances anywhere in a tile. Embeds more windows.
    crop_all_windows: bool = False
    # Wall-clock budget: stop (checkpointed, adapter published) once exceeded. Breaks exact
    # reproducibility, so it is for benchmarks and quick trials, not for resumable production jobs.
    max_seconds: float | None = None
    # Cache the frozen encoder prefix's activations of methods that train the encoder from some block on
    # (lora, adapter; sam_core.training.prefix_cache). False runs the whole encoder in every step.
    prefix_cache: bool = True
    # Recompute each encoder block's activations in the backward pass instead of keeping them (encoder-side
    # methods; sam_core.training.grad_checkpoint): less memory, one more forward pass of the blocks.
    grad_checkpoint: bool = False
    # Validation scores at most this many instances per image (the first ones, as evaluation's
    # max_instances_per_image): dense data (hundreds of cells per image) would otherwise make every
    # validation cost more than the training between them. None = every instance.
    val_max_instances: int | None = 50

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidInput("must be >= 1", field=name)
        if self.lr <= 0:
            raise InvalidInput("must be > 0", field="lr")
        if self.val_max_instances is not None and self.val_max_instances < 1:
            raise InvalidInput("must be >= 1 or None", field="val_max_instances")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> TrainConfig:
        nested = {"method": MethodConfig, "prompt": PromptConfig, "eval_prompt": PromptConfig, "loss": SegLossConfig}
        values = {k: (nested[k](**v) if k in nested else v) for k, v in data.items()}
        return TrainConfig(**values)


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raise from a progress callback to stop a run: train() first checkpoints the current step (so the
    run resumes exactly from there), then re-raises."""


@dataclass
class ProgressEvent:
    """What a progress callback receives (the trainer service streams these)."""

    state: Phase
    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    lr: float | None = None
    val_dice: float | None = None
    best_val_dice: float | None = None
    eta_seconds: float | None = None
    message: str = ""


@dataclass
class TrainResult:
    """``model`` is the base model with the published adapter applied (rank 0; None on other ranks)."""

    adapter_dir: Path | None
    model: LoadedModel | None
    history: dict[str, list[float]]
    best_val_dice: float | None
    zero_shot_val_dice: float | None
    steps: int
    seconds: float
    stopped_early: bool
    out_of_time: bool = False  # stopped by ``max_seconds`` rather than by patience or the step count


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
