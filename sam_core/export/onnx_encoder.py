"""ONNX export of the image encoder with a dynamic batch axis, and an ONNX Runtime encoder over it.

Graph: ``images`` B x 3 x S x S float32 (preprocessed, :func:`sam_core.modeling.preprocess.preprocess`) ->
one output per feature level of the model's family, B x C_l x h_l x w_l float32, B dynamic. The family
tells the levels (``feature_names``, ``feature_shapes``); :func:`encoder_output_names` names the outputs:
a one-level model (SAM 1) keeps the single output ``image_embeddings`` its graphs have always had (Triton
configurations and deployed files name it), a multi-level model (SAM 2: ``image_embed``,
``high_res_feat_s0``, ``high_res_feat_s1``) names each output after its level. The exported module is the
family's :meth:`~sam_core.modeling.family.SegmentationModel.inference_encoder` (unoptimised), so the graph
computes what the in-process encoder computes.

LiteMedSAM's TinyViT ``PatchMerging`` reads its batch size as ``B = len(x)``, which the tracer records
as a constant: a graph exported at batch 1 then fails at any other batch. The export runs on a copy
whose PatchMerging modules read ``x.shape[0]`` instead (same computation). SAM's ViT needs no change, nor
does SAM 2's Hiera + FPN neck: every reshape there reads the batch from ``x.shape`` (window_unpartition
derives it from the window count), and the traced constants (padding, window grids) depend only on the
fixed input side. tests/sam_core/test_onnx_sam2.py runs graphs exported at batch 2 at batches 1 and 3.
The tracer's shape inference leaves the outputs' spatial sizes symbolic (and may even give two levels of
different sizes the same symbol), so the export declares every output ``batch x C_l x h_l x w_l`` with the
family's static ``feature_shapes``: servers that read the graph's signature (Triton, pytriton) see the true
shapes. ``onnxruntime`` and ``onnx`` are imported lazily (extra ``cpu`` or ``gpu``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.jit._trace import TracerWarning

from sam_core.files import atomic_output
from sam_core.modeling.family import EncoderOutput, SegmentationModel
from sam_core.modeling.registry import LoadedModel, state_dict_sha256

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "image_embeddings"


def _patch_merging_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # self: TinyViT's untyped PatchMerging
    """TinyViT PatchMerging.forward with the batch size read from the shape (traceable as dynamic)."""
    if x.ndim == 3:
        h, w = self.input_resolution
        x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    merged: torch.Tensor = x.flatten(2).transpose(1, 2)
    return merged


def exportable_encoder(encoder: nn.Module) -> nn.Module:
    """An eval copy of ``encoder`` whose PatchMerging modules keep the batch axis dynamic when traced."""
    clone = copy.deepcopy(encoder).eval()
    for module in clone.modules():
        if type(module).__name__ == "PatchMerging" and hasattr(module, "input_resolution"):
            module.forward = types.MethodType(_patch_merging_forward, module)
    return clone


def encoder_output_names(net: SegmentationModel) -> tuple[str, ...]:
    """The encoder graph's output names, one per feature level in ``net.feature_names`` order (see the module
    docstring: a one-level model's output is ``image_embeddings``)."""
    names = tuple(net.feature_names)
    return (OUTPUT_NAME,) if len(names) == 1 else names


def _declare_output_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Rewrite the graph outputs' declared shapes to ``batch x *shapes[name]`` (metadata only)."""
    import onnx

    graph = onnx.load(str(path))
    for output in graph.graph.output:
        dims = output.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        for dim, size in zip(dims[1:], shapes[output.name], strict=True):
            dim.dim_value = size
    onnx.save(graph, str(path))


def export_encoder_onnx(model: LoadedModel, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model``'s image encoder (adapters included) to ``path``; written atomically
    (:func:`sam_core.files.atomic_output`), so a partial file is never visible at ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    encoder = exportable_encoder(model.net.inference_encoder(optimize=False))
    outputs = encoder_output_names(model.net)
    size = model.spec.img_size
    example = torch.zeros(2, 3, size, size, device=next(encoder.parameters()).device)
    with atomic_output(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        warnings.simplefilter("ignore", TracerWarning)  # shape asserts traced as constants
        torch.onnx.export(encoder, (example,), str(tmp), dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=list(outputs),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)})
        shapes = model.net.feature_shapes()
        _declare_output_shapes(tmp, {output: shapes[level]
                                     for output, level in zip(outputs, model.net.feature_names, strict=True)})
    return out


def encoder_export_path(model: LoadedModel, cache_dir: str | os.PathLike[str] | None = None,
                        opset: int = DEFAULT_OPSET) -> Path:
    """``<cache_dir>/encoder-<model>-<adapter>-<key16>.onnx``; the key hashes the model and adapter ids,
    samforge and torch versions, the opset and the exported encoder's weights (a changed weight never reuses
    a file). ``cache_dir`` None: :func:`sam_core.export.onnx_decoder.default_cache_dir`."""
    from sam_core.export.onnx_decoder import _package_version, default_cache_dir

    parts = [model.model_id, str(model.adapter_id), _package_version(), torch.__version__, str(opset),
             state_dict_sha256(model.net.inference_encoder(optimize=False).state_dict())]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    adapter = re.sub(r"[^A-Za-z0-9._-]", "_", model.adapter_id or "base")
    return folder / f"encoder-{model.model_id}-{adapter}-{key[:16]}.onnx"


def cached_onnx_encoder(model: LoadedModel, *, cache_dir: str | os.PathLike[str] | None = None,
                        threads: int | None = None, providers: list[str] | None = None) -> OnnxEncoder:
    """An :class:`OnnxEncoder` for ``model``, exporting the graph first unless the cache has it
    (replicas sharing the cache volume export once; the write is atomic)."""
    path = encoder_export_path(model, cache_dir)
    if not path.is_file():
        export_encoder_onnx(model, path)
    return OnnxEncoder(path, threads=threads, providers=providers)


class OnnxEncoder:
    """ONNX Runtime session over :func:`export_encoder_onnx`'s graph: B x 3 x S x S -> every output the graph
    has (``output_names``, in graph order): the one B x C x h x w tensor of a one-output graph, else a
    ``{name: tensor}`` dict of all levels; both are an :data:`~sam_core.modeling.family.EncoderOutput`,
    which the family's ``features_from_encoder`` turns into named features."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        from sam_core.export.onnx_decoder import default_providers

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        self.output_names = tuple(str(output.name) for output in self.session.get_outputs())

    def __call__(self, batch: torch.Tensor) -> EncoderOutput:
        images = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        levels = self.session.run(list(self.output_names), {INPUT_NAME: images})
        if len(levels) == 1:
            return torch.from_numpy(levels[0])
        return {name: torch.from_numpy(level) for name, level in zip(self.output_names, levels, strict=True)}
