"""Server interceptors: typed errors -> status codes, bearer-token auth -> tenant, per-RPC metrics.

All three wrap the method handlers (unary and streaming) in one place so servicers stay thin: a
servicer raises ``sam_core.errors`` types and reads the caller's tenant with :func:`current_tenant`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from sam_core.errors import InvalidInput

from .metrics import RPC_ERRORS, RPC_LATENCY
from .status import PermissionDenied, Unauthenticated, status_for

log = logging.getLogger("samforge.rpc")
_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("samforge_tenant", default=None)
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
# A handler's behaviour function: (request or request iterator, context) -> response or response iterator.
Behaviour = Callable[[Any, grpc.ServicerContext], Any]
# around(behaviour, streaming_response) -> the wrapped behaviour
Around = Callable[[Behaviour, bool], Behaviour]
Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[RequestT, ResponseT] | None"]


def current_tenant() -> str | None:
    """The tenant of the caller's bearer token (None when auth is off)."""
    return _TENANT.get()


def resolve_tenant(requested: str) -> str:
    """The tenant a request acts for: the token's tenant when auth is on (a different non-empty
    ``requested`` tenant is PERMISSION_DENIED), else ``requested`` or "default"."""
    from sam_core.adapters.store import validate_name

    token_tenant = current_tenant()
    if token_tenant is not None:
        if requested and requested != token_tenant:
            raise PermissionDenied(f"token is not valid for tenant {requested!r}", field="tenant")
        return token_tenant
    tenant = requested or "default"
    validate_name("tenant", tenant)
    return tenant


def _wrap(handler: grpc.RpcMethodHandler[RequestT, ResponseT] | None,
          around: Around) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
    """Rebuild ``handler`` with its behaviour function wrapped by ``around(behaviour, streaming_response)``."""
    if handler is None:
        return None
    for kind, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                          ("unary_stream", grpc.unary_stream_rpc_method_handler),
                          ("stream_unary", grpc.stream_unary_rpc_method_handler),
                          ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return factory(around(behaviour, handler.response_streaming),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    return handler


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> NoReturn:
    code = status_for(exc)
    if code is None:
        log.exception("internal error in %s", method)
        RPC_ERRORS.labels(method=method, code="INTERNAL").inc()
        context.abort(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")
    RPC_ERRORS.labels(method=method, code=code.name).inc()
    context.abort(code, str(exc))


def _guarded(guard: Callable[[grpc.ServicerContext], AbstractContextManager[None]]) -> Around:
    """An ``around`` that runs every call (unary, or a response stream to its end) inside ``guard(context)``."""

    def around(behaviour: Behaviour, streaming: bool) -> Behaviour:
        if streaming:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with guard(context):
                    yield from behaviour(request, context)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with guard(context):
                return behaviour(request, context)
        return unary

    return around


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps typed errors to their status code and anything else to a generic INTERNAL (trace logged)."""

    def intercept_service(self, continuation: Continuation[RequestT, ResponseT],
                          handler_call_details: grpc.HandlerCallDetails,
                          ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        method = handler_call_details.method

        @contextmanager
        def statuses(context: grpc.ServicerContext) -> Iterator[None]:
            try:
                yield
            except grpc.RpcError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                _abort_for(exc, context, method)

        return _wrap(continuation(handler_call_details), _guarded(statuses))


def load_tokens(path: str) -> dict[str, str]:
    """{token: tenant} from a JSON file (a mounted Secret in Kubernetes).

    Every tenant must be a valid tenant name (the rules of every other name, see ``validate_name``): a bad
    entry is InvalidInput naming ``SAMFORGE_AUTH_TOKENS_FILE`` and the entry's position (never the token).
    """
    from sam_core.adapters.store import validate_name

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} must hold a JSON object mapping token -> tenant")
    for position, tenant in enumerate(data.values(), start=1):
        try:
            validate_name("tenant", tenant)
        except InvalidInput as exc:
            raise InvalidInput(f"{path}, entry {position}: {exc.detail}", field="SAMFORGE_AUTH_TOKENS_FILE") from exc
    return data


class AuthInterceptor(grpc.ServerInterceptor):
    """``authorization: Bearer <token>`` -> tenant (in a context variable for the call's duration)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = dict(tokens)

    def intercept_service(self, continuation: Continuation[RequestT, ResponseT],
                          handler_call_details: grpc.HandlerCallDetails,
                          ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if method.startswith(PUBLIC_PREFIXES):
            return handler
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        token = ""  # nosec B105  # the empty default when no token is presented, not a credential
        if isinstance(header, str) and header.lower().startswith("bearer "):  # bytes only for "-bin" keys
            token = header[7:].strip()
        tenant = self.tokens.get(token) if token else None

        @contextmanager
        def as_tenant(context: grpc.ServicerContext) -> Iterator[None]:
            if tenant is None:
                RPC_ERRORS.labels(method=method, code="UNAUTHENTICATED").inc()
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
            reset = _TENANT.set(tenant)
            try:
                yield
            finally:
                _TENANT.reset(reset)

        return _wrap(handler, _guarded(as_tenant))


class MetricsInterceptor(grpc.ServerInterceptor):
    """Latency histogram per RPC method (streams: time to the end of the stream)."""

    def intercept_service(self, continuation: Continuation[RequestT, ResponseT],
                          handler_call_details: grpc.HandlerCallDetails,
                          ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        method = handler_call_details.method

        @contextmanager
        def timed(context: grpc.ServicerContext) -> Iterator[None]:
            start = time.perf_counter()
            try:
                yield
            finally:
                RPC_LATENCY.labels(method=method).observe(time.perf_counter() - start)

        return _wrap(continuation(handler_call_details), _guarded(timed))


__all__ = ["AuthInterceptor", "ErrorInterceptor", "MetricsInterceptor", "current_tenant", "load_tokens",
           "resolve_tenant", "Unauthenticated"]
