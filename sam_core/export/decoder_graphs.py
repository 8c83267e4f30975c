"""Traceable prompt decoders for the ONNX export, one per model family, and how the runtime feeds each.

:func:`decoder_export` looks a model's family (``ModelSpec.family``) up in :data:`DECODER_EXPORTS`, a
:class:`DecoderExport`: the graph module, which feature levels it takes under which input names, how
prompts become its point arrays, and how one mask is chosen from all mask tokens. Every graph takes its
feature inputs (batch 1, shared by all prompts), then ``point_coords`` B x P x 2 float32 (model input frame),
``point_labels`` B x P float32, ``mask_input`` Bm x 1 x L x L, ``has_mask_input`` (Bm,) float32 (Bm = B or
1, 1 broadcasts), and returns ``low_res_logits`` B x T x L x L and ``iou_predictions`` B x T for all T mask
tokens; the runtime keeps tokens ``1:T`` for a multimask decode, else the family's single mask.

- **sam1** (:class:`DecoderGraph`, segment-anything's ``SamOnnxModel`` layout): feature input
  ``image_embeddings`` (level ``image_embed``); the clicks first, then the box as two corners labelled 2 and 3;
  the padding point (0, 0) labelled -1 only without a box (``PromptEncoder``'s rule); single mask = token 0.
- **sam2** (:class:`Sam2DecoderGraph`): feature inputs named as the levels (``image_embed``,
  ``high_res_feat_s0``, ``high_res_feat_s1``); the box corners (labels 2, 3) first, then the clicks, then the
  padding point, which SAM 2's prompt encoder always appends (``SAM2ImagePredictor._predict``); single mask
  = the decoder's ``dynamic_multimask_via_stability`` choice when configured (``build_sam2`` does), else
  token 0. The graph calls the official modules (``PromptEncoder._embed_points``, ``MaskDecoder.predict_masks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

from sam_core.errors import InvalidInput
from sam_core.inference.prompts import Prompt, all_present
from sam_core.modeling.family import SegmentationModel
from sam_core.modeling.preprocess import SizeOrSpec, transform_boxes, transform_coords
from sam_core.modeling.registry import LoadedModel
from sam_core.modeling.sam1 import Sam1Model, require_sam1
from sam_core.modeling.sam2 import EMBED, HIGH_RES_S0, HIGH_RES_S1, Sam2Model

PAD_LABEL = -1.0
BOX_LABELS = (2.0, 3.0)
PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUT_NAMES = ("low_res_logits", "iou_predictions")
SingleMask = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""All mask tokens' (B x T x L x L logits, B x T IoU) -> the single-mask decode's (B x 1 x L x L, B x 1)."""


