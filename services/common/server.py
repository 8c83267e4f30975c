"""Server bootstrap shared by the three services: :func:`serve` is every service's process.

``serve(service, read_settings, services, load)``, the same for the encoder, decoder and trainer:

1. settings from the environment; a bad value logs one line naming the variable and returns exit status 2
   (before ``services`` and ``load`` import the service's modules, so a misconfigured process fails in a
   fraction of a second, without importing torch);
2. the gRPC server starts (:func:`build_server`: interceptors metrics -> auth -> errors, ``grpc.health.v1``,
   reflection, optional TLS, Prometheus ``/metrics``) with a :class:`PendingServicer` registered for each
   service: health answers NOT_SERVING and calls fail UNAVAILABLE while ``load`` builds the real servicers
   (model weights, engines); a failed load logs why and returns exit status 1;
3. the servicers are attached and health turns SERVING;
4. SIGTERM/SIGINT (:func:`run_until_signal`): health turns NOT_SERVING, the server stops accepting,
   in-flight calls get ``SAMFORGE_GRACE_SECONDS`` to finish, then ``Loaded.close`` runs; exit status 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sam_core.errors import SamforgeError, Unavailable

from .interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, load_tokens
from .settings import CommonSettings

log = logging.getLogger("samforge.server")
SettingsT = TypeVar("SettingsT", bound=CommonSettings)
RpcMethod = Callable[[Any, grpc.ServicerContext], Any]


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

    def handle(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
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
    teardown of modules takes seconds that would come out of the pod's termination grace period.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------- serve()
@dataclass(frozen=True)
class GrpcService:
    """A gRPC service a process serves: its full name and the generated ``add_<Name>Servicer_to_server``."""

    name: str
    add_to_server: Callable[[Any, grpc.Server], None]


@dataclass(frozen=True)
class Loaded:
    """What a service's loader built: the servicer of each :class:`GrpcService` (by full name), the model it
    serves (for the log) and what to close once the server has drained (engines, threads, channels)."""

    servicers: Mapping[str, object]
    model_id: str
    close: Callable[[], None]


class PendingServicer:
    """Registered in place of a servicer before the model loads: each RPC method fails UNAVAILABLE until
    :meth:`attach` gives it the real servicer, then calls the real servicer's method of the same name."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self._servicer: object | None = None

    def attach(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, method: str) -> RpcMethod:
        """The handler gRPC registers for RPC ``method`` (looked up once, when the service is added)."""
        if method.startswith("_"):
            raise AttributeError(method)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            servicer = self._servicer
            if servicer is None:
                raise Unavailable(f"{self.service_name} is still loading its model; retry shortly")
            return getattr(servicer, method)(request, context)

        return call


def serve(service: str, read_settings: Callable[[], SettingsT], services: Callable[[], Sequence[GrpcService]],
          load: Callable[[SettingsT], Loaded]) -> int:
    """Run one service process (see the module docstring); returns the exit status (0, 1 or 2)."""
    try:
        settings = read_settings()
    except SamforgeError as exc:
        setup_logging("INFO")
        log.error("%s: bad setting %s", service, exc)
        return 2
    setup_logging(settings.log_level)
    if settings.threads > 0:
        import torch

        torch.set_num_threads(settings.threads)
    pending: dict[str, PendingServicer] = {}
    try:
        server = build_server(settings, _register(services, pending))
    except SamforgeError as exc:  # a setting's file holds something invalid (e.g. a tenant name in the tokens)
        log.error("%s: bad setting %s", service, exc)
        return 2
    except (OSError, ValueError) as exc:  # port taken, unreadable TLS or token files
        log.error("cannot start the %s: %s", service, exc)
        return 1
    loaded = _load(service, settings, load, server)
    if loaded is None:
        return 1
    for name, servicer in pending.items():
        servicer.attach(loaded.servicers[name])
    if not server.stopping.is_set():
        server.set_serving(True)
        log.info("SERVING %s on port %d (%s)", service, server.port, loaded.model_id)
    run_until_signal(server, on_stop=loaded.close)
    return 0


def _register(services: Callable[[], Sequence[GrpcService]],
              pending: dict[str, PendingServicer]) -> Callable[[grpc.Server], list[str]]:
    """Register a :class:`PendingServicer` (kept in ``pending``) for each of ``services()``: called by
    :func:`build_server` after the settings' files (tokens, TLS) are read."""
    def add(server: grpc.Server) -> list[str]:
        for grpc_service in services():
            pending[grpc_service.name] = PendingServicer(grpc_service.name)
            grpc_service.add_to_server(pending[grpc_service.name], server)
        return list(pending)

    return add


def _load(service: str, settings: SettingsT, load: Callable[[SettingsT], Loaded], server: Server) -> Loaded | None:
    """``load(settings)``, or None after logging why it failed and stopping ``server``."""
    try:
        loaded = load(settings)
    except SamforgeError as exc:
        log.error("cannot start the %s: %s", service, exc)
    except Exception:  # noqa: BLE001 - a bug while loading: logged with its trace, the process exits 1
        log.exception("cannot start the %s", service)
    else:
        missing = set(server.service_names) - set(loaded.servicers)
        if not missing:
            return loaded
        log.error("cannot start the %s: the loader built no servicer for %s", service, ", ".join(sorted(missing)))
        loaded.close()
    server.stop(0)
    return None
