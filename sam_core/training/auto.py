"""``--method auto``: a time-budgeted search over a small recipe grid, scored on the held-out split.

The grid (:func:`recipe_grid`) is decoder on whole images, decoder on native-resolution crops (the crop size the
data diagnostics recommend, else the one that makes their median unresolvable instance resolvable), LoRA rank 4
and rank 8, each at two learning rates (the method's ``recommended_lr`` times :data:`LR_FACTORS`). The
diagnostics prune and order it: no crop recipes when every instance is resolvable and the images are small
(:func:`~sam_core.training.auto_tiling.crop_plan`). When there are crop recipes, a new held-out split has two
*modes*: the baseline and every candidate are scored both on whole images and on native-resolution tiles
(:func:`~sam_core.training.auto_tiling.baseline_on_heldout`), since a crop-trained decoder is meant to be served
tiled and on dense data a whole-image one can serve better tiled too. A candidate's score is its better mode. Crop
recipes go first when the diagnostics recommend ``--crop`` or tiles beat whole images by
:data:`~sam_core.training.auto_tiling.TILED_GAIN` for the baseline. A stored (champion's) split keeps its one mode.
A recipe sets the method, LoRA rank, learning rate and crop; everything else comes from the spec's
:class:`~sam_core.training.config.TrainConfig`.

:func:`run_auto` is a plain loop over the grid. Each candidate gets an equal share of what is left of the budget
(``remaining / candidates left``, so time a candidate does not use goes to the next ones); it is trained by
:func:`sam_core.training.loop.train` with ``max_seconds`` = that share minus two evaluations (its closing
validation and its held-out scoring, each estimated by the baseline's held-out scoring in every mode, without the
encoding for a candidate that keeps the base encoder). Its validation split (the
one early stopping and best-state selection use) is the job's usual one. After :data:`PROBE_STEPS` steps the loop's
measured step time says whether the candidate's useful minimum (one epoch, or :data:`MIN_USEFUL_STEPS` steps when an
epoch is longer) fits in the share; if not the candidate stops and is recorded as skipped with that reason, and the
later recipes of the same method are skipped before they start when their share is smaller than that measured
minimum. A candidate whose share ends before its useful minimum (caching took most of it, so it never reached the
probe) is skipped too, not scored. Caching encoder outputs (embeddings of whole images or crops, the frozen
prefix's activations) serves every later recipe of the same method and crop, so the first of them may spend up to
their shares together on it.
Each trained candidate is scored on the job's signed held-out split (:mod:`sam_core.training.guard`, the split's
own evaluation settings, :func:`~sam_core.training.guard.guard_score`), never on the validation split; the best
score wins (ties: the earlier recipe, then whole images). The winner then goes through the normal publishing guard
against the baseline in the winner's mode, scored on the same split before the search: accepted in
``<out>/adapter/``, rejected in ``<out>/rejected/``; the split stored with it is that mode's, so every later
version of the name is compared served the same way.

Budget accounting: the budget starts when :func:`run_auto` starts (data check, splits and the baseline's
held-out score count against it). The loop stops a candidate after the first step that ends past its training
time; it then validates once and is scored, which its share reserves, so it overruns its share by at most one
step (plus any error in the two estimates), and an overrun comes out of the later candidates' shares. After the
search, when the winner's share (not patience) ended its training and the search left it more than its useful
minimum, the winner resumes its last checkpoint with the time left (:func:`extend_winner`; validation keeps
choosing its best state) and keeps the continued state only if it scores better on the held-out split. Then the
winner's validation report (zero-shot vs fine-tuned) runs: the job exceeds the budget by at most that one
evaluation (and the last step of a candidate).

Candidates train one after the other in ``<out>/auto/`` and share its ``embeddings/`` and ``prefix_cache/``
(the caches are signed, so a recipe that needs other entries computes them); each candidate's adapter and
history are kept in ``<out>/auto/<slug>/`` (with its last checkpoint until the search ends). The published
artifact's metrics record ``auto_recipe`` and ``auto_candidates`` (every row of the table); ``<out>/auto.json``
holds the same table. Each finished candidate (or pruned) is reported as one ``evaluating`` progress event; the
candidates' own end-of-training events are not forwarded (the job has not ended).

Deterministic given the seed apart from the time budget: the grid, its order, the splits, every candidate's
initialisation, batches and prompts are fixed by the seed; the clock decides only how many steps a candidate
runs (and so its score and which candidate wins) and which candidates are skipped. A restarted job searches
again from the first recipe.
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
from typing import Any

from sam_core.adapters.artifact import read_adapter_config, write_adapter_config
from sam_core.data.dataset import SegmentationDataset, load_dataset
from sam_core.data.diagnostics import DataReport
from sam_core.errors import InvalidInput
from sam_core.evaluation.evaluate import EvalReport, compare, evaluate, format_table, write_report
from sam_core.files import atomic_write_text
from sam_core.inference.predictor import Predictor
from sam_core.modeling.registry import LoadedModel
from sam_core.training.auto_tiling import (
    CROP_MIN_DOWNSCALE,
    HeldoutBaseline,
    HeldoutMode,
    baseline_on_heldout,
    crop_plan,
)
from sam_core.training.config import Phase, ProgressEvent, StopTraining, TrainConfig
from sam_core.training.finetune import (
    FinetuneResult,
    FinetuneSpec,
    baseline_scorer,
    check_data,
    settle,
    split,
)
from sam_core.training.guard import guard_score, judge
from sam_core.training.loop import train
from sam_core.training.methods import MethodConfig, get_method

LR_FACTORS = (1.0, 3.0)
"""Each method is tried at its ``recommended_lr`` times each factor."""
LORA_RANKS = (4, 8)
PROBE_STEPS = 3
"""Steps after which a candidate's measured step time decides whether its useful minimum fits in its share."""
MIN_USEFUL_STEPS = 100
"""A candidate's useful minimum is one epoch or this many steps, whichever is fewer: on data with many instances
per image an epoch is hundreds of steps, and a part of one still trains."""
AUTO_METHOD = "auto"  # what CLIs and CreateJob call the search (it is not a method plug-in)
AUTO_DIR = "auto"
DEFAULT_TIME_BUDGET = 1200.0  # seconds (``--time-budget 20m``)
MAX_TIME_BUDGET = 7 * 24 * 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Recipe:
    """One candidate of the search: a method, its LoRA rank (0 for none), a peak learning rate and a crop."""

    method: str
    lr: float
    rank: int = 0
    crop: int | None = None

    @property
    def label(self) -> str:
        parts = [self.method + (f" r{self.rank}" if self.rank else "")]
        parts.append(f"crop {self.crop}" if self.crop else "whole")
        return " ".join(parts) + f" lr {self.lr:.0e}"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("+", "")

    def method_config(self) -> MethodConfig:
        rank = self.rank or MethodConfig().rank
        return MethodConfig(self.method, rank=rank, alpha=float(rank))

    def train_config(self, base: TrainConfig, seconds: float) -> TrainConfig:
        """``base`` with this recipe's method, lr and crop (through every grid window that holds an instance, as
        tiled inference sees it), bounded by ``seconds`` instead of a step count."""
        return dataclasses.replace(base, method=self.method_config(), lr=self.lr, crop=self.crop, max_steps=None,
                                   max_seconds=seconds, crop_all_windows=self.crop is not None)


