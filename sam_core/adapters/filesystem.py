"""File-system adapter store: :class:`FileSystemAdapterStore`, the local :class:`AdapterStore`.

Layout of the store's root (a local or shared POSIX folder)::

    root/index.json                  all versions, aliases, alias history and a revision counter
    root/.lock                       fcntl.flock: one writer at a time, across processes
    root/.staging/                   temp folders of publishes / deletes in progress (same file system)
    root/<tenant>/<name>/v<N>/       adapter_config.json + adapter_model.safetensors (read-only files)

A publish copies the artifact into ``.staging/tmp-*``, validates the copy (config + tensor checksum), fsyncs
it and then, under the lock, renames it to ``v<N>`` and atomically replaces ``index.json``
(:func:`sam_core.files.atomic_write_text`: temp file, fsync, ``os.replace``, fsync of the folder):
readers, which never take the lock, see a version completely or not at all, and a refused publish leaves
nothing under ``root/<tenant>``. :meth:`FileSystemAdapterStore.resolve` re-checks a version's content
sha256 (:func:`~sam_core.adapters.store.content_sha256`) against the index and refuses a folder that was
changed on disk with :class:`~sam_core.errors.AdapterInvalid`; a successful check is remembered only while
the files' stat signature (inode, size, mtime, ctime) is unchanged and older than ``_RACY_SECONDS`` (git's
"racy clean" rule), so a hot path does not re-hash every request.

Names, references, versions and the tenancy rules are those of :mod:`sam_core.adapters.store`.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

from sam_core.adapters import index as ix
from sam_core.adapters.store import (
    AdapterRef,
    AdapterVersion,
    content_sha256,
    tenant_dir,
    validate_call,
    validate_name,
    validate_version,
    watch_revision,
)
from sam_core.errors import AdapterInvalid
from sam_core.files import atomic_write_text, rename_durably

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
STAGING_NAME = ".staging"
_STAGING_MAX_AGE = 24 * 3600.0  # staging folders older than this are leftovers of crashed processes
_RACY_SECONDS = 2.0  # stat signatures younger than this are never trusted (coarse fs timestamps)

StatSignature: TypeAlias = tuple[tuple[str, int, int, int, int], ...]
"""(name, inode, size, mtime_ns, ctime_ns) of a folder ("" for itself) and of its entries, in name order."""


def stat_signature(path: Path) -> StatSignature | None:
    """(inode, size, mtime, ctime) of a file or folder and of a folder's entries; None if missing."""
    try:
        st = os.stat(path)
        parts: list[tuple[str, int, int, int, int]] = [("", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                est = entry.stat(follow_symlinks=False)
                parts.append((entry.name, est.st_ino, est.st_size, est.st_mtime_ns, est.st_ctime_ns))
    except FileNotFoundError:
        return None
    return tuple(parts)


def trusted_signature(signature: StatSignature | None) -> bool:
    """A signature can vouch for unchanged content only once its newest timestamp is safely in the past."""
    if signature is None:
        return False
    newest = max(max(part[3], part[4]) for part in signature)
    return time.time_ns() - newest > _RACY_SECONDS * 1e9


class FileSystemAdapterStore:
    """An :class:`AdapterStore` in a local (or shared POSIX) folder; safe across threads and processes.

    Writers serialise on ``fcntl.flock(root/.lock)``; readers read ``index.json`` without locking (it is only
    ever replaced atomically) and cache the parsed index by its stat signature.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._index_path = self.root / INDEX_NAME
        self._cache_lock = threading.Lock()
        self._index_cache: tuple[StatSignature, dict[str, Any]] | None = None
        self._verified: dict[Path, tuple[StatSignature, str]] = {}

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
            signature = stat_signature(self._index_path)
            with self._cache_lock:
                cached = self._index_cache
            if cached is not None and cached[0] == signature and trusted_signature(signature):
                return cached[1]
        try:
            with open(self._index_path, "rb") as handle:
                st = os.fstat(handle.fileno())
                raw = handle.read()
        except FileNotFoundError:
            return ix.empty_index()
        try:
            index = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterInvalid(f"{self._index_path} is not valid JSON ({exc})", field="index") from exc
        ix.check_format(index, str(self._index_path))
        signature = (("", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),)
        with self._cache_lock:
            self._index_cache = (signature, index)
        return copy.deepcopy(index) if fresh else index

    def _commit(self, index: dict[str, Any]) -> None:
        """Bump the revision and atomically replace index.json (call with the lock held)."""
        ix.bump(index)
        atomic_write_text(self._index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")

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

    def _version_path(self, tenant: str, name: str, version: int) -> Path:
        return tenant_dir(self.root, tenant) / validate_name("name", name) / f"v{version}"

    def _lookup(self, index: dict[str, Any], tenant: str, ref: AdapterRef) -> AdapterVersion:
        version = ix.lookup(index, tenant, ref)
        entry = ix.entry_of(index, tenant, ref.name)
        assert entry is not None
        return ix.to_version(tenant, ref.name, version, entry, self._version_path(tenant, ref.name, version))

    def _verify(self, version: AdapterVersion) -> None:
        """AdapterInvalid unless the folder's content sha256 still matches the index."""
        path = version.path
        before = stat_signature(path)
        with self._cache_lock:
            cached = self._verified.get(path)
        if before is not None and cached == (before, version.sha256) and trusted_signature(before):
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
        after = stat_signature(path)
        with self._cache_lock:
            if after is not None and after == before and trusted_signature(after):
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
        validate_call(tenant, name=name, version=version)
        return self._lookup(self._read_index(), tenant, AdapterRef(name, version=version))

    def list(self, tenant: str, name: str | None = None) -> list[AdapterVersion]:
        """All of ``tenant``'s versions (of ``name`` only, if given), by name then version; [] if none."""
        validate_name("tenant", tenant)
        if name is not None:
            validate_name("name", name)
        return [ix.to_version(tenant, adapter, v, entry, self._version_path(tenant, adapter, v))
                for adapter, v, entry in ix.versions_of(self._read_index(), tenant, name)]

    def path_of(self, version: AdapterVersion) -> Path:
        """The local folder holding ``version``'s artifact (NotFound if it is not there)."""
        validate_name("tenant", version.tenant)
        validate_name("name", version.name)
        validate_version(version.version)
        path = self._version_path(version.tenant, version.name, version.version)
        if not path.is_dir():
            raise ix.not_found(AdapterRef(version.name, version=version.version))
        return path

    def watch(self, callback: Callable[[int], None], *, interval: float = 1.0) -> Callable[[], None]:
        """Poll :meth:`revision` every ``interval`` s; ``callback(revision)`` on change (see :func:`watch_revision`)."""
        return watch_revision(self.revision, callback, interval=interval, label=f"adapter registry {self.root}")

    # ------------------------------------------------------------------ writing

    def publish(self, tenant: str, name: str, source_dir: str | os.PathLike[str], *,
                parent: str | AdapterRef | None = None) -> AdapterVersion:
        """Copy the artifact in ``source_dir`` into the next version of ``tenant``/``name``.

        Only ``adapter_config.json`` and ``adapter_model.safetensors`` are copied; the copy is validated
        (config, tensor checksum, safetensors) before it becomes visible, so a corrupt or incomplete artifact
        raises AdapterInvalid and changes nothing. ``parent`` (a reference in the same tenant) is recorded
        as ``name:N``; NotFound(field="parent") if it does not resolve.
        """
        validate_call(tenant, name=name)
        parent_ref = ix.parent_ref(parent)
        source = ix.artifact_source(Path(source_dir))
        staged = self._staging_dir("tmp-")
        try:
            record = ix.stage_artifact(source, staged)
            result = self._install(tenant, name, staged, record, parent_ref)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # already gone once installed
        log.info("adapter registry: published %s/%s (sha256 %s)", tenant, result.ref, result.sha256[:16])
        return result

    def _install(self, tenant: str, name: str, staged: Path, record: dict[str, Any],
                 parent_ref: AdapterRef | None) -> AdapterVersion:
        """Under the lock: resolve the parent, rename ``staged`` to the next ``v<N>`` and commit the index.

        On any failure the version folder is removed again, so nothing becomes visible.
        """
        with self._locked():
            index = self._read_index(fresh=True)
            number = ix.add_version(index, tenant, name, record, parent_ref)
            target = self._version_path(tenant, name, number)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a publisher that crashed before its index write: never visible
                log.warning("adapter registry: removing orphaned %s", target)
                shutil.rmtree(target)
            try:
                rename_durably(staged, target)
                self._commit(index)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            return self._lookup(index, tenant, AdapterRef(name, version=number))

    def promote(self, tenant: str, name: str, alias: str, version: int) -> AdapterVersion:
        """Point ``name@alias`` at ``version`` (which must verify); the previous target goes on the history.

        Promoting an alias to the version it already points to changes nothing (no history entry, same revision).
        """
        validate_call(tenant, name=name, alias=alias, version=version)
        self._verify(self._lookup(self._read_index(), tenant, AdapterRef(name, version=version)))
        with self._locked():
            index = self._read_index(fresh=True)
            previous = ix.promote(index, tenant, name, alias, version)  # NotFound if deleted meanwhile
            if previous != version:
                self._commit(index)
                log.info("adapter registry: promoted %s/%s@%s: %s -> %s", tenant, name, alias, previous, version)
            return self._lookup(index, tenant, AdapterRef(name, version=version))

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion:
        """Move ``name@alias`` back to the version it pointed to before its last move.

        NotFound if the alias does not exist; AdapterConflict (FAILED_PRECONDITION) if it has no history;
        AdapterInvalid if the earlier version no longer verifies (the alias then stays where it is).
        """
        validate_call(tenant, name=name, alias=alias)
        with self._locked():
            index = self._read_index(fresh=True)
            self._verify(self._lookup(index, tenant, AdapterRef(name, version=ix.rollback_target(
                index, tenant, name, alias))))
            was, previous = ix.rollback(index, tenant, name, alias)
            self._commit(index)
            log.info("adapter registry: rolled back %s/%s@%s: %s -> %s", tenant, name, alias, was, previous)
            return self._lookup(index, tenant, AdapterRef(name, version=previous))

    def delete(self, tenant: str, name: str, version: int) -> None:
        """Remove one version (its number is never reused). Refused while an alias points at it."""
        validate_call(tenant, name=name, version=version)
        with self._locked():
            index = self._read_index(fresh=True)
            found = self._lookup(index, tenant, AdapterRef(name, version=version))
            ix.delete(index, tenant, name, version)
            self._commit(index)
            if found.path.exists():  # out of v<N> first, so a half-removed folder is never at its path
                doomed = self._staging_dir("deleted-")
                os.rename(found.path, doomed / found.path.name)
                shutil.rmtree(doomed, ignore_errors=True)
        with self._cache_lock:
            self._verified.pop(found.path, None)
        log.info("adapter registry: deleted %s/%s", tenant, found.ref)

