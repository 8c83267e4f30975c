"""The AdapterRegistry API: each call resolves the caller's tenant, then makes one store call.

The store validates names, versions and references (InvalidInput), reports another tenant's adapter exactly
like a missing one (NotFound) and refuses deleting an aliased version or rolling back an alias without
history (AdapterConflict -> FAILED_PRECONDITION).

``promote`` is guarded: it refuses (AdapterConflict -> FAILED_PRECONDITION, naming both versions and their
scores) a version that scores below the alias's current version on their held-out split, or that was scored on
another split than it, unless ``force`` (:func:`sam_core.training.guard.promotion_refusal`). :func:`champion`
is the version a new job of a name must beat.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sam_core.adapters.store import AdapterConflict, AdapterStore, AdapterVersion
from sam_core.errors import InvalidInput, NotFound
from sam_core.training.guard import promotion_refusal
from services.common.interceptors import resolve_tenant


class TenantRegistry:
    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def list(self, tenant: str, name: str = "") -> list[AdapterVersion]:
        return self.store.list(resolve_tenant(tenant), name or None)

    def get(self, tenant: str, ref: str) -> AdapterVersion:
        """``name`` (latest), ``name:3`` or ``name@prod``; the files are checked against the index."""
        tenant = resolve_tenant(tenant)
        if not ref:
            raise InvalidInput("required: name, name:version or name@alias", field="ref")
        return self.store.resolve(tenant, ref)

    def promote(self, tenant: str, name: str, alias: str, version: int, *, force: bool = False) -> AdapterVersion:
        tenant = resolve_tenant(tenant)
        if not force:
            candidate = self.store.get(tenant, name, version)
            current = _current(self.store, tenant, name, alias)
            refusal = None if current is None or current.version == version else promotion_refusal(
                candidate.ref, candidate.metrics, f"{current.ref} ({name}@{alias})", current.metrics)
            if refusal is not None:
                raise AdapterConflict(refusal, field="version")
        return self.store.promote(tenant, name, alias, version)

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion:
        return self.store.rollback(resolve_tenant(tenant), name, alias)

    def delete(self, tenant: str, name: str, version: int) -> None:
        self.store.delete(resolve_tenant(tenant), name, version)


def _current(store: AdapterStore, tenant: str, name: str, alias: str) -> AdapterVersion | None:
    """The version ``name@alias`` points at, or None when the alias does not exist (yet)."""
    try:
        return store.resolve(tenant, f"{name}@{alias}")
    except NotFound:
        return None


def champion(store: AdapterStore, tenant: str, name: str, alias: str) -> AdapterVersion | None:
    """What a new job of ``name`` must beat: the version ``name@alias`` points at (``alias`` = the job's
    promote_to), else the latest version of ``name``, else None (the base model)."""
    current = _current(store, tenant, name, alias) if alias else None
    if current is not None:
        return current
    try:
        return store.resolve(tenant, name)
    except NotFound:
        return None


def copy_version(store: AdapterStore, tenant: str, ref: str, folder: Path) -> Path:
    """``ref``'s files copied to ``folder`` once (a staging folder renamed into place, so a crash leaves no half
    copy): a worker may run where only the jobs volume is mounted (kubernetes)."""
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(store.path_of(store.resolve(tenant, ref)), staging)
        staging.rename(folder)
    return folder
