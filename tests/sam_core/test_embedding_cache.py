"""Tests of sam_core.inference.embedding_cache: the canonical embedding key and the in-memory LRU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sam_core.errors import InvalidInput
from sam_core.inference.embedding_cache import MemoryEmbeddingLRU, embedding_key
from sam_core.inference.predictor import Predictor
from sam_core.inference.types import Embedding
from sam_core.io.images import image_content_hash


@pytest.fixture(scope="module")
def embedding(tiny_model) -> Embedding:
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    return Predictor(tiny_model).encode_one(image)


def _fake(nbytes: int) -> Embedding:
    """An Embedding whose features take exactly ``nbytes`` (a multiple of 4)."""
    return Embedding({"image_embed": torch.zeros(1, 1, 1, nbytes // 4)}, (4, 4), (4, 4), "m", "p")


# ---------------------------------------------------------------------------------------------- keys


def test_key_is_sha256_hex_and_changes_with_each_field() -> None:
    image_hash = image_content_hash(np.zeros((4, 5, 3), np.uint8))
    base = (image_hash, "model-a", "pre-v1", None)
    key = embedding_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0 and key == key.lower()
    assert embedding_key(*base) == key
    variants = [
        (image_content_hash(np.ones((4, 5, 3), np.uint8)), "model-a", "pre-v1", None),
        (image_hash, "model-b", "pre-v1", None),
        (image_hash, "model-a", "pre-v2", None),
        (image_hash, "model-a", "pre-v1", "adapter-1"),
        (image_hash, "model-a", "pre-v1", "None"),
    ]
    keys = {embedding_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # None and "" both mean "no adapter"; moving text between fields never collides.
    assert embedding_key(image_hash, "model-a", "pre-v1", "") == key
    assert embedding_key("ab", "c", "d", None) != embedding_key("a", "bc", "d", None)
    with pytest.raises(InvalidInput) as info:
        embedding_key("", "m", "p", None)
    assert info.value.field == "image_hash"


# ----------------------------------------------------------------------------------------------- LRU


def test_lru_evicts_least_recently_used() -> None:
    lru = MemoryEmbeddingLRU(max_bytes=300)
    a, b, c, d = _fake(100), _fake(100), _fake(100), _fake(100)
    assert lru.put("a", a) and lru.put("b", b) and lru.put("c", c)
    assert lru.bytes == 300 and lru.evictions == 0
    assert lru.get("a") is a  # a is now the most recently used
    assert lru.put("d", d)
    assert lru.keys() == ["c", "a", "d"] and "b" not in lru
    assert lru.evictions == 1 and lru.bytes == 300
    assert lru.get("b") is None
    # A big entry evicts as many as needed, oldest first.
    assert lru.put("big", _fake(200))
    assert lru.keys() == ["d", "big"] and lru.evictions == 3 and lru.bytes == 300
    assert lru.stats() == {"hits": 1, "misses": 1, "evictions": 3, "rejected": 0, "bytes": 300,
                           "entries": 2, "max_bytes": 300}


def test_lru_refuses_oversize_and_replaces() -> None:
    lru = MemoryEmbeddingLRU(max_bytes=200)
    assert lru.put("a", _fake(100))
    assert not lru.put("huge", _fake(204))
    assert "huge" not in lru and lru.keys() == ["a"] and lru.rejected == 1 and lru.evictions == 0
    # Replacing a key does not double count; an oversize replacement drops the stale value.
    assert lru.put("a", _fake(160)) and lru.bytes == 160 and len(lru) == 1
    assert not lru.put("a", _fake(400)) and lru.bytes == 0 and "a" not in lru
    assert lru.get("a") is None and lru.misses == 1 and lru.hits == 0


def test_lru_get_or_compute_pop_clear(embedding: Embedding) -> None:
    lru = MemoryEmbeddingLRU(max_bytes=10 * embedding.nbytes)
    calls: list[int] = []

    def compute() -> Embedding:
        calls.append(1)
        return embedding

    assert lru.get_or_compute("k", compute) is embedding
    assert lru.get_or_compute("k", compute) is embedding
    assert len(calls) == 1 and lru.hits == 1 and lru.misses == 1 and lru.bytes == embedding.nbytes
    assert lru.pop("k") is embedding and lru.bytes == 0 and lru.pop("k") is None
    lru.put("x", embedding)
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0
    with pytest.raises(ValueError):
        MemoryEmbeddingLRU(max_bytes=-1)


def test_lru_concurrent_access_respects_budget() -> None:
    budget = 1000
    lru = MemoryEmbeddingLRU(max_bytes=budget)
    sizes = [40, 80, 120, 200, 400]
    violations: list[int] = []
    gets = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        local_gets = 0
        for _ in range(400):
            key = f"k{int(rng.integers(0, 30))}"
            if rng.random() < 0.5:
                lru.put(key, _fake(sizes[int(rng.integers(0, len(sizes)))]))
            else:
                lru.get(key)
                local_gets += 1
            if lru.bytes > budget:
                violations.append(lru.bytes)
        with lock:
            gets[0] += local_gets

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = lru.stats()
    assert not violations and stats["bytes"] <= budget
    assert stats["hits"] + stats["misses"] == gets[0]
    # The byte counter equals the sum of the entries actually held.
    assert stats["bytes"] == sum(lru.get(k).nbytes for k in lru.keys())
