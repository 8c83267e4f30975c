"""Adapter store contract: names, references, published versions and the :class:`AdapterStore` protocol.

Adapters are tenant-scoped and referenced as ``name`` (latest version), ``name:3`` (version 3) or
``name@prod`` (an alias). Versions are 1-based, immutable and never reused (deleting ``ships:2`` does not
let a later publish become ``ships:2`` again). ``promote`` points an alias at a version and remembers the
previous target; ``rollback`` walks that per-alias history back one step at a time.

:class:`AdapterStore` is the resolver interface (vLLM ``lora/`` style) the trainer publishes into and the
encoder/decoder services resolve from per request; :class:`sam_core.adapters.filesystem.FileSystemAdapterStore`
is the local implementation, :class:`sam_core.adapters.s3.S3AdapterStore` the object-store one
(``s3://bucket/prefix``, :func:`parse_s3_url`); :func:`sam_core.adapters.factory.open_store` picks one.
A version's identity is its content digest, :func:`content_sha256`; :func:`watch_revision` is the polling
``watch`` of any store with a revision counter.

Names are validated before they touch a path (``[a-z0-9][a-z0-9._-]{0,62}``, no ``..``): that is the
path-traversal guard. A tenant only ever sees its own adapters; another tenant's adapter is reported
exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from sam_core.errors import AdapterInvalid, InvalidInput
from sam_core.files import file_sha256

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}", re.ASCII)
_RESERVED_TENANTS = frozenset({"index.json"})  # the file-system store's root/index.json


class AdapterConflict(AdapterInvalid):
    """The registry's state forbids the operation (nothing to roll back, deleting an aliased version).

    A subclass of :class:`AdapterInvalid`, so the error interceptor maps it to FAILED_PRECONDITION.
    """


def validate_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a safe tenant / adapter / alias name, else ``InvalidInput(field=kind)``.

    Allowed: ``[a-z0-9][a-z0-9._-]{0,62}`` without ``..`` (so no ``/``, no leading dot, no traversal).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"must be a string, got {type(value).__name__}", field=kind)
    if not _NAME_RE.fullmatch(value) or ".." in value:
        shown = value if len(value) <= 70 else value[:70] + "..."
        raise InvalidInput(f"{shown!r} is not a valid {kind} name: use 1-63 characters of a-z 0-9 . _ -, "
                           "starting with a letter or digit, without '..'", field=kind)
    if kind == "tenant" and value in _RESERVED_TENANTS:
        raise InvalidInput(f"{value!r} is a reserved tenant name", field=kind)
    return value


_NOT_TAKEN = object()  # validate_call: the call takes no such argument (None is a value, and is refused)


def validate_call(tenant: object, *, name: object = _NOT_TAKEN, alias: object = _NOT_TAKEN,
                  version: object = _NOT_TAKEN) -> None:
    """The tenant and whichever of name / alias / version a store call takes, each checked by
    :func:`validate_name` / :func:`validate_version` (InvalidInput naming the field)."""
    validate_name("tenant", tenant)
    for kind, value in (("name", name), ("alias", alias)):
        if value is not _NOT_TAKEN:
            validate_name(kind, value)
    if version is not _NOT_TAKEN:
        validate_version(version)


def tenant_dir(root: str | os.PathLike[str], tenant: str) -> Path:
    """``<root>/<tenant>``: the one way a path is built from a tenant (the name is validated first, so it can
    never leave ``root``: no ``/``, no ``..``, no upper case that would split one tenant into two trees)."""
    return Path(root) / validate_name("tenant", tenant)


def validate_version(value: object, field_name: str = "version") -> int:
    """Return ``value`` if it is a version number (an int >= 1, not a bool), else ``InvalidInput(field_name)``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"must be an integer >= 1, got {value!r}", field=field_name)
    return value


