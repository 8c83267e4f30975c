"""Adapter registry: where published adapters live and how their versions and aliases move.

Adapters are tenant-scoped and referenced as ``name`` (latest version), ``name:3`` (version 3) or
``name@prod`` (an alias). Versions are 1-based, immutable and never reused (deleting ``ships:2`` does not
let a later publish become ``ships:2`` again). ``promote`` points an alias at a version and remembers the
previous target; ``rollback`` walks that per-alias history back one step at a time.

:class:`AdapterStore` is the resolver interface (vLLM ``lora/`` style) the trainer publishes into and the
encoder/decoder services resolve from per request; :class:`FileSystemAdapterStore` is the local
implementation (an object-store one can come later)::

    root/index.json                  all versions, aliases, alias history and a revision counter
    root/.lock                       fcntl.flock: one writer at a time, across processes
    root/.staging/                   temp folders of publishes / deletes in progress (same file system)
    root/<tenant>/<name>/v<N>/       adapter_config.json + adapter_model.safetensors (read-only files)

A publish copies the artifact into ``.staging/tmp-*``, validates the copy (config + tensor checksum), fsyncs
it and then, under the lock, renames it to ``v<N>`` and atomically replaces ``index.json`` (temp file, fsync,
``os.replace``): readers, which never take the lock, see a version completely or not at all, and a refused
publish leaves nothing under ``root/<tenant>``. :meth:`resolve` re-checks a
version's content sha256 (sorted file names + file sha256s) against the index and refuses a folder that
was changed on disk with :class:`~sam_core.errors.AdapterInvalid`; a successful check is remembered only
while the files' stat signature (inode, size, mtime, ctime) is unchanged and older than
``_RACY_SECONDS`` (git's "racy clean" rule), so a hot path does not re-hash every request.

Names are validated before they touch a path (``[a-z0-9][a-z0-9._-]{0,62}``, no ``..``): that is the
path-traversal guard. A tenant only ever sees its own adapters; another tenant's adapter is reported
exactly like one that does not exist.
"""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sam_core.adapters.artifact import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from sam_core.errors import AdapterInvalid, InvalidInput, NotFound
from sam_core.modeling.registry import file_sha256

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
STAGING_NAME = ".staging"
_STAGING_MAX_AGE = 24 * 3600.0  # staging folders older than this are leftovers of crashed processes
INDEX_FORMAT_VERSION = 1
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}", re.ASCII)
_RESERVED_TENANTS = frozenset({INDEX_NAME})  # would collide with root/index.json
_RACY_SECONDS = 2.0  # stat signatures younger than this are never trusted (coarse fs timestamps)


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


def _validate_version(value: object, field_name: str = "version") -> int:
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
                _validate_version(self.version)
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


