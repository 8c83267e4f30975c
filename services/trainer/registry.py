"""The AdapterRegistry API: each call resolves the caller's tenant, then makes one store call.

The store validates names, versions and references (InvalidInput), reports another tenant's adapter exactly
like a missing one (NotFound) and refuses deleting an aliased version or rolling back an alias without
history (AdapterConflict -> FAILED_PRECONDITION).
"""

from __future__ import annotations

from sam_core.adapters.store import AdapterStore, AdapterVersion
from sam_core.errors import InvalidInput
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

    def promote(self, tenant: str, name: str, alias: str, version: int) -> AdapterVersion:
        return self.store.promote(resolve_tenant(tenant), name, alias, version)

    def rollback(self, tenant: str, name: str, alias: str) -> AdapterVersion:
        return self.store.rollback(resolve_tenant(tenant), name, alias)

    def delete(self, tenant: str, name: str, version: int) -> None:
        self.store.delete(resolve_tenant(tenant), name, version)