@dataclass(frozen=True)
class AdapterRef:
    """``name`` (latest), ``name:3`` (version 3) or ``name@prod`` (alias); at most one of version / alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_name("name", self.name)
            if self.version is not None:
                validate_version(self.version)
            if self.alias is not None:
                validate_name("alias", self.alias)
        except InvalidInput as exc:
            raise InvalidInput(f"{exc.field}: {exc.detail}", field="adapter") from exc
        if self.version is not None and self.alias is not None:
            raise InvalidInput("give a version or an alias, not both", field="adapter")

    @classmethod
    def parse(cls, text: object) -> AdapterRef:
        """``"ships"`` -> latest, ``"ships:3"`` -> version 3, ``"ships@prod"`` -> alias; else InvalidInput."""
        if not isinstance(text, str):
            raise InvalidInput(f"an adapter reference must be a string, got {type(text).__name__}", field="adapter")
        if "@" in text:
            name, alias = text.split("@", 1)
            if ":" in name:
                raise InvalidInput(f"{text!r}: use name:version or name@alias, not both", field="adapter")
            return cls(name, alias=alias)
        if ":" in text:
            name, version = text.split(":", 1)
            if not _VERSION_RE.fullmatch(version):
                raise InvalidInput(f"{text!r}: the version must be an integer >= 1", field="adapter")
            return cls(name, version=int(version))
        return cls(text)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable published version (``aliases``: the aliases pointing at it when it was read)."""

    tenant: str
    name: str
    version: int
    sha256: str  # content digest: sha256 over the sorted file names + file sha256s
    method: str
    base_model_id: str
    shares_base_embeddings: bool
    created_at: str  # publish time, ISO 8601 UTC
    parent: str | None  # "name:N" in the same tenant, or None
    aliases: tuple[str, ...]
    metrics: dict[str, Any] = field(hash=False)
    n_parameters: int
    path: Path

    @property
    def ref(self) -> str:
        """``name:N`` — the reference that always means exactly this content."""
        return f"{self.name}:{self.version}"


def parse_s3_url(url: str, field_name: str = "registry_url") -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix"); InvalidInput(field=field_name) otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment or ".." in parts.path.split("/"):
        raise InvalidInput(f"{url!r} is not an s3://bucket[/prefix] URL", field=field_name)
    return parts.netloc, parts.path.strip("/")


@runtime_checkable
class AdapterStore(Protocol):
    """Where adapters come from. Every call is scoped to one tenant."""

    def publish(self, tenant: str, name: str, source_dir: str | os.PathLike[str], *,
                parent: str | AdapterRef | None = None) -> AdapterVersion: ...

    def resolve(self, tenant: str, ref: str | AdapterRef) -> AdapterVersion: ...

    def list(self, tenant: str, name: str | None = None) -> list[AdapterVersion]: ...

    def get(self, tenant: str, name: str, version: int) -> AdapterVersion: ...

    def promote(self, tenant: str, name: str, alias: str, version: int) -> AdapterVersion: ...

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion: ...

    def delete(self, tenant: str, name: str, version: int) -> None: ...

    def path_of(self, version: AdapterVersion) -> Path: ...

    def revision(self) -> int: ...

    def watch(self, callback: Callable[[int], None], *, interval: float = 1.0) -> Callable[[], None]: ...


def content_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 over ``name\\0sha256(file)\\n`` for every entry of ``folder`` in name order.

    Anything that is not a regular file (a sub-folder, a symlink) enters the digest as a marker, so it
    never matches a published artifact. Raises FileNotFoundError if the folder is missing.
    """
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        body = file_sha256(entry.path) if entry.is_file(follow_symlinks=False) else "!not-a-regular-file"
        digest.update(f"{entry.name}\0{body}\n".encode())
    return digest.hexdigest()


def watch_revision(revision: Callable[[], int], callback: Callable[[int], None], *, interval: float,
                   label: str) -> Callable[[], None]:
    """Call ``revision()`` every ``interval`` s in a daemon thread and ``callback(revision)`` when it changes.

    The generic :meth:`AdapterStore.watch` of a store with a monotonic revision counter. Returns an
    idempotent ``stop()`` that ends the thread (and waits for it unless called from the callback).
    Errors in the callback or while polling are logged (prefixed with ``label``), never end the watch.
    """
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise InvalidInput(f"must be a number > 0, got {interval!r}", field="interval")
    stopped = threading.Event()
    last = revision()

    def run() -> None:
        nonlocal last
        while not stopped.wait(interval):
            try:
                current = revision()
            except Exception:
                log.exception("%s: reading the revision failed", label)
                continue
            if current == last:
                continue
            last = current
            try:
                callback(current)
            except Exception:
                log.exception("%s: watch callback failed", label)

    thread = threading.Thread(target=run, name="adapter-registry-watch", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        if threading.current_thread() is not thread:
            thread.join()

    return stop
