"""ONNX Runtime decoder: prompt encoder + mask decoder exported as one graph with a prompt-batch axis.

Each family has its graph (:mod:`sam_core.export.decoder_graphs`: SAM 1's described here, SAM 2's there);
:func:`~sam_core.export.decoder_graphs.decoder_export` picks it by ``ModelSpec.family``, and this module's
export, cache and runtime are the same for every family. The SAM 1 graph follows segment-anything's
``SamOnnxModel`` (``utils/onnx.py``) with three differences that keep it numerically equal to
:class:`sam_core.inference.predictor.Predictor`'s PyTorch decode:

- it returns all ``num_mask_tokens`` (4) masks and IoU predictions (``return_single_mask=False``); the
  runtime slices ``0:1`` (single mask) or ``1:4`` (multimask) exactly like ``MaskDecoder.forward``;
- boxes are fed as their two corner points with labels 2 and 3 and *no* padding point, and point-only
  prompts get the one padding point (0, 0) with label -1 that ``PromptEncoder`` adds when there is no
  box; for box + points the points come first, then the corners (``PromptEncoder``'s concatenation
  order). The official notebook's padding point next to a box changes box masks;
- it stops at the low-resolution logits (B x 4 x L x L): upscaling to the original image is
  :func:`sam_core.modeling.preprocess.upscale_logits`, shared with the PyTorch path.

Graph inputs: ``image_embeddings`` 1 x C x h x w, ``point_coords`` B x P x 2 float32 (model input
frame), ``point_labels`` B x P float32, ``mask_input`` Bm x 1 x L x L, ``has_mask_input`` (Bm,) float32
with Bm = B or 1 (1 broadcasts over the batch). Outputs: ``low_res_logits`` B x 4 x L x L and
``iou_predictions`` B x 4. B, P and Bm are dynamic. SAM 2's graph takes its three feature levels
(``image_embed``, ``high_res_feat_s0``, ``high_res_feat_s1``) in place of ``image_embeddings``.

``onnxruntime`` (extra ``cpu`` or ``gpu``) and ``onnx`` are imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.jit._trace import TracerWarning

from sam_core.export.decoder_graphs import (  # noqa: F401  # DecoderGraph, prompt_arrays: re-exported
    BOX_LABELS,
    OUTPUT_NAMES,
    PAD_LABEL,
    DecoderGraph,
    decoder_export,
    prompt_arrays,
)
from sam_core.files import atomic_output
from sam_core.inference.predictor import DEFAULT_DECODE_BATCH, Predictor
from sam_core.inference.prompts import Prompt, all_present
from sam_core.modeling.family import Features
from sam_core.modeling.registry import LoadedModel, state_dict_sha256

EXPORT_FORMAT = 1  # bump when the graph's interface or construction changes (invalidates cached exports)
DEFAULT_OPSET = 17
INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")  # SAM 1's


def _example_inputs(model: LoadedModel, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Trace inputs with B=2, P=3, Bm=2 (distinct from 1 so no dynamic size is traced as a constant)."""
    shapes = model.net.feature_shapes()
    low = model.spec.low_res_size
    size = float(model.spec.img_size)
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(1, *shapes[name], generator=generator).to(device)
                for name, _ in decoder_export(model).feature_inputs]
    return (
        *features,
        (torch.rand(2, 3, 2, generator=generator) * size).to(device),
        torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0]], device=device),
        torch.randn(2, 1, low, low, generator=generator).to(device),
        torch.tensor([1.0, 0.0], device=device),
    )


