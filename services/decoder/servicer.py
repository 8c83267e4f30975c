"""gRPC servicer of ``sam.v1.DecoderService``: decode the request, call the engine once, encode the reply."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from sam_core.errors import Unavailable
from services._generated.sam.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.interceptors import resolve_tenant

from . import codec
from .embeddings import CallOptions
from .encoder_client import FORWARDED_METADATA
from .engine import DecoderEngine

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name  # "sam.v1.DecoderService"


def call_options(context: grpc.ServicerContext) -> CallOptions:
    """The caller's ``authorization`` metadata and remaining deadline, forwarded to the encoder."""
    metadata = tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k.lower() in FORWARDED_METADATA)
    return CallOptions(metadata=metadata, time_remaining=context.time_remaining)


class DecoderService(decoder_pb2_grpc.DecoderServiceServicer):
    """Registered before the weights load; calls fail UNAVAILABLE until :meth:`attach` gives it the engine."""

    def __init__(self, engine: DecoderEngine | None = None) -> None:
        self._engine = engine

    def attach(self, engine: DecoderEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> DecoderEngine:
        if self._engine is None:
            raise Unavailable("the decoder is still loading its model")
        return self._engine

    def Segment(self, request: decoder_pb2.SegmentRequest,
                context: grpc.ServicerContext) -> decoder_pb2.SegmentResponse:
        tenant = resolve_tenant(request.tenant)
        result = self.engine.segment(
            tenant, prompts=codec.ProtoPrompts(request.prompts), image=request.image,
            embedding_key=request.embedding_key, multimask=request.multimask, adapter=request.adapter.ref,
            threshold=request.threshold, tiling=codec.tiling_from_proto(request.HasField("tiling"), request.tiling),
            want_low_res=request.return_low_res_logits, encoding=codec.encoding_name(request.encoding),
            call=call_options(context))
        return codec.segment_response(result)

    def SegmentEverything(self, request: decoder_pb2.SegmentEverythingRequest,
                          context: grpc.ServicerContext) -> decoder_pb2.SegmentEverythingResponse:
        tenant = resolve_tenant(request.tenant)
        result = self.engine.segment_everything(
            tenant, image=request.image, embedding_key=request.embedding_key, adapter=request.adapter.ref,
            options=codec.everything_options(request), encoding=codec.encoding_name(request.encoding),
            call=call_options(context))
        return codec.everything_response(result)


def register(service: DecoderService) -> Callable[[grpc.Server], list[str]]:
    """A ``build_server`` register callback adding ``service``; returns the full service names."""

    def add(server: grpc.Server) -> list[str]:
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(service, server)
        return [SERVICE_NAME]

    return add
