"""`samforge demo`: the main job until the services land — real LiteMedSAM on a generated scene.

Generates an image with a few objects (or reads ``--image``), embeds it once, decodes several box
and point prompts in one batched call, decodes again on native-resolution tiles, and reports scores,
areas, Dice against the generated ground truth and timings. Masks are written as PNG files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from sam_core.inference.prompts import Prompt


def demo_scene(height: int = 480, width: int = 640, seed: int = 7) -> tuple[np.ndarray, list[np.ndarray]]:
    """H x W x 3 uint8 scene (textured background, bright blobs) and its instance masks (H x W bool)."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.normal(70, 25, (height, width)), (0, 0), 3).clip(0, 255)
    masks = []
    for cx, cy, ax, ay, angle in ((0.25, 0.3, 60, 35, 20), (0.7, 0.35, 40, 70, -30), (0.45, 0.75, 25, 25, 0),
                                  (0.85, 0.8, 12, 8, 45)):
        mask = np.zeros((height, width), np.uint8)
        cv2.ellipse(mask, (int(cx * width), int(cy * height)), (ax, ay), angle, 0, 360, 1, -1)
        image[mask > 0] = cv2.GaussianBlur(rng.normal(210, 12, (height, width)), (0, 0), 2)[mask > 0]
        masks.append(mask.astype(bool))
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), masks


def demo_prompts(image: np.ndarray, truth: list[np.ndarray], *, points: bool
                 ) -> tuple[list[Prompt], list[np.ndarray | None]]:
    """A box per true mask (plus a centre point for the first two when ``points``; LiteMedSAM was trained with
    box prompts only, its point masks are poor), each with its target; one central box without truth."""
    from sam_core.data.prompt_sim import box_from_mask, sample_points
    from sam_core.inference.prompts import Prompt

    rng = np.random.default_rng(0)
    prompts = [Prompt(box=box_from_mask(m).astype(np.float64)) for m in truth]
    targets: list[np.ndarray | None] = list(truth)
    if points:
        for m in truth[:2]:
            coords, labels = sample_points(m, rng, n_pos=1, from_center=True)
            prompts.append(Prompt.from_points(coords, labels))
            targets.append(m)
    if not prompts:
        h, w = image.shape[:2]
        return [Prompt.from_box([w * 0.25, h * 0.25, w * 0.75, h * 0.75])], [None]
    return prompts, targets


def run_demo(out_dir: str | Path = "out/demo", model: str = "litemedsam",
             image_path: str | None = None) -> dict[str, Any]:
    from sam_core.evaluation.metrics import dice
    from sam_core.inference.predictor import Predictor
    from sam_core.inference.tiling import decode_tiled, encode_tiled
    from sam_core.io.images import load_image
    from sam_core.io.masks import encode_png, encode_rle
    from sam_core.modeling.registry import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    predictor = Predictor(load_model(model))
    t1 = time.perf_counter()
    truth: list[np.ndarray] = []
    if image_path:
        image = load_image(image_path)
    else:
        image, truth = demo_scene()
        cv2.imwrite(str(out / "scene.png"), image[..., ::-1])
    prompts, targets = demo_prompts(image, truth, points=model != "litemedsam")
    embedding = predictor.encode_one(image)
    t2 = time.perf_counter()
    result = predictor.decode(embedding, prompts, multimask=False)
    t3 = time.perf_counter()
    tiled = encode_tiled(predictor, image)
    t4 = time.perf_counter()
    tiled_result = decode_tiled(predictor, tiled, prompts)
    t5 = time.perf_counter()
    rows = []
    for i, prompt in enumerate(prompts):
        mask = result.masks[i, 0]
        (out / f"mask_{i}.png").write_bytes(encode_png(mask))
        gt = targets[i]
        rows.append({
            "prompt": "box" if prompt.box is not None else "point",
            "iou_score": round(float(result.iou_scores[i, 0]), 3),
            "area": int(mask.sum()),
            "rle_chars": len(encode_rle(mask)["counts"]),
            "dice_vs_truth": None if gt is None else round(dice(mask, gt), 3),
            "dice_tiled_vs_truth": None if gt is None else round(dice(tiled_result.masks[i, 0], gt), 3),
        })
    summary = {
        "model_id": predictor.model_id,
        "image_size": list(image.shape[:2]),
        "prompts": rows,
        "tiles": len(tiled.tiles),
        "timing_ms": {"load_model": round(1e3 * (t1 - t0)), "encode": round(1e3 * (t2 - t1)),
                      f"decode_{len(prompts)}_prompts": round(1e3 * (t3 - t2)),
                      "encode_tiled": round(1e3 * (t4 - t3)), "decode_tiled": round(1e3 * (t5 - t4))},
        "outputs": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
