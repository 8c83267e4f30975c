from services._generated.sam.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("image", "tenant", "adapter", "tiling")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tenant: str
    adapter: _common_pb2.AdapterRef
    tiling: _common_pb2.TilingOptions
    def __init__(self, image: _Optional[bytes] = ..., tenant: _Optional[str] = ..., adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ..., tiling: _Optional[_Union[_common_pb2.TilingOptions, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embedding", "cached", "encode_ms")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.EmbeddingInfo
    cached: bool
    encode_ms: float
    def __init__(self, embedding: _Optional[_Union[_common_pb2.EmbeddingInfo, _Mapping]] = ..., cached: _Optional[bool] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class GetEmbeddingRequest(_message.Message):
    __slots__ = ("key", "tenant")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    key: str
    tenant: str
    def __init__(self, key: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("info", "dtype", "total_bytes", "tile_origins", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TILE_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.EmbeddingInfo
    dtype: str
    total_bytes: int
    tile_origins: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, info: _Optional[_Union[_common_pb2.EmbeddingInfo, _Mapping]] = ..., dtype: _Optional[str] = ..., total_bytes: _Optional[int] = ..., tile_origins: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("cache_entries", "cache_bytes", "cache_budget_bytes", "hits", "misses", "evictions", "encodes", "queue_depth", "model_id", "device", "loaded_adapters", "l2_hits")
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    L2_HITS_FIELD_NUMBER: _ClassVar[int]
    cache_entries: int
    cache_bytes: int
    cache_budget_bytes: int
    hits: int
    misses: int
    evictions: int
    encodes: int
    queue_depth: int
    model_id: str
    device: str
    loaded_adapters: _containers.RepeatedScalarFieldContainer[str]
    l2_hits: int
    def __init__(self, cache_entries: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_budget_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., encodes: _Optional[int] = ..., queue_depth: _Optional[int] = ..., model_id: _Optional[str] = ..., device: _Optional[str] = ..., loaded_adapters: _Optional[_Iterable[str]] = ..., l2_hits: _Optional[int] = ...) -> None: ...