@dataclass
class Candidate:
    """A row of the search table: what ran (``steps``, ``seconds``) and its held-out score, or why it did not."""

    recipe: Recipe
    steps: int = 0
    seconds: float = 0.0
    heldout_dice: float | None = None
    skipped: str = ""
    adapter_dir: Path | None = None
    out_of_time: bool = False  # its share ended its training (not patience): more time would train it further
    needed_steps: int = 0  # its useful minimum (one epoch, at most MIN_USEFUL_STEPS), known once it steps
    extended: str = ""  # what the time the search left did for it (see :func:`extend_winner`)
    served: str = ""  # the held-out mode of its score: "whole images" or "tiles"

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe.label, "method": self.recipe.method, "rank": self.recipe.rank,
                "lr": self.recipe.lr, "crop": self.recipe.crop, "steps": self.steps,
                "seconds": round(self.seconds, 2), "heldout_dice": self.heldout_dice, "heldout_mode": self.served,
                "result": f"skipped: {self.skipped}" if self.skipped else "trained", "extended": self.extended}


@dataclass
class AutoResult:
    """The search's table, the winner's index in it, and the guarded run of the winner."""

    candidates: list[Candidate]
    winner: int
    finetune: FinetuneResult
    budget: float

    def table(self) -> str:
        return format_candidates(self.candidates, self.winner)

    def to_json(self) -> dict[str, Any]:
        return {"budget_seconds": self.budget, "recipe": self.candidates[self.winner].recipe.label,
                "candidates": [c.to_json() for c in self.candidates]}


