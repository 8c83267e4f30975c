"""Server bootstrap shared by the three services.

``build_server`` creates a gRPC server with the interceptors (metrics -> auth -> errors), standard
``grpc.health.v1`` health (NOT_SERVING until the caller marks it ready) and server reflection, optional
TLS, and a Prometheus ``/metrics`` HTTP endpoint. ``run_until_signal`` implements graceful shutdown:
on SIGTERM/SIGINT health turns NOT_SERVING, the server stops accepting, in-flight calls get
``grace_seconds`` to finish, then the process exits.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, load_tokens
from .settings import CommonSettings

log = logging.getLogger("samforge.server")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@dataclass
class Server:
    grpc_server: grpc.Server
    health: health.HealthServicer
    port: int
    metrics_port: int
    service_names: tuple[str, ...]
    settings: CommonSettings
    stopping: threading.Event

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, wait up to ``grace`` seconds for in-flight calls."""
        self.set_serving(False)
        event = self.grpc_server.stop(self.settings.grace_seconds if grace is None else grace)
        event.wait()


def build_server(settings: CommonSettings, register: Callable[[grpc.Server], Iterable[str]], *,
                 start_metrics: bool = True) -> Server:
    """Create, register servicers (``register`` returns their full service names) and start the server."""
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor()]
    if settings.auth_tokens_file:
        interceptors.append(AuthInterceptor(load_tokens(settings.auth_tokens_file)))
    interceptors.append(ErrorInterceptor())
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers), interceptors=interceptors,
                         options=options)
    names = tuple(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    metrics_port = 0
    if start_metrics and settings.metrics_port >= 0:
        from prometheus_client import start_http_server

        httpd, _ = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = httpd.server_port
    result = Server(server, health_servicer, port, metrics_port, names, settings, _signal_event())
    result.set_serving(False)
    server.start()
    log.info("listening on %s:%d (metrics %d, tls=%s, auth=%s)", settings.host, port, metrics_port,
             bool(settings.tls_cert), bool(settings.auth_tokens_file))
    return result


def _signal_event() -> threading.Event:
    """An event set by SIGTERM/SIGINT, installed as soon as the server exists (so a SIGTERM during the
    model load is honoured once loading ends instead of killing the process mid-way)."""
    stopping = threading.Event()

    def handle(signum, frame):  # noqa: ARG001
        log.info("signal %d: NOT_SERVING, draining", signum)
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
    return stopping


def run_until_signal(server: Server, on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT, then drain and stop (graceful shutdown)."""
    while not server.stopping.wait(0.5):
        pass
    started = time.monotonic()
    server.stop()
    if on_stop:
        on_stop()
    log.info("stopped after %.2fs", time.monotonic() - started)


def exit_now(code: int) -> None:
    """Flush logs and stdio, then leave without interpreter teardown.

    Call it after everything is closed (gRPC server, threads, clients): with torch loaded the normal
    teardown of modules takes seconds (5-7 s measured on a loaded 2-core machine) that would come out
    of the pod's termination grace period.
    """
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
