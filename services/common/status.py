"""The one place where typed errors become gRPC status codes (classes, never message text), and back.

:data:`SERVICE_STATUS_OF` maps error classes to codes (:func:`status_for`, used by the server interceptor).
Its inverse, :func:`error_for`, is derived from the same table: a service that calls another service turns
the peer's status code back into the typed error it stands for (the first class listed for that code).
"""

from __future__ import annotations

import grpc

from sam_core import errors

# Most specific first: the first isinstance match wins.
STATUS_OF: tuple[tuple[type[errors.SamforgeError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AdapterInvalid, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


class PermissionDenied(errors.SamforgeError):
    """The caller's token does not grant access to the requested tenant."""


class Unauthenticated(errors.SamforgeError):
    """No or an unknown bearer token while auth is on."""


class Cancelled(errors.SamforgeError):
    """The client cancelled or the deadline passed while work was queued."""


SERVICE_STATUS_OF: tuple[tuple[type[errors.SamforgeError], grpc.StatusCode], ...] = (
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Cancelled, grpc.StatusCode.DEADLINE_EXCEEDED),
    *STATUS_OF,
)


def _inverse() -> dict[grpc.StatusCode, type[errors.SamforgeError]]:
    inverse: dict[grpc.StatusCode, type[errors.SamforgeError]] = {}
    for kind, code in SERVICE_STATUS_OF:
        inverse.setdefault(code, kind)
    return inverse


ERROR_OF: dict[grpc.StatusCode, type[errors.SamforgeError]] = _inverse()


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a typed error, or None (then the call fails INTERNAL with a generic message)."""
    for kind, code in SERVICE_STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


def error_for(code: grpc.StatusCode) -> type[errors.SamforgeError] | None:
    """The typed error a peer's status ``code`` stands for (``status_for`` of it gives ``code`` back), or None
    for codes no typed error maps to (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)."""
    return ERROR_OF.get(code)
