"""One fine-tuning job end to end: load the data, diagnose it (:func:`sam_core.data.diagnostics.diagnose`:
``diagnostics.json`` in the run folder, its one-line summary as the first progress event, phase
``checking_data``), split it, train (or fit PerSAM), evaluate zero-shot vs fine-tuned on the validation split,
write the report and plots, publish the adapter.

This is what ``samforge train`` and the trainer service run; both only translate their inputs into a
:class:`FinetuneSpec` and forward :class:`~sam_core.training.loop.ProgressEvent` s.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sam_core.adapters.artifact import AdapterConfig, read_adapter_config
from sam_core.data.dataset import SegmentationDataset, load_dataset
from sam_core.data.diagnostics import diagnose
from sam_core.data.splits import split_dataset, split_first_last
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import (
    EvalConfig,
    EvalReport,
    compare,
    evaluate,
    evaluate_fn,
    format_table,
    write_report,
)
from sam_core.files import atomic_write_text
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import LoadedModel
from sam_core.training.config import Phase, ProgressEvent, TrainConfig
from sam_core.training.loop import train


@dataclass(frozen=True)
class SplitSpec:
    """How to split: ``val_fraction`` + ``seed``, or explicit ``first_last`` = (n_train, n_val) of sorted ids."""

    val_fraction: float = 0.2
    seed: int = 0
    first_last: tuple[int, int] | None = None
    min_area: int = 0


@dataclass(frozen=True)
class FinetuneSpec:
    data: str
    out_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitSpec = field(default_factory=SplitSpec)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter_name: str | None = None
    parent: str | None = None
    persam_steps: int = 200


@dataclass
class FinetuneResult:
    adapter_dir: Path
    adapter: AdapterConfig
    reports: list[EvalReport]
    table: str
    seconds: float
    report_files: dict[str, Path]

    def summary(self) -> dict[str, Any]:
        return {
            "adapter_dir": str(self.adapter_dir),
            "method": self.adapter.method,
            "n_parameters": self.adapter.n_parameters,
            "seconds": round(self.seconds, 1),
            "val": {r.label: {k: _finite(r.summary.get(k)) for k in ("dice_mean", "dice_resolvable_mean", "iou_mean",
                                                                      "nsd_mean", "n_instances", "n_resolvable")}
                    for r in self.reports},
            "report": str(self.report_files.get("report", "")),
        }


def _finite(value: float | None) -> float | None:
    """None for a missing or non-finite value (``nan`` over an empty set), for strict JSON."""
    return value if value is not None and math.isfinite(value) else None


def split(spec: FinetuneSpec, ds: SegmentationDataset | None = None) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) of ``ds`` (loaded from ``spec.data`` when not given) as ``spec.split`` says."""
    ds = ds if ds is not None else load_dataset(spec.data, min_area=spec.split.min_area)
    if spec.split.first_last is not None:
        return split_first_last(ds, *spec.split.first_last)
    return split_dataset(ds, val_fraction=spec.split.val_fraction, seed=spec.split.seed)


