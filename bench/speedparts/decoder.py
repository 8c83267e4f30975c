"""Decoder part: per-prompt latency of LiteMedSAM's mask decoder for 1, 16 and 64 box prompts on one embedding
of the benchmark image.

Baseline: a loop over ``segment_anything.SamPredictor.predict`` (one box per call) on the same model and the
same embedding. samforge: ``Predictor.decode`` with the re-associated decoder, with the eager decoder, and with
ONNX Runtime (skipped, with a note on stderr, when ONNX Runtime is missing). Also the minimum mask IoU of the
re-associated decoder vs the SamPredictor loop over the 64 prompts.

Result keys: ``rows`` (one per prompt count: ``prompts``, ``SamPredictor loop (baseline) ms/prompt`` and, per
samforge runner, ``<name> ms/prompt``, ``<name> prompts/s``, ``<name> speedup``) and
``mask_iou_vs_sampredictor_min``.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.speedparts.common import benchmark_image, median_time, random_boxes, run_child

if TYPE_CHECKING:
    from segment_anything import SamPredictor

    from sam_core.inference.predictor import Predictor
    from sam_core.inference.types import Embedding
    from sam_core.modeling.registry import LoadedModel

PROMPT_COUNTS = (1, 16, 64)
BASELINE = "SamPredictor loop (baseline)"


def decoder_runners(model: LoadedModel, device: str) -> dict[str, Predictor]:
    """samforge's decoders by label: re-associated, eager and (when available) ONNX Runtime."""
    from sam_core.export.onnx_decoder import make_onnx_predictor
    from sam_core.inference.predictor import Predictor

    runners = {"samforge (re-associated decoder)": Predictor(model, device=device),
               "samforge eager decoder": Predictor(model, device=device, fast_decoder=False)}
    try:
        runners["samforge ONNX Runtime decoder"] = make_onnx_predictor(model)
    except Exception as exc:  # onnxruntime missing: reported, not fatal
        print(json.dumps({"onnx": f"skipped: {exc}"}), file=sys.stderr)
    return runners


def time_row(n: int, repeats: int, boxes: list[np.ndarray], sam_predictor: SamPredictor,
             runners: dict[str, Predictor], embedding: Embedding) -> dict[str, Any]:
    """ms per prompt of the baseline loop and of every runner for the first ``n`` boxes, with speedups."""
    from sam_core.inference.prompts import Prompt

    def loop() -> None:
        for box in boxes[:n]:
            sam_predictor.predict(box=box, multimask_output=False)

    reps = repeats * 4 if n == 1 else repeats
    base = median_time(loop, reps)
    row: dict[str, Any] = {"prompts": n, f"{BASELINE} ms/prompt": round(1e3 * base / n, 2)}
    prompts = [Prompt(box=b) for b in boxes[:n]]
    for name, predictor in runners.items():
        t = median_time(partial(predictor.decode, embedding, prompts), reps)
        row[f"{name} ms/prompt"] = round(1e3 * t / n, 2)
        row[f"{name} prompts/s"] = round(n / t, 1)
        row[f"{name} speedup"] = round(base / t, 2)
    return row


def min_mask_iou(boxes: list[np.ndarray], sam_predictor: SamPredictor, predictor: Predictor,
                 embedding: Embedding) -> float:
    """Minimum mask IoU of ``predictor``'s masks vs the SamPredictor loop's over every box."""
    import torch

    from sam_core.inference.prompts import Prompt

    with torch.inference_mode():
        ref = [sam_predictor.predict(box=b, multimask_output=False)[0][0] for b in boxes]
        ours = predictor.decode(embedding, [Prompt(box=b) for b in boxes]).masks[:, 0]
    agree = [float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))
             for a, b in zip(ref, ours, strict=True)]
    return min(agree)


def child_decoder(repeats: int, device: str) -> dict[str, Any]:
    """Every decoder on one shared embedding of the benchmark image (run in its own process)."""
    from segment_anything import SamPredictor

    from sam_core.modeling.registry import load_model

    model = load_model("litemedsam")
    image = benchmark_image()
    h, w = image.shape[:2]
    boxes = [np.array(b, np.float32) for b in random_boxes(max(PROMPT_COUNTS), h, w, seed=0)]
    runners = decoder_runners(model, device)
    fast = runners["samforge (re-associated decoder)"]
    embedding = fast.encode_one(image)
    sam_predictor = SamPredictor(model.net)
    sam_predictor.set_image(image)
    sam_predictor.features = embedding.image_embedding.to(device)  # the same embedding for every runner
    rows = []
    for n in PROMPT_COUNTS:
        rows.append(time_row(n, repeats, boxes, sam_predictor, runners, embedding))
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "mask_iou_vs_sampredictor_min": round(min_mask_iou(boxes, sam_predictor, fast, embedding), 5)}


def part_decoder(repeats: int) -> dict[str, Any]:
    """The decoder comparison in a child process with tcmalloc."""
    return run_child(["decoder", str(repeats)], tcmalloc=True)
