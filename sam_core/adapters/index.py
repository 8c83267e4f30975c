"""The registry index shared by every :class:`~sam_core.adapters.store.AdapterStore`: format and pure operations.

The index is one JSON document::

    {"format_version": 1, "revision": N,
     "tenants": {tenant: {name: {"next_version": int, "versions": {"<N>": record},
                                 "aliases": {alias: N}, "alias_history": {alias: [N, ...]}}}}}

A store reads it, applies one of the functions below to a private copy and replaces it atomically (the
file-system store under an flock with ``os.replace``, the S3 store with a conditional put on the ETag).
These functions only change the document: they never touch files, so a refused operation (NotFound,
AdapterConflict) has changed nothing. ``revision`` is bumped by :func:`bump` once per committed change.

A version ``record`` holds the content digest, the per-file sha256s and the artifact metadata (see
:func:`index_record`); a store may add its own keys (the S3 store records where the files are).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sam_core.adapters.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    read_adapter_config,
    read_adapter_tensors,
)
from sam_core.adapters.store import AdapterConflict, AdapterRef, AdapterVersion, content_sha256
from sam_core.errors import AdapterInvalid, InvalidInput, NotFound
from sam_core.files import file_sha256, fsync_tree

INDEX_FORMAT_VERSION = 1
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME)


def empty_index() -> dict[str, Any]:
    return {"format_version": INDEX_FORMAT_VERSION, "revision": 0, "tenants": {}}


def check_format(index: object, source: str) -> dict[str, Any]:
    """``index`` if it is an index this code can read, else AdapterInvalid(field="index")."""
    if not isinstance(index, dict) or index.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise AdapterInvalid(f"{source} has an unsupported format", field="index")
    return index


def bump(index: dict[str, Any]) -> int:
    """Increment and return the revision (once per committed change)."""
    index["revision"] = int(index.get("revision", 0)) + 1
    return int(index["revision"])


def not_found(ref: AdapterRef | str) -> NotFound:
    """The same error whether the tenant, the name or the version is unknown: no existence leak."""
    return NotFound(f"adapter {str(ref)!r} not found", field="adapter")


def parent_ref(parent: str | AdapterRef | None) -> AdapterRef | None:
    """``parent`` as a reference; a malformed one is InvalidInput on the field ``parent``."""
    if parent is None or isinstance(parent, AdapterRef):
        return parent
    try:
        return AdapterRef.parse(parent)
    except InvalidInput as exc:
        raise InvalidInput(exc.detail, field="parent") from exc


def artifact_source(source: Path) -> Path:
    """``source`` if it is a folder holding both artifact files (NotFound / AdapterInvalid otherwise)."""
    if not source.is_dir():
        raise NotFound(f"{source} is not a folder", field="source_dir")
    missing = [f for f in ARTIFACT_FILES if not (source / f).is_file()]
    if missing:
        raise AdapterInvalid(f"{source} is not a complete adapter artifact: missing {', '.join(missing)}",
                             field="adapter")
    return source


def stage_artifact(source: Path, staged: Path) -> dict[str, Any]:
    """Copy the artifact files into ``staged`` (read-only, fsynced), validate the copy, return its index record.

    Exactly the bytes that will become visible are validated; a broken artifact is AdapterInvalid.
    """
    for file_name in ARTIFACT_FILES:
        shutil.copyfile(source / file_name, staged / file_name)
        os.chmod(staged / file_name, 0o444)  # immutable by convention; a hint against in-place edits
    fsync_tree(staged)
    try:
        config = read_adapter_config(staged)
        read_adapter_tensors(staged, config)
    except NotFound as exc:
        raise AdapterInvalid(f"{source}: {exc.detail}", field="adapter") from exc
    return index_record(staged, config)


def index_record(folder: Path, config: AdapterConfig) -> dict[str, Any]:
    """What the index stores about one version (``parent`` is filled in when the version is added)."""
    return {
        "sha256": content_sha256(folder), "files": {name: file_sha256(folder / name) for name in ARTIFACT_FILES},
        "method": config.method, "base_model_id": config.base_model_id,
        "shares_base_embeddings": config.shares_base_embeddings,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": dict(config.metrics), "n_parameters": int(config.n_parameters), "parent": None,
    }


def entry_of(index: dict[str, Any], tenant: str, name: str) -> dict[str, Any] | None:
    entry: dict[str, Any] | None = index["tenants"].get(tenant, {}).get(name)
    return entry


def to_version(tenant: str, name: str, version: int, entry: dict[str, Any], path: Path) -> AdapterVersion:
    """The :class:`AdapterVersion` of ``entry``'s ``version``, its files at ``path``."""
    record = entry["versions"][str(version)]
    aliases = tuple(sorted(a for a, v in entry["aliases"].items() if v == version))
    return AdapterVersion(
        tenant=tenant, name=name, version=version, sha256=record["sha256"], method=record["method"],
        base_model_id=record["base_model_id"], shares_base_embeddings=record["shares_base_embeddings"],
        created_at=record["created_at"], parent=record["parent"], aliases=aliases,
        metrics=copy.deepcopy(record["metrics"]), n_parameters=record["n_parameters"], path=path,
    )


