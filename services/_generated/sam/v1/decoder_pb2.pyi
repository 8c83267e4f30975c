from services._generated.sam.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_ENCODING_RLE: _ClassVar[MaskEncoding]
    MASK_ENCODING_PNG: _ClassVar[MaskEncoding]
    MASK_ENCODING_POLYGONS: _ClassVar[MaskEncoding]
    MASK_ENCODING_NONE: _ClassVar[MaskEncoding]
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_ENCODING_RLE: MaskEncoding
MASK_ENCODING_PNG: MaskEncoding
MASK_ENCODING_POLYGONS: MaskEncoding
MASK_ENCODING_NONE: MaskEncoding

class Point(_message.Message):
    __slots__ = ("x", "y", "label")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    label: int
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., label: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("box", "points", "mask_input")
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_FIELD_NUMBER: _ClassVar[int]
    box: Box
    points: _containers.RepeatedCompositeFieldContainer[Point]
    mask_input: _common_pb2.Tensor
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., mask_input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "embedding_key", "tenant", "prompts", "multimask", "adapter", "encoding", "threshold", "return_low_res_logits", "tiling")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MULTIMASK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOW_RES_LOGITS_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding_key: str
    tenant: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    multimask: bool
    adapter: _common_pb2.AdapterRef
    encoding: MaskEncoding
    threshold: float
    return_low_res_logits: bool
    tiling: _common_pb2.TilingOptions
    def __init__(self, image: _Optional[bytes] = ..., embedding_key: _Optional[str] = ..., tenant: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., multimask: _Optional[bool] = ..., adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ..., encoding: _Optional[_Union[MaskEncoding, str]] = ..., threshold: _Optional[float] = ..., return_low_res_logits: _Optional[bool] = ..., tiling: _Optional[_Union[_common_pb2.TilingOptions, _Mapping]] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("xy",)
    XY_FIELD_NUMBER: _ClassVar[int]
    xy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, xy: _Optional[_Iterable[float]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("iou_score", "stability_score", "area", "bbox", "rle_counts", "png", "polygons")
    IOU_SCORE_FIELD_NUMBER: _ClassVar[int]
    STABILITY_SCORE_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    RLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    iou_score: float
    stability_score: float
    area: int
    bbox: _containers.RepeatedScalarFieldContainer[int]
    rle_counts: str
    png: bytes
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    def __init__(self, iou_score: _Optional[float] = ..., stability_score: _Optional[float] = ..., area: _Optional[int] = ..., bbox: _Optional[_Iterable[int]] = ..., rle_counts: _Optional[str] = ..., png: _Optional[bytes] = ..., polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("masks", "low_res_logits")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    LOW_RES_LOGITS_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    low_res_logits: _common_pb2.Tensor
    def __init__(self, masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., low_res_logits: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("results", "image_size", "embedding_key", "model_id", "adapter", "re_embedded", "decode_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RE_EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PromptResult]
    image_size: _containers.RepeatedScalarFieldContainer[int]
    embedding_key: str
    model_id: str
    adapter: str
    re_embedded: bool
    decode_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ..., image_size: _Optional[_Iterable[int]] = ..., embedding_key: _Optional[str] = ..., model_id: _Optional[str] = ..., adapter: _Optional[str] = ..., re_embedded: _Optional[bool] = ..., decode_ms: _Optional[float] = ...) -> None: ...

class SegmentEverythingRequest(_message.Message):
    __slots__ = ("image", "embedding_key", "tenant", "adapter", "points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "min_mask_area", "encoding", "max_masks")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    POINTS_PER_SIDE_FIELD_NUMBER: _ClassVar[int]
    PRED_IOU_THRESH_FIELD_NUMBER: _ClassVar[int]
    STABILITY_SCORE_THRESH_FIELD_NUMBER: _ClassVar[int]
    BOX_NMS_THRESH_FIELD_NUMBER: _ClassVar[int]
    MIN_MASK_AREA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MAX_MASKS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding_key: str
    tenant: str
    adapter: _common_pb2.AdapterRef
    points_per_side: int
    pred_iou_thresh: float
    stability_score_thresh: float
    box_nms_thresh: float
    min_mask_area: int
    encoding: MaskEncoding
    max_masks: int
    def __init__(self, image: _Optional[bytes] = ..., embedding_key: _Optional[str] = ..., tenant: _Optional[str] = ..., adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ..., points_per_side: _Optional[int] = ..., pred_iou_thresh: _Optional[float] = ..., stability_score_thresh: _Optional[float] = ..., box_nms_thresh: _Optional[float] = ..., min_mask_area: _Optional[int] = ..., encoding: _Optional[_Union[MaskEncoding, str]] = ..., max_masks: _Optional[int] = ...) -> None: ...

class SegmentEverythingResponse(_message.Message):
    __slots__ = ("masks", "image_size", "embedding_key", "decode_ms")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    image_size: _containers.RepeatedScalarFieldContainer[int]
    embedding_key: str
    decode_ms: float
    def __init__(self, masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., image_size: _Optional[_Iterable[int]] = ..., embedding_key: _Optional[str] = ..., decode_ms: _Optional[float] = ...) -> None: ...
