"""Protobuf <-> engine types for ``sam.v1.DecoderService`` (the only decoder module besides the servicer
that knows protobuf).

Prompts are converted lazily (:class:`ProtoPrompts`), so the engine rejects an oversized request by its
length before converting a single prompt. A ``mask_input`` Tensor must be float32 with ``data`` holding
exactly ``prod(shape)`` little-endian values; its shape is then checked by the prompt validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np

from sam_core.errors import InvalidMaskInput
from sam_core.inference.automatic import EverythingOptions
from sam_core.inference.prompts import Prompt
from services._generated.sam.v1 import common_pb2, decoder_pb2
from services.common.tiling import TilingRequest

from .engine import EverythingResult, SegmentResult
from .masks import MaskOut

ENCODING_NAMES: dict[int, str] = {
    decoder_pb2.MASK_ENCODING_UNSPECIFIED: "rle",
    decoder_pb2.MASK_ENCODING_RLE: "rle",
    decoder_pb2.MASK_ENCODING_PNG: "png",
    decoder_pb2.MASK_ENCODING_POLYGONS: "polygons",
    decoder_pb2.MASK_ENCODING_NONE: "none",
}
_MAX_MASK_VALUES = 4096 * 4096


def encoding_name(value: int) -> str:
    """The engine's encoding name; an enum value this server does not know passes through as "enum <n>"."""
    return ENCODING_NAMES.get(value, f"enum {value}")


def prompt_from_proto(message: decoder_pb2.Prompt, field: str) -> Prompt:
    box = None
    if message.HasField("box"):
        b = message.box
        box = np.array([b.x0, b.y0, b.x1, b.y1], dtype=np.float64)
    coords = labels = None
    if len(message.points):
        coords = np.array([[p.x, p.y] for p in message.points], dtype=np.float64)
        labels = np.array([p.label for p in message.points], dtype=np.int64)
    mask = None
    if message.HasField("mask_input"):
        mask = tensor_to_array(message.mask_input, f"{field}.mask_input")
    return Prompt(box=box, point_coords=coords, point_labels=labels, mask_input=mask)


def tensor_to_array(tensor: common_pb2.Tensor, field: str) -> np.ndarray:
    """A float32 Tensor -> numpy array of its shape (InvalidMaskInput naming ``field`` otherwise)."""
    if tensor.dtype != "float32":
        raise InvalidMaskInput(f"dtype must be float32, got {tensor.dtype!r}", field=field)
    shape = tuple(int(v) for v in tensor.shape)
    if not shape or min(shape) < 1 or int(np.prod(shape, dtype=np.float64)) > _MAX_MASK_VALUES:
        raise InvalidMaskInput(f"bad shape {list(shape)}", field=field)
    if len(tensor.data) != 4 * int(np.prod(shape)):
        raise InvalidMaskInput(f"data holds {len(tensor.data)} bytes, shape {list(shape)} needs "
                               f"{4 * int(np.prod(shape))}", field=field)
    return np.frombuffer(tensor.data, dtype="<f4").astype(np.float32).reshape(shape)


class ProtoPrompts(Sequence[Prompt]):
    """A read-only sequence of the request's prompts, each converted when first read."""

    def __init__(self, messages: Sequence[decoder_pb2.Prompt]) -> None:
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> Prompt: ...

    @overload
    def __getitem__(self, index: slice) -> list[Prompt]: ...

    def __getitem__(self, index: int | slice) -> Prompt | list[Prompt]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return prompt_from_proto(self._messages[index], f"prompts[{index}]")


def tiling_from_proto(has_tiling: bool, options: common_pb2.TilingOptions) -> TilingRequest | None:
    if not has_tiling or not options.enabled:
        return None
    return TilingRequest(tile_size=options.tile_size, overlap=options.overlap)


def everything_options(request: decoder_pb2.SegmentEverythingRequest) -> EverythingOptions:
    return EverythingOptions(points_per_side=request.points_per_side, pred_iou_thresh=request.pred_iou_thresh,
                             stability_score_thresh=request.stability_score_thresh,
                             box_nms_thresh=request.box_nms_thresh, min_mask_area=request.min_mask_area,
                             max_masks=request.max_masks)


def tensor_message(array: np.ndarray) -> common_pb2.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return common_pb2.Tensor(dtype="float32", shape=list(data.shape), data=data.tobytes())


def mask_message(mask: MaskOut) -> decoder_pb2.Mask:
    return decoder_pb2.Mask(
        iou_score=mask.iou_score, stability_score=mask.stability_score, area=mask.area,
        bbox=list(mask.bbox) if mask.bbox is not None else [], rle_counts=mask.rle_counts, png=mask.png,
        polygons=[decoder_pb2.Polygon(xy=polygon) for polygon in mask.polygons])


def segment_response(result: SegmentResult) -> decoder_pb2.SegmentResponse:
    results = []
    for output in result.results:
        message = decoder_pb2.PromptResult(masks=[mask_message(m) for m in output.masks])
        if output.low_res_logits is not None:
            message.low_res_logits.CopyFrom(tensor_message(output.low_res_logits))
        results.append(message)
    return decoder_pb2.SegmentResponse(
        results=results, image_size=list(result.image_size), embedding_key=result.embedding_key,
        model_id=result.model_id, adapter=result.adapter, re_embedded=result.re_embedded, decode_ms=result.decode_ms)


def everything_response(result: EverythingResult) -> decoder_pb2.SegmentEverythingResponse:
    return decoder_pb2.SegmentEverythingResponse(masks=[mask_message(m) for m in result.masks],
                                                 image_size=list(result.image_size),
                                                 embedding_key=result.embedding_key, decode_ms=result.decode_ms)