def export_decoder_onnx(model: LoadedModel, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model``'s prompt encoder + mask decoder to ``path`` (see the module docstring for the I/O).

    Uses the TorchScript-based exporter (``dynamo=False``); dynamic axes: B (prompt batch), P (points per
    prompt) and Bm (mask-input batch, B or 1). Written atomically (:func:`sam_core.files.atomic_output`),
    so a partial file is never visible at ``path``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    export = decoder_export(model)
    graph = export.graph(model.net).eval()
    device = next(graph.parameters()).device
    graph.to(device)
    with atomic_output(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated (the dynamo one needs onnxscript, not a dependency), and
        # the tracer warns that the attention scale sqrt(C / heads) is traced as a constant: it is one.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", TracerWarning)
        torch.onnx.export(
            graph,
            _example_inputs(model, device),
            str(tmp),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(export.input_names),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "point_coords": {0: "batch", 1: "points"},
                "point_labels": {0: "batch", 1: "points"},
                "mask_input": {0: "mask_batch"},
                "has_mask_input": {0: "mask_batch"},
                "low_res_logits": {0: "batch"},
                "iou_predictions": {0: "batch"},
            },
        )
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samforge")
    except PackageNotFoundError:
        return "0+unknown"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/samforge/onnx`` (``~/.cache/samforge/onnx``): where exports go when a caller names no
    folder (the services always name one, ``SAMFORGE_ONNX_CACHE_DIR``; sam_core reads no settings)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "samforge" / "onnx"


def export_cache_key(model: LoadedModel, opset: int = DEFAULT_OPSET) -> str:
    """sha256 over model id, adapter id, samforge/torch versions, export format, opset and the exported
    modules' weights (the graph's ``prompt_encoder.*`` + ``mask_decoder.*``), so an in-place weight change
    never reuses a file."""
    weights = decoder_export(model).graph(model.net).state_dict()
    parts = [model.model_id, str(model.adapter_id), _package_version(), torch.__version__, str(EXPORT_FORMAT),
             str(opset), state_dict_sha256(weights)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cached_export_path(model: LoadedModel, cache_dir: str | os.PathLike[str] | None = None,
                       opset: int = DEFAULT_OPSET) -> Path:
    """Where the cached export of ``model`` lives: ``<cache_dir>/decoder-<model>-<adapter>-<key16>.onnx``."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    adapter = re.sub(r"[^A-Za-z0-9._-]", "_", model.adapter_id or "base")
    return folder / f"decoder-{model.model_id}-{adapter}-{export_cache_key(model, opset)[:16]}.onnx"


def default_providers() -> list[str]:
    """CUDA (with CPU fallback) when this onnxruntime build offers it, else CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxDecoder:
    """ONNX Runtime session over :func:`export_decoder_onnx`'s graph for one model (or adapted model).

    Without ``onnx_path`` the graph is exported once to ``cache_dir`` (default :func:`default_cache_dir`)
    under a name keyed by :func:`export_cache_key`; later decoders for the same model reuse the file
    (``self.exported`` tells whether this instance exported). An explicit ``onnx_path`` is used as is
    (exported there first if the file does not exist; its content is trusted to match ``model``).
    ``threads`` sets ORT's intra-op threads (None: ORT's default, one per physical core).
    """

    def __init__(self, model: LoadedModel, onnx_path: str | Path | None = None, *,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, decode_batch: int = DEFAULT_DECODE_BATCH,
                 opset: int = DEFAULT_OPSET) -> None:
        import onnxruntime as ort

        self.spec = model.spec
        self.model_id = model.model_id
        self.adapter_id = model.adapter_id
        self.decode_batch = decode_batch
        self.num_mask_tokens = model.net.num_multimask_outputs + 1
        self.export = decoder_export(model)
        self._single_mask = self.export.single_mask(model.net)
        self.exported = False
        if onnx_path is None:
            path = cached_export_path(model, cache_dir, opset)
            if not path.is_file():
                export_decoder_onnx(model, path, opset=opset)
                self.exported = True
        else:
            path = Path(onnx_path)
            if not path.is_file():
                export_decoder_onnx(model, path, opset=opset)
                self.exported = True
        self.onnx_path = path
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        self.providers = list(providers) if providers is not None else default_providers()
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        self._no_mask = np.zeros((1, 1, self.spec.low_res_size, self.spec.low_res_size), np.float32)

    def feature_feeds(self, features: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One image's features as the graph's feature inputs: ``{level: 1 x C_l x h_l x w_l}`` (every level the
        graph takes), or the bare image embedding for a graph taking only that level."""
        inputs = self.export.feature_inputs
        if not isinstance(features, Mapping):
            if len(inputs) != 1:
                raise ValueError(f"this decoder graph takes {len(inputs)} feature levels, got one array")
            features = {inputs[0][0]: features}
        missing = [level for level, _ in inputs if level not in features]
        if missing:
            raise ValueError(f"feature levels {missing} are missing (have {sorted(features)})")
        return {name: features[level] for level, name in inputs}

    def run(self, features: np.ndarray | Mapping[str, np.ndarray], coords: np.ndarray, labels: np.ndarray,
            masks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One session call: features (see :meth:`feature_feeds`), B x P x 2, B x P, B x 1 x L x L or None
        -> (B x T x L x L, B x T) for all T mask tokens."""
        if masks is None:
            mask_input, has_mask = self._no_mask, np.zeros(1, np.float32)
        else:
            mask_input, has_mask = np.ascontiguousarray(masks, dtype=np.float32), np.ones(len(masks), np.float32)
        feeds: dict[str, Any] = {
            **self.feature_feeds(features), "point_coords": coords, "point_labels": labels,
            "mask_input": mask_input, "has_mask_input": has_mask,
        }
        low_res, iou = self.session.run(list(OUTPUT_NAMES), feeds)
        return low_res, iou

    def select(self, low_res: np.ndarray, iou: np.ndarray, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """All tokens' outputs -> the multimask tokens ``1:T``, or the family's single mask."""
        if multimask:
            return low_res[:, 1:self.num_mask_tokens], iou[:, 1:self.num_mask_tokens]
        return self._single_mask(low_res, iou)

    def decode_low_res(self, features: Features, prompts: Sequence[Prompt], original_size: tuple[int, int],
                       multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts -> (N x M x L x L low-res logits, N x M IoU) on the CPU, in input order.

        Same contract as :meth:`Predictor.decode_low_res`: one image's features (every level, 1 x C_l x h_l x
        w_l); prompts grouped by signature and decoded ``decode_batch`` at a time; M = 3 with ``multimask``
        else 1.
        """
        feats = {level: np.ascontiguousarray(features[level].detach().to("cpu", torch.float32).numpy())
                 for level, _ in self.export.feature_inputs}
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature(), []).append(i)
        m = self.num_mask_tokens - 1 if multimask else 1
        low_side = self.spec.low_res_size
        low_res = np.empty((len(prompts), m, low_side, low_side), np.float32)
        iou = np.empty((len(prompts), m), np.float32)
        for indices in groups.values():
            for start in range(0, len(indices), self.decode_batch):
                chunk = indices[start:start + self.decode_batch]
                group = [prompts[i] for i in chunk]
                coords, labels = self.export.prompt_arrays(group, original_size, self.spec)
                masks = np.stack(all_present(p.mask_input for p in group)) if group[0].mask_input is not None else None
                low_res[chunk], iou[chunk] = self.select(*self.run(feats, coords, labels, masks), multimask)
        return torch.from_numpy(low_res), torch.from_numpy(iou)


class OnnxPredictor(Predictor):
    """A :class:`Predictor` that encodes with PyTorch and decodes with :class:`OnnxDecoder`.

    Results (masks, stability, post-processing) are computed exactly as in the base class; only
    :meth:`decode_low_res` runs in ONNX Runtime.
    """

    def __init__(self, model: LoadedModel, *, onnx_path: str | Path | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, opset: int = DEFAULT_OPSET,
                 **predictor_kwargs: Any) -> None:
        super().__init__(model, **predictor_kwargs)
        self.onnx = OnnxDecoder(model, onnx_path, providers=providers, threads=threads, cache_dir=cache_dir,
                                decode_batch=self.decode_batch, opset=opset)

    def decode_low_res(self, features: Features, prompts: Sequence[Prompt], original_size: tuple[int, int],
                       multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts -> (N x M x L x L, N x M) on ``self.device``; see :meth:`OnnxDecoder.decode_low_res`."""
        self.onnx.decode_batch = self.decode_batch
        low_res, iou = self.onnx.decode_low_res(features, prompts, original_size, multimask)
        return low_res.to(self.device), iou.to(self.device)


def make_onnx_predictor(model: LoadedModel, **kwargs: Any) -> OnnxPredictor:
    """An :class:`OnnxPredictor` for ``model``; kwargs go to OnnxPredictor (onnx_path, providers, threads,
    cache_dir, opset) and Predictor (device, max_prompts, decode_batch, autocast_dtype)."""
    return OnnxPredictor(model, **kwargs)