def run_finetune(model: LoadedModel, spec: FinetuneSpec,
                 callback: Callable[[ProgressEvent], None] | None = None) -> FinetuneResult | None:
    """Train ``spec.train.method`` on ``spec.data`` and compare it with the zero-shot model on the val split.

    Under torchrun every rank trains; only rank 0 evaluates and reports (other ranks return None). A one-shot
    method is fitted by rank 0 alone (it has no gradient steps to share).
    """
    t0 = time.perf_counter()
    out = Path(spec.out_dir)
    emit = callback or (lambda event: None)
    ds = load_dataset(spec.data, min_area=spec.split.min_area)
    main = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 reports
    if main:
        check_data(ds, model, out, emit)
    elif spec.train.method.plugin.one_shot:
        return None
    train_ds, val_ds = split(spec, ds)
    if len(val_ds) == 0:
        raise InvalidInput("the validation split is empty; lower val_fraction or add data", field="split")
    trained: tuple[Path, LoadedModel, dict[str, list[float]]] | None = None
    if not spec.train.method.plugin.one_shot:
        result = train(model, train_ds, val_ds, spec.train, out, callback=emit, adapter_name=spec.adapter_name,
                       parent=spec.parent)
        if result.model is None or result.adapter_dir is None:  # a non-zero torchrun rank: rank 0 publishes
            return None
        trained = (result.adapter_dir, result.model, result.history)
    emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message="zero-shot vs fine-tuned on the validation split"))
    cache: dict[str, Any] = {}
    zero_shot = evaluate(Predictor(model), val_ds, spec.eval, label="zero-shot", embeddings=cache)
    if trained is None:
        adapter_dir, tuned, history = _fit_one_shot(model, train_ds, val_ds, spec, zero_shot, emit)
    else:
        adapter_dir, tuned_model, history = trained
        tuned = evaluate(Predictor(tuned_model), val_ds, spec.eval,
                         label=f"fine-tuned ({spec.train.method.method})", embeddings=cache)
    reports = [zero_shot, tuned]
    files = write_report(out / "eval", reports, history=history, dataset=val_ds)
    return FinetuneResult(adapter_dir=adapter_dir, adapter=read_adapter_config(adapter_dir), reports=reports,
                          table=format_table(compare(reports)), seconds=time.perf_counter() - t0, report_files=files)


def check_data(ds: SegmentationDataset, model: LoadedModel, out: Path,
               emit: Callable[[ProgressEvent], None]) -> None:
    """Diagnose ``ds`` for ``model``: ``out/diagnostics.json`` and a ``checking_data`` event with the summary line."""
    report = diagnose(ds, model.spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diagnostics.json", json.dumps(report.to_json(), indent=1, allow_nan=False))
    emit(ProgressEvent(Phase.CHECKING_DATA, 0, 0, 0, message=report.summary_line()))


def _fit_one_shot(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset,
                  spec: FinetuneSpec, zero_shot: EvalReport, emit: Callable[[ProgressEvent], None]
                  ) -> tuple[Path, EvalReport, dict[str, list[float]]]:
    """The one-shot method (PerSAM-F): the first training image's largest instance is the reference; each val
    instance is scored against the single prompt-free mask of its image."""
    from sam_core.training.persam import fit_persam, save_persam, segment_persam

    predictor = Predictor(model)
    sample = train_ds[0]
    reference = max(sample.instances, key=lambda inst: int(inst.mask.sum()))

    def progress(step: int, loss: float) -> None:
        emit(ProgressEvent(Phase.TRAINING, step, spec.persam_steps, 0, loss=loss))

    persam, info = fit_persam(predictor, sample.load_image(), reference.mask, steps=spec.persam_steps,
                              seed=spec.train.seed, callback=progress)

    def segment(image: np.ndarray, prompts: list[dict[str, Any]]) -> np.ndarray:
        mask, _ = segment_persam(predictor, persam, image)
        return np.repeat(mask[None], len(prompts), axis=0)

    label = f"{spec.train.method.method} (one-shot)"
    tuned = evaluate_fn(segment, val_ds, spec.eval, label=label, model_id=model.model_id, img_size=model.spec.img_size)
    adapter_dir = Path(spec.out_dir) / "adapter"
    metrics = {"val_dice": tuned.summary.get("dice_mean"), "zero_shot_val_dice": zero_shot.summary.get("dice_mean"),
               "reference": sample.image_id}
    save_persam(adapter_dir, model, persam, metrics=metrics, name=spec.adapter_name)
    history: dict[str, list[float]] = {"step": list(range(1, len(info["losses"]) + 1)), "loss": info["losses"],
                                       "val_step": [], "val_dice": []}
    (Path(spec.out_dir) / "history.json").write_text(json.dumps(history))
    emit(ProgressEvent(Phase.DONE, spec.persam_steps, spec.persam_steps, 0, message=str(adapter_dir)))
    return adapter_dir, tuned, history
