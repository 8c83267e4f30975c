"""SAM 2.1 tiny on the CPU: samforge against the official ``sam2`` package, same weights, same threads, one run.

    python bench/sam2_speed.py [--repeats 3] [--prompts 64] [--threads N] [--out bench/results]

Weights: a randomly initialised ``sam2.1_hiera_t`` (``build_sam2`` with seed 0; no real SAM 2.1 weights exist
on these machines), saved in the official ``{"model": state_dict}`` format and loaded back through samforge's
registry, so both sides run identical weights. The figures are timing only: random weights segment nothing.
Image: the first image of ``../shared/data`` (bench.speedparts.common.benchmark_image) or a synthetic 1024 px
one; both sides resize it to the model's 1024 px input themselves.

Variants, interleaved (every repeat runs each once, in turn, so load changes hit all of them alike; the
median of ``--repeats`` is kept, in wall seconds and in this process's CPU seconds):

- encode: samforge ``Predictor.encode_one`` (what the encoder service runs: resize, then the model's inference
  encoder) vs ``SAM2ImagePredictor.set_image``;
- ``--prompts`` box prompts on one embedding, single mask, masks at the image's size: samforge
  ``Predictor.decode`` (what the decoder service runs for one Segment with those boxes: the re-associated
  fast decoder, and the official decoder with ``fast_decoder=False``) vs a Python loop of one
  ``SAM2ImagePredictor.predict(box=...)`` per box and vs one batched ``predict(box=N x 4)`` call.

Ratios are against the named official baseline of the same run. Writes ``bench/results/sam2_speed.{json,md}``
with the CPU model, its AVX-512 / bf16 flags, torch version, threads and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prefix_stages import write_results  # noqa: E402
from bench.speedparts.common import DATA, benchmark_image, cpu_model_and_isa, random_boxes, synthetic_image  # noqa: E402
from sam_core.inference.predictor import Predictor  # noqa: E402
from sam_core.inference.prompts import Prompt  # noqa: E402
from sam_core.modeling.registry import load_model  # noqa: E402

NAME, CONFIG = "sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml"
ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # all in cpu_model_and_isa's list
ENCODE = ("samforge Predictor.encode_one", "SAM2ImagePredictor.set_image (baseline)")
DECODE = ("samforge Predictor.decode (fast decoder)", "samforge Predictor.decode (official decoder)",
          "SAM2ImagePredictor.predict loop (baseline)", "SAM2ImagePredictor.predict batched (baseline)")


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each variant over ``repeats`` rounds, the variants in turn (callers warm
    them up first)."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"wall_s": round(statistics.median(wall[name]), 4), "cpu_s": round(statistics.median(cpu[name]), 4)}
            for name in variants}


def ratios(rows: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    """Each row's speedup over ``baseline`` (baseline time / row time), wall and CPU."""
    base = rows[baseline]
    return {name: {"wall": round(base["wall_s"] / r["wall_s"], 2), "cpu": round(base["cpu_s"] / r["cpu_s"], 2)}
            for name, r in rows.items()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build both sides on the same random weights and time them (see the module docstring)."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        official_model = build_sam2(CONFIG, ckpt_path=None, device="cpu")
    with tempfile.TemporaryDirectory(prefix="sam2bench-") as scratch:
        path = Path(scratch) / "sam2.1_hiera_tiny.pt"
        torch.save({"model": official_model.state_dict()}, path)
        loaded = load_model(NAME, checkpoint=path)
    image = benchmark_image() if DATA.is_dir() and not args.synthetic else synthetic_image(1024)
    h, w = image.shape[:2]
    boxes = np.array(random_boxes(args.prompts, h, w, seed=0), dtype=np.float32)
    prompts = [Prompt.from_box(box) for box in boxes]
    official = SAM2ImagePredictor(official_model)
    fast, eager = Predictor(loaded), Predictor(loaded, fast_decoder=False)
    embedding = fast.encode_one(image)  # warm-up: builds the inference encoder snapshot
    official.set_image(image)
    encode = interleaved({ENCODE[0]: lambda: fast.encode_one(image), ENCODE[1]: lambda: official.set_image(image)},
                         args.repeats)
    for predictor in (fast, eager):  # warm-up with one box (the 64-box runs warm themselves over their prompts)
        predictor.decode(embedding, prompts[:1], return_low_res=False)
    official.predict(box=boxes[0], multimask_output=False)

    def loop() -> list[np.ndarray]:
        return [official.predict(box=box, multimask_output=False)[0] for box in boxes]

    decode = interleaved({
        DECODE[0]: lambda: fast.decode(embedding, prompts, return_low_res=False),
        DECODE[1]: lambda: eager.decode(embedding, prompts, return_low_res=False),
        DECODE[2]: loop,
        DECODE[3]: lambda: official.predict(box=boxes, multimask_output=False)}, args.repeats)
    ours = fast.decode(embedding, prompts, return_low_res=False).masks[:, 0]
    theirs = official.predict(box=boxes, multimask_output=False)[0].reshape(len(boxes), h, w) > 0
    flags = set(cpu_model_and_isa().get("isa", []))
    return {"model": f"{NAME} (random weights, timing only)", "image": f"{w} x {h} (model input 1024 px)",
            "prompts": args.prompts, "repeats": args.repeats,
            "avx512_bf16": {flag: flag in flags for flag in ISA_FLAGS},
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "encode": encode, "encode_ratio": ratios(encode, ENCODE[1]),
            "decode": decode, "decode_ratio_vs_loop": ratios(decode, DECODE[2]),
            "decode_ratio_vs_batched": ratios(decode, DECODE[3]),
            "mask_iou_vs_official_min": round(min(mask_iou(a, b) for a, b in zip(ours, theirs, strict=True)), 5)}


def markdown(result: dict[str, Any]) -> str:
    """``sam2_speed.md``: the machine, the encode and decode tables with ratios, the mask agreement."""
    flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in result["avx512_bf16"].items())
    lines = [f"# SAM 2.1 tiny on the CPU: samforge vs the official sam2 package ({result['model']})", "",
             f"CPU: {result['cpu']} ({flags}), torch {result['torch']}, {result['threads']} threads. "
             f"Image {result['image']}; median of {result['repeats']} interleaved repeats. Load average "
             f"(1/5/15 min) before {result['load_before']}, after {result['load_after']}.", "",
             "| encode (one image) | wall s | CPU s | speedup vs set_image (wall / CPU) |", "|---|---|---|---|"]
    for name, row in result["encode"].items():
        ratio = result["encode_ratio"][name]
        lines.append(f"| {name} | {row['wall_s']} | {row['cpu_s']} | {ratio['wall']}x / {ratio['cpu']}x |")
    lines += ["", f"| {result['prompts']} boxes on one embedding, single mask | wall s | CPU s "
              "| speedup vs the loop (wall / CPU) | speedup vs batched predict (wall / CPU) |",
              "|---|---|---|---|---|"]
    for name, row in result["decode"].items():
        loop, batched = result["decode_ratio_vs_loop"][name], result["decode_ratio_vs_batched"][name]
        lines.append(f"| {name} | {row['wall_s']} | {row['cpu_s']} | {loop['wall']}x / {loop['cpu']}x "
                     f"| {batched['wall']}x / {batched['cpu']}x |")
    lines += ["", f"Mask IoU of samforge (fast decoder) vs batched `SAM2ImagePredictor.predict`, per box, min: "
              f"{result['mask_iou_vs_official_min']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--synthetic", action="store_true", help="a synthetic 1024 px image even if data exists")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    write_results(Path(args.out), "sam2_speed", measure(args), markdown)


if __name__ == "__main__":
    main()
