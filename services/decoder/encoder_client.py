"""The decoder's gRPC client of ``sam.v1.EncoderService`` (an :class:`~services.decoder.embeddings.EmbeddingSource`).

Channel: ``SAMFORGE_ENCODER_ADDRESS`` with the ``dns:///`` scheme added when it has none, and the
``round_robin`` load-balancing policy, so with a headless Kubernetes Service (one A record per encoder pod)
the decoder spreads its calls over every encoder pod instead of pinning one connection. Reconnect backoff
is capped at 2 s so a restarted encoder is used again within ~2 s (gRPC's default cap is 120 s); calls are
fail-fast (no ``wait_for_ready``), so an unreachable encoder is UNAVAILABLE at once instead of at the deadline.

Every call forwards the caller's ``authorization`` metadata (auth works end to end) and has the deadline
``min(SAMFORGE_ENCODER_TIMEOUT_SECONDS, the caller's remaining time)``. Status codes (never message text)
become sam_core's typed errors through :func:`services.common.status.error_for`, the inverse of the table the
encoder's interceptor uses, so the decoder answers with the encoder's code; the encoder's message is kept.
The codes gRPC itself produces for the call (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) are told apart
first: an unreachable encoder, our own deadline and the caller's deadline are different errors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from sam_core.errors import Unavailable
from services._generated.sam.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc
from services.common.embedding_codec import ServedEmbedding, embedding_from_chunks
from services.common.settings import DecoderSettings
from services.common.status import Cancelled, error_for
from services.common.tiling import TilingRequest

from .embeddings import CallOptions, Metadata

log = logging.getLogger("samforge.decoder.encoder_client")
SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")
FORWARDED_METADATA = ("authorization",)
MAX_RECONNECT_BACKOFF_MS = 2000
DNS_MIN_RERESOLUTION_MS = 5000


class EncoderFailed(RuntimeError):
    """The encoder answered with an unexpected status (INTERNAL, UNIMPLEMENTED, ...): INTERNAL here too."""


def channel_target(address: str) -> str:
    """``host:port`` -> ``dns:///host:port``; addresses that already name a resolver scheme are kept."""
    return address if address.startswith(SCHEMES) else f"dns:///{address}"


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RERESOLUTION_MS),
    ]


def open_channel(settings: DecoderSettings) -> grpc.Channel:
    """The channel to the encoder; TLS (trusting ``SAMFORGE_TLS_CERT``) when the services run with TLS."""
    target = channel_target(settings.encoder_address)
    options = channel_options(settings.max_message_bytes)
    if settings.tls_cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_cert).read_bytes())
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


class EncoderClient:
    """``embed`` / ``get`` over a channel to the encoder service (see the module docstring)."""

    def __init__(self, channel: grpc.Channel, timeout_seconds: float, *, address: str = "") -> None:
        self.channel = channel
        self.stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        self.timeout_seconds = float(timeout_seconds)
        self.address = address or "the encoder"

    def embed(self, tenant: str, image: bytes, *, adapter: str, tiling: TilingRequest | None,
              call: CallOptions) -> str:
        request = encoder_pb2.EmbedRequest(image=image, tenant=tenant, adapter=common_pb2.AdapterRef(ref=adapter))
        if tiling is not None:
            request.tiling.CopyFrom(common_pb2.TilingOptions(enabled=True, tile_size=tiling.tile_size,
                                                             overlap=tiling.overlap))
        timeout, caller_limited = self._timeout(call)
        try:
            reply: encoder_pb2.EmbedResponse = self.stub.Embed(request, timeout=timeout, metadata=_forwarded(call))
        except grpc.RpcError as exc:
            raise self._error(exc, "Embed", timeout, caller_limited) from None
        return reply.embedding.key

    def get(self, tenant: str, key: str, *, call: CallOptions) -> ServedEmbedding:
        timeout, caller_limited = self._timeout(call)
        request = encoder_pb2.GetEmbeddingRequest(key=key, tenant=tenant)
        try:
            return embedding_from_chunks(self.stub.GetEmbedding(request, timeout=timeout, metadata=_forwarded(call)))
        except grpc.RpcError as exc:
            raise self._error(exc, "GetEmbedding", timeout, caller_limited) from None

    def close(self) -> None:
        self.channel.close()

    def _timeout(self, call: CallOptions) -> tuple[float, bool]:
        """(deadline in seconds, whether the caller's remaining time is what limits it)."""
        remaining = call.time_remaining()
        if remaining is None or remaining >= self.timeout_seconds:
            return self.timeout_seconds, False
        if remaining <= 0:
            raise Cancelled("the caller's deadline passed before the encoder was called")
        return remaining, True

    def _error(self, exc: grpc.RpcError, method: str, timeout: float, caller_limited: bool) -> Exception:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"the encoder at {self.address} is unreachable ({details}); retry shortly")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if caller_limited:
                return Cancelled(f"the caller's deadline passed while waiting for the encoder's {method}")
            return Unavailable(f"the encoder at {self.address} did not answer {method} within {timeout:.1f}s")
        if code == grpc.StatusCode.CANCELLED:
            return Cancelled(details)
        kind = error_for(code)
        if kind is not None:
            return kind(details)
        log.error("encoder %s failed with %s: %s", method, code.name, details)
        return EncoderFailed(f"encoder {method} failed with {code.name}")


def _forwarded(call: CallOptions) -> Metadata:
    return tuple((k, v) for k, v in call.metadata if k.lower() in FORWARDED_METADATA)
