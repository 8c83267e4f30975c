"""Triton part: the exported LiteMedSAM encoder served by a real tritonserver (nvidia-pytriton in
``.venv-triton``, ``make triton-env``) through samforge's Triton backend client.

Measures latency per call at batch 1, seconds per image at batch 4, and images/s with 8 concurrent
single-image callers (Triton batches them). Baselines, measured first in the same process: the same ONNX graph
run in-process by ONNX Runtime (the added latency per call is the difference) and samforge's in-process
PyTorch path. Skipped, with a message, when the Triton interpreter (``--triton-python``) is missing.

Result keys: ``rows`` (by path: ``batch1_ms_per_call``, ``batch4_s_per_image``, ``images_per_s_batch4``,
``images_per_s_8_callers`` where measured, ``triton_batch_sizes_8_callers`` for Triton),
``added_ms_per_call_batch1``, ``throughput_ratio_triton_vs_in_process_ort``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.speedparts.common import ROOT, benchmark_image, median_time, run_child

if TYPE_CHECKING:
    import torch

    from sam_core.modeling.registry import LoadedModel

ORT_IN_PROCESS = "in-process ONNX Runtime (same graph)"
TORCH_IN_PROCESS = "in-process PyTorch (samforge torch backend)"
TRITON = "Triton (pytriton, ORT in its Python backend) via tritonclient gRPC"
CALLERS = 8
IMAGES_PER_CALLER = 2

EncodeFn = Callable[["torch.Tensor"], "torch.Tensor"]


def default_triton_python() -> str:
    """$SAMFORGE_TEST_TRITON_PYTHON, else the interpreter of ``.venv-triton`` in this checkout."""
    return os.environ.get("SAMFORGE_TEST_TRITON_PYTHON") or str(ROOT / ".venv-triton" / "bin" / "python")


def callers_throughput(model: LoadedModel, image: np.ndarray, encode: EncodeFn, *, max_batch: int,
                       concurrency: int) -> float:
    """Images/s of 8 callers x 2 images through the encoder service's DynamicBatcher configured as the service
    configures it for this backend (in-process: batches of <= 4, one at a time; Triton: single images, 8 in
    flight, batched by Triton)."""
    from concurrent.futures import ThreadPoolExecutor

    from sam_core.inference.predictor import Predictor
    from services.encoder.batcher import DynamicBatcher, EncodeJob

    predictor = Predictor(model, encoder_fn=encode)
    batcher = DynamicBatcher(max_batch=max_batch, max_wait_s=0.005, queue_size=64, concurrency=concurrency)
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(CALLERS) as pool:
            list(pool.map(lambda _: [batcher.submit(EncodeJob(predictor, predictor.prepare(image))).result()
                                     for _ in range(IMAGES_PER_CALLER)], range(CALLERS)))
        return CALLERS * IMAGES_PER_CALLER / (time.perf_counter() - start)
    finally:
        batcher.close()


def latency_row(encode: EncodeFn, x1: torch.Tensor, repeats: int) -> dict[str, Any]:
    """ms per call at batch 1 and seconds (and images/s) per image at batch 4."""
    x4 = x1.repeat(4, 1, 1, 1)
    b1 = median_time(lambda: encode(x1), repeats)
    b4 = median_time(lambda: encode(x4), max(2, repeats // 2)) / 4
    return {"batch1_ms_per_call": round(1e3 * b1, 1), "batch4_s_per_image": round(b4, 4),
            "images_per_s_batch4": round(1 / b4, 3)}


def triton_row(model: LoadedModel, image: np.ndarray, x1: torch.Tensor, repeats: int, triton_python: str,
               onnx_path: Path, workdir: Path) -> dict[str, Any]:
    """The ONNX graph through a pytriton server: latencies, 8-caller throughput and the batch sizes Triton ran."""
    from services.encoder.backends import TritonEncoder
    from services.encoder.pytriton_encoder import PyTritonServer

    with PyTritonServer(triton_python, onnx_path, workdir, max_batch=8, max_queue_delay_us=5000) as server:
        client = TritonEncoder(server.url, "sam_encoder", timeout_s=300)
        try:
            row = latency_row(client, x1, repeats)
            seen = len(server.batch_sizes())
            rate = callers_throughput(model, image, client, max_batch=1, concurrency=CALLERS)
            batches = server.batch_sizes()[seen:]
        finally:
            client.close()
    return {**row, "images_per_s_8_callers": round(rate, 3), "triton_batch_sizes_8_callers": batches}


def child_triton(repeats: int, triton_python: str) -> dict[str, Any]:
    """In-process ORT / PyTorch first (Triton not started yet), then the same graph through Triton."""
    from sam_core.export.onnx_encoder import OnnxEncoder, export_encoder_onnx
    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model

    model = load_model("litemedsam")
    image = benchmark_image()
    x1 = preprocess(image, model.spec)[0]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_encoder_onnx(model, Path(folder) / "encoder.onnx")
        session = OnnxEncoder(onnx_path)
        rows[ORT_IN_PROCESS] = latency_row(session, x1, repeats)
        rows[TORCH_IN_PROCESS] = latency_row(Predictor(model).encode_tensor, x1, repeats)
        rows[ORT_IN_PROCESS]["images_per_s_8_callers"] = round(
            callers_throughput(model, image, session, max_batch=4, concurrency=1), 3)
        rows[TRITON] = triton_row(model, image, x1, repeats, triton_python, onnx_path, Path(folder) / "triton")
    return {"rows": rows,
            "added_ms_per_call_batch1": round(rows[TRITON]["batch1_ms_per_call"]
                                              - rows[ORT_IN_PROCESS]["batch1_ms_per_call"], 1),
            "throughput_ratio_triton_vs_in_process_ort": round(
                rows[TRITON]["images_per_s_8_callers"] / rows[ORT_IN_PROCESS]["images_per_s_8_callers"], 2)}


def part_triton(repeats: int, triton_python: str) -> dict[str, Any] | None:
    """The Triton comparison in a child process with tcmalloc, or None when ``triton_python`` is missing."""
    if not os.access(triton_python, os.X_OK):
        print(f"triton: skipped ({triton_python} missing; run `make triton-env`)", flush=True)
        return None
    result = run_child(["triton", str(repeats), triton_python], tcmalloc=True)
    print(json.dumps(result), flush=True)
    return result
