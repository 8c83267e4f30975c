"""Per-tenant counters behind ``EncoderService.Stats``: a tenant sees its own cache use, never another's.

The engine adds a :class:`TenantUsage` delta at each event (an L1 hit or miss, an L2 hit, images encoded, an
L1 entry stored). :class:`UsageBook` keeps the counters of at most :data:`MAX_TENANTS` tenants (least recently
active dropped first: without auth any caller can name a new tenant, so the book must stay bounded); a dropped
tenant's counters restart from zero.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

MAX_TENANTS = 10_000


@dataclass
class TenantUsage:
    """Counters of one tenant; ``stored``: L1 entries it added (evictions = stored - entries still cached)."""

    hits: int = 0
    misses: int = 0
    encodes: int = 0
    l2_hits: int = 0
    stored: int = 0


class UsageBook:
    """Thread-safe {tenant: TenantUsage}, bounded to ``max_tenants``."""

    def __init__(self, max_tenants: int = MAX_TENANTS) -> None:
        self.max_tenants = max_tenants
        self._book: OrderedDict[str, TenantUsage] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tenant: str, delta: TenantUsage) -> None:
        with self._lock:
            usage = self._book.setdefault(tenant, TenantUsage())
            self._book.move_to_end(tenant)
            for counter in fields(TenantUsage):
                setattr(usage, counter.name, getattr(usage, counter.name) + getattr(delta, counter.name))
            while len(self._book) > self.max_tenants:
                self._book.popitem(last=False)

    def of(self, tenant: str) -> TenantUsage:
        """A copy of ``tenant``'s counters (zeros for a tenant never seen)."""
        with self._lock:
            found = self._book.get(tenant)
            return replace(found) if found is not None else TenantUsage()