class _PromptGraph(nn.Module):
    """What both families' graphs share: the prompt encoder and mask decoder modules (no copies) and the
    dense (mask) prompt embedding."""

    prompt_encoder: Any  # segment-anything's or sam2's PromptEncoder (same attributes used here)
    mask_decoder: Any
    coord_scale: torch.Tensor

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        h, w = self.prompt_encoder.input_image_size
        self.register_buffer("coord_scale", torch.tensor([float(w), float(h)]), persistent=False)

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Bm x 1 x L x L, (Bm,) -> Bm x C x h x w (no_mask_embed where has_mask_input is 0)."""
        encoder = self.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense: torch.Tensor = has * encoder.mask_downscaling(mask_input) + (1 - has) * no_mask
        return dense


class DecoderGraph(_PromptGraph):
    """Traceable prompt encoder + mask decoder (shares the modules of ``sam``; no copies).

    forward(image_embeddings 1 x C x h x w, point_coords B x P x 2, point_labels B x P,
    mask_input Bm x 1 x L x L, has_mask_input (Bm,)) -> (B x 4 x L x L logits, B x 4 IoU predictions).
    """

    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder

    def __init__(self, sam: Sam1Model) -> None:
        super().__init__(sam.prompt_encoder, sam.mask_decoder)

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



class Sam2DecoderGraph(_PromptGraph):
    """SAM 2's prompt encoder + mask decoder (shares the modules of ``net``).

    forward(image_embed 1 x C x h x w, high_res_feat_s0 1 x C/8 x 4h x 4w, high_res_feat_s1 1 x C/4 x 2h x 2w,
    point_coords B x P x 2, point_labels B x P, mask_input Bm x 1 x L x L, has_mask_input (Bm,))
    -> (B x 4 x L x L logits, B x 4 IoU predictions). The points arrive padded (:func:`sam2_prompt_arrays`).
    """

    def __init__(self, net: Sam2Model) -> None:
        super().__init__(net.sam_prompt_encoder, net.sam_mask_decoder)

    def forward(self, image_embed: torch.Tensor, high_res_feat_s0: torch.Tensor, high_res_feat_s1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.prompt_encoder._embed_points(point_coords, point_labels, pad=False)
        dense = self._embed_masks(mask_input, has_mask_input)
        low_res: torch.Tensor
        iou: torch.Tensor
        low_res, iou, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=True,
            high_res_features=[high_res_feat_s0, high_res_feat_s1])
        return low_res, iou


def _click_arrays(prompts: Sequence[Prompt], original_size: tuple[int, int],
                  img_size: SizeOrSpec) -> tuple[np.ndarray, np.ndarray]:
    points = all_present(p.point_coords for p in prompts)
    return (np.stack([transform_coords(c, original_size, img_size) for c in points]),
            np.stack(all_present(p.point_labels for p in prompts)).astype(np.float32))


def _corner_arrays(prompts: Sequence[Prompt], original_size: tuple[int, int],
                   img_size: SizeOrSpec) -> tuple[np.ndarray, np.ndarray]:
    boxes = transform_boxes(np.stack(all_present(p.box for p in prompts)), original_size, img_size)
    return boxes.reshape(len(prompts), 2, 2), np.broadcast_to(np.asarray(BOX_LABELS, np.float32), (len(prompts), 2))


def _padding_arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 1, 2), np.float32), np.full((n, 1), PAD_LABEL, np.float32)


def _joined(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.ascontiguousarray(np.concatenate([c for c, _ in parts], axis=1), dtype=np.float32),
            np.ascontiguousarray(np.concatenate([lab for _, lab in parts], axis=1), dtype=np.float32))


def prompt_arrays(prompts: Sequence[Prompt], original_size: tuple[int, int],
                  img_size: SizeOrSpec) -> tuple[np.ndarray, np.ndarray]:
    """SAM 1: prompts of one signature -> (B x P' x 2 float32 coords in the model frame, B x P' float32 labels).

    Points first, then the box's two corners (labels 2, 3); point-only prompts get PromptEncoder's
    padding point (0, 0) with label -1 (P' = P + 1), box prompts none.
    """
    first = prompts[0]
    parts = [_click_arrays(prompts, original_size, img_size)] if first.point_coords is not None else []
    has_box = first.box is not None
    parts.append(_corner_arrays(prompts, original_size, img_size) if has_box else _padding_arrays(len(prompts)))
    return _joined(parts)


def sam2_prompt_arrays(prompts: Sequence[Prompt], original_size: tuple[int, int],
                       img_size: SizeOrSpec) -> tuple[np.ndarray, np.ndarray]:
    """SAM 2: as :func:`prompt_arrays`, but the box corners come first and every prompt ends with the padding
    point (what ``Sam2Model.prompt_embeddings`` and the official prompt encoder build)."""
    first = prompts[0]
    parts = [_corner_arrays(prompts, original_size, img_size)] if first.box is not None else []
    if first.point_coords is not None:
        parts.append(_click_arrays(prompts, original_size, img_size))
    parts.append(_padding_arrays(len(prompts)))
    return _joined(parts)


def _first_mask(low_res: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return low_res[:, 0:1], iou[:, 0:1]


def _require_sam2(net: SegmentationModel, purpose: str) -> Sam2Model:
    if not isinstance(net, Sam2Model):
        raise InvalidInput(f"{purpose} of the sam2 family needs a Sam2Model, not {type(net).__name__}", field="model")
    return net


def _sam2_single_mask(net: SegmentationModel) -> SingleMask:
    """The official decoder's single-mask choice, applied to the graph's outputs."""
    decoder = _require_sam2(net, "ONNX decoder export").sam_mask_decoder
    if not decoder.dynamic_multimask_via_stability:
        return _first_mask

    def choose(low_res: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, scores = decoder._dynamic_multimask_via_stability(torch.from_numpy(low_res), torch.from_numpy(iou))
        return logits.numpy(), scores.numpy()

    return choose


@dataclass(frozen=True)
class DecoderExport:
    """One family's decoder export: ``graph`` builds the traceable module over a model's own modules;
    ``feature_inputs`` pairs each feature level with its graph input name (graph input order);
    ``prompt_arrays`` lays prompts of one signature out as the graph's points; ``single_mask`` gives the
    function choosing the single-mask decode from all tokens."""

    graph: Callable[[SegmentationModel], nn.Module]
    feature_inputs: tuple[tuple[str, str], ...]
    prompt_arrays: Callable[[Sequence[Prompt], tuple[int, int], SizeOrSpec], tuple[np.ndarray, np.ndarray]]
    single_mask: Callable[[SegmentationModel], SingleMask]

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*(name for _, name in self.feature_inputs), *PROMPT_INPUTS)


DECODER_EXPORTS: dict[str, DecoderExport] = {
    "sam1": DecoderExport(graph=lambda net: DecoderGraph(require_sam1(net, "ONNX decoder export")),
                          feature_inputs=(("image_embed", "image_embeddings"),), prompt_arrays=prompt_arrays,
                          single_mask=lambda net: _first_mask),
    "sam2": DecoderExport(graph=lambda net: Sam2DecoderGraph(_require_sam2(net, "ONNX decoder export")),
                          feature_inputs=tuple((name, name) for name in (EMBED, HIGH_RES_S0, HIGH_RES_S1)),
                          prompt_arrays=sam2_prompt_arrays, single_mask=_sam2_single_mask),
}


def decoder_export(model: LoadedModel) -> DecoderExport:
    """The :class:`DecoderExport` of ``model``'s family; InvalidInput (field ``model``) when it has none."""
    export = DECODER_EXPORTS.get(model.spec.family)
    if export is None:
        raise InvalidInput(f"no ONNX decoder export for the {model.spec.family!r} family "
                           f"(have: {', '.join(DECODER_EXPORTS)})", field="model")
    return export
