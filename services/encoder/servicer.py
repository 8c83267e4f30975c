"""gRPC servicer of ``sam.v1.EncoderService``: decode the request, call the engine once, encode the reply.

It exists once the engine has loaded; until then :func:`services.common.server.serve` answers UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc

from services._generated.sam.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.embedding_codec import embedding_chunks, embedding_info
from services.common.interceptors import resolve_tenant
from services.common.server import GrpcService
from services.common.tiling import TilingRequest

from .engine import EmbeddingEngine

SERVICE = GrpcService(encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,  # sam.v1.EncoderService
                      encoder_pb2_grpc.add_EncoderServiceServicer_to_server)


class EncoderService(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    def Embed(self, request: encoder_pb2.EmbedRequest, context: grpc.ServicerContext) -> encoder_pb2.EmbedResponse:
        tenant = resolve_tenant(request.tenant)
        tiling = None
        if request.HasField("tiling") and request.tiling.enabled:
            tiling = TilingRequest(tile_size=request.tiling.tile_size, overlap=request.tiling.overlap)
        result = self.engine.embed(tenant, request.image, adapter=request.adapter.ref, tiling=tiling,
                                   is_active=context.is_active, time_remaining=context.time_remaining())
        return encoder_pb2.EmbedResponse(embedding=embedding_info(result.key, result.value), cached=result.cached,
                                         encode_ms=result.encode_ms)

    def GetEmbedding(self, request: encoder_pb2.GetEmbeddingRequest,
                     context: grpc.ServicerContext) -> Iterator[encoder_pb2.EmbeddingChunk]:
        tenant = resolve_tenant(request.tenant)
        value = self.engine.get(tenant, request.key)
        yield from embedding_chunks(request.key, value)

    def Stats(self, request: encoder_pb2.StatsRequest, context: grpc.ServicerContext) -> encoder_pb2.StatsResponse:
        tenant = resolve_tenant(request.tenant)
        return encoder_pb2.StatsResponse(**dataclasses.asdict(self.engine.stats(tenant)))
