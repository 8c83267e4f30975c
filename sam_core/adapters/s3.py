"""S3-compatible adapter store: :class:`S3AdapterStore`, the object-store :class:`AdapterStore`.

``s3://bucket/prefix`` (AWS S3, MinIO, Ceph RGW, ... through boto3). Layout under the prefix::

    index.json                                   the same document as the file-system store's index
                                                 (:mod:`sam_core.adapters.index`), plus each version's location
    <tenant>/<name>/uploads/<upload id>/<file>   adapter_config.json + adapter_model.safetensors

Publishing never shows a half-done version: the artifact is validated locally, its files are uploaded to a
fresh ``uploads/<random id>/`` (``If-None-Match: *``, so no object is ever overwritten), and only then is
the version added to ``index.json`` with a conditional put on the ETag that was read (``If-Match``; ``If-None-Match:
*`` for the first write). A concurrent writer makes the put fail with 412 (or 409); the writer then re-reads the
index and applies its change again, at most ``_COMMIT_ATTEMPTS`` times (then :class:`~sam_core.errors.Unavailable`).
Readers resolve only through the index, so files of an upload that never reached the index (a publisher killed
mid-upload) are invisible; they stay as unreferenced orphans under ``uploads/`` until
:meth:`S3AdapterStore.sweep_uploads` (``samforge registry-sweep``) deletes those older than a grace period. Version
numbers are allocated by the index commit, so they are dense and never reused; aliases, alias history, tenancy
and the revision counter behave exactly as in the file-system store (same index functions).

Loaders need files: :meth:`S3AdapterStore.resolve` downloads a version into the local cache
(``<cache_dir>/objects/<content sha256>/``), checks the content sha256 against the index before the folder is
renamed into place, and re-checks a cached folder while its stat signature is new (as the file-system store
does). A version whose objects were changed in the bucket is refused with AdapterInvalid; a damaged cached copy is
downloaded again. Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_REGION``, profiles, instance roles); an S3-compatible server is reached with ``endpoint_url``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sam_core.adapters import index as ix
from sam_core.adapters.filesystem import StatSignature, stat_signature, trusted_signature
from sam_core.adapters.store import (
    AdapterRef,
    AdapterVersion,
    content_sha256,
    parse_s3_url,
    validate_call,
    validate_name,
    validate_version,
    watch_revision,
)
from sam_core.errors import AdapterInvalid, Unavailable
from sam_core.files import fsync_tree

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
DEFAULT_SWEEP_GRACE_S = 86400.0  # an upload younger than this may still be on its way to the index
_COMMIT_ATTEMPTS = 32  # conditional index writes before giving up under contention
_RETRY_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NOT_MODIFIED_CODES = frozenset({"304", "NotModified"})
T = TypeVar("T")


class S3Client(Protocol):
    """The four boto3 S3 client calls the store makes (boto3 ships no type information)."""

    def get_object(self, **kwargs: Any) -> dict[str, Any]: ...

    def put_object(self, **kwargs: Any) -> dict[str, Any]: ...

    def delete_objects(self, **kwargs: Any) -> dict[str, Any]: ...

    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]: ...


def make_client(endpoint_url: str | None = None) -> S3Client:
    """A boto3 S3 client with bounded retries and timeouts (credentials from boto3's standard chain)."""
    import boto3  # imported here: only deployments with an s3:// registry need it loaded
    from botocore.config import Config

    config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    client: S3Client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
    return client


def _error_code(exc: Exception) -> str | None:
    """The S3 error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code", "")) or None


class S3AdapterStore:
    """An :class:`AdapterStore` in an S3 bucket; safe across threads, processes and machines."""

    def __init__(self, url: str, client: S3Client | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client if client is not None else make_client(endpoint_url)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "samforge-s3"
        self._index_key = self._key(INDEX_NAME)
        self._lock = threading.Lock()
        self._index_cache: tuple[str, dict[str, Any]] | None = None  # (ETag, parsed index)
        self._verified: dict[Path, StatSignature] = {}

    def __repr__(self) -> str:
        return f"S3AdapterStore({self.url!r})"

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _call(self, operation: str, key: str, **kwargs: Any) -> dict[str, Any]:
        """One client call; errors other than the S3 codes callers handle become Unavailable (no secrets shown)."""
        try:
            result: dict[str, Any] = getattr(self.client, operation)(Bucket=self.bucket, Key=key, **kwargs)
            return result
        except Exception as exc:
            code = _error_code(exc)
            if code in _RETRY_CODES or code in _MISSING_CODES or code in _NOT_MODIFIED_CODES:
                raise
            raise Unavailable(f"adapter registry s3://{self.bucket}/{key}: {operation} failed: "
                              f"{code or type(exc).__name__}", field="registry") from exc

    # ------------------------------------------------------------------ index

    def _read_index(self, *, fresh: bool = False) -> tuple[dict[str, Any], str | None]:
        """(index, ETag); a cached copy is revalidated with If-None-Match. Mutate only if ``fresh``."""
        with self._lock:
            cached = self._index_cache
        try:
            conditional = {"IfNoneMatch": cached[0]} if cached is not None else {}
            response = self._call("get_object", self._index_key, **conditional)
        except Exception as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                return ix.empty_index(), None
            if code in _NOT_MODIFIED_CODES and cached is not None:
                return (copy.deepcopy(cached[1]) if fresh else cached[1]), cached[0]
            raise
        raw = response["Body"].read()
        try:
            index = ix.check_format(json.loads(raw), f"s3://{self.bucket}/{self._index_key}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterInvalid(f"s3://{self.bucket}/{self._index_key} is not valid JSON ({exc})",
                                 field="index") from exc
        etag = str(response["ETag"])
        with self._lock:
            self._index_cache = (etag, index)
        return (copy.deepcopy(index) if fresh else index), etag

    def _update(self, change: Callable[[dict[str, Any]], tuple[T, bool]]) -> tuple[T, dict[str, Any]]:
        """Apply ``change`` (-> (result, changed)) to the newest index and write it back conditionally.

        A concurrent write (412/409) re-reads and re-applies; an exception from ``change`` writes nothing.
        """
        for attempt in range(_COMMIT_ATTEMPTS):
            index, etag = self._read_index(fresh=True)
            result, changed = change(index)
            if not changed:
                return result, index
            ix.bump(index)
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            body = (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()
            try:
                response = self._call("put_object", self._index_key, Body=body, ContentType="application/json",
                                      **condition)
            except Exception as exc:
                if _error_code(exc) not in _RETRY_CODES:
                    raise
                time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** attempt)))  # nosec B311  # backoff jitter, not a secret
                continue
            with self._lock:
                self._index_cache = (str(response["ETag"]), copy.deepcopy(index))
            return result, index
        raise Unavailable(f"adapter registry s3://{self.bucket}/{self._index_key} kept changing: gave up after "
                          f"{_COMMIT_ATTEMPTS} conditional writes", field="registry")

    def _version(self, index: dict[str, Any], tenant: str, ref: AdapterRef) -> tuple[AdapterVersion, dict[str, Any]]:
        """(version, its index record) for ``ref``; NotFound as in every store."""
        number = ix.lookup(index, tenant, ref)
        entry = ix.entry_of(index, tenant, ref.name)
        assert entry is not None
        record: dict[str, Any] = entry["versions"][str(number)]
        path = self.cache_dir / "objects" / record["sha256"]
        return ix.to_version(tenant, ref.name, number, entry, path), record

    # ------------------------------------------------------------------ local copies

    def _cached(self, path: Path, sha256: str) -> bool:
        """True if ``path`` holds the content ``sha256`` (re-hashed unless its stat signature is trusted)."""
        before = stat_signature(path)
        if before is None:
            return False
        with self._lock:
            known = self._verified.get(path)
        if known == before and trusted_signature(before):
            return True
        if content_sha256(path) != sha256:
            return False
        with self._lock:
            self._verified[path] = before
        return True

    def _materialize(self, version: AdapterVersion, record: dict[str, Any]) -> Path:
        """Make sure ``version.path`` holds the version's verified files (download them if needed)."""
        path = version.path
        if self._cached(path, version.sha256):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix="download-", dir=path.parent))
        try:
            for file_name in ix.ARTIFACT_FILES:
                self._download(f"{record['location']}/{file_name}", download / file_name, version)
            actual = content_sha256(download)
            if actual != version.sha256:
                raise AdapterInvalid(f"stored adapter {version.ref!r} has content sha256 {actual[:16]}..., but the "
                                     f"registry recorded {version.sha256[:16]}...; it was changed in the bucket and "
                                     "must not be served", field="adapter")
            for file_name in ix.ARTIFACT_FILES:
                os.chmod(download / file_name, 0o444)
            fsync_tree(download)
            self._replace(download, path)
        finally:
            shutil.rmtree(download, ignore_errors=True)  # gone once renamed into place
        return path

    def _download(self, key: str, target: Path, version: AdapterVersion) -> None:
        try:
            response = self._call("get_object", self._key(key))
        except Exception as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise AdapterInvalid(f"stored adapter {version.ref!r} is missing {target.name} in the bucket",
                                     field="adapter") from exc
            raise
        with open(target, "wb") as handle:
            shutil.copyfileobj(response["Body"], handle)

    def _replace(self, download: Path, path: Path) -> None:
        """Rename a verified download to ``path``, moving a damaged copy out of the way first."""
        if path.exists():
            doomed = Path(tempfile.mkdtemp(prefix="damaged-", dir=path.parent))
            try:
                os.rename(path, doomed / path.name)
            except FileNotFoundError:
                pass
            shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.rename(download, path)
        except OSError:  # another process put the same verified content there first
            if not path.is_dir():
                raise

    # ------------------------------------------------------------------ reading

    def revision(self) -> int:
        """Monotonic counter bumped by every publish / promote / rollback / delete (0 for an empty store)."""
        return int(self._read_index()[0].get("revision", 0))

    def resolve(self, tenant: str, ref: str | AdapterRef) -> AdapterVersion:
        """The version ``ref`` names for ``tenant``, downloaded and verified into the local cache."""
        validate_name("tenant", tenant)
        parsed = ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)
        version, record = self._version(self._read_index()[0], tenant, parsed)
        self._materialize(version, record)
        return version

    def get(self, tenant: str, name: str, version: int) -> AdapterVersion:
        """Metadata of one version (nothing downloaded; :meth:`resolve` is the serving path)."""
        validate_call(tenant, name=name, version=version)
        return self._version(self._read_index()[0], tenant, AdapterRef(name, version=version))[0]

    def list(self, tenant: str, name: str | None = None) -> list[AdapterVersion]:
        """All of ``tenant``'s versions (of ``name`` only, if given), by name then version; [] if none."""
        validate_name("tenant", tenant)
        if name is not None:
            validate_name("name", name)
        index = self._read_index()[0]
        return [self._version(index, tenant, AdapterRef(adapter, version=v))[0]
                for adapter, v, _ in ix.versions_of(index, tenant, name)]

    def path_of(self, version: AdapterVersion) -> Path:
        """The local folder holding ``version``'s verified artifact (downloaded if needed; NotFound if deleted)."""
        validate_name("tenant", version.tenant)
        validate_name("name", version.name)
        validate_version(version.version)
        found, record = self._version(self._read_index()[0], version.tenant,
                                      AdapterRef(version.name, version=version.version))
        return self._materialize(found, record)

    def watch(self, callback: Callable[[int], None], *, interval: float = 1.0) -> Callable[[], None]:
        """Poll :meth:`revision` every ``interval`` s; ``callback(revision)`` on change (see :func:`watch_revision`)."""
        return watch_revision(self.revision, callback, interval=interval, label=f"adapter registry {self.url}")

    # ------------------------------------------------------------------ writing

    def publish(self, tenant: str, name: str, source_dir: str | os.PathLike[str], *,
                parent: str | AdapterRef | None = None) -> AdapterVersion:
        """Upload the artifact in ``source_dir`` and add it to the index as the next version of ``tenant``/``name``.

        The artifact is validated before anything is uploaded (AdapterInvalid, nothing changes); ``parent`` is
        recorded as ``name:N`` (NotFound(field="parent") if it does not resolve; the upload is then removed).
        """
        validate_call(tenant, name=name)
        parent_ref = ix.parent_ref(parent)
        source = ix.artifact_source(Path(source_dir))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix="publish-", dir=self.cache_dir))
        try:
            record = ix.stage_artifact(source, staged)
            record["location"] = f"{tenant}/{name}/uploads/{uuid.uuid4().hex}"
            self._upload(staged, record["location"])
            try:
                number, index = self._update(lambda index: (ix.add_version(index, tenant, name, record, parent_ref),
                                                            True))
            except BaseException:
                self._remove_objects(record["location"])
                raise
            version, _ = self._version(index, tenant, AdapterRef(name, version=number))
            if not self._cached(version.path, version.sha256):
                version.path.parent.mkdir(parents=True, exist_ok=True)
                self._replace(staged, version.path)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("adapter registry: published %s/%s (sha256 %s)", tenant, version.ref, version.sha256[:16])
        return version

    def _upload(self, staged: Path, location: str) -> None:
        for file_name in ix.ARTIFACT_FILES:
            with open(staged / file_name, "rb") as handle:
                self._call("put_object", self._key(location, file_name), Body=handle, IfNoneMatch="*")

    def _remove_objects(self, location: str) -> None:
        """Delete a version's objects (best effort: a leftover is an invisible orphan, logged)."""
        keys = [{"Key": self._key(location, f)} for f in ix.ARTIFACT_FILES]
        try:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        except Exception as exc:
            log.warning("adapter registry: could not remove s3://%s/%s (%s); it is not referenced by the index",
                        self.bucket, self._key(location), _error_code(exc) or type(exc).__name__)

    def promote(self, tenant: str, name: str, alias: str, version: int) -> AdapterVersion:
        """Point ``name@alias`` at ``version`` (which must download and verify); the previous target is remembered.

        Promoting an alias to the version it already points to changes nothing (no history entry, same revision).
        """
        validate_call(tenant, name=name, alias=alias, version=version)
        self._materialize(*self._version(self._read_index()[0], tenant, AdapterRef(name, version=version)))

        def change(index: dict[str, Any]) -> tuple[int | None, bool]:
            previous = ix.promote(index, tenant, name, alias, version)  # NotFound if deleted meanwhile
            return previous, previous != version

        previous, index = self._update(change)
        if previous != version:
            log.info("adapter registry: promoted %s/%s@%s: %s -> %s", tenant, name, alias, previous, version)
        return self._version(index, tenant, AdapterRef(name, version=version))[0]

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion:
        """Move ``name@alias`` back to the version it pointed to before its last move.

        NotFound if the alias does not exist; AdapterConflict (FAILED_PRECONDITION) if it has no history;
        AdapterInvalid if the earlier version no longer verifies (the alias then stays where it is).
        """
        validate_call(tenant, name=name, alias=alias)

        def change(index: dict[str, Any]) -> tuple[tuple[int, int], bool]:
            target = ix.rollback_target(index, tenant, name, alias)
            self._materialize(*self._version(index, tenant, AdapterRef(name, version=target)))
            return ix.rollback(index, tenant, name, alias), True

        (was, target), index = self._update(change)
        log.info("adapter registry: rolled back %s/%s@%s: %s -> %s", tenant, name, alias, was, target)
        return self._version(index, tenant, AdapterRef(name, version=target))[0]

    def sweep_uploads(self, older_than_s: float = DEFAULT_SWEEP_GRACE_S, *, dry_run: bool = False) -> tuple[str, ...]:
        """Delete the uploads no index version references whose newest object is older than ``older_than_s``.

        The bucket is listed first and the index read after it: an upload that reaches the index meanwhile is
        referenced, and one still being uploaded is younger than the grace period (keep it far above the longest
        upload). Returns the upload locations removed (or that would be, with ``dry_run``).
        """
        uploads: dict[str, float] = {}  # location -> newest LastModified (unix seconds)
        for key, modified in self._listed():
            parts = key[len(self.prefix) + 1:].split("/") if self.prefix else key.split("/")
            if len(parts) == 5 and parts[2] == "uploads":
                location = "/".join(parts[:4])
                uploads[location] = max(uploads.get(location, 0.0), modified)
        index, _ = self._read_index(fresh=True)
        referenced = {record["location"] for names in index["tenants"].values() for entry in names.values()
                      for record in entry["versions"].values()}
        cutoff = time.time() - older_than_s
        orphans = tuple(sorted(loc for loc, newest in uploads.items() if loc not in referenced and newest < cutoff))
        for location in () if dry_run else orphans:
            self._remove_objects(location)
        log.info("adapter registry: %s %d orphaned upload(s) in s3://%s/%s", "found" if dry_run else "removed",
                 len(orphans), self.bucket, self.prefix)
        return orphans

    def _listed(self) -> Iterator[tuple[str, float]]:
        """(key, LastModified as unix seconds) of every object under the prefix."""
        token: dict[str, str] = {}
        while True:
            try:
                page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), **token)
            except Exception as exc:
                raise Unavailable(f"adapter registry s3://{self.bucket}/{self.prefix}: listing failed: "
                                  f"{_error_code(exc) or type(exc).__name__}", field="registry") from exc
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, tenant: str, name: str, version: int) -> None:
        """Remove one version from the index, then its objects (its number is never reused). Refused while aliased."""
        validate_call(tenant, name=name, version=version)
        record, _ = self._update(lambda index: (ix.delete(index, tenant, name, version), True))
        self._remove_objects(record["location"])
        log.info("adapter registry: deleted %s/%s:%d", tenant, name, version)
