from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TilingOptions(_message.Message):
    __slots__ = ("enabled", "tile_size", "overlap")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    tile_size: int
    overlap: int
    def __init__(self, enabled: _Optional[bool] = ..., tile_size: _Optional[int] = ..., overlap: _Optional[int] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class EmbeddingInfo(_message.Message):
    __slots__ = ("key", "model_id", "encoder_adapter", "preprocess_version", "feature_shape", "original_size", "input_size", "num_tiles", "nbytes", "levels")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    key: str
    model_id: str
    encoder_adapter: str
    preprocess_version: str
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    original_size: _containers.RepeatedScalarFieldContainer[int]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    num_tiles: int
    nbytes: int
    levels: _containers.RepeatedCompositeFieldContainer[FeatureLevel]
    def __init__(self, key: _Optional[str] = ..., model_id: _Optional[str] = ..., encoder_adapter: _Optional[str] = ..., preprocess_version: _Optional[str] = ..., feature_shape: _Optional[_Iterable[int]] = ..., original_size: _Optional[_Iterable[int]] = ..., input_size: _Optional[_Iterable[int]] = ..., num_tiles: _Optional[int] = ..., nbytes: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[FeatureLevel, _Mapping]]] = ...) -> None: ...

class FeatureLevel(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...
