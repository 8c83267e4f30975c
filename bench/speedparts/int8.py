"""Int8 part: ONNX Runtime dynamic int8 quantisation of the exported LiteMedSAM encoder (``quantize_dynamic``,
int8 weights) vs its fp32 graph.

Baseline: the same encoder exported to ONNX in fp32 and run by ONNX Runtime in the same process. Measures
seconds per image at batch 1 for both graphs and the mask IoU of each graph's embeddings vs the PyTorch
encoder's (decoding ground-truth boxes on real images; skipped without ../shared/data).

Result keys: ``fp32_batch1_s_per_image``, ``int8_batch1_s_per_image``, ``int8_mask_iou_{min,mean,n}``,
``int8_images``, ``int8_embedding_rel_error_mean``, ``fp32_onnx_mask_iou_min``, ``speedup_int8_vs_fp32_onnx``.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.speedparts.common import mask_agreement, median_time, run_child, sample_images

if TYPE_CHECKING:
    import onnxruntime as ort

    from sam_core.modeling.registry import LoadedModel


def int8_sessions(model: LoadedModel) -> dict[str, ort.InferenceSession]:
    """ONNX Runtime sessions ``fp32`` (the exported encoder) and ``int8`` (its dynamic int8 quantisation)."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sam_core.export.onnx_encoder import export_encoder_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as work:
        fp32_path = export_encoder_onnx(model, Path(work) / "encoder.onnx")
        int8_path = Path(work) / "encoder.int8.onnx"
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        return {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("fp32", fp32_path), ("int8", int8_path))}


def child_int8(repeats: int) -> dict[str, Any]:
    """Seconds per image of both graphs at batch 1 and their mask agreement with the PyTorch encoder."""
    import torch

    from sam_core.inference.predictor import Predictor
    from sam_core.modeling.preprocess import preprocess
    from sam_core.modeling.registry import load_model

    images = sample_images(4)
    if not images:
        return {"skipped": "no ../shared/data"}
    model = load_model("litemedsam")
    sessions = int8_sessions(model)
    input_name = sessions["fp32"].get_inputs()[0].name

    def run(name: str, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(sessions[name].run(None, {input_name: preprocess(image, model.spec)[0].numpy()})[0])

    image = images[0][1]
    out: dict[str, Any] = {}
    for name in sessions:
        out[f"{name}_batch1_s_per_image"] = round(median_time(partial(run, name, image), repeats), 4)
    reference = Predictor(model)
    fp32_vs_torch = mask_agreement(reference, images, lambda im: run("fp32", im))
    int8_vs_torch = mask_agreement(reference, images, lambda im: run("int8", im))
    out.update({f"int8_{k}": v for k, v in int8_vs_torch.items()})
    out["fp32_onnx_mask_iou_min"] = fp32_vs_torch["mask_iou_min"]
    out["speedup_int8_vs_fp32_onnx"] = round(out["fp32_batch1_s_per_image"] / out["int8_batch1_s_per_image"], 2)
    return out


def part_int8(repeats: int) -> dict[str, Any]:
    """The int8 comparison in a child process with tcmalloc."""
    return run_child(["int8", str(repeats)], tcmalloc=True)
