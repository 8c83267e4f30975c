"""A real S3 API server for tests: moto's ThreadedMotoServer on a free loopback port, a fresh bucket per test.

moto 5 evaluates ``If-Match`` / ``If-None-Match`` on PutObject (412 PreconditionFailed), but checks the
condition and writes the object in two steps without a lock, while its HTTP server handles requests on
several threads. S3 (and MinIO) evaluate the condition atomically with the write; :func:`start` restores
that guarantee by serialising moto's PutObject handler, so concurrency tests exercise the store, not a
check-then-write race in the test server.
"""

from __future__ import annotations

import functools
import threading
import uuid
from dataclasses import dataclass
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    server: Any

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        bucket = f"samforge-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def env(self, url: str) -> dict[str, str]:
        """The environment a service process needs to use ``url`` on this server."""
        return {**CREDENTIALS, "SAMFORGE_REGISTRY_URL": url, "SAMFORGE_S3_ENDPOINT_URL": self.endpoint}


def _atomic_conditional_puts() -> None:
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_samforge_serialised", False):
        return
    original = S3Response.put_object
    lock = threading.Lock()

    @functools.wraps(original)
    def put_object(self: Any) -> Any:
        with lock:
            return original(self)

    put_object._samforge_serialised = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def start() -> S3Server:
    from moto.server import ThreadedMotoServer

    _atomic_conditional_puts()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(f"http://{host}:{port}", server)
