"""The status table both ways: typed error -> code (server interceptor) -> typed error (the decoder's encoder client).

The wire test runs a real gRPC server with the real :class:`ErrorInterceptor` whose servicer raises each typed
error of the table, and calls it through the decoder's real :class:`EncoderClient`: every entry must come back
as an error the table maps to the same code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from sam_core import errors
from services._generated.sam.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.interceptors import ErrorInterceptor
from services.common.status import ERROR_OF, SERVICE_STATUS_OF, error_for, status_for
from services.decoder.embeddings import CallOptions
from services.decoder.encoder_client import EncoderClient, EncoderFailed, channel_options

KINDS = [kind for kind, _ in SERVICE_STATUS_OF]
# codes gRPC also produces by itself: the client words these errors itself (unreachable, whose deadline)
TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_every_code_of_the_table_has_exactly_one_inverse_that_maps_back():
    assert set(ERROR_OF) == {code for _, code in SERVICE_STATUS_OF}
    for kind, code in SERVICE_STATUS_OF:
        inverse = error_for(code)
        assert inverse is not None and status_for(inverse("x")) == code
        assert status_for(kind("x")) == code
    assert error_for(grpc.StatusCode.FAILED_PRECONDITION) is errors.AdapterInvalid  # listed before ModelLoadError
    assert error_for(grpc.StatusCode.INTERNAL) is None and error_for(grpc.StatusCode.UNIMPLEMENTED) is None


class RaisingEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    """GetEmbedding raises ``KINDS[int(tenant)]``; tenant "internal" raises an untyped error."""

    def GetEmbedding(self, request: encoder_pb2.GetEmbeddingRequest,
                     context: grpc.ServicerContext) -> Iterator[encoder_pb2.EmbeddingChunk]:
        if request.tenant == "internal":
            raise RuntimeError("a bug")
        raise KINDS[int(request.tenant)](f"from the encoder #{request.tenant}", field="key")
        yield encoder_pb2.EmbeddingChunk()  # a server-streaming method: this function is a generator


@pytest.fixture(scope="module")
def client() -> Iterator[EncoderClient]:
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[ErrorInterceptor()])
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(RaisingEncoder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    encoder = EncoderClient(grpc.insecure_channel(address, options=channel_options(4 << 20)), 30.0, address=address)
    try:
        yield encoder
    finally:
        encoder.close()
        server.stop(0).wait()


@pytest.mark.parametrize(("index", "code"), [(i, code) for i, (_, code) in enumerate(SERVICE_STATUS_OF)],
                         ids=[kind.__name__ for kind in KINDS])
def test_every_typed_error_round_trips_through_the_wire(client, index, code):
    """The caller's deadline (10 s) limits the call, so DEADLINE_EXCEEDED is the caller's (Cancelled)."""
    with pytest.raises(errors.SamforgeError) as info:
        client.get(str(index), "0" * 64, call=CallOptions(time_remaining=lambda: 10.0))
    assert status_for(info.value) == code and type(info.value) is error_for(code)
    if code not in TRANSPORT_CODES:
        assert f"from the encoder #{index}" in str(info.value)  # the encoder's message is kept


def test_an_untyped_encoder_failure_stays_internal(client):
    with pytest.raises(EncoderFailed):
        client.get("internal", "0" * 64, call=CallOptions())


@pytest.mark.parametrize("tenant", ["../escape", "Alice", "a/b", "index.json"])
def test_tokens_file_refuses_invalid_tenant_names(tmp_path, tenant):
    from sam_core.errors import InvalidInput
    from services.common.interceptors import load_tokens

    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"secret-token-1": "alice", "secret-token-2": tenant}))
    with pytest.raises(InvalidInput) as err:
        load_tokens(str(path))
    assert err.value.field == "SAMFORGE_AUTH_TOKENS_FILE" and "entry 2" in str(err.value)
    assert "secret-token" not in str(err.value)  # the message never shows a token
    path.write_text(json.dumps({"secret-token-1": "alice", "secret-token-2": "bob"}))
    assert load_tokens(str(path)) == {"secret-token-1": "alice", "secret-token-2": "bob"}
