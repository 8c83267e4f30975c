"""gRPC servicer of ``sam.v1.EncoderService``: decode the request, call the engine once, encode the reply."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grpc

from sam_core.errors import Unavailable
from services._generated.sam.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.embedding_codec import embedding_chunks, embedding_info
from services.common.interceptors import resolve_tenant
from services.common.tiling import TilingRequest

from .engine import EmbeddingEngine

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name  # "sam.v1.EncoderService"


class EncoderService(encoder_pb2_grpc.EncoderServiceServicer):
    """Registered before the weights load; calls fail UNAVAILABLE until :meth:`attach` gives it the engine."""

    def __init__(self, engine: EmbeddingEngine | None = None) -> None:
        self._engine = engine

    def attach(self, engine: EmbeddingEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> EmbeddingEngine:
        if self._engine is None:
            raise Unavailable("the encoder is still loading its model")
        return self._engine

    def Embed(self, request: encoder_pb2.EmbedRequest, context: grpc.ServicerContext) -> encoder_pb2.EmbedResponse:
        tenant = resolve_tenant(request.tenant)
        tiling = None
        if request.HasField("tiling") and request.tiling.enabled:
            tiling = TilingRequest(tile_size=request.tiling.tile_size, overlap=request.tiling.overlap)
        result = self.engine.embed(tenant, request.image, adapter=request.adapter.ref, tiling=tiling,
                                   is_active=context.is_active)
        return encoder_pb2.EmbedResponse(embedding=embedding_info(result.key, result.value), cached=result.cached,
                                         encode_ms=result.encode_ms)

    def GetEmbedding(self, request: encoder_pb2.GetEmbeddingRequest,
                     context: grpc.ServicerContext) -> Iterator[encoder_pb2.EmbeddingChunk]:
        tenant = resolve_tenant(request.tenant)
        value = self.engine.get(tenant, request.key)
        yield from embedding_chunks(request.key, value)

    def Stats(self, request: encoder_pb2.StatsRequest, context: grpc.ServicerContext) -> encoder_pb2.StatsResponse:
        return encoder_pb2.StatsResponse(**dataclasses.asdict(self.engine.stats()))


def register(service: EncoderService) -> Callable[[grpc.Server], list[str]]:
    """A ``build_server`` register callback adding ``service``; returns the full service names."""

    def add(server: grpc.Server) -> list[str]:
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(service, server)
        return [SERVICE_NAME]

    return add
