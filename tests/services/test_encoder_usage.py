"""EmbeddingEngine.stats per tenant (tiny model, in process): one tenant's entries, bytes, evictions and
counters; the bounded per-tenant book behind them."""

from __future__ import annotations

import pytest

from services.common.settings import EncoderSettings
from services.encoder.engine import EmbeddingEngine
from services.encoder.usage import TenantUsage, UsageBook
from tests.services.test_encoder_engine import TINY_BYTES, png


@pytest.fixture
def engine(tiny_model, tmp_path):
    settings = EncoderSettings.from_env({"SAMFORGE_MODEL": "tiny", "SAMFORGE_REGISTRY_DIR": str(tmp_path / "r"),
                                         "SAMFORGE_CACHE_BYTES": str(3 * TINY_BYTES)})
    engine = EmbeddingEngine(tiny_model, settings)
    yield engine
    engine.close()


def test_evictions_and_entries_are_counted_for_the_tenant_that_owned_them(engine):
    for seed in range(3):
        engine.embed("a", png(seed))
    engine.embed("b", png(0))  # same pixels as a's first image: its own entry, evicting a's oldest
    engine.embed("b", png(0))
    a, b = engine.stats("a"), engine.stats("b")
    assert (a.cache_entries, a.cache_bytes, a.evictions, a.encodes, a.misses, a.hits) == (2, 2 * TINY_BYTES, 1, 3, 3, 0)
    assert (b.cache_entries, b.cache_bytes, b.evictions, b.encodes, b.misses, b.hits) == (1, TINY_BYTES, 0, 1, 1, 1)
    nobody = engine.stats("c")
    assert (nobody.cache_entries, nobody.encodes, nobody.evictions) == (0, 0, 0)
    assert a.cache_budget_bytes == nobody.cache_budget_bytes == 3 * TINY_BYTES


def test_the_usage_book_keeps_the_most_recently_active_tenants():
    book = UsageBook(max_tenants=2)
    for tenant in ("a", "b", "a", "c"):
        book.add(tenant, TenantUsage(hits=1))
    assert (book.of("a").hits, book.of("b").hits, book.of("c").hits) == (2, 0, 1)
    copy = book.of("a")
    copy.hits = 99
    assert book.of("a").hits == 2