def lookup(index: dict[str, Any], tenant: str, ref: AdapterRef) -> int:
    """The version number ``ref`` names in ``tenant`` (NotFound, the same for every kind of miss)."""
    entry = entry_of(index, tenant, ref.name)
    if entry is None or not entry["versions"]:
        raise not_found(ref)
    if ref.alias is not None:
        if ref.alias not in entry["aliases"]:
            raise not_found(ref)
        version = int(entry["aliases"][ref.alias])
    elif ref.version is not None:
        version = ref.version
    else:
        version = max(int(v) for v in entry["versions"])
    if str(version) not in entry["versions"]:
        raise not_found(ref)
    return version


def versions_of(index: dict[str, Any], tenant: str, name: str | None) -> Iterable[tuple[str, int, dict[str, Any]]]:
    """(name, version, entry) of ``tenant``'s versions (of ``name`` only, if given), by name then version."""
    entries = index["tenants"].get(tenant, {})
    for adapter in sorted(entries if name is None else [name] if name in entries else []):
        entry = entries[adapter]
        for version in sorted(int(k) for k in entry["versions"]):
            yield adapter, version, entry


def add_version(index: dict[str, Any], tenant: str, name: str, record: dict[str, Any],
                parent: AdapterRef | None) -> int:
    """Record ``record`` as the next version of ``tenant``/``name`` (numbers are never reused); return it.

    ``parent`` must resolve in the same tenant (NotFound(field="parent") otherwise) and is stored as ``name:N``.
    """
    record = dict(record)
    if parent is not None:
        try:
            record["parent"] = f"{parent.name}:{lookup(index, tenant, parent)}"
        except NotFound as exc:
            raise NotFound(f"parent {str(parent)!r} not found", field="parent") from exc
    entry = index["tenants"].setdefault(tenant, {}).setdefault(
        name, {"next_version": 1, "versions": {}, "aliases": {}, "alias_history": {}})
    number = int(entry["next_version"])
    entry["versions"][str(number)] = record
    entry["next_version"] = number + 1
    return number


def promote(index: dict[str, Any], tenant: str, name: str, alias: str, version: int) -> int | None:
    """Point ``name@alias`` at ``version``, pushing the previous target on its history.

    Returns the previous target, or raises NotFound; returns ``version`` itself (and changes nothing) if
    the alias already points there.
    """
    lookup(index, tenant, AdapterRef(name, version=version))
    entry = entry_of(index, tenant, name)
    assert entry is not None
    previous: int | None = entry["aliases"].get(alias)
    if previous == version:
        return previous
    if previous is not None:
        entry["alias_history"].setdefault(alias, []).append(previous)
    entry["aliases"][alias] = version
    return previous


def rollback_target(index: dict[str, Any], tenant: str, name: str, alias: str) -> int:
    """The version ``name@alias`` would roll back to (NotFound; AdapterConflict if it has no history)."""
    entry = entry_of(index, tenant, name)
    if entry is None or not entry["versions"] or alias not in entry["aliases"]:
        raise not_found(AdapterRef(name, alias=alias))
    history = entry["alias_history"].get(alias, [])
    if not history:
        raise AdapterConflict(f"{name}@{alias} has no earlier version to roll back to", field="alias")
    return int(history[-1])


def rollback(index: dict[str, Any], tenant: str, name: str, alias: str) -> tuple[int, int]:
    """Move ``name@alias`` back one step of its history; returns (from, to)."""
    target = rollback_target(index, tenant, name, alias)
    entry = entry_of(index, tenant, name)
    assert entry is not None
    entry["alias_history"][alias].pop()
    was = int(entry["aliases"][alias])
    entry["aliases"][alias] = target
    return was, target


def delete(index: dict[str, Any], tenant: str, name: str, version: int) -> dict[str, Any]:
    """Remove one version from the index (refused while aliased); returns its record."""
    lookup(index, tenant, AdapterRef(name, version=version))
    entry = entry_of(index, tenant, name)
    assert entry is not None
    aliases = sorted(a for a, v in entry["aliases"].items() if v == version)
    if aliases:
        shown = ", ".join(f"{name}@{a}" for a in aliases)
        raise AdapterConflict(f"{name}:{version} is the target of alias {shown}; promote the alias to another "
                              "version (or roll it back) before deleting", field="version")
    record: dict[str, Any] = entry["versions"].pop(str(version))
    for alias, history in entry["alias_history"].items():
        entry["alias_history"][alias] = compact(history, entry["aliases"].get(alias), version)
    return record


def compact(history: list[int], current: int | None, deleted: int) -> list[int]:
    """History without ``deleted``, without repeats and without a top equal to the current target."""
    out: list[int] = []
    for version in history:
        if version != deleted and (not out or out[-1] != version):
            out.append(version)
    while out and out[-1] == current:
        out.pop()
    return out
