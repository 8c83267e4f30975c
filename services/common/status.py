"""The one place where typed errors become gRPC status codes (classes, never message text)."""

from __future__ import annotations

import grpc

from sam_core import errors

# Most specific first: the first isinstance match wins.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
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


SERVICE_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Cancelled, grpc.StatusCode.DEADLINE_EXCEEDED),
    *STATUS_OF,
)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a typed error, or None (then the call fails INTERNAL with a generic message)."""
    for kind, code in SERVICE_STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None
