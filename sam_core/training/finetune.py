"""One fine-tuning job end to end: load the data, diagnose it (:func:`sam_core.data.diagnostics.diagnose`:
``diagnostics.json`` in the run folder, its one-line summary as the first progress event, phase
``checking_data``), hold out the adapter name's signed split (:mod:`sam_core.training.guard`: the baseline's
stored split, or a new one), split the rest (train/val), train (or fit PerSAM), evaluate zero-shot vs
fine-tuned on the validation split, write the report and plots, then judge the candidate against the baseline
on the held-out split.

The artifact's config records the split and the scores on it (``heldout_*`` metrics). An accepted candidate
stays in ``<out>/adapter/``; a rejected one is moved to ``<out>/rejected/`` (nothing is left in
``<out>/adapter/``) and :attr:`FinetuneResult.accepted` is False; ``<out>/guard.json`` holds the verdict.

This is what ``samforge train`` and the trainer service run; both only translate their inputs into a
:class:`FinetuneSpec` and forward :class:`~sam_core.training.loop.ProgressEvent` s. A spec with a
``time_budget`` is ``--method auto``: :func:`run_finetune` hands it to :func:`sam_core.training.auto.run_auto`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sam_core.adapters.artifact import (
    AdapterConfig,
    adapter_identity,
    load_adapter,
    read_adapter_config,
    write_adapter_config,
)
from sam_core.data.dataset import SegmentationDataset, load_dataset
from sam_core.data.diagnostics import DataReport, diagnose
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
from sam_core.training.guard import GuardOptions, HeldoutSplit, Scorer, Verdict, judge, stored_metrics
from sam_core.training.loop import train
from sam_core.training.methods import get_method

if TYPE_CHECKING:
    from sam_core.training.persam import PerSamModel


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
    guard: GuardOptions = field(default_factory=GuardOptions)
    # Seconds: set = method "auto", a recipe search within this budget (train.method is then not used)
    time_budget: float | None = None


@dataclass
class FinetuneResult:
    """``adapter_dir``: ``<out>/adapter`` when the guard accepted the run, ``<out>/rejected`` otherwise."""

    adapter_dir: Path
    adapter: AdapterConfig
    reports: list[EvalReport]
    table: str
    seconds: float
    report_files: dict[str, Path]
    guard: Verdict
    auto: dict[str, Any] | None = None  # method "auto": the search table (AutoResult.to_json())

    @property
    def accepted(self) -> bool:
        return self.guard.accepted

    def summary(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "guard": self.guard.to_json(),
            "adapter_dir": str(self.adapter_dir),
            "method": self.adapter.method,
            "n_parameters": self.adapter.n_parameters,
            "seconds": round(self.seconds, 1),
            "val": {r.label: {k: _finite(r.summary.get(k)) for k in ("dice_mean", "dice_resolvable_mean", "iou_mean",
                                                                      "nsd_mean", "n_instances", "n_resolvable")}
                    for r in self.reports},
            "report": str(self.report_files.get("report", "")),
            **({"auto": self.auto} if self.auto is not None else {}),
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
    """Train ``spec.train.method`` on ``spec.data``, compare it with the zero-shot model on the val split and
    judge it against ``spec.guard.baseline`` on the held-out split (see the module docstring).

    Under torchrun every rank trains; only rank 0 evaluates and reports (other ranks return None). A one-shot
    method is fitted by rank 0 alone (it has no gradient steps to share).
    """
    if spec.time_budget is not None:
        from sam_core.training.auto import run_auto

        return run_auto(model, spec, spec.time_budget, callback).finetune
    t0 = time.perf_counter()
    out = Path(spec.out_dir)
    emit = callback or (lambda event: None)
    ds = load_dataset(spec.data, min_area=spec.split.min_area)
    main = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 reports
    if main:
        check_data(ds, model, out, emit)
    elif spec.train.method.plugin.one_shot:
        return None
    heldout, heldout_ds, rest = heldout_split(spec, ds)
    train_ds, val_ds = split(spec, rest)
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
    heldout_cache: dict[str, Any] = {}  # held-out images keep their recorded ids: their own cache
    zero_shot = evaluate(Predictor(model), val_ds, spec.eval, label="zero-shot", embeddings=cache)
    if trained is None:
        adapter_dir, tuned, history, candidate = _fit_one_shot(model, train_ds, val_ds, spec, zero_shot, emit)
    else:
        adapter_dir, tuned_model, history = trained
        tuned = evaluate(Predictor(tuned_model), val_ds, spec.eval,
                         label=f"fine-tuned ({spec.train.method.method})", embeddings=cache)
        candidate = predictor_scorer(tuned_model, heldout_cache)
    reports = [zero_shot, tuned]
    files = write_report(out / "eval", reports, history=history, dataset=val_ds)
    emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message="candidate vs baseline on the held-out split"))
    verdict = guard_verdict(model, spec.guard, heldout, heldout_ds, candidate, heldout_cache)
    adapter_dir = settle(adapter_dir, verdict, heldout)
    return FinetuneResult(adapter_dir=adapter_dir, adapter=read_adapter_config(adapter_dir), reports=reports,
                          table=format_table(compare(reports)), seconds=time.perf_counter() - t0, report_files=files,
                          guard=verdict)


def heldout_split(spec: FinetuneSpec, ds: SegmentationDataset
                  ) -> tuple[HeldoutSplit, SegmentationDataset, SegmentationDataset]:
    """(the split, its images, the rest of ``ds``): the baseline's stored split, else a new one drawn from ``ds``.

    The held-out images are loaded with the split's own ``min_area`` (which may differ from this job's).
    """
    baseline = spec.guard.baseline
    stored = read_adapter_config(baseline).heldout_split if baseline is not None else None
    if stored is None:
        heldout = HeldoutSplit.create(ds, fraction=spec.guard.heldout_fraction, seed=spec.split.seed,
                                      min_area=spec.split.min_area, eval_cfg=spec.eval)
    else:
        heldout = HeldoutSplit.from_json(stored, "the baseline adapter")  # no server path in the message
    heldout_ds, rest = heldout.select(ds)
    if heldout.min_area != spec.split.min_area:
        heldout_ds, _ = heldout.select(load_dataset(spec.data, min_area=heldout.min_area))
    return heldout, heldout_ds, rest


def predictor_scorer(model: LoadedModel, cache: dict[str, Any]) -> Scorer:
    """Evaluate ``model`` through a Predictor (embeddings shared through ``cache``)."""
    def score(ds: SegmentationDataset, cfg: EvalConfig, label: str) -> EvalReport:
        return evaluate(Predictor(model), ds, cfg, label=label, embeddings=cache)

    return score


def persam_scorer(model: LoadedModel, persam: PerSamModel) -> Scorer:
    """Evaluate a one-shot PerSAM model: each instance is scored against its image's single prompt-free mask."""
    from sam_core.training.persam import segment_persam

    predictor = Predictor(model)

    def segment(image: np.ndarray, prompts: list[Any]) -> np.ndarray:
        mask, _ = segment_persam(predictor, persam, image)
        return np.repeat(mask[None], len(prompts), axis=0)

    def score(ds: SegmentationDataset, cfg: EvalConfig, label: str) -> EvalReport:
        return evaluate_fn(segment, ds, cfg, label=label, model_id=model.model_id, img_size=model.spec.img_size)

    return score