def parse_time_budget(text: str | float) -> float:
    """Seconds from ``"300"``, ``"90s"``, ``"20m"`` or ``"1.5h"``; InvalidInput(field="time_budget") otherwise."""
    raw = str(text).strip().lower()
    unit = _UNITS.get(raw[-1:], None)
    try:
        seconds = float(raw[:-1] if unit else raw) * (unit or 1.0)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIME_BUDGET):
        raise InvalidInput(f"must be a positive duration up to {MAX_TIME_BUDGET:g} s such as 300, 90s, 20m or 1.5h, "
                           f"got {text!r}", field="time_budget")
    return seconds


def recipe_grid(report: DataReport, crops_first: bool | None = None) -> list[Candidate]:
    """Every recipe as a table row, in search order; crop recipes pruned (skipped) when nothing needs them, first
    when ``crops_first`` (default: when the diagnostics recommend crops)."""
    crop, recommended = crop_plan(report)
    crops_first = recommended if crops_first is None else crops_first
    decoder_lrs = [get_method("decoder").recommended_lr * f for f in LR_FACTORS]
    lora_lrs = [get_method("lora").recommended_lr * f for f in LR_FACTORS]
    whole = [Candidate(Recipe("decoder", lr)) for lr in decoder_lrs]
    if crop is None:
        cropped = [Candidate(Recipe("decoder", lr, crop=report.img_size), skipped="every instance is resolvable "
                             f"and the images are under {CROP_MIN_DOWNSCALE:g}x the model's input size")
                   for lr in decoder_lrs]
    else:
        cropped = [Candidate(Recipe("decoder", lr, crop=crop)) for lr in decoder_lrs]
    lora = [Candidate(Recipe("lora", lr, rank=rank)) for rank in LORA_RANKS for lr in lora_lrs]
    return (cropped + whole if crops_first else whole + cropped) + lora


def prune_untiled_crops(candidates: list[Candidate], report: DataReport, held: HeldoutBaseline) -> list[Candidate]:
    """Skip the crop recipes when they are there only for large images (every instance is resolvable) and the
    held-out split is scored on whole images only (a champion's stored split): nothing would serve them tiled."""
    if report.unresolvable or any(mode.tiled for mode in held.modes):
        return candidates
    for candidate in candidates:
        if candidate.recipe.crop and not candidate.skipped:
            candidate.skipped = "every instance is resolvable and the stored held-out split is scored on whole images"
    return candidates


def format_candidates(candidates: list[Candidate], winner: int | None = None) -> str:
    """The search table: one line per recipe (``*`` marks the winner)."""
    lines = [f"  {'recipe':<28} {'steps':>6} {'time s':>7}  held-out Dice (served on)", "  " + "-" * 70]
    for i, c in enumerate(candidates):
        score = f"skipped: {c.skipped}" if c.skipped else f"{c.heldout_dice:.4f} ({c.served})"
        mark = "*" if i == winner else " "
        lines.append(f"{mark} {c.recipe.label:<28} {c.steps:>6} {c.seconds:>7.1f}  {score}")
        if c.extended:
            lines.append(f"  {'':<28} continued with the time left: {c.extended}")
    return "\n".join(lines)


