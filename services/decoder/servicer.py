"""gRPC servicer of ``sam.v1.DecoderService``: decode the request, call the engine once, encode the reply.

It exists once the engine has loaded; until then :func:`services.common.server.serve` answers UNAVAILABLE.
"""

from __future__ import annotations

import grpc

from services._generated.sam.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.interceptors import resolve_tenant
from services.common.server import GrpcService

from . import codec
from .embeddings import CallOptions
from .encoder_client import FORWARDED_METADATA
from .engine import DecoderEngine

SERVICE = GrpcService(decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name,  # sam.v1.DecoderService
                      decoder_pb2_grpc.add_DecoderServiceServicer_to_server)


def call_options(context: grpc.ServicerContext) -> CallOptions:
    """The caller's ``authorization`` metadata and remaining deadline, forwarded to the encoder."""
    metadata = tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k.lower() in FORWARDED_METADATA)
    return CallOptions(metadata=metadata, time_remaining=context.time_remaining)


class DecoderService(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, engine: DecoderEngine) -> None:
        self.engine = engine

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