@runtime_checkable
class AdapterStore(Protocol):
    """Where adapters come from. Every call is scoped to one tenant."""

    def publish(self, tenant: str, name: str, source_dir: str | os.PathLike, *,
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


def content_sha256(folder: str | os.PathLike) -> str:
    """sha256 over ``name\\0sha256(file)\\n`` for every entry of ``folder`` in name order.

    Anything that is not a regular file (a sub-folder, a symlink) enters the digest as a marker, so it
    never matches a published artifact. Raises FileNotFoundError if the folder is missing.
    """
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        body = file_sha256(entry.path) if entry.is_file(follow_symlinks=False) else "!not-a-regular-file"
        digest.update(f"{entry.name}\0{body}\n".encode())
    return digest.hexdigest()


def _file_digests(folder: Path) -> dict[str, str]:
    return {name: file_sha256(folder / name) for name in ARTIFACT_FILES}


def _stat_signature(path: Path) -> tuple | None:
    """(inode, size, mtime, ctime) of a folder and its entries; None if missing."""
    try:
        st = os.stat(path)
        parts: list[tuple] = [("", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                est = entry.stat(follow_symlinks=False)
                parts.append((entry.name, est.st_ino, est.st_size, est.st_mtime_ns, est.st_ctime_ns))
    except FileNotFoundError:
        return None
    return tuple(parts)


def _trusted(signature: tuple | None) -> bool:
    """A signature can vouch for unchanged content only once its newest timestamp is safely in the past."""
    if signature is None:
        return False
    newest = max(max(part[3], part[4]) for part in signature)
    return time.time_ns() - newest > _RACY_SECONDS * 1e9


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty_index() -> dict[str, Any]:
    return {"format_version": INDEX_FORMAT_VERSION, "revision": 0, "tenants": {}}


def _not_found(ref: AdapterRef | str) -> NotFound:
    # The same message whether the tenant, the name or the version is unknown: no existence leak.
    return NotFound(f"adapter {str(ref)!r} not found", field="adapter")


class FileSystemAdapterStore:
    """An :class:`AdapterStore` in a local (or shared POSIX) folder; safe across threads and processes.

    Writers serialise on ``fcntl.flock(root/.lock)``; readers read ``index.json`` without locking (it is only
    ever replaced atomically) and cache the parsed index by its stat signature.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._index_path = self.root / INDEX_NAME
        self._cache_lock = threading.Lock()
        self._index_cache: tuple[tuple, dict[str, Any]] | None = None
        self._verified: dict[Path, tuple[tuple, str]] = {}

    def __repr__(self) -> str:
        return f"FileSystemAdapterStore({str(self.root)!r})"

    # ------------------------------------------------------------------ index and lock

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _read_index(self, *, fresh: bool = False) -> dict[str, Any]:
        """The parsed index; callers must not mutate it unless ``fresh`` (then it is a private copy)."""
        if not fresh:
            signature = _stat_signature(self._index_path)
            with self._cache_lock:
                cached = self._index_cache
            if cached is not None and cached[0] == signature and _trusted(signature):
                return cached[1]
        try:
            with open(self._index_path, "rb") as handle:
                st = os.fstat(handle.fileno())
                raw = handle.read()
        except FileNotFoundError:
            return _empty_index()
        try:
            index = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterInvalid(f"{self._index_path} is not valid JSON ({exc})", field="index") from exc
        if not isinstance(index, dict) or index.get("format_version", 0) > INDEX_FORMAT_VERSION:
            raise AdapterInvalid(f"{self._index_path} has an unsupported format", field="index")
        signature = (("", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),)
        with self._cache_lock:
            self._index_cache = (signature, index)
        return copy.deepcopy(index) if fresh else index

    def _commit(self, index: dict[str, Any]) -> None:
        """Bump the revision and atomically replace index.json (call with the lock held)."""
        index["revision"] = int(index.get("revision", 0)) + 1
        data = (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_NAME}.tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._index_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_path(self.root)

    def _staging_dir(self, prefix: str) -> Path:
        """A new private folder in root/.staging (removing leftovers of crashed processes, best effort)."""
        staging = self.root / STAGING_NAME
        staging.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - _STAGING_MAX_AGE
        for entry in os.scandir(staging):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except FileNotFoundError:
                pass
        return Path(tempfile.mkdtemp(prefix=prefix, dir=staging))

    @staticmethod
    def _entry(index: dict[str, Any], tenant: str, name: str) -> dict[str, Any] | None:
        return index["tenants"].get(tenant, {}).get(name)

    def _version_path(self, tenant: str, name: str, version: int) -> Path:
        return self.root / tenant / name / f"v{version}"

    def _to_version(self, tenant: str, name: str, version: int, entry: dict[str, Any]) -> AdapterVersion:
        record = entry["versions"][str(version)]
        aliases = tuple(sorted(a for a, v in entry["aliases"].items() if v == version))
        return AdapterVersion(
            tenant=tenant, name=name, version=version, sha256=record["sha256"], method=record["method"],
            base_model_id=record["base_model_id"], shares_base_embeddings=record["shares_base_embeddings"],
            created_at=record["created_at"], parent=record["parent"], aliases=aliases,
            metrics=copy.deepcopy(record["metrics"]), n_parameters=record["n_parameters"],
            path=self._version_path(tenant, name, version),
        )

    def _lookup(self, index: dict[str, Any], tenant: str, ref: AdapterRef) -> AdapterVersion:
        entry = self._entry(index, tenant, ref.name)
        if entry is None or not entry["versions"]:
            raise _not_found(ref)
        if ref.alias is not None:
            if ref.alias not in entry["aliases"]:
                raise _not_found(ref)
            version = entry["aliases"][ref.alias]
        elif ref.version is not None:
            version = ref.version
        else:
            version = max(int(v) for v in entry["versions"])
        if str(version) not in entry["versions"]:
            raise _not_found(ref)
        return self._to_version(tenant, ref.name, version, entry)

    def _verify(self, version: AdapterVersion) -> None:
        """AdapterInvalid unless the folder's content sha256 still matches the index."""
        path = version.path
        before = _stat_signature(path)
        with self._cache_lock:
            cached = self._verified.get(path)
        if before is not None and cached == (before, version.sha256) and _trusted(before):
            return
        try:
            actual = content_sha256(path)
        except (FileNotFoundError, NotADirectoryError):
            actual = None
        if actual != version.sha256:
            state = "is missing" if actual is None else f"has content sha256 {actual[:16]}..."
            raise AdapterInvalid(f"stored adapter {version.ref!r} {state}, but the registry recorded "
                                 f"{version.sha256[:16]}...; it was changed on disk and must not be served",
                                 field="adapter")
        after = _stat_signature(path)
        with self._cache_lock:
            if after == before and _trusted(after):
                self._verified[path] = (after, version.sha256)
            else:
                self._verified.pop(path, None)

    # ------------------------------------------------------------------ reading

    def revision(self) -> int:
        """Monotonic counter bumped by every publish / promote / rollback / delete (0 for an empty store)."""
        return int(self._read_index().get("revision", 0))

    def resolve(self, tenant: str, ref: str | AdapterRef) -> AdapterVersion:
        """The version ``ref`` names for ``tenant``, after checking its files still match the index.

        NotFound if the tenant has no such adapter / version / alias; AdapterInvalid if it was changed on disk.
        """
        validate_name("tenant", tenant)
        parsed = ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)
        version = self._lookup(self._read_index(), tenant, parsed)
        self._verify(version)
        return version

    def get(self, tenant: str, name: str, version: int) -> AdapterVersion:
        """Metadata of one version (no content check; :meth:`resolve` is the serving path)."""
        validate_name("tenant", tenant)
        validate_name("name", name)
        _validate_version(version)
        return self._lookup(self._read_index(), tenant, AdapterRef(name, version=version))

    def list(self, tenant: str, name: str | None = None) -> list[AdapterVersion]:
        """All of ``tenant``'s versions (of ``name`` only, if given), by name then version; [] if none."""
        validate_name("tenant", tenant)
        if name is not None:
            validate_name("name", name)
        entries = self._read_index()["tenants"].get(tenant, {})
        out = []
        for adapter in sorted(entries if name is None else [name] if name in entries else []):
            entry = entries[adapter]
            out.extend(self._to_version(tenant, adapter, v, entry) for v in sorted(int(k) for k in entry["versions"]))
        return out

    def path_of(self, version: AdapterVersion) -> Path:
        """The local folder holding ``version``'s artifact (NotFound if it is not there)."""
        validate_name("tenant", version.tenant)
        validate_name("name", version.name)
        _validate_version(version.version)
        path = self._version_path(version.tenant, version.name, version.version)
        if not path.is_dir():
            raise _not_found(AdapterRef(version.name, version=version.version))
        return path

    def watch(self, callback: Callable[[int], None], *, interval: float = 1.0) -> Callable[[], None]:
        """Poll :meth:`revision` every ``interval`` s in a daemon thread; ``callback(revision)`` on change.

        Returns an idempotent ``stop()`` that ends the thread (and waits for it unless called from the
        callback). Errors in the callback or while polling are logged, never end the watch.
        """
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise InvalidInput(f"must be a number > 0, got {interval!r}", field="interval")
        stopped = threading.Event()
        last = self.revision()

        def run() -> None:
            nonlocal last
            while not stopped.wait(interval):
                try:
                    current = self.revision()
                except Exception:
                    log.exception("adapter registry %s: reading the revision failed", self.root)
                    continue
                if current == last:
                    continue
                last = current
                try:
                    callback(current)
                except Exception:
                    log.exception("adapter registry %s: watch callback failed", self.root)

        thread = threading.Thread(target=run, name="adapter-registry-watch", daemon=True)
        thread.start()

        def stop() -> None:
            stopped.set()
            if threading.current_thread() is not thread:
                thread.join()

        return stop

    # ------------------------------------------------------------------ writing

    def publish(self, tenant: str, name: str, source_dir: str | os.PathLike, *,
                parent: str | AdapterRef | None = None) -> AdapterVersion:
        """Copy the artifact in ``source_dir`` into the next version of ``tenant``/``name``.

        Only ``adapter_config.json`` and ``adapter_model.safetensors`` are copied; the copy is validated
        (config, tensor checksum, safetensors) before it becomes visible, so a corrupt or incomplete artifact
        raises AdapterInvalid and changes nothing. ``parent`` (a reference in the same tenant) is recorded
        as ``name:N``; NotFound(field="parent") if it does not resolve.
        """
        validate_name("tenant", tenant)
        validate_name("name", name)
        parent_ref = parent if parent is None or isinstance(parent, AdapterRef) else None
        if parent is not None and parent_ref is None:
            try:
                parent_ref = AdapterRef.parse(parent)
            except InvalidInput as exc:
                raise InvalidInput(exc.detail, field="parent") from exc
        source = Path(source_dir)
        if not source.is_dir():
            raise NotFound(f"{source} is not a folder", field="source_dir")
        missing = [f for f in ARTIFACT_FILES if not (source / f).is_file()]
        if missing:
            raise AdapterInvalid(f"{source} is not a complete adapter artifact: missing {', '.join(missing)}",
                                 field="adapter")
        tmp = self._staging_dir("tmp-")
        target: Path | None = None
        committed = False
        try:
            for file_name in ARTIFACT_FILES:
                shutil.copyfile(source / file_name, tmp / file_name)
                os.chmod(tmp / file_name, 0o444)  # immutable by convention; a hint against in-place edits
                _fsync_path(tmp / file_name)
            _fsync_path(tmp)
            try:  # validate exactly the bytes that will become visible
                config = read_adapter_config(tmp)
                read_adapter_tensors(tmp, config)
            except NotFound as exc:
                raise AdapterInvalid(f"{source}: {exc.detail}", field="adapter") from exc
            digest = content_sha256(tmp)
            record = {
                "sha256": digest, "files": _file_digests(tmp), "method": config.method,
                "base_model_id": config.base_model_id, "shares_base_embeddings": config.shares_base_embeddings,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "metrics": dict(config.metrics), "n_parameters": int(config.n_parameters), "parent": None,
            }
            with self._locked():
                index = self._read_index(fresh=True)
                if parent_ref is not None:
                    try:
                        record["parent"] = self._lookup(index, tenant, parent_ref).ref
                    except NotFound as exc:
                        raise NotFound(f"parent {str(parent_ref)!r} not found", field="parent") from exc
                entry = index["tenants"].setdefault(tenant, {}).setdefault(
                    name, {"next_version": 1, "versions": {}, "aliases": {}, "alias_history": {}})
                number = int(entry["next_version"])
                target = self._version_path(tenant, name, number)
                name_dir = target.parent
                name_dir.mkdir(parents=True, exist_ok=True)
                if target.exists():  # left by a publisher that crashed before its index write: never visible
                    log.warning("adapter registry: removing orphaned %s", target)
                    shutil.rmtree(target)
                os.rename(tmp, target)
                _fsync_path(name_dir)
                entry["versions"][str(number)] = record
                entry["next_version"] = number + 1
                self._commit(index)
                committed = True
                result = self._to_version(tenant, name, number, entry)
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
                if target is not None and target.exists():
                    shutil.rmtree(target, ignore_errors=True)
        log.info("adapter registry: published %s/%s (sha256 %s)", tenant, result.ref, digest[:16])
        return result

    def promote(self, tenant: str, name: str, alias: str, version: int) -> AdapterVersion:
        """Point ``name@alias`` at ``version`` (which must verify); the previous target goes on the history.

        Promoting an alias to the version it already points to changes nothing (no history entry, same revision).
        """
        validate_name("tenant", tenant)
        validate_name("name", name)
        validate_name("alias", alias)
        _validate_version(version)
        self._verify(self._lookup(self._read_index(), tenant, AdapterRef(name, version=version)))
        with self._locked():
            index = self._read_index(fresh=True)
            target = self._lookup(index, tenant, AdapterRef(name, version=version))  # may be gone meanwhile
            entry = self._entry(index, tenant, name)
            assert entry is not None
            previous = entry["aliases"].get(alias)
            if previous == version:
                return target
            if previous is not None:
                entry["alias_history"].setdefault(alias, []).append(previous)
            entry["aliases"][alias] = version
            self._commit(index)
            result = self._to_version(tenant, name, version, entry)
        log.info("adapter registry: %s/%s@%s -> %s (was %s)", tenant, name, alias, version, previous)
        return result

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion:
        """Move ``name@alias`` back to the version it pointed to before its last move.

        NotFound if the alias does not exist; AdapterConflict (FAILED_PRECONDITION) if it has no history;
        AdapterInvalid if the earlier version no longer verifies (the alias then stays where it is).
        """
        validate_name("tenant", tenant)
        validate_name("name", name)
        validate_name("alias", alias)
        with self._locked():
            index = self._read_index(fresh=True)
            entry = self._entry(index, tenant, name)
            if entry is None or not entry["versions"] or alias not in entry["aliases"]:
                raise _not_found(AdapterRef(name, alias=alias))
            history = entry["alias_history"].get(alias, [])
            if not history:
                raise AdapterConflict(f"{name}@{alias} has no earlier version to roll back to", field="alias")
            previous = history[-1]
            target = self._to_version(tenant, name, previous, entry)
            self._verify(target)
            current = entry["aliases"][alias]
            history.pop()
            entry["aliases"][alias] = previous
            self._commit(index)
            result = self._to_version(tenant, name, previous, entry)
        log.info("adapter registry: rolled back %s/%s@%s from %s to %s", tenant, name, alias, current, previous)
        return result

    def delete(self, tenant: str, name: str, version: int) -> None:
        """Remove one version (its number is never reused). Refused while an alias points at it."""
        validate_name("tenant", tenant)
        validate_name("name", name)
        _validate_version(version)
        with self._locked():
            index = self._read_index(fresh=True)
            found = self._lookup(index, tenant, AdapterRef(name, version=version))
            if found.aliases:
                shown = ", ".join(f"{name}@{a}" for a in found.aliases)
                raise AdapterConflict(f"{found.ref} is the target of alias {shown}; promote the alias to another "
                                      "version (or roll it back) before deleting", field="version")
            entry = self._entry(index, tenant, name)
            assert entry is not None
            del entry["versions"][str(version)]
            for alias, history in entry["alias_history"].items():
                entry["alias_history"][alias] = _compact(history, entry["aliases"].get(alias), version)
            self._commit(index)
            if found.path.exists():  # out of v<N> first, so a half-removed folder is never at its path
                doomed = self._staging_dir("deleted-")
                os.rename(found.path, doomed / found.path.name)
                shutil.rmtree(doomed, ignore_errors=True)
        with self._cache_lock:
            self._verified.pop(found.path, None)
        log.info("adapter registry: deleted %s/%s", tenant, found.ref)


def _compact(history: list[int], current: int | None, deleted: int) -> list[int]:
    """History without ``deleted``, without repeats and without a top equal to the current target."""
    out: list[int] = []
    for version in history:
        if version != deleted and (not out or out[-1] != version):
            out.append(version)
    while out and out[-1] == current:
        out.pop()
    return out