class _OutOfShare(StopTraining):  # noqa: N818 - a control-flow signal
    """A candidate cannot do useful work within its share; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Search:
    """What every candidate of one search shares."""

    model: LoadedModel
    spec: FinetuneSpec
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    held: HeldoutBaseline
    emit: Callable[[ProgressEvent], None]
    deadline: float
    cache: dict[str, Any] = field(default_factory=dict)
    useful_seconds: dict[str, float] = field(default_factory=dict)  # method -> measured useful minimum, seconds
    reports: dict[int, tuple[HeldoutMode, EvalReport]] = field(default_factory=dict)  # a candidate's best mode

    @property
    def work(self) -> Path:
        return Path(self.spec.out_dir) / AUTO_DIR

    def eval_estimate(self, recipe: Recipe) -> float:
        """Seconds of one held-out scoring of ``recipe``'s candidate (every mode): a frozen encoder reuses the
        cached embeddings."""
        return self.held.seconds if get_method(recipe.method).changes_image_encoder else self.held.cached_seconds


def score_heldout(search: _Search, model: LoadedModel, label: str) -> tuple[float, HeldoutMode, EvalReport]:
    """(score, mode, report) of ``model``'s best mode on the held-out images (ties: the earlier mode)."""
    best: tuple[float, HeldoutMode, EvalReport] | None = None
    for mode in search.held.modes:
        report = evaluate(Predictor(model), search.held.images, mode.split.eval_config(), label=label,
                          embeddings=search.cache)
        score = guard_score(report)[0]
        if best is None or score > best[0]:
            best = (score, mode, report)
    assert best is not None  # a split has at least one mode
    return best


def _watch(search: _Search, candidate: Candidate, started: float, share: float,
           cache_share: float | None = None) -> Callable[[ProgressEvent], None]:
    """The candidate's progress callback: forwards its events (not its end-of-training ones), stops it when
    caching outlives ``cache_share`` (default ``share``) or when its measured useful minimum does not fit
    ``share``."""
    cache_share = share if cache_share is None else cache_share
    method = candidate.recipe.method

    def callback(event: ProgressEvent) -> None:
        elapsed = time.perf_counter() - started
        if event.state.final:
            return
        search.emit(event)
        if event.state is not Phase.TRAINING:
            if event.state is Phase.EMBEDDING and elapsed > cache_share:
                raise _OutOfShare(f"caching the encoder outputs took over its {cache_share:.0f} s share")
            return
        candidate.steps = event.step
        candidate.needed_steps = min(event.total_steps // max(1, search.spec.train.epochs), MIN_USEFUL_STEPS)
        if event.step != PROBE_STEPS or event.eta_seconds is None or event.total_steps <= event.step:
            return
        step_time = event.eta_seconds / (event.total_steps - event.step)
        per_epoch = event.total_steps // max(1, search.spec.train.epochs)
        useful = min(per_epoch, MIN_USEFUL_STEPS)
        search.useful_seconds[method] = useful * step_time
        needed = elapsed + (useful - event.step) * step_time
        if needed > share:
            what = "one epoch" if useful == per_epoch else "the minimum"
            raise _OutOfShare(f"{what} ({useful} steps at {step_time:.2f} s/step) needs ~{needed:.0f} s, "
                              f"its share is {share:.0f} s")

    return callback


def _reset_work(work: Path) -> None:
    """Drop the previous candidate's checkpoints and artifact (the caches stay)."""
    for name in ("checkpoints", "adapter", "history.json"):
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_candidate(search: _Search, index: int, candidate: Candidate, share: float, sharing: int = 1) -> None:
    """Train ``candidate`` within ``share`` seconds and score it on the held-out split (fills the row);
    ``sharing``: how many candidates, this one included, will use the encoder outputs it caches."""
    recipe, started = candidate.recipe, time.perf_counter()
    measured, eval_seconds = search.useful_seconds.get(recipe.method), search.eval_estimate(recipe)
    training_seconds = share - 2 * eval_seconds  # its closing validation and its held-out scoring
    if share <= 0:
        candidate.skipped = "the time budget is spent"
        return
    if measured is not None and measured > training_seconds:
        candidate.skipped = (f"the useful minimum of {recipe.method} measured ~{measured:.0f} s, "
                             f"its share is {share:.0f} s")
        return
    if training_seconds <= 0:
        candidate.skipped = (f"its {share:.1f} s share does not cover a validation and a held-out evaluation "
                             f"(2 x {eval_seconds:.1f} s)")
        return
    _reset_work(search.work)
    cfg = recipe.train_config(search.spec.train, training_seconds)
    try:
        result = train(search.model, search.train_ds, search.val_ds, cfg, search.work, resume=False,
                       callback=_watch(search, candidate, started, training_seconds,
                                       cache_share=training_seconds + (sharing - 1) * share),
                       adapter_name=search.spec.adapter_name, parent=search.spec.parent)
    except _OutOfShare as stop:
        candidate.skipped, candidate.seconds = stop.reason, time.perf_counter() - started
        return
    assert result.model is not None and result.adapter_dir is not None  # one process
    if result.out_of_time and result.steps < candidate.needed_steps:  # e.g. caching left it too few steps
        candidate.skipped = (f"its share ended after {result.steps} of the {candidate.needed_steps} steps it needs "
                             "(one epoch, or the minimum)")
        candidate.seconds = time.perf_counter() - started
        return
    kept = search.work / recipe.slug
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    os.replace(result.adapter_dir, kept / "adapter")
    os.replace(search.work / "history.json", kept / "history.json")
    os.replace(search.work / "checkpoints", kept / "checkpoints")  # the winner may resume from them
    candidate.heldout_dice, mode, report = score_heldout(search, result.model, recipe.label)
    search.reports[index], candidate.served = (mode, report), mode.name
    candidate.steps, candidate.adapter_dir = result.steps, kept / "adapter"
    candidate.seconds, candidate.out_of_time = time.perf_counter() - started, result.out_of_time


def search_recipes(search: _Search, candidates: list[Candidate]) -> int | None:
    """The plain loop: each candidate not pruned runs in turn with its share, and every row is reported in one
    event; returns the best one's index."""
    for index, candidate in enumerate(candidates):
        if not candidate.skipped:
            left = [c.recipe for c in candidates[index:] if not c.skipped]
            sharing = sum(1 for r in left if (r.method, r.crop) == (candidate.recipe.method, candidate.recipe.crop))
            run_candidate(search, index, candidate, (search.deadline - time.perf_counter()) / len(left), sharing)
        result = f"skipped: {candidate.skipped}" if candidate.skipped else f"held-out Dice {candidate.heldout_dice:.4f}"
        search.emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message=(
            f"auto {index + 1}/{len(candidates)} {candidate.recipe.label}: {candidate.steps} steps, "
            f"{candidate.seconds:.1f} s, {result}")))
    scored = [(c.heldout_dice, -i) for i, c in enumerate(candidates) if c.heldout_dice is not None]
    return -max(scored)[1] if scored else None