def baseline_scorer(model: LoadedModel, folder: str | None, cache: dict[str, Any]) -> tuple[Scorer, str]:
    """(scorer, label) of the baseline: the base model (``folder`` None) or the champion adapter in ``folder``."""
    if folder is None:
        return predictor_scorer(model, cache), "base model"
    config = read_adapter_config(folder)
    if get_method(config.method).one_shot:
        from sam_core.training.persam import load_persam

        return persam_scorer(model, load_persam(model, folder)), adapter_identity(config)
    return predictor_scorer(load_adapter(model, folder), cache), adapter_identity(config)


def guard_verdict(model: LoadedModel, options: GuardOptions, heldout: HeldoutSplit,
                  heldout_ds: SegmentationDataset, candidate: Scorer, cache: dict[str, Any]) -> Verdict:
    """Score the candidate and the baseline on the held-out split (with the split's evaluation settings)."""
    cfg = heldout.eval_config()
    baseline, label = baseline_scorer(model, options.baseline, cache)
    return judge(candidate(heldout_ds, cfg, "candidate"), baseline(heldout_ds, cfg, "baseline"), label, heldout,
                 options)


def settle(adapter_dir: Path, verdict: Verdict, heldout: HeldoutSplit) -> Path:
    """Record the split and the held-out scores in the artifact, write ``guard.json`` next to it, and move a
    rejected artifact to ``rejected/``; returns where the artifact is."""
    config = read_adapter_config(adapter_dir)
    write_adapter_config(adapter_dir, dataclasses.replace(
        config, metrics={**config.metrics, **stored_metrics(verdict)}, heldout_split=heldout.to_json()))
    out = adapter_dir.parent
    atomic_write_text(out / "guard.json", json.dumps(verdict.to_json(), indent=1, allow_nan=False) + "\n")
    rejected = out / "rejected"
    shutil.rmtree(rejected, ignore_errors=True)  # a rejected earlier attempt of this run
    if verdict.accepted:
        return adapter_dir
    os.replace(adapter_dir, rejected)
    return rejected


