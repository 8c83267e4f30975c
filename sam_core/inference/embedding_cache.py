"""The canonical embedding cache key and the in-memory LRU of embeddings.

* :func:`embedding_key` is the one canonical cache key of an embedding: the training store
  (:class:`sam_core.inference.embedding_store.EmbeddingStore`), the encoder service's cache and the
  decoder service all use it. Two keys are equal only if the image content, the model (weights),
  the preprocessing version and the encoder adapter all are.
* :class:`MemoryEmbeddingLRU` is a thread-safe in-memory LRU of embeddings with a byte budget that
  evicts least-recently-used entries before storing a new one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from sam_core.errors import InvalidInput

KEY_FORMAT = "samforge-embedding-key-v1"
"""Domain tag hashed into every :func:`embedding_key` (bump it if the key's fields ever change)."""


def canonical_encoder_adapter(encoder_adapter: str | None) -> str | None:
    """The encoder adapter as keys and stores record it: ``None`` for the base encoder (so does ``""``)."""
    return encoder_adapter or None


def embedding_key(image_hash: str, model_id: str, preprocess_version: str, encoder_adapter: str | None) -> str:
    """The canonical cache key of one image's embedding: a 64-character lowercase SHA-256 hex digest.

    Fields (all hashed, so two keys are equal only if every field is):

    * ``image_hash``: content hash of the canonical image (:func:`sam_core.io.images.image_content_hash`);
    * ``model_id``: the loaded model's id (``LoadedModel.model_id``, which pins the weights);
    * ``preprocess_version``: ``ModelSpec.preprocess_version`` (resize, normalisation, input size);
    * ``encoder_adapter``: id of the adapter applied to the image encoder, or ``None`` (``""`` is
      treated as ``None``) for the base encoder.

    The fields are serialised as a JSON array behind the domain tag :data:`KEY_FORMAT`, so no
    choice of field values can make two different tuples collide by concatenation (``None`` is JSON
    ``null``, distinct from any string).
    """
    for name, value in (("image_hash", image_hash), ("model_id", model_id), ("preprocess_version", preprocess_version)):
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"must be a non-empty string, got {value!r}", field=name)
    if encoder_adapter is not None and not isinstance(encoder_adapter, str):
        raise InvalidInput(f"must be a string or None, got {encoder_adapter!r}", field="encoder_adapter")
    payload = json.dumps(
        [KEY_FORMAT, image_hash, model_id, preprocess_version, canonical_encoder_adapter(encoder_adapter)],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class SizedValue(Protocol):
    """What the LRU stores: anything that knows its size in bytes (an Embedding, a tiled one, a cache entry)."""

    @property
    def nbytes(self) -> int: ...


ValueT = TypeVar("ValueT", bound=SizedValue)


class MemoryEmbeddingLRU(Generic[ValueT]):
    """Thread-safe in-memory LRU of embeddings (any :class:`SizedValue`) by key, bounded by ``max_bytes``.

    Sizes are the values' ``nbytes``. :meth:`put` evicts least-recently-used entries until the new one
    fits; an entry larger than the whole budget is not stored (counted in ``rejected``). Counters are
    plain attributes (``hits``, ``misses``, ``evictions``, ``rejected``, ``bytes``) and are also
    returned by :meth:`stats`. Embeddings are stored by reference: callers must not mutate them.
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[ValueT, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> ValueT | None:
        """The embedding for ``key`` (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, embedding: ValueT) -> bool:
        """Insert or replace ``key`` as most recently used; False (nothing stored) if it exceeds the budget.

        A replaced or rejected key's previous entry is dropped (not counted as an eviction).
        """
        size = embedding.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                self.rejected += 1
                return False
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self.bytes -= evicted_size
                self.evictions += 1
            self._entries[key] = (embedding, size)
            self.bytes += size
            return True

    def get_or_compute(self, key: str, compute: Callable[[], ValueT]) -> ValueT:
        """Cached embedding for ``key``, or ``compute()`` (run outside the lock) cached and returned."""
        found = self.get(key)
        if found is not None:
            return found
        embedding = compute()
        self.put(key, embedding)
        return embedding

    def pop(self, key: str) -> ValueT | None:
        """Remove and return ``key``'s embedding (None if absent); not counted as hit, miss or eviction."""
        with self._lock:
            item = self._entries.pop(key, None)
            if item is None:
                return None
            self.bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        """Drop every entry (counters other than ``bytes`` are kept)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def values(self) -> list[ValueT]:
        """Embeddings from least to most recently used (not counted as hits)."""
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def __contains__(self, key: object) -> bool:
        """Membership test that neither counts nor refreshes recency."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "evictions", "rejected", "bytes", "entries", "max_bytes"}`` snapshot."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "rejected": self.rejected,
                "bytes": self.bytes,
                "entries": len(self._entries),
                "max_bytes": self.max_bytes,
            }