def extend_winner(search: _Search, index: int, candidate: Candidate) -> None:
    """Give the winner the time the search left, when its share (not patience) ended it: resume its last
    checkpoint with that budget (validation keeps choosing its best state), score it on the held-out split
    again and keep whichever of the two states scores better there (ties: the shorter run)."""
    left = search.deadline - time.perf_counter() - 2 * search.eval_estimate(candidate.recipe)
    needed = search.useful_seconds.get(candidate.recipe.method, 0.0)
    if not candidate.out_of_time or left <= needed or left <= 0:
        return
    assert candidate.adapter_dir is not None and candidate.heldout_dice is not None
    kept, steps_before, started = candidate.adapter_dir.parent, candidate.steps, time.perf_counter()
    _reset_work(search.work)
    shutil.copytree(kept / "checkpoints", search.work / "checkpoints")
    search.emit(ProgressEvent(Phase.TRAINING, steps_before, 0, 0,
                              message=f"auto: {candidate.recipe.label} continues for the {left:.0f} s left"))
    cfg = candidate.recipe.train_config(search.spec.train, left)
    result = train(search.model, search.train_ds, search.val_ds, cfg, search.work, resume=True,
                   callback=lambda event: None if event.state.final else search.emit(event),
                   adapter_name=search.spec.adapter_name, parent=search.spec.parent)
    assert result.model is not None and result.adapter_dir is not None
    score, mode, report = score_heldout(search, result.model, candidate.recipe.label)
    verdict = (f"+{result.steps - steps_before} steps, held-out Dice {candidate.heldout_dice:.4f} ({candidate.served}) "
               f"-> {score:.4f} ({mode.name})")
    candidate.seconds += time.perf_counter() - started
    if score > candidate.heldout_dice:
        shutil.rmtree(candidate.adapter_dir)
        os.replace(result.adapter_dir, candidate.adapter_dir)
        os.replace(search.work / "history.json", kept / "history.json")
        candidate.heldout_dice, candidate.steps, candidate.served = score, result.steps, mode.name
        search.reports[index] = (mode, report)
        candidate.extended = f"{verdict} (kept)"
    else:
        candidate.extended = f"{verdict} (the shorter run kept)"
    message = f"auto {candidate.recipe.label}: {candidate.extended}"
    search.emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message=message))