def check_data(ds: SegmentationDataset, model: LoadedModel, out: Path,
               emit: Callable[[ProgressEvent], None]) -> DataReport:
    """Diagnose ``ds`` for ``model``: ``out/diagnostics.json`` and a ``checking_data`` event with the summary line;
    returns the report."""
    report = diagnose(ds, model.spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diagnostics.json", json.dumps(report.to_json(), indent=1, allow_nan=False))
    emit(ProgressEvent(Phase.CHECKING_DATA, 0, 0, 0, message=report.summary_line()))
    return report


def _fit_one_shot(model: LoadedModel, train_ds: SegmentationDataset, val_ds: SegmentationDataset,
                  spec: FinetuneSpec, zero_shot: EvalReport, emit: Callable[[ProgressEvent], None]
                  ) -> tuple[Path, EvalReport, dict[str, list[float]], Scorer]:
    """The one-shot method (PerSAM-F): the first training image's largest instance is the reference; each val
    instance is scored against the single prompt-free mask of its image."""
    from sam_core.training.persam import fit_persam, save_persam

    sample = train_ds[0]
    reference = max(sample.instances, key=lambda inst: int(inst.mask.sum()))

    def progress(step: int, loss: float) -> None:
        emit(ProgressEvent(Phase.TRAINING, step, spec.persam_steps, 0, loss=loss))

    persam, info = fit_persam(Predictor(model), sample.load_image(), reference.mask, steps=spec.persam_steps,
                              seed=spec.train.seed, callback=progress)
    scorer = persam_scorer(model, persam)
    tuned = scorer(val_ds, spec.eval, f"{spec.train.method.method} (one-shot)")
    adapter_dir = Path(spec.out_dir) / "adapter"
    metrics = {"val_dice": tuned.summary.get("dice_mean"), "zero_shot_val_dice": zero_shot.summary.get("dice_mean"),
               "reference": sample.image_id}
    save_persam(adapter_dir, model, persam, metrics=metrics, name=spec.adapter_name)
    history: dict[str, list[float]] = {"step": list(range(1, len(info["losses"]) + 1)), "loss": info["losses"],
                                       "val_step": [], "val_dice": []}
    (Path(spec.out_dir) / "history.json").write_text(json.dumps(history))
    emit(ProgressEvent(Phase.DONE, spec.persam_steps, spec.persam_steps, 0, message=str(adapter_dir)))
    return adapter_dir, tuned, history, scorer
