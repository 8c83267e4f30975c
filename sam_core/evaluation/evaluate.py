"""Evaluate a model on a segmentation data set with simulated prompts; compare models; write a report.

One scoring loop serves every kind of model:

* :func:`evaluate` runs a :class:`~sam_core.inference.predictor.Predictor` (whole-image or tiled embedding). Each image
  is embedded once; pass an ``embeddings`` dict to reuse embeddings across runs (e.g. the zero-shot run's
  embeddings for a decoder-only fine-tune, whose image encoder is unchanged).
* :func:`evaluate_fn` runs any ``segment(image, prompts) -> N x H x W bool`` callable (e.g. one-shot PerSAM).

Prompts come from :func:`~sam_core.data.prompt_sim.simulate_prompt` with a generator seeded from
``(cfg.seed, image_id)`` only, so two models (or two runs, or a subset of the data set) see identical
prompts. Every instance gets one prompt; all instances of an image are decoded in one batched call
(split only beyond the predictor's ``max_prompts``) and scored with Dice, IoU, HD95 and NSD. Only the
``keep_worst`` lowest-Dice masks are kept in memory.

Every score says whether its instance is resolvable at the model's input scale
(:func:`sam_core.data.resolution.is_resolvable`: the whole image resized as the model resizes it, or a
native tile with ``cfg.tiled``), and the summary gives Dice over all instances (``dice_mean``) and over the resolvable
ones (``dice_resolvable_mean``, ``n_resolvable``): a set of specks no input can resolve is noise in the first.

JSON (:meth:`EvalReport.to_json`, ``report.json``): non-finite floats (``inf`` HD95 when one mask is
empty, ``nan`` aggregates of an empty set) are written as ``null``; ``summary.hd95_inf_count`` says how
many HD95 values were infinite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import re
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias, TypedDict, overload

import numpy as np

from sam_core.data.prompt_sim import PromptConfig, simulate_prompt
from sam_core.data.resolution import InputSize, input_side, is_resolvable
from sam_core.data.samples import Instance, Sample
from sam_core.errors import InvalidInput
from sam_core.evaluation.metrics import InstanceScore, score_instance, summarize
from sam_core.inference.predictor import Predictor
from sam_core.inference.prompts import Prompt
from sam_core.inference.tiling import TiledEmbedding, decode_tiled, encode_tiled
from sam_core.inference.types import Embedding

PromptDict: TypeAlias = dict[str, np.ndarray | None]
"""One :func:`~sam_core.data.prompt_sim.simulate_prompt` result: "box", "point_coords", "point_labels" (or None)."""
SegmentFn = Callable[[np.ndarray, list[PromptDict]], np.ndarray]
"""``segment(image H x W x 3 uint8, prompts: N simulate_prompt dicts) -> N x H x W bool``."""
ProgressFn = Callable[[int, int], None]
"""``progress(images_done, images_total)``, called after every image."""
EmbeddingCache = MutableMapping[str, "Embedding | TiledEmbedding"]

COMPARE_KEYS: tuple[str, ...] = (
    "dice_mean", "dice_resolvable_mean", "iou_mean", "hd95_mean", "nsd_mean", "dice_image_mean", "n_instances",
    "n_resolvable", "seconds",
)
_Segmenter = Callable[[Sample, list[PromptDict]], np.ndarray]


def _eval_prompt_config() -> PromptConfig:
    return PromptConfig(kind="box", box_jitter=0.0, box_jitter_max_px=0)


@dataclass
class EvalConfig:
    """How to evaluate.

    prompt: how prompts are simulated (default: exact tight box, no jitter). seed: prompt seed (combined
    with each image id). tiled / tile_overlap: tiled embedding (see :mod:`sam_core.inference.tiling`). multimask:
    decode 3 masks per prompt and keep the one with the highest predicted IoU. nsd_tolerance: NSD tolerance
    in pixels. keep_worst: number of lowest-Dice cases whose masks are kept. max_instances_per_image: score
    only the first N instances of each image (in the data set's instance order); None = all.
    """

    prompt: PromptConfig = field(default_factory=_eval_prompt_config)
    seed: int = 0
    tiled: bool = False
    tile_overlap: int = 64
    multimask: bool = False
    nsd_tolerance: float = 2.0
    keep_worst: int = 8
    max_instances_per_image: int | None = None

    def __post_init__(self) -> None:
        if self.tile_overlap < 0:
            raise InvalidInput("must be >= 0", field="tile_overlap")
        if self.nsd_tolerance < 0:
            raise InvalidInput("must be >= 0", field="nsd_tolerance")
        if self.keep_worst < 0:
            raise InvalidInput("must be >= 0", field="keep_worst")
        if self.max_instances_per_image is not None and self.max_instances_per_image < 1:
            raise InvalidInput("must be >= 1 or None", field="max_instances_per_image")


@dataclass
class WorstCase:
    """One low-Dice instance: pred / gt are H x W bool; prompt is JSON-ready (lists or None)."""

    image_id: str
    instance_id: int
    dice: float
    pred: np.ndarray
    gt: np.ndarray
    prompt: dict[str, object]

    def to_json(self) -> dict[str, object]:
        """Everything but the masks (their areas instead)."""
        return _jsonable({
            "image_id": self.image_id,
            "instance_id": self.instance_id,
            "dice": self.dice,
            "prompt": self.prompt,
            "pred_area": int(np.count_nonzero(self.pred)),
            "gt_area": int(np.count_nonzero(self.gt)),
        })


@dataclass
class EvalReport:
    """Result of one evaluation run.

    scores: one InstanceScore per evaluated instance, in data set order. summary: :func:`metrics.summarize`.
    per_image: image_id -> {"dice": mean, "iou": mean, "n": count}. worst: lowest Dice first.
    config: the EvalConfig as a dict (for the record). seconds: the whole run; encode_seconds: the part of it
    spent computing image embeddings (those not found in the ``embeddings`` cache), so a run with every embedding
    cached costs about ``seconds - encode_seconds``.
    """

    scores: list[InstanceScore]
    summary: dict[str, float]
    per_image: dict[str, dict[str, float]]
    worst: list[WorstCase]
    model_id: str
    label: str
    seconds: float
    config: dict[str, object] = field(default_factory=dict)
    encode_seconds: float = 0.0

    def dice_values(self) -> np.ndarray:
        """(N,) float64 per-instance Dice."""
        return np.array([s.dice for s in self.scores], dtype=np.float64)

    def to_json(self) -> dict[str, object]:
        """JSON-serialisable dict (strict JSON: inf / nan -> null)."""
        return _jsonable({
            "label": self.label,
            "model_id": self.model_id,
            "seconds": self.seconds,
            "encode_seconds": self.encode_seconds,
            "config": self.config,
            "summary": self.summary,
            "per_image": self.per_image,
            "scores": [dataclasses.asdict(s) for s in self.scores],
            "worst": [w.to_json() for w in self.worst],
        })


# --------------------------------------------------------------------------------------------------
# helpers


class Comparison(TypedDict):
    """:func:`compare`'s result."""

    baseline: str
    labels: list[str]
    rows: dict[str, dict[str, float]]
    deltas: dict[str, dict[str, float]]


@overload
def _jsonable(value: Mapping[str, object]) -> dict[str, object]: ...


@overload
def _jsonable(value: object) -> object: ...


def _jsonable(value: object) -> object:
    """Recursively convert numpy values to Python ones; non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer | int):
        return int(value)
    if isinstance(value, np.floating | float):
        return float(value) if math.isfinite(value) else None
    return value


def prompt_rng(seed: int, image_id: str) -> np.random.Generator:
    """Generator seeded from (seed, image_id) only: independent of data set order and of the model."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def image_prompts(image_id: str, instances: Sequence[Instance], cfg: PromptConfig, seed: int) -> list[PromptDict]:
    """One simulate_prompt dict per instance, drawn from :func:`prompt_rng` in instance order."""
    rng = prompt_rng(seed, image_id)
    return [simulate_prompt(inst.mask, rng, cfg) for inst in instances]


def prompt_from_dict(prompt: Mapping[str, object]) -> Prompt:
    """simulate_prompt dict (box / point_coords / point_labels, each array or None) -> Prompt."""
    def arr(key: str, dtype: type) -> np.ndarray | None:
        value = prompt.get(key)
        return None if value is None else np.asarray(value, dtype=dtype)

    return Prompt(box=arr("box", np.float64), point_coords=arr("point_coords", np.float64),
                  point_labels=arr("point_labels", np.int64))


def eval_cache_key(predictor: Predictor, image_id: str, cfg: EvalConfig) -> str:
    """Cache key of an image's embedding: model id, encoder adapter (None for the base model and
    decoder-only adapters, which share embeddings), image id; tiled embeddings per overlap."""
    suffix = f"/tiled-o{cfg.tile_overlap}" if cfg.tiled else ""
    return f"{predictor.model_id}/{predictor.model.encoder_adapter_id}/{image_id}{suffix}"


def _selected_instances(sample: Sample, cfg: EvalConfig) -> list[Instance]:
    if cfg.max_instances_per_image is None:
        return list(sample.instances)
    return list(sample.instances[:cfg.max_instances_per_image])


def _checked_masks(masks: object, n: int, size: tuple[int, int]) -> np.ndarray:
    """Model output -> N x H x W bool, or InvalidInput naming the expected shape."""
    arr = np.asarray(masks)
    if arr.shape != (n, *size):
        raise InvalidInput(f"expected {n} x {size[0]} x {size[1]} masks, got shape {arr.shape}", field="segment")
    return arr.astype(bool, copy=False)


class _WorstKeeper:
    """The k lowest-Dice cases seen so far (ties: the earlier one wins); masks copied only on entry."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, WorstCase]] = []  # (-dice, -seq): root = first to evict
        self._seq = 0

    def offer(self, score: InstanceScore, pred: np.ndarray, gt: np.ndarray, prompt: PromptDict) -> None:
        self._seq += 1
        if self.k == 0 or (len(self._heap) == self.k and score.dice >= -self._heap[0][0]):
            return
        case = WorstCase(score.image_id, score.instance_id, score.dice, pred.copy(), gt.copy(), _jsonable(prompt))
        entry = (-score.dice, -self._seq, case)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def cases(self) -> list[WorstCase]:
        return [case for _, _, case in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]


def _score_image(sample: Sample, instances: Sequence[Instance], preds: np.ndarray, prompts: Sequence[PromptDict],
                 cfg: EvalConfig, worst: _WorstKeeper, img_size: InputSize | None) -> list[InstanceScore]:
    """preds: N x H x W bool, one per instance; ``img_size`` None: every instance counts as resolvable."""
    scores = []
    tile = input_side(img_size) if cfg.tiled and img_size is not None else None
    for inst, pred, prompt in zip(instances, preds, prompts, strict=True):
        resolvable = img_size is None or is_resolvable(inst.mask, img_size, tile=tile)
        score = score_instance(sample.image_id, inst.instance_id, pred, inst.mask, tolerance=cfg.nsd_tolerance,
                               resolvable=resolvable)
        worst.offer(score, pred, inst.mask, prompt)
        scores.append(score)
    return scores


def _image_summary(scores: Sequence[InstanceScore]) -> dict[str, float]:
    return {"dice": float(np.mean([s.dice for s in scores])), "iou": float(np.mean([s.iou for s in scores])),
            "n": len(scores)}


def _evaluate_loop(segmenter: _Segmenter, dataset: Sequence[Sample], cfg: EvalConfig, *, label: str,
                   model_id: str, progress: ProgressFn | None, img_size: InputSize | None) -> EvalReport:
    """The shared loop: prompts, one segmenter call per image, scores, worst cases."""
    t0 = time.perf_counter()
    scores: list[InstanceScore] = []
    per_image: dict[str, dict[str, float]] = {}
    worst = _WorstKeeper(cfg.keep_worst)
    total = len(dataset)
    for done, sample in enumerate(dataset, start=1):
        instances = _selected_instances(sample, cfg)
        if instances:
            prompts = image_prompts(sample.image_id, instances, cfg.prompt, cfg.seed)
            size = instances[0].mask.shape
            preds = _checked_masks(segmenter(sample, prompts), len(instances), size)
            image_scores = _score_image(sample, instances, preds, prompts, cfg, worst, img_size)
            per_image[sample.image_id] = _image_summary(image_scores)
            scores += image_scores
        if progress is not None:
            progress(done, total)
    return EvalReport(scores=scores, summary=summarize(scores), per_image=per_image, worst=worst.cases(),
                      model_id=model_id, label=label, seconds=time.perf_counter() - t0,
                      config=_jsonable(dataclasses.asdict(cfg)))


# --------------------------------------------------------------------------------------------------
# predictor path


@dataclass
class _Stopwatch:
    seconds: float = 0.0


def _embedding_for(predictor: Predictor, sample: Sample, cfg: EvalConfig,
                   cache: EmbeddingCache | None, spent: _Stopwatch) -> Embedding | TiledEmbedding:
    key = eval_cache_key(predictor, sample.image_id, cfg)
    if cache is not None and key in cache:
        return cache[key]
    started = time.perf_counter()
    image = sample.load_image()
    if cfg.tiled:
        embedding: Embedding | TiledEmbedding = encode_tiled(predictor, image, overlap=cfg.tile_overlap)
    else:
        embedding = predictor.encode_one(image)
    if cache is not None:
        cache[key] = embedding
    spent.seconds += time.perf_counter() - started
    return embedding


def _best_masks(masks: np.ndarray, iou_scores: np.ndarray) -> np.ndarray:
    """N x M x H x W, N x M -> N x H x W: the mask with the highest predicted IoU per prompt."""
    best = np.argmax(iou_scores, axis=1)
    selected: np.ndarray = masks[np.arange(len(masks)), best]
    return selected


def decode_masks(predictor: Predictor, embedding: Embedding | TiledEmbedding, prompts: Sequence[Prompt], *,
                 multimask: bool = False) -> np.ndarray:
    """N prompts -> N x H x W bool, batched (one call per ``predictor.max_prompts`` prompts)."""
    chunks = []
    for start in range(0, len(prompts), predictor.max_prompts):
        chunk = prompts[start:start + predictor.max_prompts]
        if isinstance(embedding, TiledEmbedding):
            result = decode_tiled(predictor, embedding, chunk, multimask=multimask)
        else:
            result = predictor.decode(embedding, chunk, multimask=multimask, return_low_res=False)
        chunks.append(_best_masks(result.masks, result.iou_scores) if multimask else result.masks[:, 0])
    return np.concatenate(chunks)


def _predictor_segmenter(predictor: Predictor, cfg: EvalConfig, cache: EmbeddingCache | None,
                         spent: _Stopwatch) -> _Segmenter:
    def segment(sample: Sample, prompts: list[PromptDict]) -> np.ndarray:
        embedding = _embedding_for(predictor, sample, cfg, cache, spent)
        return decode_masks(predictor, embedding, [prompt_from_dict(p) for p in prompts], multimask=cfg.multimask)

    return segment


def evaluate(predictor: Predictor, dataset: Sequence[Sample], cfg: EvalConfig | None = None, *,
             label: str = "model", embeddings: EmbeddingCache | None = None,
             progress: ProgressFn | None = None) -> EvalReport:
    """Evaluate a predictor on every instance of ``dataset`` (see the module docstring).

    ``embeddings``: if given, embeddings are looked up under :func:`eval_cache_key` and stored there, so a
    second run with the same dict encodes nothing. The key holds the model id and the encoder adapter, so
    a decoder-only adapter reuses the base model's embeddings and an encoder adapter gets its own.
    """
    cfg, spent = cfg or EvalConfig(), _Stopwatch()
    segmenter = _predictor_segmenter(predictor, cfg, embeddings, spent)
    report = _evaluate_loop(segmenter, dataset, cfg, label=label, model_id=predictor.model_id, progress=progress,
                            img_size=predictor.spec)
    return dataclasses.replace(report, encode_seconds=spent.seconds)


def evaluate_fn(segment: SegmentFn, dataset: Sequence[Sample], cfg: EvalConfig | None = None, *,
                label: str = "model", model_id: str = "external",
                progress: ProgressFn | None = None, img_size: InputSize | None = None) -> EvalReport:
    """Evaluate any ``segment(image, prompts) -> N x H x W bool`` with the same prompts and scoring.

    ``prompts`` are the N simulate_prompt dicts of the image (a prompt-free model may ignore them but must
    still return one mask per instance, in order). ``img_size``: the segmenter's model input size (or its
    ``ModelSpec``, whose resize mode then applies), which decides which instances are resolvable; None
    counts every instance as resolvable.
    """
    cfg = cfg or EvalConfig()

    def segmenter(sample: Sample, prompts: list[PromptDict]) -> np.ndarray:
        return segment(sample.load_image(), prompts)

    return _evaluate_loop(segmenter, dataset, cfg, label=label, model_id=model_id, progress=progress,
                          img_size=img_size)


# --------------------------------------------------------------------------------------------------
# comparison and report


def _row(report: EvalReport) -> dict[str, float]:
    row = {key: report.summary.get(key, math.nan) for key in COMPARE_KEYS if key != "seconds"}
    row["seconds"] = report.seconds
    return row


def compare(reports: Sequence[EvalReport]) -> Comparison:
    """Side-by-side summary of several reports; deltas are relative to the first (the baseline).

    Returns {"baseline": label, "labels": [...], "rows": {label: {key: value}},
    "deltas": {label: {key: value - baseline value}} (every label but the baseline)}, keys = COMPARE_KEYS.
    """
    if not reports:
        raise InvalidInput("at least one report is needed", field="reports")
    labels = [r.label for r in reports]
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"report labels must be unique, got {labels}", field="reports")
    rows = {r.label: _row(r) for r in reports}
    base = rows[labels[0]]
    deltas = {label: {k: float(rows[label][k]) - float(base[k]) for k in COMPARE_KEYS} for label in labels[1:]}
    return {"baseline": labels[0], "labels": labels, "rows": rows, "deltas": deltas}


def _fmt(key: str, value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if key in ("n_instances", "n_resolvable"):
        return f"{int(value):+d}" if signed else f"{int(value)}"
    digits = 2 if key in ("hd95_mean", "seconds") else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_table(comparison: Comparison) -> str:
    """Markdown table of :func:`compare`'s output: one row per label, "value (delta)" after the baseline."""
    header = "| model | " + " | ".join(COMPARE_KEYS) + " |"
    lines = [header, "|" + "---|" * (len(COMPARE_KEYS) + 1)]
    for label in comparison["labels"]:
        row, delta = comparison["rows"][label], comparison["deltas"].get(label)
        cells = [_fmt(k, row[k]) + (f" ({_fmt(k, delta[k], signed=True)})" if delta else "") for k in COMPARE_KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def write_report(path_dir: str | Path, reports: Sequence[EvalReport], *,
                 history: Mapping[str, Sequence[float]] | None = None,
                 dataset: Sequence[Sample] | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``path_dir`` (created if needed).

    Files (keys of the returned dict): "report" report.json ({"reports": [to_json...], "comparison": ...,
    "table": markdown}), "table" report.md, "dice_histogram" dice_histogram.png, "training_curves"
    training_curves.png (only with ``history``), "worst_cases/<label>" worst_cases_<label>.png per report
    (crops of the images when ``dataset`` is given, masks only otherwise).
    """
    from sam_core.evaluation import plots

    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparison = compare(reports)
    table = format_table(comparison)
    payload = {"reports": [r.to_json() for r in reports], "comparison": _jsonable(comparison), "table": table}
    paths = {"report": out / "report.json", "table": out / "report.md"}
    paths["report"].write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    paths["table"].write_text(table, encoding="utf-8")
    paths["dice_histogram"] = plots.plot_dice_histogram(reports, out / "dice_histogram.png")
    if history is not None:
        paths["training_curves"] = plots.plot_training_curves(history, out / "training_curves.png")
    for report in reports:
        path = out / f"worst_cases_{_slug(report.label)}.png"
        paths[f"worst_cases/{report.label}"] = plots.plot_worst_cases(report, dataset, path)
    return paths