def run_auto(model: LoadedModel, spec: FinetuneSpec, budget: float,
             callback: Callable[[ProgressEvent], None] | None = None) -> AutoResult:
    """Search the recipe grid within ``budget`` seconds and publish the best candidate through the guard."""
    t0 = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InvalidInput("auto searches in one process; run it without torchrun", field="method")
    emit = callback or (lambda event: None)
    out = Path(spec.out_dir)
    ds = load_dataset(spec.data, min_area=spec.split.min_area)
    report = check_data(ds, model, out, emit)
    emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message="baseline on the held-out split"))
    cache: dict[str, Any] = {}
    scorer, baseline_label = baseline_scorer(model, spec.guard.baseline, cache)
    held = baseline_on_heldout(spec, ds, report, scorer, emit)
    candidates = prune_untiled_crops(recipe_grid(report, crops_first=held.crops_first), report, held)
    train_ds, val_ds = split(spec, held.rest)
    if len(val_ds) == 0:
        raise InvalidInput("the validation split is empty; lower val_fraction or add data", field="split")
    search = _Search(model, spec, train_ds, val_ds, held, emit, deadline=t0 + budget, cache=cache)
    winner = search_recipes(search, candidates)
    if winner is None:
        raise InvalidInput(f"no recipe could train within {budget:g} s:\n{format_candidates(candidates)}",
                           field="time_budget")
    extend_winner(search, winner, candidates[winner])
    for candidate in candidates:  # only the winner could resume, and it has
        if candidate.adapter_dir is not None:
            shutil.rmtree(candidate.adapter_dir.parent / "checkpoints", ignore_errors=True)
    result = publish_winner(search, candidates, winner, baseline_label, t0)
    auto = AutoResult(candidates, winner, result, budget)
    atomic_write_text(out / "auto.json", json.dumps(auto.to_json(), indent=1, allow_nan=False) + "\n")
    result.auto = auto.to_json()
    return auto


def publish_winner(search: _Search, candidates: list[Candidate], winner: int, baseline_label: str,
                   t0: float) -> FinetuneResult:
    """Copy the winner to ``<out>/adapter`` with the table in its metrics, report it on the validation split
    served the way it won, and let the guard (the baseline in that mode) accept it there or move it to
    ``<out>/rejected``."""
    best, out, (mode, heldout_report) = candidates[winner], Path(search.spec.out_dir), search.reports[winner]
    eval_cfg = dataclasses.replace(search.spec.eval, tiled=mode.tiled)
    assert best.adapter_dir is not None
    adapter_dir = out / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(best.adapter_dir, adapter_dir)
    config = read_adapter_config(adapter_dir)
    write_adapter_config(adapter_dir, dataclasses.replace(config, metrics={
        **config.metrics, "auto_recipe": best.recipe.label, "auto_candidates": [c.to_json() for c in candidates]}))
    from sam_core.adapters.artifact import load_adapter

    tuned_model = load_adapter(search.model, adapter_dir)
    search.emit(ProgressEvent(Phase.EVALUATING, 0, 0, 0, message="zero-shot vs fine-tuned on the validation split"))
    val_cache: dict[str, Any] = {}
    reports = [evaluate(Predictor(search.model), search.val_ds, eval_cfg, label="zero-shot", embeddings=val_cache),
               evaluate(Predictor(tuned_model), search.val_ds, eval_cfg,
                        label=f"fine-tuned (auto: {best.recipe.label})", embeddings=val_cache)]
    history = json.loads((best.adapter_dir.parent / "history.json").read_text())
    files = write_report(out / "eval", reports, history=history, dataset=search.val_ds)
    verdict = judge(heldout_report, mode.baseline, baseline_label, mode.split, search.spec.guard)
    settled = settle(adapter_dir, verdict, mode.split)
    return FinetuneResult(adapter_dir=settled, adapter=read_adapter_config(settled), reports=reports,
                          table=format_table(compare(reports)), seconds=time.perf_counter() - t0,
                          report_files=files, guard=verdict)
