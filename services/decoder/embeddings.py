"""Where the decoder's embeddings come from: a local byte-budget LRU in front of the encoder service.

:meth:`Embeddings.fetch` for one request (tenant already resolved):

1. an ``embedding_key`` in the local LRU (keyed by tenant *and* key, so a tenant cannot use another
   tenant's key even on the decoder) is served without calling the encoder;
2. otherwise the encoder's ``GetEmbedding`` streams it (then it is cached locally);
3. a key the encoder does not know (evicted, expired, the encoder restarted) is re-embedded from the
   request's image when there is one (``re_embedded``), else NOT_FOUND telling the client to send the image;
4. a request with only an image is embedded (``Embed`` with tenant, encoder-side adapter and tiling) and
   then fetched by the returned key (a local hit when the decoder already holds it). The key is remembered
   under the sha256 of the image *bytes* (with tenant, adapter and tiling), so the next request with the
   same bytes is served from the local LRU without the Embed round trip (the image is not even decoded;
   identical bytes always give the same key). The memo holds ``MEMO_ENTRIES`` keys, least recent out.

The encoder is reached through an :class:`EmbeddingSource` (gRPC in production, see ``encoder_client``),
which raises sam_core's typed errors: NotFound for an unknown key, Unavailable when the encoder cannot be
reached, and the encoder's own errors (InvalidInput for a bad image, ...) otherwise.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sam_core.errors import InvalidInput, NotFound
from sam_core.inference.embedding_cache import MemoryEmbeddingLRU
from services.common import metrics
from services.common.embedding_codec import ServedEmbedding
from services.common.tiling import TilingRequest

CACHE_LABEL = "decoder"
MEMO_ENTRIES = 4096
_KEY_RE = re.compile(r"[0-9a-f]{64}")
Metadata = tuple[tuple[str, str | bytes], ...]
"""gRPC call metadata: (key, value) pairs, values bytes only for keys ending in "-bin"."""


def _no_deadline() -> float | None:
    return None


@dataclass(frozen=True)
class CallOptions:
    """What one request forwards to the encoder: the caller's ``authorization`` metadata and its deadline.

    ``time_remaining()`` is the caller's remaining time in seconds (None: no deadline).
    """

    metadata: Metadata = ()
    time_remaining: Callable[[], float | None] = field(default=_no_deadline)


class EmbeddingSource(Protocol):
    """The encoder as the decoder sees it (typed errors only, see the module docstring)."""

    def embed(self, tenant: str, image: bytes, *, adapter: str, tiling: TilingRequest | None,
              call: CallOptions) -> str:
        """Embed ``image`` for ``tenant`` (``adapter``: an exact "name:N" encoder-side adapter or ""); the key."""
        ...

    def get(self, tenant: str, key: str, *, call: CallOptions) -> ServedEmbedding:
        """The cached embedding ``key`` of ``tenant`` (NotFound if the encoder does not hold it)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """``source``: "local" (decoder LRU), "encoder" (GetEmbedding) or "embedded" (Embed, then fetched)."""

    key: str
    value: ServedEmbedding
    re_embedded: bool
    source: str


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise InvalidInput("expected the 64-character hex key returned by EncoderService.Embed",
                           field="embedding_key")
    return key


class Embeddings:
    """Local LRU (``max_bytes`` of features) + fetch / re-embed rules over an :class:`EmbeddingSource`."""

    def __init__(self, source: EmbeddingSource, max_bytes: int) -> None:
        self.source = source
        self.cache: MemoryEmbeddingLRU[ServedEmbedding] = MemoryEmbeddingLRU(int(max_bytes))
        self._memo: OrderedDict[str, str] = OrderedDict()  # (tenant, adapter, tiling, bytes sha256) -> key
        self._lock = threading.Lock()  # makes the eviction count of one put exact; guards the memo
        for counter in (metrics.CACHE_HITS, metrics.CACHE_MISSES, metrics.CACHE_EVICTIONS):
            counter.labels(cache=CACHE_LABEL)  # export the series at 0
        metrics.CACHE_BYTES.labels(cache=CACHE_LABEL).set(0)

    def fetch(self, tenant: str, *, key: str = "", image: bytes = b"", adapter: str = "",
              tiling: TilingRequest | None = None, call: CallOptions | None = None) -> Fetched:
        """The embedding a request decodes against (see the module docstring for the rules).

        ``adapter`` is the exact encoder-side adapter ("name:N") to embed with, "" for base embeddings.
        """
        call = call or CallOptions()
        re_embed = False
        if key:
            check_key(key)
            found = self._local(tenant, key)
            if found is not None:
                return Fetched(key, found, False, "local")
            try:
                return Fetched(key, self._remote(tenant, key, call), False, "encoder")
            except NotFound:
                if not image:
                    raise NotFound(f"embedding {key} is not held by the encoder any more (evicted, expired or the "
                                   "encoder restarted); send the image with the request (or Embed it again)",
                                   field="embedding_key") from None
                re_embed = True
        elif not image:
            raise InvalidInput("give the image, an embedding_key from EncoderService.Embed, or both", field="image")
        memo_key = _memo_key(tenant, image, adapter, tiling)
        if not re_embed:
            with self._lock:
                known = self._memo.get(memo_key)
            if known is not None:
                found = self._local(tenant, known)
                if found is not None:
                    return Fetched(known, found, False, "local")
        new_key = self.source.embed(tenant, image, adapter=adapter, tiling=tiling, call=call)
        with self._lock:
            self._memo[memo_key] = new_key
            self._memo.move_to_end(memo_key)
            while len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)
        found = self._local(tenant, new_key)
        if found is None:
            found = self._remote(tenant, new_key, call)
        return Fetched(new_key, found, re_embed, "embedded")

    def _local(self, tenant: str, key: str) -> ServedEmbedding | None:
        found = self.cache.get(_cache_key(tenant, key))
        (metrics.CACHE_HITS if found is not None else metrics.CACHE_MISSES).labels(cache=CACHE_LABEL).inc()
        return found

    def _remote(self, tenant: str, key: str, call: CallOptions) -> ServedEmbedding:
        value = self.source.get(tenant, key, call=call)
        with self._lock:
            before = self.cache.evictions
            self.cache.put(_cache_key(tenant, key), value)
            evicted = self.cache.evictions - before
        if evicted > 0:
            metrics.CACHE_EVICTIONS.labels(cache=CACHE_LABEL).inc(evicted)
        metrics.CACHE_BYTES.labels(cache=CACHE_LABEL).set(self.cache.bytes)
        return value

    def close(self) -> None:
        self.source.close()


def _memo_key(tenant: str, image: bytes, adapter: str, tiling: TilingRequest | None) -> str:
    shape = f"{tiling.tile_size}x{tiling.overlap}" if tiling is not None else "-"
    return f"{tenant}/{adapter}/{shape}/{hashlib.sha256(image).hexdigest()}"


def _cache_key(tenant: str, key: str) -> str:
    return f"{tenant}/{key}"  # tenant names never contain "/" (validate_name)
