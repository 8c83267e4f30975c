"""Typed errors raised by sam_core.

Every error a caller can cause derives from :class:`SamforgeError` and carries the name of the
offending field (``field``) so that a message reads ``"prompts[3].box: x1 must be > x0"``.
The services map these classes (never their message text) to gRPC status codes in one interceptor:

=====================  ====================
class                  gRPC status
=====================  ====================
InvalidInput (+ subs)  INVALID_ARGUMENT
NotFound               NOT_FOUND
AdapterInvalid         FAILED_PRECONDITION
ModelLoadError         FAILED_PRECONDITION
Overloaded             RESOURCE_EXHAUSTED
Unavailable            UNAVAILABLE
=====================  ====================
"""

from __future__ import annotations


class SamforgeError(Exception):
    """Base class of every error sam_core raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}" if field else message)


class InvalidInput(SamforgeError):
    """The caller sent something sam_core cannot work with (the caller must change the request)."""


class ImageDecodeError(InvalidInput):
    """Bytes that are not a decodable image (corrupt, truncated, unknown format)."""


class ImageTooLarge(InvalidInput):
    """Image over the byte or pixel limit (decompression-bomb guard)."""


class InvalidPrompt(InvalidInput):
    """NaN/inf or out-of-range coordinates, bad labels, malformed boxes, empty prompt list."""


class TooManyPrompts(InvalidInput):
    """More prompts in one call than the configured maximum."""


class InvalidMaskInput(InvalidInput):
    """A low-resolution mask input of the wrong shape or dtype."""


class NotFound(SamforgeError):
    """A referenced object (embedding key, adapter, job, file) does not exist."""


class ModelLoadError(SamforgeError):
    """Weights missing, unreadable, of the wrong model, or failing their checksum."""


class AdapterInvalid(SamforgeError):
    """An adapter artifact that must not be served: wrong base model, bad checksum, bad tensors."""


class Overloaded(SamforgeError):
    """A bounded queue is full; the caller may retry later."""


class Unavailable(SamforgeError):
    """A dependency (another service, Redis) cannot be reached right now."""
