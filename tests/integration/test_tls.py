"""TLS: an encoder started with SAMFORGE_TLS_CERT/KEY serves only TLS clients that trust its certificate."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from services._generated.sam.v1 import encoder_pb2, encoder_pb2_grpc

from .conftest import start_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "tls.key", folder / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def test_tls_only(certificate, tmp_path):
    key, cert = certificate
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    service = start_service("encoder", {"SAMFORGE_MODEL": "tiny", "SAMFORGE_TLS_CERT": str(cert),
                                        "SAMFORGE_TLS_KEY": str(key), "SAMFORGE_REGISTRY_DIR": str(tmp_path / "reg")},
                            tmp_path, credentials=credentials)
    try:
        with grpc.secure_channel(service.address, credentials) as channel:
            stats = encoder_pb2_grpc.EncoderServiceStub(channel).Stats(encoder_pb2.StatsRequest(), timeout=10)
            assert stats.model_id.startswith("tiny-")
        with grpc.insecure_channel(service.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                encoder_pb2_grpc.EncoderServiceStub(channel).Stats(encoder_pb2.StatsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert service.stop() == 0
