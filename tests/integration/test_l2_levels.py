"""A three-level (SAM 2.1-shaped) embedding through a real redis-server: bit-exact, levels in order."""

from __future__ import annotations

import pytest

from sam_core.inference.types import Embedding
from services.encoder.l2 import RedisL2
from tests.services.test_embedding_levels import assert_same, three_levels, tiled_three_levels

pytestmark = pytest.mark.integration


def test_redis_l2_round_trip_of_three_levels(redis_url):
    l2 = RedisL2(redis_url, 60)
    embedding, tiled = three_levels(4), tiled_three_levels()
    l2.put("a" * 64, "t", embedding)
    l2.put("b" * 64, "t", tiled)
    back = l2.get("a" * 64, "t")
    assert isinstance(back, Embedding)
    assert_same(back, embedding)
    again = l2.get("b" * 64, "t")
    assert again is not None and not isinstance(again, Embedding)
    for ours, theirs in zip([again.whole, *again.tiles], [tiled.whole, *tiled.tiles], strict=True):
        assert_same(ours, theirs)
    assert l2.get("a" * 64, "other") is None and l2.errors == 0
