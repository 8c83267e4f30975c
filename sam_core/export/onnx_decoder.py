"""ONNX Runtime decoder: prompt encoder + mask decoder exported as one graph with a prompt-batch axis.

The graph follows segment-anything's ``SamOnnxModel`` (``utils/onnx.py``) with three differences that
keep it numerically equal to :class:`sam_core.inference.predictor.Predictor`'s PyTorch decode:

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
``iou_predictions`` B x 4. B, P and Bm are dynamic.

``onnxruntime`` (extra ``cpu`` or ``gpu``) and ``onnx`` are imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torch.jit._trace import TracerWarning

from sam_core.files import atomic_output
from sam_core.inference.predictor import DEFAULT_DECODE_BATCH, Predictor
from sam_core.inference.prompts import Prompt, all_present
from sam_core.modeling.family import Features, image_embedding
from sam_core.modeling.preprocess import transform_boxes, transform_coords
from sam_core.modeling.registry import LoadedModel, state_dict_sha256
from sam_core.modeling.sam1 import Sam1Model, require_sam1

EXPORT_FORMAT = 1  # bump when the graph's interface or construction changes (invalidates cached exports)
DEFAULT_OPSET = 17
INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUT_NAMES = ("low_res_logits", "iou_predictions")
PAD_LABEL = -1.0
BOX_LABELS = (2.0, 3.0)


class DecoderGraph(nn.Module):
    """Traceable prompt encoder + mask decoder (shares the modules of ``sam``; no copies).

    forward(image_embeddings 1 x C x h x w, point_coords B x P x 2, point_labels B x P,
    mask_input Bm x 1 x L x L, has_mask_input (Bm,)) -> (B x 4 x L x L logits, B x 4 IoU predictions).
    """

    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    coord_scale: torch.Tensor

    def __init__(self, sam: Sam1Model) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        h, w = self.prompt_encoder.input_image_size
        self.register_buffer("coord_scale", torch.tensor([float(w), float(h)]), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x P x 2, B x P -> B x P x C; same arithmetic as PromptEncoder._embed_points/_embed_boxes."""
        encoder = self.prompt_encoder
        embedding: torch.Tensor = encoder.pe_layer._pe_encoding((coords + 0.5) / self.coord_scale)
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != PAD_LABEL).to(embedding.dtype)
        embedding = embedding + encoder.not_a_point_embed.weight * (labels == PAD_LABEL).to(embedding.dtype)
        for i in range(encoder.num_point_embeddings):
            embedding = embedding + encoder.point_embeddings[i].weight * (labels == i).to(embedding.dtype)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Bm x 1 x L x L, (Bm,) -> Bm x C x h x w (no_mask_embed where has_mask_input is 0)."""
        encoder = self.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense: torch.Tensor = has * encoder.mask_downscaling(mask_input) + (1 - has) * no_mask
        return dense

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        low_res: torch.Tensor
        iou: torch.Tensor
        low_res, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return low_res, iou


def _example_inputs(model: LoadedModel, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Trace inputs with B=2, P=3, Bm=2 (distinct from 1 so no dynamic size is traced as a constant)."""
    channels, h, w = next(iter(model.net.feature_shapes().values()))
    low = model.spec.low_res_size
    size = float(model.spec.img_size)
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, channels, h, w, generator=generator).to(device),
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
    graph = DecoderGraph(require_sam1(model.net, "ONNX decoder export")).eval()
    device = next(graph.mask_decoder.parameters()).device
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
            input_names=list(INPUT_NAMES),
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
    modules' weights (prompt encoder + mask decoder), so an in-place weight change never reuses a file."""
    net = require_sam1(model.net, "ONNX decoder export")
    weights = {f"prompt_encoder.{k}": v for k, v in net.prompt_encoder.state_dict().items()}
    weights.update({f"mask_decoder.{k}": v for k, v in net.mask_decoder.state_dict().items()})
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


def prompt_arrays(prompts: Sequence[Prompt], original_size: tuple[int, int],
                  img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of one signature -> (B x P' x 2 float32 coords in the model frame, B x P' float32 labels).

    Points first, then the box's two corners (labels 2, 3); point-only prompts get PromptEncoder's
    padding point (0, 0) with label -1 (P' = P + 1), box prompts none.
    """
    first = prompts[0]
    n = len(prompts)
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if first.point_coords is not None:
        points = all_present(p.point_coords for p in prompts)
        coords.append(np.stack([transform_coords(c, original_size, img_size) for c in points]))
        labels.append(np.stack(all_present(p.point_labels for p in prompts)).astype(np.float32))
    if first.box is not None:
        boxes = transform_boxes(np.stack(all_present(p.box for p in prompts)), original_size, img_size)
        coords.append(boxes.reshape(n, 2, 2))
        labels.append(np.broadcast_to(np.asarray(BOX_LABELS, np.float32), (n, 2)))
    else:
        coords.append(np.zeros((n, 1, 2), np.float32))
        labels.append(np.full((n, 1), PAD_LABEL, np.float32))
    return (np.ascontiguousarray(np.concatenate(coords, axis=1), dtype=np.float32),
            np.ascontiguousarray(np.concatenate(labels, axis=1), dtype=np.float32))


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

    def run(self, features: np.ndarray, coords: np.ndarray, labels: np.ndarray,
            masks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One session call: 1 x C x h x w, B x P x 2, B x P, B x 1 x L x L or None -> (B x 4 x L x L, B x 4)."""
        if masks is None:
            mask_input, has_mask = self._no_mask, np.zeros(1, np.float32)
        else:
            mask_input, has_mask = np.ascontiguousarray(masks, dtype=np.float32), np.ones(len(masks), np.float32)
        feeds: dict[str, Any] = {
            "image_embeddings": features, "point_coords": coords, "point_labels": labels,
            "mask_input": mask_input, "has_mask_input": has_mask,
        }
        low_res, iou = self.session.run(list(OUTPUT_NAMES), feeds)
        return low_res, iou

    def decode_low_res(self, features: Features, prompts: Sequence[Prompt], original_size: tuple[int, int],
                       multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts -> (N x M x L x L low-res logits, N x M IoU) on the CPU, in input order.

        Same contract as :meth:`Predictor.decode_low_res`: one image's features (SAM 1: the one level
        ``image_embed``, 1 x C x h x w); prompts grouped by signature and decoded ``decode_batch`` at a time;
        M = 3 with ``multimask`` else 1.
        """
        feats = np.ascontiguousarray(image_embedding(features).detach().to("cpu", torch.float32).numpy())
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature(), []).append(i)
        mask_slice = slice(1, self.num_mask_tokens) if multimask else slice(0, 1)
        m = mask_slice.stop - mask_slice.start
        low_side = self.spec.low_res_size
        low_res = np.empty((len(prompts), m, low_side, low_side), np.float32)
        iou = np.empty((len(prompts), m), np.float32)
        for indices in groups.values():
            for start in range(0, len(indices), self.decode_batch):
                chunk = indices[start:start + self.decode_batch]
                group = [prompts[i] for i in chunk]
                coords, labels = prompt_arrays(group, original_size, self.spec.img_size)
                masks = np.stack(all_present(p.mask_input for p in group)) if group[0].mask_input is not None else None
                lr, sc = self.run(feats, coords, labels, masks)
                low_res[chunk] = lr[:, mask_slice]
                iou[chunk] = sc[:, mask_slice]
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
